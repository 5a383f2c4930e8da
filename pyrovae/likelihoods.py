"""Likelihoods p(x|z): turn decoder output into a distribution over a data point.

Contract: ``likelihood(params)`` with decoder output ``params`` of shape
``(..., data_dim)`` returns a distribution with ``event_shape == (data_dim,)``;
``likelihood.mean(params)`` is E[x|z] (what pictures show); and
``likelihood.check_support(x)`` raises :class:`~pyrovae.errors.InvalidDataError` for data
the distribution cannot score.

A likelihood whose decoder gives several numbers per data value (a location and a scale, a
mixture's weights, locations and scales) says so in ``params_per_value`` P: its decoder then
outputs ``(..., P * data_dim)``, read as ``(..., P, data_dim)``, the p-th block of
``data_dim`` numbers the p-th parameter of every value.  A likelihood that is a probability
mass function over the data's values (not a density) says how many values each takes in
``num_levels``, so that its log p(x) can be reported in bits per dimension as well as nats
(:func:`bits_per_dim`).

A new likelihood is one class here plus one entry in :data:`LIKELIHOODS`.

References:

1. Loaiza-Ganem, Cunningham (2019). The continuous Bernoulli: fixing a pervasive error in
   variational autoencoders. NeurIPS.
2. Salimans, Karpathy, Chen, Kingma (2017). PixelCNN++: Improving the PixelCNN with
   discretized logistic mixture likelihood and other modifications. ICLR.
3. Kingma, Salimans, Jozefowicz, Chen, Sutskever, Welling (2016). Improved variational
   inference with inverse autoregressive flow. NeurIPS.
"""

from __future__ import annotations

import math
from collections.abc import Callable
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
    """Base class of observation models.

    ``params_per_value``: the decoder outputs this many numbers per data value (1: one).
    ``num_levels``: the values each data value takes, for a likelihood that is a probability
    mass function over them (2 for binary data, 256 for 8-bit data), else ``None`` (a
    density, whose log p(x) has no bits per dimension).
    """

    params_per_value: int = 1
    num_levels: int | None = None

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

    num_levels = 2

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

    #: not a probability over the data's values: no bits per dimension
    num_levels = None

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


# --- discrete likelihoods of 8-bit data ------------------------------------------------------

#: the values of 8-bit data, read as k / 255 for k = 0..255 (how pyrovae's loaders scale them)
EIGHT_BIT_LEVELS = 256
#: log-scales are clamped into [-LOG_SCALE_BOUND, LOG_SCALE_BOUND] where they enter exp: far
#: beyond any scale that changes a bin's probability, short of exp's overflow in float32
LOG_SCALE_BOUND = 80.0


def _half_bin(num_levels: int) -> float:
    """Half the spacing of ``num_levels`` values on [0, 1]."""
    if num_levels < 2:
        raise ValueError(f"num_levels must be at least 2, got {num_levels}")
    return 0.5 / (num_levels - 1)


