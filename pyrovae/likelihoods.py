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

import math
from typing import Any

import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.nn import PyroParam
from torch.distributions.utils import broadcast_all
from torch.nn import functional as F

from pyrovae.errors import InvalidDataError
from pyrovae.registration import LeanPyroModule


def _refuse_outside(x: torch.Tensor, outside: torch.Tensor, requirement: str, advice: str) -> None:
    """Raise :class:`InvalidDataError` naming how many values of ``x`` are ``outside``, with one."""
    if bool(outside.any()):
        example = x[outside][0].item()
        raise InvalidDataError(f"{requirement}, but {int(outside.sum())} values are not, "
                               f"e.g. {example:g}; {advice}")


class Likelihood(LeanPyroModule):
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


class _BernoulliLogDensity(torch.autograd.Function):
    """log Bernoulli(value; sigmoid(logits)) = value * logits - softplus(logits), elementwise.

    On a CPU, torch's ``binary_cross_entropy_with_logits`` (and ``softplus``,
    ``logsigmoid``) go through a ``log1p`` that this build does not vectorise; the same
    value written as ``value * l - max(l, 0) - log(1 + exp(-|l|))`` uses the vectorised
    ``exp`` and ``log`` and runs several times faster on the ``K x N x D`` decoder outputs
    of importance sampling.  ``log(1 + t)`` for t in (0, 1] is within one float rounding of
    ``log1p(t)`` in absolute terms (its relative precision goes for |l| beyond ~17 in
    float32, where the term is below the rounding of the rest).  The gradient is written
    out: d/dl = value - sigmoid(l), d/dvalue = l.
    """

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(logits, value)
        log_prob = logits.abs().neg_().exp_().add_(1).log_()
        return log_prob.add_(logits.clamp(min=0)).sub_(logits * value).neg_()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        logits, value = ctx.saved_tensors
        grad_logits = grad * (value - torch.sigmoid(logits)) if ctx.needs_input_grad[0] else None
        grad_value = grad * logits if ctx.needs_input_grad[1] else None
        return grad_logits, grad_value


def bernoulli_log_prob(logits: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Elementwise log Bernoulli(value; sigmoid(logits)) in nats, broadcast; also the
    negative cross-entropy for grey-level ``value`` in [0, 1].  One fused kernel on a GPU,
    the vectorised form of :class:`_BernoulliLogDensity` on a CPU."""
    logits, value = broadcast_all(logits, value)
    if logits.device.type == "cpu":
        return _BernoulliLogDensity.apply(logits, value)
    # the cross-entropy's backward needs its inputs, not its output: in place is safe
    return F.binary_cross_entropy_with_logits(logits, value, reduction="none").neg_()


class _LogitBernoulli(dist.Bernoulli):
    """Pyro's ``Bernoulli`` scored by :func:`bernoulli_log_prob`: the same values as
    ``dist.Bernoulli(logits=...)``, without the allocations and the scalar ``log1p`` of
    torch's cross-entropy on the ``K x N x D`` decoder outputs."""

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        return bernoulli_log_prob(self.logits, value)


def logit_clip_of_probability_clip(epsilon: float) -> float:
    """The logit bound ``log((1 - epsilon) / epsilon)`` at which a Bernoulli probability
    is clamped to ``[epsilon, 1 - epsilon]`` (``epsilon`` in (0, 1/2))."""
    if not 0 < epsilon < 0.5:
        raise ValueError(f"epsilon must be in (0, 1/2), got {epsilon}")
    return math.log((1 - epsilon) / epsilon)


class BernoulliLikelihood(Likelihood):
    """p(x|z) = prod_d Bernoulli(x_d; sigmoid(f_d(z))) for binary data; decoder gives logits.

    With ``logit_clip`` C the logits are clamped to [-C, C] first, in training, evaluation
    and sampling alike, and get no gradient beyond it: each pixel's probability lies in
    [sigmoid(-C), sigmoid(C)], and a confidently wrong pixel costs at most log(1 + e^C) nats.
    Tomczak & Welling's ``log_Bernoulli`` clamps the probability to [1e-5, 1 - 1e-5], C =
    :func:`logit_clip_of_probability_clip` ``(1e-5)`` = 11.51.

    :param logit_clip: the bound C, positive; ``None``: no clamp.

    Example::

        likelihood = BernoulliLikelihood()
        likelihood(torch.zeros(784)).log_prob(torch.ones(784))  # -784 log 2 nats
        clipped = BernoulliLikelihood(logit_clip=logit_clip_of_probability_clip(1e-5))
        clipped(torch.tensor([-50.0])).log_prob(torch.ones(1))  # log 1e-5 = -11.51 nats

    References:

    1. Tomczak, Welling (2018). VAE with a VampPrior. AISTATS.
    """

    def __init__(self, logit_clip: float | None = None) -> None:
        super().__init__()
        if logit_clip is not None and not (math.isfinite(logit_clip) and logit_clip > 0):
            raise ValueError(f"logit_clip must be a positive number, got {logit_clip}")
        self.logit_clip = None if logit_clip is None else float(logit_clip)

    @classmethod
    def from_config(cls, config: Any, **context: Any) -> BernoulliLikelihood:
        return cls(logit_clip=getattr(config, "bernoulli_logit_clip", None))

    def _logits(self, params: torch.Tensor) -> torch.Tensor:
        if self.logit_clip is None:
            return params
        return params.clamp(-self.logit_clip, self.logit_clip)

    def forward(self, params: torch.Tensor) -> dist.Distribution:
        return _LogitBernoulli(logits=self._logits(params)).to_event(1)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self._logits(params))

    def check_support(self, x: torch.Tensor) -> None:
        _refuse_outside(x, (x != 0) & (x != 1),
                        "the Bernoulli likelihood needs binary data (0 or 1)",
                        "binarize the data (--binarize dynamic|static) or choose a likelihood "
                        "for grey levels (--likelihood gaussian)")


