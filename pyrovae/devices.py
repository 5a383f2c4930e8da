"""Where a run computes and how it is seeded: the small helpers every layer may use."""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import pyro
import torch
from torch import nn

from pyrovae.errors import PyrovaeError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` is ``cuda`` when CUDA is available, else ``cpu``; other names pass through."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PyrovaeError(f"device {name!r} requested but CUDA is not available here")
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