def _bin_edges(value: torch.Tensor, num_levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The upper and lower edges (k + 1/2) / (L - 1), (k - 1/2) / (L - 1) of each value's bin,
    from its index k: two neighbouring bins share the same rounded edge, so that their
    probabilities add up to 1 even where a scale far below float precision puts all the mass
    at that edge."""
    steps = num_levels - 1
    index = torch.round(value * steps)
    return (index + 0.5) / steps, (index - 0.5) / steps


def _edge_bins(value: torch.Tensor, half: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks of the first value (0, whose bin takes the lower tail) and the last (1, the
    upper tail)."""
    return value < half, value > 1 - half


def discretized_logistic_log_prob(value: torch.Tensor, loc: torch.Tensor, log_scale: torch.Tensor,
                                  num_levels: int = EIGHT_BIT_LEVELS) -> torch.Tensor:
    """log P(value) of a logistic distribution discretized onto ``num_levels`` values on [0, 1].

    The values are x_k = k / (L - 1), k = 0..L-1, each the centre of a bin of width
    2h = 1 / (L - 1); with F(t) = sigmoid((t - loc) / s) the logistic CDF,

        P(x_k) = F(x_k + h) - F(x_k - h)   for 0 < k < L - 1,
        P(x_0) = F(h),   P(x_(L-1)) = 1 - F(1 - h)   (the edge bins take the tails),

    so the L probabilities sum to 1.  The interior difference is computed as

        log sigmoid(a) + log sigmoid(-b) + log(1 - exp(-(a - b))),   a = (x + h - loc) / s,
        b = (x - h - loc) / s,   a - b = 2h / s,

    (sigmoid(a) - sigmoid(b) = sigmoid(a) sigmoid(-b) (1 - e^(b - a))), which has no
    cancellation: it stays finite and accurate to float rounding for any scale, tiny or large,
    and any distance of the value from ``loc``.

    :param value: data values on the grid, ``(...)``, broadcast with the parameters.
    :param loc: the logistic's location, in the units of the data.
    :param log_scale: log s, clamped to [-:data:`LOG_SCALE_BOUND`, :data:`LOG_SCALE_BOUND`].
    :param num_levels: L, the number of values (256 for 8-bit data).
    :returns: log P(value), nats, the broadcast shape.
    """
    half = _half_bin(num_levels)
    value, loc, log_scale = broadcast_all(value, loc, log_scale)
    inverse_scale = torch.exp(-log_scale.clamp(-LOG_SCALE_BOUND, LOG_SCALE_BOUND))
    upper, lower = _bin_edges(value, num_levels)
    log_below_upper = F.logsigmoid((upper - loc) * inverse_scale)  # log F(x + h)
    log_above_lower = F.logsigmoid((loc - lower) * inverse_scale)  # log (1 - F(x - h))
    log_gap = torch.log(-torch.expm1(-2 * half * inverse_scale))
    first, last = _edge_bins(value, half)
    return torch.where(first, log_below_upper,
                       torch.where(last, log_above_lower,
                                   log_below_upper + log_above_lower + log_gap))


def discretized_gaussian_log_prob(value: torch.Tensor, loc: torch.Tensor, log_scale: torch.Tensor,
                                  num_levels: int = EIGHT_BIT_LEVELS) -> torch.Tensor:
    """log P(value) of a Gaussian discretized onto ``num_levels`` values on [0, 1].

    The bins and edge tails of :func:`discretized_logistic_log_prob`, with F(t) =
    Phi((t - loc) / s) the normal CDF.  A bin above ``loc`` is scored by the reflected
    difference Phi(-b) - Phi(-a), so that both CDFs lie in the lower tail, where
    ``log_ndtr`` is accurate; the difference is taken as
    log Phi(hi) + log(1 - exp(log Phi(lo) - log Phi(hi))), in float64 and returned in the
    parameters' dtype: finite and accurate for tiny scales and values far in the tails.

    :param value: data values on the grid, ``(...)``, broadcast with the parameters.
    :param loc: the Gaussian's mean, in the units of the data.
    :param log_scale: log of its standard deviation, clamped as in the logistic.
    :param num_levels: L, the number of values (256 for 8-bit data).
    :returns: log P(value), nats, the broadcast shape.
    """
    half = _half_bin(num_levels)
    value, loc, log_scale = broadcast_all(value, loc, log_scale)
    dtype = torch.promote_types(loc.dtype, log_scale.dtype)
    inverse_scale = torch.exp(-log_scale.double().clamp(-LOG_SCALE_BOUND, LOG_SCALE_BOUND))
    upper_edge, lower_edge = _bin_edges(value.double(), num_levels)
    upper = (upper_edge - loc.double()) * inverse_scale  # a
    lower = (lower_edge - loc.double()) * inverse_scale  # b
    first, last = _edge_bins(value, half)
    above = upper + lower > 0  # the bin's centre above loc
    # Phi(a) - Phi(b) = Phi(-b) - Phi(-a): both arguments on the side of the lower tail
    high = torch.where(above, -lower, upper)
    low = torch.where(above, -upper, lower)
    log_high = torch.special.log_ndtr(high)
    interior = log_high + torch.log(-torch.expm1(torch.special.log_ndtr(low) - log_high))
    log_prob = torch.where(first, torch.special.log_ndtr(upper),
                           torch.where(last, torch.special.log_ndtr(-lower), interior))
    return log_prob.to(dtype)


def _quantize(continuous: torch.Tensor, num_levels: int) -> torch.Tensor:
    """The grid value x_k whose bin holds each draw, the edge bins taking the tails."""
    steps = num_levels - 1
    return torch.round(continuous * steps).clamp_(0, steps) / steps


class _Discretized(dist.TorchDistribution):
    """A continuous distribution on the real line discretized onto ``num_levels`` values on
    [0, 1] (bins of width 1 / (L - 1) centred on k / (L - 1), the edge bins taking the tails).

    Subclasses name their parameter tensors in ``_parameters`` (each ``batch_shape`` plus
    possibly trailing dimensions of their own) and give :meth:`log_prob`, the continuous
    survival function :meth:`_survival` and :meth:`_continuous_sample`.
    """

    arg_constraints: dict[str, constraints.Constraint] = {}
    support = constraints.unit_interval
    has_rsample = False
    _parameters: tuple[str, ...] = ()

    def __init__(self, batch_shape: torch.Size, num_levels: int,
                 validate_args: bool | None = None) -> None:
        _half_bin(num_levels)
        self.num_levels = num_levels
        super().__init__(batch_shape, validate_args=validate_args)

    def expand(self, batch_shape: torch.Size, _instance: Any = None) -> _Discretized:
        new = self._get_checked_instance(type(self), _instance)
        batch_shape = torch.Size(batch_shape)
        for name in self._parameters:
            parameter = getattr(self, name)
            setattr(new, name, parameter.expand(
                batch_shape + parameter.shape[len(self.batch_shape):]))
        new.num_levels = self.num_levels
        super(_Discretized, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def _survival(self) -> Callable[[float], torch.Tensor]:
        """t -> P(Y > t) of the continuous distribution, ``batch_shape``, with what does not
        depend on t computed once."""
        raise NotImplementedError

    def _continuous_sample(self, shape: torch.Size) -> torch.Tensor:
        raise NotImplementedError

    @property
    def mean(self) -> torch.Tensor:
        """E[X] = (1 / (L - 1)) sum_{k=1}^{L-1} P(X >= x_k), exactly, ``batch_shape``; with
        the edge bins taking the tails, P(X >= x_k) = P(Y > x_k - h)."""
        steps = self.num_levels - 1
        survival = self._survival()
        total = survival(0.5 / steps)
        for k in range(2, self.num_levels):
            total += survival((k - 0.5) / steps)
        return total / steps

    def sample(self, sample_shape: tuple[int, ...] = ()) -> torch.Tensor:
        """Draws of the continuous distribution, each replaced by the value of its bin:
        ``sample_shape + batch_shape``."""
        with torch.no_grad():
            shape = self._extended_shape(sample_shape)
            return _quantize(self._continuous_sample(shape), self.num_levels)


def _uniform_open(shape: torch.Size, like: torch.Tensor) -> torch.Tensor:
    """U(0, 1) draws kept off 0 and 1, so that their logit is finite."""
    tiny = torch.finfo(like.dtype).tiny
    return torch.rand(shape, dtype=like.dtype, device=like.device).clamp_(tiny, 1 - 1e-7)


class _DiscretizedLocScale(_Discretized):
    """A location-scale distribution discretized onto ``num_levels`` values; subclasses give
    ``_log_prob(value, loc, log_scale, num_levels)``."""

    _parameters = ("loc", "log_scale")
    _log_prob: Callable[..., torch.Tensor]

    def __init__(self, loc: torch.Tensor, log_scale: torch.Tensor,
                 num_levels: int = EIGHT_BIT_LEVELS, validate_args: bool | None = None) -> None:
        self.loc, self.log_scale = broadcast_all(loc, log_scale)
        super().__init__(self.loc.shape, num_levels, validate_args=validate_args)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        return self._log_prob(value, self.loc, self.log_scale, self.num_levels)


class DiscretizedLogistic(_DiscretizedLocScale):
    """The logistic distribution discretized onto ``num_levels`` values on [0, 1]
    (:func:`discretized_logistic_log_prob`).

    :param loc: location, any shape (broadcast with ``log_scale``: the batch shape).
    :param log_scale: log of the scale s.
    :param num_levels: L, the number of values (256: 8-bit data, read as k / 255).

    Example::

        p = DiscretizedLogistic(torch.tensor(0.5), torch.tensor(-4.0))
        levels = torch.arange(256) / 255
        p.log_prob(levels).exp().sum()  # 1
    """

    _log_prob = staticmethod(discretized_logistic_log_prob)

    def _survival(self) -> Callable[[float], torch.Tensor]:
        inverse_scale = torch.exp(-self.log_scale.clamp(-LOG_SCALE_BOUND, LOG_SCALE_BOUND))
        return lambda t: torch.sigmoid((self.loc - t) * inverse_scale)

    def _continuous_sample(self, shape: torch.Size) -> torch.Tensor:
        u = _uniform_open(shape, self.loc)
        scale = self.log_scale.clamp(-LOG_SCALE_BOUND, LOG_SCALE_BOUND).exp()
        return self.loc + scale * (torch.log(u) - torch.log1p(-u))


class DiscretizedGaussian(_DiscretizedLocScale):
    """The Gaussian discretized onto ``num_levels`` values on [0, 1]
    (:func:`discretized_gaussian_log_prob`).

    :param loc: mean, any shape (broadcast with ``log_scale``: the batch shape).
    :param log_scale: log of the standard deviation.
    :param num_levels: L, the number of values (256: 8-bit data, read as k / 255).

    Example::

        p = DiscretizedGaussian(torch.tensor(0.5), torch.tensor(-4.0))
        p.log_prob(torch.arange(256) / 255).exp().sum()  # 1
    """

    _log_prob = staticmethod(discretized_gaussian_log_prob)

    def _survival(self) -> Callable[[float], torch.Tensor]:
        # in float64, as the probabilities are computed
        inverse_scale = torch.exp(-self.log_scale.double().clamp(-LOG_SCALE_BOUND,
                                                                  LOG_SCALE_BOUND))
        loc = self.loc.double()
        return lambda t: torch.special.ndtr((loc - t) * inverse_scale).to(self.loc.dtype)

    def _continuous_sample(self, shape: torch.Size) -> torch.Tensor:
        scale = self.log_scale.clamp(-LOG_SCALE_BOUND, LOG_SCALE_BOUND).exp()
        noise = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        return self.loc + scale * noise


class DiscretizedLogisticMixture(_Discretized):
    """A mixture of K logistics discretized onto ``num_levels`` values on [0, 1]:
    P(x) = sum_j w_j P_j(x), each P_j of :class:`DiscretizedLogistic`, w = softmax(logits).

    Each data value has its own mixture; the values of one pixel's colour channels are
    independent given the parameters (PixelCNN++ [2] further couples a pixel's channels
    through linear terms, which this family leaves out).

    :param logits: mixture weights' logits ``batch_shape + (K,)``.
    :param locs: the components' locations ``batch_shape + (K,)``.
    :param log_scales: the components' log-scales ``batch_shape + (K,)``.
    :param num_levels: L, the number of values.

    Example::

        p = DiscretizedLogisticMixture(torch.zeros(3), torch.tensor([0.1, 0.5, 0.9]),
                                       torch.full((3,), -3.0))
        p.log_prob(torch.arange(256) / 255).exp().sum()  # 1
    """

    _parameters = ("logits", "locs", "log_scales")

    def __init__(self, logits: torch.Tensor, locs: torch.Tensor, log_scales: torch.Tensor,
                 num_levels: int = EIGHT_BIT_LEVELS, validate_args: bool | None = None) -> None:
        self.logits, self.locs, self.log_scales = broadcast_all(logits, locs, log_scales)
        if self.logits.dim() < 1:
            raise ValueError("a mixture needs a last dimension of components")
        super().__init__(self.logits.shape[:-1], num_levels, validate_args=validate_args)

    @property
    def log_weights(self) -> torch.Tensor:
        """log w, ``batch_shape + (K,)``."""
        return torch.log_softmax(self.logits, dim=-1)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        components = discretized_logistic_log_prob(value.unsqueeze(-1), self.locs,
                                                   self.log_scales, self.num_levels)
        return torch.logsumexp(self.log_weights + components, dim=-1)

    def _survival(self) -> Callable[[float], torch.Tensor]:
        inverse_scales = torch.exp(-self.log_scales.clamp(-LOG_SCALE_BOUND, LOG_SCALE_BOUND))
        weights = self.log_weights.exp()
        return lambda t: (weights * torch.sigmoid((self.locs - t) * inverse_scales)).sum(-1)

    def _continuous_sample(self, shape: torch.Size) -> torch.Tensor:
        batch = shape[: len(shape) - len(self.batch_shape)]
        component = dist.Categorical(logits=self.logits).sample(batch).unsqueeze(-1)
        locs = self.locs.expand(shape + self.locs.shape[-1:])
        log_scales = self.log_scales.expand(shape + self.log_scales.shape[-1:])
        loc = locs.gather(-1, component).squeeze(-1)
        scale = log_scales.gather(-1, component).squeeze(-1).clamp(
            -LOG_SCALE_BOUND, LOG_SCALE_BOUND).exp()
        u = _uniform_open(shape, self.locs)
        return loc + scale * (torch.log(u) - torch.log1p(-u))


class _DiscretizedLikelihood(Likelihood):
    """A likelihood of data on the grid k / (L - 1) (8-bit images read as k / 255), a
    probability mass function over those values: its log p(x) is a log probability, and
    ``-log p(x) / (D log 2)`` its bits per dimension.

    :param num_levels: L, the number of values each data value takes (256: 8 bits).
    """

    def __init__(self, num_levels: int = EIGHT_BIT_LEVELS) -> None:
        super().__init__()
        _half_bin(num_levels)
        self.num_levels = num_levels

    def _blocks(self, params: torch.Tensor) -> torch.Tensor:
        """``(..., P * D)`` as ``(..., P, D)``."""
        count = self.params_per_value
        if params.shape[-1] % count:
            raise ValueError(f"{type(self).__name__} reads {count} decoder outputs per data value; "
                             f"got {params.shape[-1]} outputs")
        return params.unflatten(-1, (count, params.shape[-1] // count))

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return self(params).base_dist.mean

    def check_support(self, x: torch.Tensor) -> None:
        steps = self.num_levels - 1
        scaled = x * steps
        outside = (x < 0) | (x > 1) | ((scaled - scaled.round()).abs() > 1e-3)
        _refuse_outside(x, outside,
                        f"the {type(self).__name__} scores values k/{steps}, k = 0..{steps} "
                        f"({self.num_levels} levels)",
                        "give 8-bit images read as k / 255 with --binarize none, or choose a "
                        "likelihood for continuous data (--likelihood gaussian)")


class DiscretizedLogisticLikelihood(_DiscretizedLikelihood):
    """p(x|z) = prod_d DiscretizedLogistic(x_d; mu_d(z), s_d(z)) over the 256 values of 8-bit
    data; the decoder gives a location and a log-scale per value (``params_per_value`` 2:
    locations first).  IAF-VAE's likelihood [3] with per-value scales.

    Example::

        likelihood = DiscretizedLogisticLikelihood()
        likelihood(torch.zeros(2 * 784)).log_prob(torch.zeros(784))  # log P, nats
    """

    params_per_value = 2

    def forward(self, params: torch.Tensor) -> dist.Distribution:
        loc, log_scale = self._blocks(params).unbind(-2)
        return DiscretizedLogistic(loc, log_scale, self.num_levels).to_event(1)


class DiscretizedGaussianLikelihood(_DiscretizedLikelihood):
    """p(x|z) = prod_d DiscretizedGaussian(x_d; mu_d(z), s_d(z)) over the 256 values of 8-bit
    data: a Gaussian integrated over each value's bin; the decoder gives a mean and a log
    standard deviation per value (``params_per_value`` 2: means first).

    Example::

        likelihood = DiscretizedGaussianLikelihood()
        likelihood(torch.zeros(2 * 784)).log_prob(torch.zeros(784))  # log P, nats
    """

    params_per_value = 2

    def forward(self, params: torch.Tensor) -> dist.Distribution:
        loc, log_scale = self._blocks(params).unbind(-2)
        return DiscretizedGaussian(loc, log_scale, self.num_levels).to_event(1)


#: mixture components of the discretized logistic mixture by default (PixelCNN++'s 10)
LOGISTIC_MIXTURE_COMPONENTS = 10


class DiscretizedLogisticMixtureLikelihood(_DiscretizedLikelihood):
    """p(x|z) = prod_d sum_j w_dj(z) DiscretizedLogistic(x_d; mu_dj(z), s_dj(z)) over the 256
    values of 8-bit data, the likelihood of PixelCNN++ [2] (without its coupling of colour
    channels) and of NVAE's decoders.  The decoder gives, per value, K weight logits, K
    locations and K log-scales: ``params_per_value`` 3K, in that order, each block of K
    components by D values.

    :param num_components: K.
    :param num_levels: the number of values (256).

    Example::

        likelihood = DiscretizedLogisticMixtureLikelihood(num_components=5)
        likelihood(torch.zeros(15 * 784)).log_prob(torch.zeros(784))  # log P, nats
    """

    def __init__(self, num_components: int = LOGISTIC_MIXTURE_COMPONENTS,
                 num_levels: int = EIGHT_BIT_LEVELS) -> None:
        super().__init__(num_levels)
        if num_components < 1:
            raise ValueError(f"num_components must be positive, got {num_components}")
        self.num_components = num_components
        self.params_per_value = 3 * num_components

    @classmethod
    def from_config(cls, config: Any, **context: Any) -> DiscretizedLogisticMixtureLikelihood:
        return cls(num_components=getattr(config, "logistic_components",
                                          LOGISTIC_MIXTURE_COMPONENTS))

    def forward(self, params: torch.Tensor) -> dist.Distribution:
        blocks = self._blocks(params)  # (..., 3K, D)
        blocks = blocks.unflatten(-2, (3, self.num_components)).movedim(-2, -1)  # (..., 3, D, K)
        logits, locs, log_scales = blocks.unbind(-3)
        return DiscretizedLogisticMixture(logits, locs, log_scales, self.num_levels).to_event(1)


def bits_per_dim(log_px: float, data_dim: int) -> float:
    """-log p(x) / (D log 2): a log probability of D discrete values in nats as bits per
    value, the unit image models report (only meaningful for a probability mass function
    over the data's values, a likelihood with ``num_levels``)."""
    return -log_px / (data_dim * math.log(2))


#: likelihoods selectable by name from the CLI and config
LIKELIHOODS: dict[str, type[Likelihood]] = {
    "bernoulli": BernoulliLikelihood,
    "bernoulli_grey": GreyLevelBernoulliLikelihood,
    "continuous_bernoulli": ContinuousBernoulliLikelihood,
    "discretized_gaussian": DiscretizedGaussianLikelihood,
    "discretized_logistic": DiscretizedLogisticLikelihood,
    "discretized_logistic_mixture": DiscretizedLogisticMixtureLikelihood,
    "gaussian": GaussianLikelihood,
    "gaussian_pixel": PixelGaussianLikelihood,
}
