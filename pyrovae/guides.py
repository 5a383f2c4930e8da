"""Amortized guide families q(z|x): map encoder features h to a distribution over z.

Contract: ``guide_family(h)`` with ``h`` of shape ``(..., feature_dim)`` returns a
distribution with ``batch_shape == h.shape[:-1]`` and ``event_shape == (latent_dim,)``.
The :class:`~pyrovae.models.VAE` samples it at site ``"z"`` inside the data plate.

A new family is one class here plus one entry in :data:`GUIDES`.
"""

from __future__ import annotations

from typing import Any

import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import nn
from torch.nn import functional as F

#: lower bound on posterior standard deviations; keeps log q finite in float32
MIN_SCALE = 1e-4


class GuideFamily(PyroModule):
    """Base class of amortized variational families."""

    def __init__(self, feature_dim: int, latent_dim: int) -> None:
        super().__init__()
        self.feature_dim = feature_dim
        self.latent_dim = latent_dim

    @classmethod
    def from_config(cls, config: Any, *, feature_dim: int, **context: Any) -> GuideFamily:
        """Build the family from a :class:`~pyrovae.config.TrainConfig`."""
        return cls(feature_dim, config.latent_dim)

    def forward(self, h: torch.Tensor) -> dist.Distribution:
        """:param h: features ``(..., feature_dim)``. :returns: q(z|x), event ``(latent_dim,)``."""
        raise NotImplementedError


class DiagonalNormalGuide(GuideFamily):
    """q(z|x) = N(z_loc(h), diag z_scale(h)^2) with affine heads on the encoder features.

    ``z_scale = softplus(linear(h)) + MIN_SCALE``.

    Example::

        family = DiagonalNormalGuide(feature_dim=200, latent_dim=50)
        q = family(torch.randn(100, 200))  # batch (100,), event (50,)
    """

    def __init__(self, feature_dim: int, latent_dim: int) -> None:
        super().__init__(feature_dim, latent_dim)
        self.loc_head = nn.Linear(feature_dim, latent_dim)
        self.scale_head = nn.Linear(feature_dim, latent_dim)

    def z_loc_scale(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:returns: ``(z_loc, z_scale)``, each ``(..., latent_dim)``."""
        return self.loc_head(h), F.softplus(self.scale_head(h)) + MIN_SCALE

    def forward(self, h: torch.Tensor) -> dist.Distribution:
        z_loc, z_scale = self.z_loc_scale(h)
        return dist.Normal(z_loc, z_scale).to_event(1)


#: guide families selectable by name from the CLI and config
GUIDES: dict[str, type[GuideFamily]] = {
    "diagonal": DiagonalNormalGuide,
}
