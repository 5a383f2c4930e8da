"""Likelihoods p(x|z): turn decoder output into a distribution over a data point.

Contract: ``likelihood(params)`` with decoder output ``params`` of shape
``(..., data_dim)`` returns a distribution with ``event_shape == (data_dim,)``;
``likelihood.mean(params)`` is E[x|z] (what pictures show); and
``likelihood.check_support(x)`` raises :class:`~pyrovae.errors.InvalidDataError` for data
the distribution cannot score.

A new likelihood is one class here plus one entry in :data:`LIKELIHOODS`.

References:

1. Loaiza-Ganem, Cunningham (2019). The continuous Bernoulli: fixing a pervasive error in
   variational autoencoders. NeurIPS.
"""

from __future__ import annotations

from typing import Any

import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.nn import PyroModule, PyroParam
from torch.distributions.utils import broadcast_all
from torch.nn import functional as F

from pyrovae.errors import InvalidDataError


def _refuse_outside(x: torch.Tensor, outside: torch.Tensor, requirement: str, advice: str) -> None:
    """Raise :class:`InvalidDataError` naming how many values of ``x`` are ``outside``, with one."""
    if bool(outside.any()):
        example = x[outside][0].item()
        raise InvalidDataError(f"{requirement}, but {int(outside.sum())} values are not, "
                               f"e.g. {example:g}; {advice}")


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


class _LogitBernoulli(dist.Bernoulli):
    """Pyro's ``Bernoulli`` whose log density negates the cross-entropy in place.

    The same values as ``dist.Bernoulli(logits=...)``; it saves one allocation of the
    size of the decoder output (``K x N x D`` when scoring K importance samples), which is
    most of the cost beyond the networks.
    """

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        logits, value = broadcast_all(self.logits, value)
        # the cross-entropy's backward needs its inputs, not its output: in place is safe
        return F.binary_cross_entropy_with_logits(logits, value, reduction="none").neg_()


class BernoulliLikelihood(Likelihood):
    """p(x|z) = prod_d Bernoulli(x_d; sigmoid(f_d(z))) for binary data; decoder gives logits.

    Example::

        likelihood = BernoulliLikelihood()
        likelihood(torch.zeros(784)).log_prob(torch.ones(784))  # -784 log 2 nats
    """

    def forward(self, params: torch.Tensor) -> dist.Distribution:
        return _LogitBernoulli(logits=params).to_event(1)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(params)

    def check_support(self, x: torch.Tensor) -> None:
        _refuse_outside(x, (x != 0) & (x != 1),
                        "the Bernoulli likelihood needs binary data (0 or 1)",
                        "binarize the data (--binarize dynamic|static) or choose a likelihood "
                        "for grey levels (--likelihood gaussian)")


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


class PixelGaussianLikelihood(Likelihood):
    """p(x|z) = prod_d N(x_d; f_d(z), sigma_d^2) with one learned sigma per pixel.

    ``sigma_d > min_sigma``: pixels that never vary (MNIST's border) would otherwise drive
    sigma_d to 0 and the likelihood to infinity; at the floor such a pixel contributes
    ``-log(min_sigma) - log(2 pi) / 2`` nats (about 6 nats for 1e-3).

    :param data_dim: number of pixels D.
    :param sigma: initial value of every sigma_d.
    :param min_sigma: lower bound of sigma_d.

    Example::

        likelihood = PixelGaussianLikelihood(data_dim=784, sigma=0.5)
        likelihood(torch.zeros(784)).log_prob(torch.zeros(784))
    """

    def __init__(self, data_dim: int, sigma: float = 1.0, min_sigma: float = 1e-3) -> None:
        super().__init__()
        if not sigma > min_sigma > 0:
            raise ValueError(f"need sigma > min_sigma > 0, got sigma={sigma}, min_sigma={min_sigma}")
        self.data_dim = data_dim
        self.min_sigma = min_sigma
        self.sigma = PyroParam(torch.full((data_dim,), float(sigma)),
                               constraint=constraints.greater_than(min_sigma), event_dim=1)

    @classmethod
    def from_config(cls, config: Any, *, data_dim: int, **context: Any) -> PixelGaussianLikelihood:
        return cls(data_dim, sigma=config.sigma)

    def forward(self, params: torch.Tensor) -> dist.Distribution:
        return dist.Normal(params, self.sigma).to_event(1)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return params


class ContinuousBernoulliLikelihood(Likelihood):
    """p(x|z) = prod_d CB(x_d; sigmoid(f_d(z))) for grey levels in [0, 1]; decoder gives logits.

    The continuous Bernoulli CB(x; lam) = C(lam) lam^x (1 - lam)^(1 - x) is the Bernoulli
    formula with the normalising constant C(lam) that makes it a density on [0, 1]; a
    Bernoulli likelihood on grey levels omits C and is not a density. Its mean is not lam:
    :meth:`mean` returns the true E[x|z].

    Example::

        likelihood = ContinuousBernoulliLikelihood()
        likelihood(torch.zeros(784)).log_prob(torch.full((784,), 0.5))  # 0 nats: CB(0.5) is uniform

    References:

    1. Loaiza-Ganem, Cunningham (2019). The continuous Bernoulli: fixing a pervasive error in
       variational autoencoders. NeurIPS.
    """

    def forward(self, params: torch.Tensor) -> dist.Distribution:
        return dist.ContinuousBernoulli(logits=params).to_event(1)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return dist.ContinuousBernoulli(logits=params).mean

    def check_support(self, x: torch.Tensor) -> None:
        _refuse_outside(x, (x < 0) | (x > 1),
                        "the continuous Bernoulli likelihood needs data in [0, 1]",
                        "rescale the data or choose a likelihood on the real line "
                        "(--likelihood gaussian)")


#: likelihoods selectable by name from the CLI and config
LIKELIHOODS: dict[str, type[Likelihood]] = {
    "bernoulli": BernoulliLikelihood,
    "continuous_bernoulli": ContinuousBernoulliLikelihood,
    "gaussian": GaussianLikelihood,
    "gaussian_pixel": PixelGaussianLikelihood,
}