class _GreyLevelBernoulli(_LogitBernoulli):
    """:class:`_LogitBernoulli` that scores any value in [0, 1] (its samples stay 0 or 1)."""

    support = constraints.unit_interval


class GreyLevelBernoulliLikelihood(BernoulliLikelihood):
    """The Bernoulli likelihood's score applied to grey levels x in [0, 1]:

        log p(x|z) = sum_d x_d f_d(z) - softplus(f_d(z)),

    the negative cross-entropy between the image and the decoder's pixel probabilities.  It
    is not a normalised density over [0, 1] (the continuous Bernoulli is), so its "log p(x)"
    is no likelihood of the grey-level images; it is the training target of many VAEs on
    grey-level MNIST, Pyro's semi-supervised example among them.  On binary data it equals
    :class:`BernoulliLikelihood`.

    :param logit_clip: as :class:`BernoulliLikelihood`'s.
    """

    def forward(self, params: torch.Tensor) -> dist.Distribution:
        return _GreyLevelBernoulli(logits=self._logits(params)).to_event(1)

    def check_support(self, x: torch.Tensor) -> None:
        _refuse_outside(x, (x < 0) | (x > 1),
                        "the grey-level Bernoulli likelihood needs data in [0, 1]",
                        "scale the data to [0, 1]")


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


#: |logit| below which the continuous Bernoulli's normaliser and mean use their series:
#: the closed forms cancel there, and at this bound the series are exact in float64
_CB_SERIES_BOUND = 0.5
#: log C(eta) - log 2 = sum_n c_n eta^(2n), n = 1..7 (Taylor series of log(eta / tanh(eta / 2)))
_CB_LOG_NORMALIZER_SERIES = (1 / 12, -7 / 1440, 31 / 90720, -127 / 4838400, 73 / 34214400,
                             -1414477 / 7846046208000, 8191 / 523069747200)
#: E[x] - 1/2 = eta * sum_n m_n eta^(2n), n = 0..6 (Taylor series of coth(eta / 2) / 2 - 1 / eta)
_CB_MEAN_SERIES = (1 / 12, -1 / 720, 1 / 30240, -1 / 1209600, 1 / 47900160,
                   -691 / 1307674368000, 1 / 74724249600)


