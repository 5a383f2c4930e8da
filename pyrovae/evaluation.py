"""Importance-sampled estimates of log p(x) per data point, from Pyro traces.

For a data point x and z_k ~ q(z|x), k = 1..K, the log importance weights are

    log w_k = log p(x, z_k) - log q(z_k | x)

and the K-sample importance-weighted (IWAE) bound is

    log p_K(x) = logsumexp_k(log w_k) - log K  <=  log p(x),

which rises with K towards log p(x); at K = 1 its expectation is the ELBO.  The log
weights come from a trace of the program's guide replayed through its model, so the
estimate is that of the program as written: any prior, likelihood, guide, number of latent
layers, enumerated discrete sites and extra arguments such as labels.  Pyro's own
``vectorized_importance_weights`` sums over the data plate and gives one weight per
batch, not per data point; here the data plate is kept.

All values are in nats.

References:

1. Burda, Grosse, Salakhutdinov (2016). Importance Weighted Autoencoders. ICLR.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask

from pyrovae.devices import seeded
from pyrovae.errors import PyrovaeError
from pyrovae.programs import (
    Program,
    ProgramError,
    as_data,
    as_program,
    evaluates,
    is_sample_site,
)
from pyrovae.sites import PARTICLE_PLATE


def site_log_prob(site: dict[str, Any], nesting: int, scaled: bool) -> torch.Tensor:
    """A site's log density with its nested plates (inside the data plate) summed out:
    ``(enumeration dims..., K, N)``, right-aligned."""
    # site["fn"].log_prob, not trace.compute_log_prob: the latter multiplies by the
    # site's scale (KL warm-up, subsampling), which has no place in log p(x).
    log_prob = site["fn"].log_prob(site["value"])
    # a mask is part of the program (which points a site covers); a scale is a training
    # weight (KL warm-up, subsampling) and counts only where asked
    log_prob = scale_and_mask(log_prob, site["scale"] if scaled else 1.0, site["mask"])
    if not torch.is_tensor(log_prob):
        log_prob = torch.as_tensor(log_prob)
    while log_prob.dim() < nesting + 1:
        log_prob = log_prob.unsqueeze(0)
    if nesting > 1:  # the plates between the particle plate and the data plate
        log_prob = log_prob.sum(dim=tuple(range(-nesting, -1)))
    return log_prob


def trace_log_prob(trace: poutine.Trace, nesting: int, scaled: bool,
                    num_enumerated: int = 0) -> torch.Tensor:
    """Sum of the sample sites' log densities ``(K, N)``, enumerated sites summed out."""
    terms = [site_log_prob(site, nesting, scaled) for site in trace.nodes.values()
             if is_sample_site(site)]
    if not terms:  # a guide without sample sites (a classifier's): log q = 0
        return torch.zeros(())
    shape = torch.broadcast_shapes(*(term.shape for term in terms))
    total = terms[0].expand(shape)
    for term in terms[1:]:
        total = total + term
    # enumeration dims sit left of the particle dim: sum the joint over them
    leading = total.dim() - 2
    if leading > 0:
        if num_enumerated == 0:
            raise ProgramError(f"site log densities have batch shape {tuple(shape)}: a site "
                               f"has dimensions left of the data and particle plates")
        total = torch.logsumexp(total.reshape(-1, *total.shape[-2:]), dim=0)
    return total


def particle_traces(model: Callable[..., object], guide: Callable[..., object],
                    *args: torch.Tensor, num_samples: int, max_plate_nesting: int = 1,
                    enumerate_model: bool = False) -> tuple[poutine.Trace, poutine.Trace]:
    """``(model_trace, guide_trace)`` of ``num_samples`` guide draws per data point.

    The guide runs inside a ``"particles"`` plate left of the program's plates, so a site
    in the data plate has batch shape ``(K, N)``; the model replays those draws, and with
    ``enumerate_model`` enumerates its remaining ``"parallel"`` sites further left.
    """
    particle_dim = -(max_plate_nesting + 1)
    with pyro.plate(PARTICLE_PLATE, num_samples, dim=particle_dim):
        guide_trace = poutine.trace(guide).get_trace(*args)
        replayed = poutine.replay(model, trace=guide_trace)
        if enumerate_model:
            replayed = poutine.enum(replayed, first_available_dim=particle_dim - 1)
        model_trace = poutine.trace(replayed).get_trace(*args)
    return model_trace, guide_trace


