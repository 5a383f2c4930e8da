"""Priors p(z): each is a ``PyroModule`` whose ``forward`` returns a distribution over z.

Contract: ``prior(posterior)`` returns a distribution with ``batch_shape == ()`` and
``event_shape == (latent_dim,)``; the model's data plate broadcasts it over data points.
``posterior`` is the VAE's amortized q(z|x) as a function ``x -> Distribution``; most
priors ignore it, priors built from the encoder (VampPrior) use it.

A new prior is one class here plus one entry in :data:`PRIORS`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.nn import PyroModule, PyroParam

Posterior = Callable[[torch.Tensor], dist.Distribution]


class Prior(PyroModule):
    """Base class of priors over a ``latent_dim``-dimensional z."""

    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        if latent_dim < 1:
            raise ValueError(f"latent_dim must be positive, got {latent_dim}")
        self.latent_dim = latent_dim

    @classmethod
    def from_config(cls, config: Any, **context: Any) -> Prior:
        """Build the prior from a :class:`~pyrovae.config.TrainConfig`."""
        return cls(config.latent_dim)

    def forward(self, posterior: Posterior | None = None) -> dist.Distribution:
        """:returns: p(z), ``batch_shape == ()``, ``event_shape == (latent_dim,)``."""
        raise NotImplementedError


class StandardNormalPrior(Prior):
    """p(z) = N(0, I).

    Example::

        prior = StandardNormalPrior(latent_dim=50)
        prior().log_prob(torch.zeros(50))  # -50/2 log(2 pi) nats
    """

    def __init__(self, latent_dim: int) -> None:
        super().__init__(latent_dim)
        # buffers, so that .to(device) moves them and state_dict round-trips
        self.register_buffer("loc", torch.zeros(latent_dim))
        self.register_buffer("scale", torch.ones(latent_dim))

    def forward(self, posterior: Posterior | None = None) -> dist.Distribution:
        return dist.Normal(self.loc, self.scale).to_event(1)


class DiagonalNormalPrior(Prior):
    """p(z) = N(m, diag s^2) with learnable m and s, initialised at N(0, I).

    Example::

        prior = DiagonalNormalPrior(latent_dim=50)
    """

    def __init__(self, latent_dim: int) -> None:
        super().__init__(latent_dim)
        self.loc = PyroParam(torch.zeros(latent_dim), event_dim=1)
        self.scale = PyroParam(torch.ones(latent_dim), constraint=constraints.positive, event_dim=1)

    def forward(self, posterior: Posterior | None = None) -> dist.Distribution:
        return dist.Normal(self.loc, self.scale).to_event(1)


#: priors selectable by name from the CLI and config
PRIORS: dict[str, type[Prior]] = {
    "normal": StandardNormalPrior,
    "diagonal": DiagonalNormalPrior,
}
