"""Where a run computes and how it is seeded: the small helpers every layer may use."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterable, Iterator

import numpy as np
import pyro
import torch
from torch import nn

from pyrovae.errors import PyrovaeError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` is ``cuda`` when CUDA is available, else ``cpu``; other names pass through.

    :raises PyrovaeError: a ``cuda`` or ``mps`` device that this machine, or this build of
        torch, does not have.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise PyrovaeError(f"device {name!r} requested but CUDA is not available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise PyrovaeError(f"device {name!r} requested but this machine has "
                               f"{torch.cuda.device_count()} CUDA device(s), cuda:0 to "
                               f"cuda:{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        built = torch.backends.mps.is_built()
        raise PyrovaeError(f"device {name!r} requested but MPS is not available here ("
                           + ("no Apple GPU found" if built else "this torch is built without "
                              "it") + "); use --device cpu")
    return device


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) through Pyro."""
    pyro.set_rng_seed(seed)


def first_device(tensors: Iterable[torch.Tensor]) -> torch.device | None:
    """The device of the first of ``tensors``, or ``None`` when there are none."""
    for tensor in tensors:
        return tensor.device
    return None


def module_device(module: nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (CPU for one that has neither)."""
    return first_device(itertools.chain(module.parameters(), module.buffers())) or \
        torch.device("cpu")


@contextlib.contextmanager
def seeded(seed: int, *indices: int, device: torch.device | None = None) -> Iterator[None]:
    """Draw from a torch RNG seeded by ``(seed, *indices)``; the global state is restored after.

    The seed is mixed by numpy's ``SeedSequence``, so nearby seeds and indices give
    unrelated streams.  Used to make a data batch's draws depend only on ``seed`` and the
    batch index, whatever else ran before (or whichever process evaluates it).
    """
    devices = [device] if device is not None and device.type == "cuda" else []
    mixed = int(np.random.SeedSequence([seed, *indices]).generate_state(2, dtype=np.uint32)
                .astype(np.uint64).dot([1, 2**32]) % 2**63)
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(mixed)
        yield