def log_weights(program: Any, *args: torch.Tensor, num_samples: int,
                scaled: bool = False) -> torch.Tensor:
    """log p(x, z_k) - log q(z_k | x) for ``num_samples`` draws from the program's guide.

    The one implementation of the importance weights: a trace of the guide, replayed
    through the model.  Latent sites of the model that the guide does not sample and that
    are marked ``infer={"enumerate": "parallel"}`` are summed out per data point, so
    log p(x, z) is then the log of the sum over their values.  Differentiable where the
    guide's draws are reparameterised (training objectives); wrap in ``torch.no_grad()``
    to evaluate.

    :param program: a :class:`~pyrovae.programs.Program` or anything
        :func:`~pyrovae.programs.as_program` takes (a VAE, an object with ``model`` and
        ``guide``, a ``(model, guide)`` pair).
    :param args: the data arguments of the model and guide, points along dimension 0.
    :param num_samples: K, the number of importance samples.
    :param scaled: multiply each site's log density by its scale (``poutine.scale``, e.g.
        the KL weight), as a training objective should; log p(x) uses ``False``.
    :returns: ``(K, N)`` log weights in nats.
    """
    program = as_program(program)
    structure = program.structure(*args)
    nesting = structure.max_plate_nesting

    def weights(model_trace: poutine.Trace, guide_trace: poutine.Trace, count: int
                ) -> torch.Tensor:
        log_p = trace_log_prob(model_trace, nesting, scaled, len(structure.enumerated_sites))
        log_q = trace_log_prob(guide_trace, nesting, scaled)
        return (log_p - log_q).expand(count, args[0].shape[0])

    return torch.cat(sampled_traces(program, structure, args, num_samples, weights))


def sampled_traces(program: Program, structure: Any, args: tuple[torch.Tensor, ...],
                   num_samples: int,
                   reduce: Callable[[poutine.Trace, poutine.Trace, int], Any]) -> list[Any]:
    """``reduce(model_trace, guide_trace, count)`` of trace pairs that hold ``num_samples``
    guide draws per data point, replayed through the model (its ``"parallel"`` sites
    enumerated): one pair with a particle plate of ``count = K`` (the fast path), or, for a
    program that does not run batched so, ``K`` plain runs of ``count = 1`` each.

    The first failure of the fast path (a shape error of the program's, in the traces or in
    ``reduce``) sends the program to plain runs for good, with one
    :class:`SequentialSamplingWarning`; where the plain run fails too, its error is raised.
    """
    owner = _owner(program)
    if owner not in _SEQUENTIAL:
        try:
            return [reduce(*_trace_pair(program, structure, args, num_samples, vectorized=True),
                           num_samples)]
        except PyrovaeError:  # pyrovae's own refusals and interruptions are not shape errors
            raise
        except (RuntimeError, IndexError, ValueError, TypeError) as error:
            failure = f"{type(error).__name__}: {error}".splitlines()[0]
            first = reduce(*_trace_pair(program, structure, args, 1, vectorized=False), 1)
            _SEQUENTIAL[owner] = True
            warnings.warn(
                f"the program does not run with its samples batched along a dimension left of "
                f"its plates ({failure}); drawing them one trace at a time instead, about "
                f"K times slower (see the fast-path contract in pyrovae.programs)",
                SequentialSamplingWarning, stacklevel=3)
            return [first] + [reduce(*_trace_pair(program, structure, args, 1, vectorized=False),
                                     1) for _ in range(num_samples - 1)]
    return [reduce(*_trace_pair(program, structure, args, 1, vectorized=False), 1)
            for _ in range(num_samples)]


