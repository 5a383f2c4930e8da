"""Saving and loading runs: model parameters, optimizer state, progress, RNG states and
config in one file.

Checkpoints hold only tensors and plain Python values, so they load with
``torch.load(weights_only=True)``: no code in a checkpoint is ever executed.
Writes are atomic (temporary file, fsync, rename), so a crash during a write leaves the
previous checkpoint intact.
"""

from __future__ import annotations

import os
import pickle
import random
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pyrovae.config import TrainConfig, build_vae
from pyrovae.errors import CheckpointError
from pyrovae.models import VAE

CHECKPOINT_NAME = "checkpoint.pt"
BEST_CHECKPOINT_NAME = "checkpoint_best.pt"
HISTORY_DIR = "checkpoints"
FORMAT_VERSION = 1


def capture_rng_state() -> dict[str, Any]:
    """The states of every RNG a run draws from: torch (CPU, CUDA), numpy and python.

    Pyro draws from torch's generators, so these cover Pyro too.  Values are tensors and
    plain Python, so they survive ``torch.load(weights_only=True)``.
    """
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)),
                  "position": int(position), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached_gaussian)},
        "python": random.getstate(),
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32),
                         numpy_state["position"], numpy_state["has_gauss"],
                         numpy_state["cached_gaussian"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    handle, tmp_name = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as tmp:
            torch.save(obj, tmp)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def save_checkpoint(path: str | Path, vae: VAE, optimizer: torch.optim.Optimizer | None,
                    epoch: int, config: TrainConfig | None,
                    image_shape: tuple[int, ...] | None = None,
                    progress: dict[str, Any] | None = None) -> None:
    """Write model parameters, optimizer state, RNG states, epoch and config to ``path`` atomically.

    :param epoch: the number of completed epochs.
    :param progress: the training loop's position (see :mod:`pyrovae.train`), for resuming.
    """
    atomic_torch_save({
        "format_version": FORMAT_VERSION,
        "epoch": epoch,
        "data_dim": vae.data_dim,
        "image_shape": list(image_shape) if image_shape is not None else None,
        "config": config.to_dict() if config is not None else None,
        "model": vae.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else {},
        "rng": capture_rng_state(),
        "progress": progress,
    }, path)


def keep_history(run_dir: Path, epoch: int, keep_last: int) -> None:
    """Copy the latest checkpoint to ``checkpoints/epoch-NNNN.pt`` and keep the newest ``keep_last``."""
    if keep_last < 1:
        return
    folder = run_dir / HISTORY_DIR
    folder.mkdir(exist_ok=True)
    target = folder / f"epoch-{epoch:04d}.pt"
    partial = target.with_suffix(".pt.tmp")
    shutil.copyfile(run_dir / CHECKPOINT_NAME, partial)
    os.replace(partial, target)
    for old in sorted(folder.glob("epoch-*.pt"))[:-keep_last]:
        old.unlink()


def mark_best(run_dir: Path) -> None:
    """Copy the latest checkpoint to ``checkpoint_best.pt`` (atomically)."""
    partial = run_dir / (BEST_CHECKPOINT_NAME + ".tmp")
    shutil.copyfile(run_dir / CHECKPOINT_NAME, partial)
    os.replace(partial, run_dir / BEST_CHECKPOINT_NAME)


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint without executing code.

    :raises CheckpointError: missing, truncated, corrupted or unsafe file.
    """
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():
            # torch warns about foreign pickle protocols before refusing them below
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"refusing to load {path}: it holds objects other than tensors and plain values, "
            f"which could run code when unpickled ({str(error).splitlines()[0]})"
        ) from None
    except Exception as error:  # a corrupted file can fail anywhere inside the unpickler
        raise CheckpointError(
            f"cannot read checkpoint {path}: truncated or corrupted ({error})"
        ) from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} is not a pyrovae checkpoint (format {FORMAT_VERSION})")
    return checkpoint


def load_vae(path: str | Path, device: str | torch.device = "cpu",
             config: TrainConfig | None = None) -> tuple[VAE, TrainConfig, dict[str, Any]]:
    """Rebuild the VAE of a checkpoint from its config and load its parameters.

    :param path: a checkpoint file or a run directory holding ``checkpoint.pt``.
    :returns: ``(vae, config, checkpoint)``; the VAE is on ``device`` in eval mode.
    """
    checkpoint = read_checkpoint(path)
    if config is None:
        if checkpoint.get("config") is None:
            raise CheckpointError(f"{path} has no config; pass the config used to train it")
        config = TrainConfig.from_dict(checkpoint["config"])
    state = checkpoint["model"]
    image_shape = checkpoint.get("image_shape")
    vae = build_vae(config, data_dim=checkpoint["data_dim"],
                    image_shape=tuple(image_shape) if image_shape is not None else None)
    try:
        vae.load_state_dict(state)
    except RuntimeError as error:
        first = str(error).splitlines()[0]
        raise CheckpointError(
            f"checkpoint {path} does not match the config (latent_dim={config.latent_dim}, "
            f"prior={config.prior}, guide={config.guide}, net={config.net}): {first}"
        ) from None
    return vae.to(device).eval(), config, checkpoint

