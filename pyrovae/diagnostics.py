"""How far to trust an importance-sampled log p(x): effective sample size and Pareto k-hat.

For one data point with log weights log w_k = log p(x, z_k) - log q(z_k|x), k = 1..K:

* the effective sample size of the self-normalized weights w̄_k = w_k / sum_j w_j,

      ESS = 1 / sum_k w̄_k^2,   1 <= ESS <= K,

  is K when every weight is equal (q(z|x) is the exact posterior) and near 1 when one
  weight dominates;
* k-hat, the shape of a generalized Pareto distribution fitted to the largest weights
  (PSIS, Vehtari et al. 2024), estimates how heavy the tail of the weights is: the
  weights have finite variance for k < 1/2, and for k > 0.7 the estimate of log p(x)
  converges too slowly to be trusted at any practical K.

:func:`importance_summary` streams the data in batches and the samples in chunks, so
memory stays at ``batch_size * chunk_size`` decoder outputs plus ``K * batch_size`` log
weights, whatever N is; from one pass it gives the IWAE bound at several K (nested
prefixes of the same K_max draws), the ELBO, per-point Monte Carlo errors and the
diagnostics above.

Sign convention of ArviZ: ``arviz.psislw`` (ArviZ < 1) takes log importance *ratios*
and fits the tail of the largest ones, so it is given ``+log w``; PSIS-LOO calls it with
``-log_likelihood``.  ``arviz_stats.base.array_stats.psislw`` (ArviZ >= 1) takes the
log-likelihood and negates it internally, so it is given ``-log w``.  Both are checked in
``tests/test_diagnostics.py`` on Gaussian weights with a known tail index.

References:

1. Vehtari, Simpson, Gelman, Yao, Gabry (2024). Pareto Smoothed Importance Sampling.
   JMLR 25(72).
2. Kong (1992). A note on importance sampling using standardized weights. Technical
   report 348, Department of Statistics, University of Chicago.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pyrovae.evaluation import default_chunk_size, importance_log_weights
from pyrovae.programs import as_data, as_program, evaluates

#: k-hat above which an importance-sampling estimate is flagged unreliable (Vehtari et al. 2024)
KHAT_THRESHOLD = 0.7
#: fewer samples than this leave fewer than 5 points in the tail: k-hat is NaN
MIN_SAMPLES_FOR_KHAT = 25
#: log weights spread over less than this many units in the last place (ulps, in their own
#: dtype) of their largest magnitude are constant: k-hat is -inf.  With the exact posterior as
#: the guide, rounding alone spreads float32 log weights over up to ~30 ulps.
CONSTANT_SPREAD_ULPS = 512


def effective_sample_size(log_weights: torch.Tensor) -> torch.Tensor:
    """Kish's effective sample size of self-normalized importance weights.

    ESS = (sum_k w_k)^2 / sum_k w_k^2, computed in log space for stability.

    :param log_weights: ``(K, N)`` log weights.
    :returns: ``(N,)`` ESS, between 1 and K.
    """
    log_weights = log_weights.double()
    return torch.exp(2 * torch.logsumexp(log_weights, 0) - torch.logsumexp(2 * log_weights, 0))


def _psis_khat(log_weights: np.ndarray) -> np.ndarray:
    """k-hat along the last axis of ``(..., K)`` log importance ratios, with either ArviZ."""
    with warnings.catch_warnings():
        # arviz 0.x announces its refactor with a FutureWarning at import
        warnings.simplefilter("ignore", FutureWarning)
        import arviz

    if int(arviz.__version__.split(".")[0]) < 1:
        _, khat = arviz.psislw(log_weights)
    else:  # ArviZ >= 1; tested where arviz-stats is installed
        from arviz_stats.base import array_stats

        # arviz-stats expects the log-likelihood and negates it: hand it -log w
        _, khat = array_stats.psislw(-log_weights, axis=-1)
    return np.asarray(khat, dtype=np.float64)


def constant_spread(log_weights: torch.Tensor) -> torch.Tensor:
    """The spread below which each point's log weights count as equal up to rounding.

    :data:`CONSTANT_SPREAD_ULPS` times the machine epsilon of ``log_weights.dtype`` times
    max_k abs(log w_k), the magnitude being at least 1 nat: a spread that small is rounding (the
    Pareto fit would model its ties), and weights equal within it give the estimate to that
    accuracy whatever their tail.

    :param log_weights: ``(K, N)`` log weights, in the dtype they were computed in.
    :returns: ``(N,)`` thresholds in nats, float64.
    """
    if not log_weights.dtype.is_floating_point:
        raise TypeError(f"log weights must be floating point, got {log_weights.dtype}")
    epsilon = torch.finfo(log_weights.dtype).eps
    magnitude = log_weights.detach().double().abs().max(0).values.clamp(min=1.0)
    return CONSTANT_SPREAD_ULPS * epsilon * magnitude.cpu()


def pareto_k(log_weights: torch.Tensor) -> torch.Tensor:
    """PSIS k-hat of the importance weights of each data point.

    :param log_weights: ``(K, N)`` log weights (any additive constant per point), in the
        dtype they were computed in: it sets how much spread is rounding.
    :returns: ``(N,)`` k-hat: below 0.5 the weights have finite variance; above
        :data:`KHAT_THRESHOLD` the estimate is unreliable.  NaN when K is below
        :data:`MIN_SAMPLES_FOR_KHAT`; -inf where the weights are constant up to rounding
        (spread below :func:`constant_spread`), whose tail is bounded.
    """
    num_samples, num_points = log_weights.shape
    khat = torch.full((num_points,), math.nan, dtype=torch.float64)
    if num_samples < MIN_SAMPLES_FOR_KHAT:
        return khat
    values = log_weights.detach().double().cpu()
    spread = values.max(0).values - values.min(0).values
    constant = spread < constant_spread(log_weights)
    khat[constant] = -math.inf
    varying = (~constant).nonzero().flatten()
    if len(varying):
        khat[varying] = torch.from_numpy(_psis_khat(values[:, varying].T.numpy()))
    return khat


def unreliable_fraction(khat: torch.Tensor, threshold: float = KHAT_THRESHOLD) -> float:
    """The fraction of data points whose importance-sampling estimate is unreliable.

    :param khat: ``(N,)`` per-point k-hat, as from :func:`pareto_k`; NaN entries (too few
        samples to fit a tail) are left out of both counts, -inf (constant weights) count
        as reliable.
    :param threshold: k-hat above which a point is unreliable.
    :returns: the fraction of the points with a k-hat whose k-hat exceeds ``threshold``,
        in [0, 1]; NaN when no point has one.
    """
    if khat.dim() != 1:
        raise ValueError(f"expected per-point k-hat of shape (N,), got {tuple(khat.shape)}")
    known = ~khat.isnan()
    num_known = int(known.sum())
    if num_known == 0:
        return math.nan
    return int((khat[known] > threshold).sum()) / num_known


def log_mean_exp_standard_error(log_weights: torch.Tensor) -> torch.Tensor:
    """Delta-method standard error of log((1/K) sum_k w_k), per data point.

    var(log mean w) ~ var(w) / (K mean(w)^2); trustworthy only when k-hat is small.

    :param log_weights: ``(K, N)`` log weights.
    :returns: ``(N,)`` standard errors in nats; NaN for K = 1.
    """
    num_samples = log_weights.shape[0]
    if num_samples < 2:
        return torch.full(log_weights.shape[1:], math.nan, dtype=torch.float64)
    weights = torch.exp(log_weights.double() - log_weights.double().max(0).values)
    return (weights.var(0) / (num_samples * weights.mean(0) ** 2)).sqrt()


@dataclass(frozen=True)
class ImportanceSummary:
    """Per-data-point results of one importance-sampling pass with K_max samples.

    All tensors are float64 on the CPU; log values in nats.

    :ivar num_samples: the Ks of ``iwae``, ascending; the last is K_max.
    :ivar iwae: ``(len(num_samples), N)`` IWAE bounds log (1/K) sum_{k<=K} w_k.
    :ivar iwae_standard_error: ``(len(num_samples), N)`` Monte Carlo errors: delta method,
        and the standard deviation of log w at K = 1.
    :ivar elbo: ``(N,)`` mean of all K_max log weights (an ELBO estimate).
    :ivar effective_sample_size: ``(N,)`` ESS of the K_max weights.
    :ivar pareto_k: ``(N,)`` PSIS k-hat of the K_max weights.
    :ivar log_weight_mean, log_weight_std, log_weight_min, log_weight_max: ``(N,)``.
    """

    num_samples: tuple[int, ...]
    iwae: torch.Tensor
    iwae_standard_error: torch.Tensor
    elbo: torch.Tensor
    effective_sample_size: torch.Tensor
    pareto_k: torch.Tensor
    log_weight_mean: torch.Tensor
    log_weight_std: torch.Tensor
    log_weight_min: torch.Tensor
    log_weight_max: torch.Tensor
    khat_threshold: float = KHAT_THRESHOLD

    @property
    def log_marginal_likelihood(self) -> torch.Tensor:
        """``(N,)`` the estimate at K_max."""
        return self.iwae[-1]

    @property
    def unreliable(self) -> torch.Tensor:
        """``(N,)`` bool: k-hat above the threshold."""
        return self.pareto_k > self.khat_threshold

    @property
    def num_unreliable(self) -> int:
        return int(self.unreliable.sum())

    @property
    def unreliable_fraction(self) -> float:
        """The fraction of points with k-hat above the threshold (:func:`unreliable_fraction`)."""
        return unreliable_fraction(self.pareto_k, self.khat_threshold)


def _summarize_batch(log_weights: torch.Tensor, ks: Sequence[int]) -> dict[str, torch.Tensor]:
    # k-hat reads the dtype the weights were computed in: it sets what spread is rounding
    khat = pareto_k(log_weights)
    log_weights = log_weights.double()
    iwae = torch.stack([torch.logsumexp(log_weights[:k], 0) - math.log(k) for k in ks])
    spread = log_weights.std(0) if len(log_weights) > 1 else torch.full(
        log_weights.shape[1:], math.nan, dtype=torch.float64)
    # at K = 1 the estimate is one log weight: its error is the spread of log w itself
    errors = torch.stack([spread if k == 1 else log_mean_exp_standard_error(log_weights[:k])
                          for k in ks])
    return {
        "iwae": iwae,
        "iwae_standard_error": errors,
        "elbo": log_weights.mean(0),
        "effective_sample_size": effective_sample_size(log_weights),
        "pareto_k": khat,
        "log_weight_mean": log_weights.mean(0),
        "log_weight_std": spread,
        "log_weight_min": log_weights.min(0).values,
        "log_weight_max": log_weights.max(0).values,
    }


@evaluates
def importance_summary(vae: Any, x: torch.Tensor | Sequence[torch.Tensor], ks: Sequence[int] = (5000,), *,
                       batch_size: int = 100, chunk_size: int | None = None,
                       khat_threshold: float = KHAT_THRESHOLD) -> ImportanceSummary:
    """IWAE bounds at several K, the ELBO and the weight diagnostics, batch by batch.

    The data go through in batches of ``batch_size`` points; for each batch K_max =
    max(ks) log weights are drawn in chunks of ``chunk_size`` (consuming the random stream
    exactly as :func:`~pyrovae.evaluation.log_marginal_likelihood` does, so the same seed
    gives the same estimate at K_max) and summarized before the next batch.  The bound at
    K < K_max uses the first K of the same draws.

    :param vae: the program: a :class:`~pyrovae.models.VAE`, an object with ``model`` and
        ``guide``, or a ``(model, guide)`` pair.
    :param x: the data, or a tuple of the model's data arguments (points along dim 0).
    :param ks: the numbers of samples K to report, each positive.
    :param batch_size: data points per trace.
    :param chunk_size: importance samples per trace; ``None``: the default of
        :func:`~pyrovae.evaluation.log_marginal_likelihood` for the device.
    :param khat_threshold: k-hat above which a point counts as unreliable.
    :returns: an :class:`ImportanceSummary`.

    Example::

        summary = importance_summary(vae, x_test, ks=(1, 5, 50, 500, 5000))
        print(summary.num_unreliable, "points with k-hat > 0.7")
    """
    ks = tuple(sorted(set(ks)))
    if not ks or any(not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks!r}")
    num_samples = ks[-1]
    program = as_program(vae)
    if chunk_size is None:
        chunk_size = default_chunk_size(batch_size, program.device)
    for name, value in (("batch_size", batch_size), ("chunk_size", chunk_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    args = program.check_data(as_data(x))
    parts: list[dict[str, torch.Tensor]] = []
    chunks = [min(chunk_size, num_samples - start) for start in range(0, num_samples, chunk_size)]
    for batch in zip(*(a.split(batch_size) for a in args), strict=True):
        batch = tuple(a.to(program.device) for a in batch)
        log_weights = torch.cat([importance_log_weights(program, *batch, num_samples=chunk).cpu()
                                 for chunk in chunks])
        parts.append(_summarize_batch(log_weights, ks))
    joined = {name: torch.cat([part[name] for part in parts], dim=-1) for name in parts[0]}
    return ImportanceSummary(num_samples=ks, khat_threshold=khat_threshold, **joined)