class SequentialSamplingWarning(UserWarning):
    """A program that does not broadcast over a sample dimension is sampled one trace at a
    time (once per program)."""


#: the programs (their module, else their guide) found not to broadcast over samples
_SEQUENTIAL: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


def _owner(program: Program) -> Any:
    """What a program's vectorization failure is remembered by: its module, else its guide
    (the object behind a bound method)."""
    if program.module is not None:
        return program.module
    return getattr(program.guide, "__self__", program.guide)


def _trace_pair(program: Program, structure: Any, args: tuple[torch.Tensor, ...],
                num_samples: int, *, vectorized: bool) -> tuple[poutine.Trace, poutine.Trace]:
    """``(model_trace, guide_trace)``: with a particle plate of K, or (K = 1) a plain run of
    the guide replayed through the model, as the program is written."""
    nesting = structure.max_plate_nesting
    enumerate_model = bool(structure.enumerated_sites)
    if vectorized:
        return particle_traces(program.model, program.guide, *args, num_samples=num_samples,
                               max_plate_nesting=nesting, enumerate_model=enumerate_model)
    guide_trace = poutine.trace(program.guide).get_trace(*args)
    replayed = poutine.replay(program.model, trace=guide_trace)
    if enumerate_model:
        replayed = poutine.enum(replayed, first_available_dim=-(nesting + 2))
    return poutine.trace(replayed).get_trace(*args), guide_trace


def importance_log_weights(program: Any, *args: torch.Tensor, num_samples: int) -> torch.Tensor:
    """:func:`log_weights` without gradients: ``(K, N)`` nats."""
    with torch.no_grad():
        return log_weights(program, *args, num_samples=num_samples)


#: decoder rows per trace on a CPU: outputs that stay in the cache (784 floats x 2048 rows is
#: 6 MB); larger chunks spend their time in page faults, not arithmetic
CPU_ROWS_PER_TRACE = 2048
#: on a GPU, rows per trace large enough to keep it busy, small enough to bound memory
GPU_ROWS_PER_TRACE = 65536


