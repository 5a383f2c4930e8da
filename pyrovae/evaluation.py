"""Importance-sampled estimates of log p(x) per data point, from Pyro traces.

For a data point x and z_k ~ q(z|x), k = 1..K, the log importance weights are

    log w_k = log p(x, z_k) - log q(z_k | x)

and the K-sample importance-weighted (IWAE) bound is

    log p_K(x) = logsumexp_k(log w_k) - log K  <=  log p(x),

which rises with K towards log p(x); at K = 1 its expectation is the ELBO.  The log
weights come from a trace of ``vae.guide`` replayed through ``vae.model``, so the
estimate is right for any prior, likelihood and guide.  Pyro's own
``vectorized_importance_weights`` sums over the data plate and gives one weight per
batch, not per data point; here the data plate is kept.

All values are in nats.

References:

1. Burda, Grosse, Salakhutdinov (2016). Importance Weighted Autoencoders. ICLR.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pyro
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask

from pyrovae.distributed import batch_plan, gather_rows, seeded, shared_seed
from pyrovae.fused import fused_log_weights
from pyrovae.models import VAE
from pyrovae.sites import PARTICLE_PLATE


def _trace_log_prob(trace: poutine.Trace, zeros: torch.Tensor, scaled: bool) -> torch.Tensor:
    """Sum of the log densities of all sample sites, broadcast to ``zeros.shape``."""
    total = zeros
    for site in trace.nodes.values():
        if site["type"] != "sample":
            continue
        # site["fn"].log_prob, not trace.compute_log_prob: the latter multiplies by the
        # site's scale (KL warm-up, subsampling), which has no place in log p(x).
        log_prob = site["fn"].log_prob(site["value"])
        if scaled:
            log_prob = scale_and_mask(log_prob, site["scale"], site["mask"])
        total = total + log_prob
    return total


def particle_traces(model: Callable[..., object], guide: Callable[..., object], x: torch.Tensor,
                    num_samples: int) -> tuple[poutine.Trace, poutine.Trace]:
    """``(model_trace, guide_trace)`` of ``num_samples`` guide draws per data point.

    The guide runs inside a ``"particles"`` plate at ``dim=-2``, so its site ``"z"`` has
    batch shape ``(K, N)``; the model replays those draws.
    """
    with pyro.plate(PARTICLE_PLATE, num_samples, dim=-2):
        guide_trace = poutine.trace(guide).get_trace(x)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x)
    return model_trace, guide_trace


def log_weights(model: Callable[..., object], guide: Callable[..., object], x: torch.Tensor,
                num_samples: int, *, scaled: bool = False) -> torch.Tensor:
    """log p(x, z_k) - log q(z_k|x) for ``num_samples`` draws from ``guide``, in one trace.

    Differentiable (reparameterised draws), for training objectives; see
    :func:`particle_traces`.

    :param model: a Pyro model ``model(x)`` whose sites all live in a data plate at ``dim=-1``.
    :param guide: the matching guide ``guide(x)``.
    :param x: data ``(N, D)``.
    :param num_samples: K, the number of importance samples.
    :param scaled: multiply each site's log density by its scale (``poutine.scale``, e.g.
        the KL weight on ``"z"``), as a training objective should; log p(x) uses ``False``.
    :returns: ``(K, N)`` log weights in nats.
    """
    model_trace, guide_trace = particle_traces(model, guide, x, num_samples)
    zeros = torch.zeros(num_samples, x.shape[0], device=x.device, dtype=x.dtype)
    return (_trace_log_prob(model_trace, zeros, scaled)
            - _trace_log_prob(guide_trace, zeros, scaled))


def importance_log_weights(vae: VAE, x: torch.Tensor, num_samples: int) -> torch.Tensor:
    """log p(x, z_k) - log q(z_k|x) for ``num_samples`` draws from the guide.

    Evaluated by :func:`~pyrovae.fused.fused_log_weights`: the values (and draws) of
    :func:`log_weights` on ``vae.model`` and ``vae.guide``, without tracing.

    :param x: data ``(N, D)`` on the VAE's device.
    :param num_samples: K, the number of importance samples.
    :returns: ``(K, N)`` log weights in nats.
    """
    with torch.no_grad():
        return fused_log_weights(vae, x, num_samples)


def _sample_chunks(num_samples: int, chunk_size: int) -> Iterator[int]:
    for start in range(0, num_samples, chunk_size):
        yield min(chunk_size, num_samples - start)


def _check_counts(num_samples: int, batch_size: int, chunk_size: int) -> None:
    for name, value in (("num_samples", num_samples), ("batch_size", batch_size),
                        ("chunk_size", chunk_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def log_marginal_likelihood(vae: VAE, x: torch.Tensor, num_samples: int = 5000, *,
                            batch_size: int = 100, chunk_size: int = 500, seed: int | None = None,
                            distributed: bool = False) -> torch.Tensor:
    """The K-sample importance-sampling estimate of log p(x) for each data point.

    log p_K(x_n) = log (1/K) sum_k p(x_n, z_k) / q(z_k | x_n),  z_k ~ q(z | x_n).

    Memory is bounded by ``batch_size * chunk_size`` decoder outputs at a time, whatever
    K and N are: the data go through in batches and the K samples in chunks, combined
    with a running log-sum-exp.

    :param vae: a trained :class:`~pyrovae.models.VAE`.
    :param x: data ``(N, D)``, validated against the VAE's likelihood.
    :param num_samples: K.
    :param batch_size: data points per trace.
    :param chunk_size: importance samples per trace.
    :param seed: draw each data batch's samples from a stream seeded by ``(seed, batch
        index)`` (:func:`~pyrovae.distributed.seeded`), leaving the global RNG as it was, so
        a point's estimate depends only on ``seed``, ``batch_size`` and its batch, not on
        what ran before or on the number of processes; ``None``: draw from the global RNG.
    :param distributed: every process of the running ``torch.distributed`` group calls this
        with the same arguments; the batches are split into contiguous runs, one per
        process, and the results gathered in order on every process.  Without ``seed``, a
        seed is drawn from the global RNG (which the processes share in training).
    :returns: ``(N,)`` estimates of log p(x_n) in nats, on the CPU; a lower bound in
        expectation (the IWAE bound), tight as K grows.

    Example::

        log_px = log_marginal_likelihood(vae, x_test, num_samples=5000)
        mean, stderr = mean_and_standard_error(log_px)
    """
    def combine(running: torch.Tensor | None, log_w: torch.Tensor) -> torch.Tensor:
        chunk = torch.logsumexp(log_w, dim=0)
        return chunk if running is None else torch.logaddexp(running, chunk)

    return _reduce_log_weights(vae, x, num_samples, batch_size, chunk_size, combine,
                               lambda running: running - math.log(num_samples), seed=seed,
                               distributed=distributed)


def _reduce_log_weights(vae: VAE, x: torch.Tensor, num_samples: int, batch_size: int,
                        chunk_size: int,
                        combine: Callable[[torch.Tensor | None, torch.Tensor], torch.Tensor],
                        finish: Callable[[torch.Tensor], torch.Tensor], *,
                        seed: int | None = None, distributed: bool = False) -> torch.Tensor:
    """Fold the ``(chunk, batch)`` log weights of each data batch with ``combine``, then
    ``finish``; returns ``(N,)`` on the CPU.  Memory: one ``chunk_size x batch_size`` trace."""
    _check_counts(num_samples, batch_size, chunk_size)
    vae.check_data(x)
    results = [torch.empty(0)]
    # the data were checked above; distribution argument checks would only cost time here
    with pyro.validation_enabled(False):
        for batch, draws in data_batches(x, batch_size, vae.device, seed=seed,
                                         distributed=distributed):
            with draws:
                state = None
                for chunk in _sample_chunks(num_samples, chunk_size):
                    state = combine(state, importance_log_weights(vae, batch, chunk))
            results.append(finish(state).cpu())
    return gather_points(torch.cat(results), x.shape[0], batch_size, distributed=distributed)


def data_batches(x: torch.Tensor, batch_size: int, device: torch.device, *,
                 seed: int | None = None, distributed: bool = False
                 ) -> Iterator[tuple[torch.Tensor, contextlib.AbstractContextManager[None]]]:
    """The data batches this process evaluates: ``(batch on device, draws)``.

    ``draws`` is a context manager to draw the batch's random numbers in: seeded by
    ``(seed, index)`` with a ``seed``, else the global RNG.  With ``distributed``, this
    process's contiguous run of batches (:func:`~pyrovae.distributed.batch_plan`), and a
    seed drawn from the global RNG where none is given, so that processes do not repeat
    each other's draws.
    """
    if distributed and seed is None:
        seed = shared_seed()
    indices = (batch_plan(x.shape[0], batch_size)[0] if distributed
               else range(-(-x.shape[0] // batch_size)))
    for index in indices:
        batch = x[index * batch_size : (index + 1) * batch_size].to(device)
        draws = seeded(seed, index, device=device) if seed is not None else contextlib.nullcontext()
        yield batch, draws


def gather_points(local: torch.Tensor, num_points: int, batch_size: int, *,
                  distributed: bool = False, dim: int = 0) -> torch.Tensor:
    """Put the per-point results of every process's batches together in order (``dim`` is
    the data dimension); a no-op unless ``distributed``."""
    if not distributed:
        return local
    return gather_rows(local, batch_plan(num_points, batch_size)[1], dim=dim)


def elbo(vae: VAE, x: torch.Tensor, num_samples: int = 1, *, batch_size: int = 100,
         chunk_size: int = 500, seed: int | None = None, distributed: bool = False) -> torch.Tensor:
    """Monte Carlo ELBO per data point: the mean over K samples of log w_k.

    :param x: data ``(N, D)``.
    :param num_samples: samples per data point (more samples, less variance; same mean).
    :param seed: per-batch seeding, see :func:`log_marginal_likelihood`.
    :param distributed: shard the batches over processes, see :func:`log_marginal_likelihood`.
    :returns: ``(N,)`` ELBO estimates in nats, on the CPU.
    """
    def combine(total: torch.Tensor | None, log_w: torch.Tensor) -> torch.Tensor:
        return log_w.sum(0) if total is None else total + log_w.sum(0)

    return _reduce_log_weights(vae, x, num_samples, batch_size, chunk_size, combine,
                               lambda total: total / num_samples, seed=seed,
                               distributed=distributed)


@dataclass(frozen=True)
class Estimate:
    """The mean over data points of a per-data-point quantity, with its standard error (nats)."""

    mean: float
    standard_error: float
    num_points: int

    def __str__(self) -> str:
        return f"{self.mean:.2f} ± {self.standard_error:.2f} nats (N={self.num_points})"


def mean_and_standard_error(values: torch.Tensor) -> Estimate:
    """Average ``values`` ``(N,)`` and give the standard error of that mean, std / sqrt(N)."""
    values = values.detach().double().flatten()
    n = values.numel()
    if n == 0:
        raise ValueError("cannot average an empty tensor")
    stderr = values.std(unbiased=True).item() / math.sqrt(n) if n > 1 else math.nan
    return Estimate(values.mean().item(), stderr, n)
