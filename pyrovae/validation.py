"""Checks run at public entry points, so that bad data fails with a message, not deep in Pyro."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from pyrovae.errors import InvalidDataError

if TYPE_CHECKING:
    from pyrovae.likelihoods import Likelihood


def check_data(x: object, data_dim: int | None = None, likelihood: Likelihood | None = None,
               name: str = "x") -> torch.Tensor:
    """Validate a batch of data points and return it unchanged.

    :param x: expected a floating-point tensor of shape ``(N, data_dim)`` with ``N >= 1``.
    :param data_dim: the size of one data point, or ``None`` to skip that check.
    :param likelihood: if given, its :meth:`~pyrovae.likelihoods.Likelihood.check_support`
        is applied.
    :param name: how the data is called in error messages.
    :raises InvalidDataError: naming the first problem found.
    """
    if not isinstance(x, torch.Tensor):
        raise InvalidDataError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise InvalidDataError(
            f"{name} must have a floating-point dtype, got {x.dtype}; convert it with x.float()"
        )
    if x.dim() != 2:
        raise InvalidDataError(
            f"{name} must have shape (N, data_dim), got shape {tuple(x.shape)}; "
            f"flatten images with x.reshape(len(x), -1)"
        )
    if x.shape[0] == 0:
        raise InvalidDataError(f"{name} is empty: shape {tuple(x.shape)}")
    if data_dim is not None and x.shape[1] != data_dim:
        raise InvalidDataError(
            f"{name} has {x.shape[1]} values per data point but the model expects {data_dim}: "
            f"shape {tuple(x.shape)}"
        )
    # a NaN or an infinity makes the sum non-finite, so a finite sum clears the data in one
    # pass without a mask of its size; a non-finite sum (or an overflow) looks element-wise
    if not bool(torch.isfinite(x.sum())) and not bool((finite := torch.isfinite(x)).all()):
        bad = int((~finite).sum())
        kind = "NaN" if bool(torch.isnan(x).any()) else "infinite"
        raise InvalidDataError(f"{name} contains {bad} non-finite values ({kind})")
    if likelihood is not None:
        likelihood.check_support(x)
    return x
