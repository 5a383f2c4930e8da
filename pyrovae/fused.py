"""The VAE's ELBO computed straight from its parts, without Pyro's tracing machinery.

For the :class:`~pyrovae.models.VAE`, Pyro's ``Trace_ELBO`` evaluates, per data point,

    ELBO(x) = log p(x | z) + beta (log p(z) - log q(z | x)),   z ~ q(z | x) reparameterised,

averaged over particles; ``TraceMeanField_ELBO`` replaces ``log q(z|x) - log p(z)`` by the
analytic KL(q(z|x) || p(z)) where torch has one.  The model and guide have one latent site
and one observed site, so the same number can be computed by calling the prior,
guide family, decoder and likelihood directly.  That skips the per-step trace
bookkeeping (messengers, site dictionaries, parameter-store registration), which costs
about as much as the networks themselves at batch 100 on a CPU.

The draws are the same as Pyro's: with the same RNG state, :func:`fused_elbo_loss`
returns exactly ``Trace_ELBO().differentiable_loss(vae.model, vae.guide, x)`` (tested),
so the fused path is a faster evaluation of Pyro's objective, not another objective.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.distributions import Distribution, kl_divergence

from pyrovae.distributed import Shard, sharded_rsample
from pyrovae.guides import DiagonalNormalGuide
from pyrovae.likelihoods import BernoulliLikelihood
from pyrovae.models import VAE
from pyrovae.priors import StandardNormalPrior

_HALF_LOG_TWO_PI = 0.5 * math.log(2 * math.pi)

#: the objectives :func:`fused_elbo_loss` reproduces, with whether the KL is analytic
FUSED_OBJECTIVES = {"trace_elbo": False, "meanfield_elbo": True}


def supports_fused(vae: VAE, objective: str, x: torch.Tensor) -> bool:
    """Whether :func:`fused_elbo_loss` reproduces ``objective`` for this VAE.

    It does for ``trace_elbo`` and ``meanfield_elbo`` whenever the guide family can be
    reparameterised (all pyrovae families can).
    """
    if objective not in FUSED_OBJECTIVES:
        return False
    with torch.no_grad():
        return bool(vae.posterior(x[:1]).has_rsample)


def _posterior_and_prior(vae: VAE, x: torch.Tensor) -> tuple[Distribution, Distribution]:
    """q(z|x) (batch ``(N,)``) and p(z), built through ``forward``, not ``__call__``: outside
    Pyro's module context (see :meth:`~pyrovae.models.VAE.untraced_posterior`).  The
    likelihood is called the same way below."""
    return vae.untraced_posterior(x), vae.prior.forward(vae.untraced_posterior)


def fused_elbo_loss(vae: VAE, x: torch.Tensor, *, num_particles: int = 1, beta: float = 1.0,
                    analytic_kl: bool = False, shard: Shard | None = None) -> torch.Tensor:
    """Minus the ELBO summed over the minibatch, as Pyro's ``Trace_ELBO`` computes it.

    :param vae: the model; its parameters receive gradients.
    :param x: data ``(N, D)``.
    :param num_particles: draws of z per data point, averaged (Pyro's vectorized particles).
    :param beta: weight of the KL term (Pyro: ``poutine.scale`` on site ``"z"``).
    :param analytic_kl: use KL(q || p) in closed form where torch registers one
        (``TraceMeanField_ELBO``); Monte Carlo otherwise.
    :param shard: in multi-process training, where ``x`` lies in the global batch: the
        noise is then drawn for the whole global batch and this process keeps its rows
        (:func:`~pyrovae.distributed.sharded_rsample`), so the draws, and the summed
        gradients, are those of one process on the global batch.  ``None``: ``q.rsample``.
    :returns: a scalar tensor, nats.
    """
    sample_shape = torch.Size((num_particles,) if num_particles > 1 else ())
    if shard is None and _is_the_standard_vae(vae):
        elbo = _standard_vae_elbo(vae, x, sample_shape, beta, analytic_kl)
    else:
        elbo = _general_elbo(vae, x, sample_shape, beta, analytic_kl, shard)
    if num_particles > 1:
        elbo = elbo.mean(0)
    return -elbo.sum()


def _general_elbo(vae: VAE, x: torch.Tensor, sample_shape: torch.Size, beta: float,
                  analytic_kl: bool, shard: Shard | None = None) -> torch.Tensor:
    """The per-particle ELBO, ``sample_shape + (N,)``, from the VAE's distributions: any
    prior, guide and likelihood (the arguments are :func:`fused_elbo_loss`'s)."""
    q, p = _posterior_and_prior(vae, x)
    z = q.rsample(sample_shape) if shard is None else sharded_rsample(q, shard, sample_shape)
    log_likelihood = vae.likelihood.forward(vae.decoder(z)).log_prob(x)
    kl = None
    if analytic_kl:
        try:
            # the data plate broadcasts p(z) over data points before Pyro takes the KL
            kl = kl_divergence(q, p.expand(q.batch_shape))
        except NotImplementedError:
            kl = None
    if kl is None:
        kl = q.log_prob(z) - p.log_prob(z)
    return log_likelihood - beta * kl


def _is_the_standard_vae(vae: VAE) -> bool:
    """Whether ``vae`` is the default VAE: diagonal guide, N(0, I) prior, Bernoulli."""
    parts = vae._modules  # a plain dict: PyroModule.__getattr__ costs ~5 us per access
    return (type(parts["guide_family"]) is DiagonalNormalGuide
            and type(parts["prior"]) is StandardNormalPrior
            and type(parts["likelihood"]) is BernoulliLikelihood)


def _standard_vae_elbo(vae: VAE, x: torch.Tensor, sample_shape: torch.Size, beta: float,
                       analytic_kl: bool) -> torch.Tensor:
    """The per-particle ELBO of :func:`_is_the_standard_vae`'s VAE, ``sample_shape + (N,)``,
    by the formulas torch's ``Normal``, ``kl_divergence`` and pyrovae's Bernoulli use, from
    the same draws, without building the six distribution objects of the general path:
    their construction and argument broadcasting are host time that shows on a GPU."""
    parts = vae._modules
    z_loc, z_scale = parts["guide_family"].z_loc_scale(parts["encoder"](x))
    noise = torch.empty(sample_shape + z_loc.shape, dtype=z_loc.dtype,
                        device=z_loc.device).normal_()  # torch's Normal.rsample draws
    z = z_loc + noise * z_scale
    logits = parts["decoder"](z)
    log_likelihood = F.binary_cross_entropy_with_logits(
        logits, x.expand_as(logits), reduction="none").neg_().sum(-1)
    if analytic_kl:
        variance_ratio = z_scale.pow(2)
        kl = (0.5 * (variance_ratio + z_loc.pow(2) - 1 - variance_ratio.log())).sum(-1)
    else:
        log_q = (-((z - z_loc) ** 2) / (2 * z_scale**2) - z_scale.log() - _HALF_LOG_TWO_PI)
        log_p = -(z**2) / 2 - _HALF_LOG_TWO_PI
        kl = (log_q - log_p).sum(-1)
    return log_likelihood - beta * kl


def fused_log_weights(vae: VAE, x: torch.Tensor, num_samples: int) -> torch.Tensor:
    """log p(x, z_k) - log q(z_k | x) for ``num_samples`` draws per data point, computed from
    the VAE's parts without tracing.

    The same draws and values as the traced :func:`pyrovae.evaluation.log_weights` (the guide
    in a particle plate, the model replayed) with the same RNG state (tested for every prior
    and guide), without the per-trace bookkeeping that shows on a GPU.

    :param x: data ``(N, D)`` on the VAE's device.
    :param num_samples: K.
    :returns: ``(K, N)`` log weights in nats (differentiable; wrap in ``torch.no_grad()`` to
        evaluate).
    """
    # the log weights are the per-particle ELBO with beta = 1 and a Monte Carlo KL
    compute = _standard_vae_elbo if _is_the_standard_vae(vae) else _general_elbo
    return compute(vae, x, torch.Size((num_samples,)), 1.0, False)