def _even_series(coefficients: tuple[float, ...], square: torch.Tensor) -> torch.Tensor:
    """sum_n coefficients[n] * square^n by Horner's rule, ``square`` ``(...)``."""
    total = torch.full_like(square, coefficients[-1])
    for coefficient in reversed(coefficients[:-1]):
        total = total * square + coefficient
    return total


def continuous_bernoulli_log_normalizer(logits: torch.Tensor) -> torch.Tensor:
    """log C of the continuous Bernoulli as a function of its logit eta = logit(lam).

    C(lam) = 2 artanh(1 - 2 lam) / (1 - 2 lam), and with 1 - 2 lam = -tanh(eta / 2),

        log C(eta) = log(eta / tanh(eta / 2)) = log 2 + eta^2 / 12 - 7 eta^4 / 1440 + ...,

    even in eta, log 2 at 0 and log abs(eta) + O(exp(-abs(eta))) in the tails.  Computed from the
    logit alone, so it stays consistent with the data term eta x - softplus(eta) for every
    eta (torch's ``ContinuousBernoulli`` clamps lam first, and its density no longer
    integrates to 1 past abs(eta) ~ 16 in float32).  Finite with finite gradients in float32
    and float64 for every finite eta.

    :param logits: eta, ``(...)``.
    :returns: log C(eta), ``(...)``, nats.
    """
    magnitude = logits.abs()
    small = magnitude < _CB_SERIES_BOUND
    # each branch gets inputs at which it is finite, so torch.where passes finite gradients
    square = torch.where(small, logits, torch.zeros_like(logits)).square()
    series = math.log(2.0) + square * _even_series(_CB_LOG_NORMALIZER_SERIES, square)
    large = torch.where(small, torch.full_like(magnitude, _CB_SERIES_BOUND), magnitude)
    # the ratio is in [2, inf) and its log does not cancel; tanh(large / 2) rounds to 1 in the tails
    closed = torch.log(large / torch.tanh(large / 2))
    return torch.where(small, series, closed)


def continuous_bernoulli_mean(logits: torch.Tensor) -> torch.Tensor:
    """E[x] of the continuous Bernoulli with logit eta.

    E[x] = lam / (2 lam - 1) + 1 / (2 artanh(1 - 2 lam)) = 1/2 + coth(eta / 2) / 2 - 1 / eta,
    which is 1/2 + eta / 12 - eta^3 / 720 + ... near eta = 0 and 1 - 1 / eta for large eta.

    :param logits: eta, ``(...)``.
    :returns: E[x], ``(...)``, in (0, 1).
    """
    small = logits.abs() < _CB_SERIES_BOUND
    near = torch.where(small, logits, torch.zeros_like(logits))
    series = 0.5 + near * _even_series(_CB_MEAN_SERIES, near.square())
    far = torch.where(small, torch.full_like(logits, _CB_SERIES_BOUND), logits)
    closed = 0.5 + 0.5 / torch.tanh(far / 2) - far.reciprocal()
    return torch.where(small, series, closed)