def default_chunk_size(batch_size: int, device: torch.device | str) -> int:
    """Importance samples per trace for batches of ``batch_size`` points on ``device``: a
    fixed number of decoder rows per trace (:data:`CPU_ROWS_PER_TRACE`,
    :data:`GPU_ROWS_PER_TRACE`), so memory is bounded whatever K is."""
    rows = GPU_ROWS_PER_TRACE if torch.device(device).type == "cuda" else CPU_ROWS_PER_TRACE
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return max(1, rows // batch_size)


def _sample_chunks(num_samples: int, chunk_size: int) -> Iterator[int]:
    for start in range(0, num_samples, chunk_size):
        yield min(chunk_size, num_samples - start)


def _check_counts(num_samples: int, batch_size: int, chunk_size: int) -> None:
    for name, value in (("num_samples", num_samples), ("batch_size", batch_size),
                        ("chunk_size", chunk_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def log_marginal_likelihood(program: Any, x: torch.Tensor | Sequence[torch.Tensor],
                            num_samples: int = 5000, *,
                            batch_size: int = 100, chunk_size: int | None = None,
                            seed: int | None = None,
                            batches: Sequence[int] | None = None) -> torch.Tensor:
    """The K-sample importance-sampling estimate of log p(x) for each data point.

    log p_K(x_n) = log (1/K) sum_k p(x_n, z_k) / q(z_k | x_n),  z_k ~ q(z | x_n).

    Memory is bounded by ``batch_size * chunk_size`` decoder outputs at a time, whatever
    K and N are: the data go through in batches and the K samples in chunks, combined
    with a running log-sum-exp.

    :param program: a trained program: a :class:`~pyrovae.models.VAE`, an object with
        ``model`` and ``guide``, or a ``(model, guide)`` pair (see :mod:`pyrovae.programs`).
    :param x: the data ``(N, ...)``, or a tuple of the model's data arguments (e.g.
        ``(x, y)`` for a model conditioned on labels), points along dimension 0; a VAE
        validates them against its likelihood.
    :param num_samples: K.
    :param batch_size: data points per trace.
    :param chunk_size: importance samples per trace; ``None``: :func:`default_chunk_size`
        for the program's device.  The draws, and so the estimate under a seed, depend on it.
    :param seed: draw each data batch's samples from a stream seeded by ``(seed, batch
        index)`` (:func:`~pyrovae.devices.seeded`), leaving the global RNG as it was, so
        a point's estimate depends only on ``seed``, ``batch_size`` and its batch, not on
        what ran before or on which process evaluates it; ``None``: draw from the global RNG.
    :param batches: evaluate only these data batches (indices into the
        ``ceil(N / batch_size)`` batches of ``x``), returning their points in order; ``None``:
        all.  :func:`~pyrovae.distributed.sharded` gives each process its run of them.
    :returns: ``(N,)`` estimates of log p(x_n) in nats, on the CPU; a lower bound in
        expectation (the IWAE bound), tight as K grows.

    Example::

        log_px = log_marginal_likelihood(vae, x_test, num_samples=5000)
        mean, stderr = mean_and_standard_error(log_px)
    """
    def combine(running: torch.Tensor | None, log_w: torch.Tensor) -> torch.Tensor:
        chunk = torch.logsumexp(log_w, dim=0)
        return chunk if running is None else torch.logaddexp(running, chunk)

    return _reduce_log_weights(program, x, num_samples, batch_size, chunk_size, combine,
                               lambda running: running - math.log(num_samples), seed=seed,
                               batches=batches)


@evaluates
def _reduce_log_weights(program: Any, x: torch.Tensor | Sequence[torch.Tensor],
                        num_samples: int, batch_size: int,
                        chunk_size: int | None,
                        combine: Callable[[torch.Tensor | None, torch.Tensor], torch.Tensor],
                        finish: Callable[[torch.Tensor], torch.Tensor], *,
                        seed: int | None = None,
                        batches: Sequence[int] | None = None) -> torch.Tensor:
    """Fold the ``(chunk, batch)`` log weights of each data batch with ``combine``, then
    ``finish``; returns the points' values ``(N,)`` (those of ``batches``) on the CPU.
    Memory: one ``chunk_size x batch_size`` trace."""
    program = as_program(program)
    if chunk_size is None:
        chunk_size = default_chunk_size(batch_size, program.device)
    _check_counts(num_samples, batch_size, chunk_size)
    args = program.check_data(as_data(x))
    results = [torch.empty(0)]
    # the data were checked above; distribution argument checks would only cost time here
    with pyro.validation_enabled(False):
        for batch, draws in data_batches(args, batch_size, program.device, seed=seed,
                                         batches=batches):
            with draws:
                state = None
                for chunk in _sample_chunks(num_samples, chunk_size):
                    state = combine(state, importance_log_weights(program, *batch,
                                                                  num_samples=chunk))
            results.append(finish(state).cpu())
    return torch.cat(results)


def data_batches(x: torch.Tensor | Sequence[torch.Tensor], batch_size: int,
                 device: torch.device, *, seed: int | None = None,
                 batches: Sequence[int] | None = None
                 ) -> Iterator[tuple[tuple[torch.Tensor, ...],
                                     contextlib.AbstractContextManager[None]]]:
    """The data batches to evaluate: ``(batch arguments on device, draws)``.

    ``draws`` is a context manager to draw the batch's random numbers in: seeded by
    ``(seed, index)`` with a ``seed``, else the global RNG.

    :param batches: indices of the ``ceil(N / batch_size)`` batches to yield, in order;
        ``None``: all of them.
    """
    args = as_data(x)
    num_batches = -(-args[0].shape[0] // batch_size)
    indices = range(num_batches) if batches is None else batches
    for index in indices:
        if not 0 <= index < num_batches:
            raise ValueError(f"batch index {index} is outside the {num_batches} batches of "
                             f"{args[0].shape[0]} points")
        batch = tuple(a[index * batch_size : (index + 1) * batch_size].to(device) for a in args)
        draws = seeded(seed, index, device=device) if seed is not None else contextlib.nullcontext()
        yield batch, draws


def elbo(program: Any, x: torch.Tensor | Sequence[torch.Tensor], num_samples: int = 1, *,
         batch_size: int = 100,
         chunk_size: int | None = None, seed: int | None = None,
         batches: Sequence[int] | None = None) -> torch.Tensor:
    """Monte Carlo ELBO per data point: the mean over K samples of log w_k.

    :param program: see :func:`log_marginal_likelihood`.
    :param x: the data, or a tuple of the model's data arguments.
    :param num_samples: samples per data point (more samples, less variance; same mean).
    :param seed: per-batch seeding, see :func:`log_marginal_likelihood`.
    :param batches: only these data batches, see :func:`log_marginal_likelihood`.
    :returns: ``(N,)`` ELBO estimates in nats, on the CPU.
    """
    def combine(total: torch.Tensor | None, log_w: torch.Tensor) -> torch.Tensor:
        return log_w.sum(0) if total is None else total + log_w.sum(0)

    return _reduce_log_weights(program, x, num_samples, batch_size, chunk_size, combine,
                               lambda total: total / num_samples, seed=seed, batches=batches)


@evaluates
def elbo_terms(program: Any, x: torch.Tensor | Sequence[torch.Tensor], *, num_samples: int = 1,
               batch_size: int = 100) -> dict[str, torch.Tensor]:
    """The ELBO split into its reconstruction and KL terms per data point (Monte Carlo).

    From the same traces as :func:`log_weights`: reconstruction = log p(x | z) (the observed
    sites of the model), kl = log q(z | x) - log p(z) (the guide's sites against the model's
    latent ones), each averaged over ``num_samples`` draws z ~ q(z | x); reconstruction - kl
    is the ELBO.

    :param program: see :func:`log_marginal_likelihood`.
    :param x: the data, or a tuple of the model's data arguments.
    :returns: ``{"reconstruction": (N,), "kl": (N,)}`` in nats, on the CPU.
    :raises ProgramError: the program sums sites out by enumeration (its terms do not split
        per site).
    """
    _check_counts(num_samples, batch_size, 1)
    program = as_program(program)
    args = program.check_data(as_data(x))
    reconstruction, kl = [], []
    with torch.no_grad(), pyro.validation_enabled(False):
        for batch, draws in data_batches(args, batch_size, program.device):
            structure = program.structure(*batch)
            if structure.enumerates:
                raise ProgramError("the ELBO of a program that sums sites out by enumeration "
                                   "does not split into per-site terms")
            nesting = structure.max_plate_nesting

            with draws:
                sums = sampled_traces(program, structure, batch, num_samples, functools.partial(
                    _split_terms, nesting=nesting, points=batch[0].shape[0]))
            reconstruction.append((sum(part[0] for part in sums) / num_samples).cpu())
            kl.append((sum(part[1] for part in sums) / num_samples).cpu())
    return {"reconstruction": torch.cat(reconstruction), "kl": torch.cat(kl)}


def _split_terms(model_trace: poutine.Trace, guide_trace: poutine.Trace, count: int, *,
                 nesting: int, points: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The sums over a trace pair's ``count`` draws of log p(x | z) and of
    log q(z | x) - log p(z): two ``(N,)`` tensors."""
    observed: Any = 0.0
    latent: Any = 0.0
    for site in model_trace.nodes.values():
        if is_sample_site(site):
            term = site_log_prob(site, nesting, False)
            if site["is_observed"]:
                observed = observed + term
            else:
                latent = latent - term
    for site in guide_trace.nodes.values():
        if is_sample_site(site) and not site["is_observed"]:
            latent = latent + site_log_prob(site, nesting, False)
    return tuple(torch.as_tensor(total).expand(count, points).sum(0)  # type: ignore[return-value]
                 for total in (observed, latent))


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
