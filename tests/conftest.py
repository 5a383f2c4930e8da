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