class ContinuousBernoulli(dist.TorchDistribution):
    """The continuous Bernoulli on [0, 1], parametrised by its logit, normalised for every logit.

        log CB(x; eta) = log C(eta) + eta x - softplus(eta),   x in [0, 1],

    with log C from :func:`continuous_bernoulli_log_normalizer`.  The same density as
    ``torch.distributions.ContinuousBernoulli(logits=eta)`` where torch's clamping of
    lam = sigmoid(eta) is inactive, and a normalised one where it is not.

    :param logits: eta, any shape; it is the batch shape.

    Example::

        cb = ContinuousBernoulli(logits=torch.tensor([0.0, 50.0]))
        cb.log_prob(torch.tensor([0.3, 1.0]))  # [0, log 50] nats
        cb.mean  # [0.5, 0.98]

    References:

    1. Loaiza-Ganem, Cunningham (2019). The continuous Bernoulli: fixing a pervasive error in
       variational autoencoders. NeurIPS.
    """

    arg_constraints = {"logits": constraints.real}
    support = constraints.unit_interval
    has_rsample = True

    def __init__(self, logits: torch.Tensor, validate_args: bool | None = None) -> None:
        self.logits = logits
        super().__init__(logits.shape, validate_args=validate_args)

    def expand(self, batch_shape: torch.Size, _instance: Any = None) -> ContinuousBernoulli:
        new = self._get_checked_instance(ContinuousBernoulli, _instance)
        batch_shape = torch.Size(batch_shape)
        new.logits = self.logits.expand(batch_shape)
        super(ContinuousBernoulli, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def mean(self) -> torch.Tensor:
        return continuous_bernoulli_mean(self.logits)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        logits, value = broadcast_all(self.logits, value)
        # eta x - softplus(eta), stably for any eta
        return bernoulli_log_prob(logits, value) + continuous_bernoulli_log_normalizer(logits)

    def rsample(self, sample_shape: tuple[int, ...] = ()) -> torch.Tensor:
        """Inverse-CDF draws, differentiable in the logits: ``sample_shape + batch_shape``.

        x = log1p(u expm1(eta)) / eta for u ~ U(0, 1), evaluated at -abs(eta) and reflected
        (x -> 1 - x, u -> 1 - u) for positive eta, so that expm1 cannot overflow.
        """
        shape = self._extended_shape(sample_shape)
        logits = self.logits.expand(shape)
        u = torch.rand(shape, dtype=logits.dtype, device=logits.device)
        positive = logits > 0
        u = torch.where(positive, 1 - u, u)
        negative_logits = -logits.abs()
        # at eta = 0 the distribution is uniform: x = u (a safe divisor keeps gradients finite)
        zero = negative_logits == 0
        safe = torch.where(zero, -torch.ones_like(negative_logits), negative_logits)
        x = torch.where(zero, u, torch.log1p(u * torch.expm1(safe)) / safe)
        return torch.where(positive, 1 - x, x).clamp(0, 1)

    def sample(self, sample_shape: tuple[int, ...] = ()) -> torch.Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape)


class ContinuousBernoulliLikelihood(Likelihood):
    """p(x|z) = prod_d CB(x_d; sigmoid(f_d(z))) for grey levels in [0, 1]; decoder gives logits.

    The continuous Bernoulli CB(x; lam) = C(lam) lam^x (1 - lam)^(1 - x) is the Bernoulli
    formula with the normalising constant C(lam) that makes it a density on [0, 1]; a
    Bernoulli likelihood on grey levels omits C and is not a density. Its mean is not lam:
    :meth:`mean` returns the true E[x|z].  Both come from the logits alone
    (:class:`ContinuousBernoulli`), so the density stays normalised for confident decoders.

    Example::

        likelihood = ContinuousBernoulliLikelihood()
        likelihood(torch.zeros(784)).log_prob(torch.full((784,), 0.5))  # 0 nats: CB(0.5) is uniform

    References:

    1. Loaiza-Ganem, Cunningham (2019). The continuous Bernoulli: fixing a pervasive error in
       variational autoencoders. NeurIPS.
    """

    def forward(self, params: torch.Tensor) -> dist.Distribution:
        return ContinuousBernoulli(logits=params).to_event(1)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return continuous_bernoulli_mean(params)

    def check_support(self, x: torch.Tensor) -> None:
        _refuse_outside(x, (x < 0) | (x > 1),
                        "the continuous Bernoulli likelihood needs data in [0, 1]",
                        "rescale the data or choose a likelihood on the real line "
                        "(--likelihood gaussian)")


#: likelihoods selectable by name from the CLI and config
LIKELIHOODS: dict[str, type[Likelihood]] = {
    "bernoulli": BernoulliLikelihood,
    "bernoulli_grey": GreyLevelBernoulliLikelihood,
    "continuous_bernoulli": ContinuousBernoulliLikelihood,
    "gaussian": GaussianLikelihood,
    "gaussian_pixel": PixelGaussianLikelihood,
}
