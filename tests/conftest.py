"""Shared fixtures: a clean Pyro parameter store, seeded RNGs and validation on for every test."""

from __future__ import annotations

import os
from pathlib import Path

import pyro
import pytest
import torch

#: the offline datasets shipped beside the repository (see ../shared/data/README.md)
SHARED_DATA = Path(
    os.environ.get("PYROVAE_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)

requires_mnist = pytest.mark.skipif(
    not (SHARED_DATA / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file(),
    reason=f"real MNIST not found in {SHARED_DATA} (set PYROVAE_TEST_DATA to a folder holding MNIST/raw)",
)
requires_binarized_mnist = pytest.mark.skipif(
    not (SHARED_DATA / "binarized_mnist.npz").is_file(),
    reason=f"binarized_mnist.npz not found in {SHARED_DATA} (set PYROVAE_TEST_DATA)",
)


@pytest.fixture(autouse=True)
def clean_pyro_state():
    """Every test starts with an empty param store, seed 0, validation on, and 2 threads."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    pyro.enable_validation(True)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield
    pyro.clear_param_store()


@pytest.fixture
def shared_data() -> Path:
    return SHARED_DATA


# --- a tiny synthetic dataset, for CLI, run and resume tests without the MNIST files -----------

#: the synthetic dataset's sizes: 8x8 grey images, 120 to train on and 40 to test
SYNTHETIC_SIDE, SYNTHETIC_TRAIN, SYNTHETIC_TEST = 8, 120, 40


def write_synthetic_dataset(path: Path, *, num_train: int = SYNTHETIC_TRAIN,
                            num_test: int = SYNTHETIC_TEST, side: int = SYNTHETIC_SIDE,
                            seed: int = 0) -> Path:
    """Write an ``npz`` dataset (``--dataset npz:PATH``) of grey ``side`` x ``side`` images.

    Each image is one of four strokes (a row, a column, a diagonal, a ring) at a random
    position, blurred by noise and clipped to [0, 1]: structure a VAE learns in a few steps,
    in files a test writes in milliseconds.

    :returns: ``path``, holding float32 arrays ``train`` ``(num_train, side, side)`` and
        ``test`` ``(num_test, side, side)``.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:side, 0:side]

    def images(count: int) -> np.ndarray:
        out = np.empty((count, side, side), dtype=np.float32)
        for i in range(count):
            kind, at = rng.integers(4), rng.integers(1, side - 1)
            if kind == 0:
                stroke = rows == at
            elif kind == 1:
                stroke = cols == at
            elif kind == 2:
                stroke = (rows - cols) == at - side // 2
            else:
                stroke = np.abs(np.hypot(rows - side / 2 + 0.5, cols - side / 2 + 0.5) - at / 2) < 0.7
            noisy = 0.85 * stroke + 0.1 + 0.1 * rng.standard_normal((side, side))
            out[i] = np.clip(noisy, 0.0, 1.0)
        return out

    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, train=images(num_train), test=images(num_test))
    return path


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory) -> str:
    """``--dataset`` for a tiny synthetic dataset (:func:`write_synthetic_dataset`):
    ``npz:/tmp/.../synthetic.npz``, written once per test session."""
    folder = tmp_path_factory.mktemp("synthetic")
    return f"npz:{write_synthetic_dataset(folder / 'synthetic.npz')}"
