"""Likelihoods p(x|z): turn decoder output into a distribution over a data point.

Contract: ``likelihood(params)`` with decoder output ``params`` of shape
``(..., data_dim)`` returns a distribution with ``event_shape == (data_dim,)``;
``likelihood.mean(params)`` is E[x|z] (what pictures show); and
``likelihood.check_support(x)`` raises :class:`~pyrovae.errors.InvalidDataError` for data
the distribution cannot score.

A new likelihood is one class here plus one entry in :data:`LIKELIHOODS`.
"""

from __future__ import annotations

from typing import Any

import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.nn import PyroModule, PyroParam

from pyrovae.errors import InvalidDataError


class Likelihood(PyroModule):
    """Base class of observation models."""

    @classmethod
    def from_config(cls, config: Any, **context: Any) -> Likelihood:
        """Build the likelihood from a :class:`~pyrovae.config.TrainConfig`."""
        return cls()

    def forward(self, params: torch.Tensor) -> dist.Distribution:
        """:param params: decoder output ``(..., data_dim)``. :returns: p(x|z)."""
        raise NotImplementedError

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        """:returns: E[x|z], ``(..., data_dim)``."""
        raise NotImplementedError

    def check_support(self, x: torch.Tensor) -> None:
        """Raise :class:`InvalidDataError` if some value of ``x`` is outside the support."""


class BernoulliLikelihood(Likelihood):
    """p(x|z) = prod_d Bernoulli(x_d; sigmoid(f_d(z))) for binary data; decoder gives logits.

    Example::

        likelihood = BernoulliLikelihood()
        likelihood(torch.zeros(784)).log_prob(torch.ones(784))  # -784 log 2 nats
    """

    def forward(self, params: torch.Tensor) -> dist.Distribution:
        return dist.Bernoulli(logits=params).to_event(1)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(params)

    def check_support(self, x: torch.Tensor) -> None:
        outside = (x != 0) & (x != 1)
        if bool(outside.any()):
            example = x[outside][0].item()
            raise InvalidDataError(
                f"the Bernoulli likelihood needs binary data (0 or 1), but {int(outside.sum())} "
                f"values are not, e.g. {example:g}; binarize the data (--binarize dynamic|static) "
                f"or choose a likelihood for grey levels (--likelihood gaussian)"
            )


class GaussianLikelihood(Likelihood):
    """p(x|z) = N(x; f(z), sigma^2 I); sigma fixed or learned (one global scalar).

    :param sigma: the observation noise standard deviation, or its initial value when
        ``learn_sigma`` is true.
    :param learn_sigma: learn sigma by maximising the ELBO.

    Example::

        fixed = GaussianLikelihood(sigma=0.1)
        learned = GaussianLikelihood(sigma=1.0, learn_sigma=True)
    """

    def __init__(self, sigma: float = 1.0, learn_sigma: bool = False) -> None:
        super().__init__()
        if not sigma > 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        self.learn_sigma = learn_sigma
        if learn_sigma:
            self.sigma = PyroParam(torch.tensor(float(sigma)), constraint=constraints.positive)
        else:
            self.register_buffer("sigma", torch.tensor(float(sigma)))

    @classmethod
    def from_config(cls, config: Any, **context: Any) -> GaussianLikelihood:
        return cls(sigma=config.sigma, learn_sigma=config.learn_sigma)

    def forward(self, params: torch.Tensor) -> dist.Distribution:
        return dist.Normal(params, self.sigma).to_event(1)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return params


#: likelihoods selectable by name from the CLI and config
LIKELIHOODS: dict[str, type[Likelihood]] = {
    "bernoulli": BernoulliLikelihood,
    "gaussian": GaussianLikelihood,
}
