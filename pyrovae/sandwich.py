"""Bidirectional Monte Carlo: a stochastic lower and upper bound on log p(x) that sandwich it.

On data simulated from the model itself, each x comes with an exact posterior sample: the
z it was drawn from.  Ancestral sampling through the program gives the pairs

    (z_n, x_n) ~ p(z) p(x | z),   so   z_n | x_n ~ p(z | x_n).

Forward AIS (:mod:`pyrovae.ais`) from r(z) (the guide or the prior) to p(z|x) gives
log w_fwd with E[w_fwd] = p(x): log (1/C) sum_c w_fwd,c is a stochastic **lower** bound.
Reverse AIS starts each chain at the exact z_n and runs the same tempered densities
backwards, from beta = 1 to beta = 0, with the weight updates

    log w_rev += (beta_{t-1} - beta_t) (log p(x, z) - log r(z)),

so that E[w_rev] = 1 / p(x) and -log (1/C) sum_c w_rev,c is a stochastic **upper** bound
(Jensen's inequality in both directions).  Both tighten as the number of temperatures
grows; their gap bounds the error of AIS on these data, with no closed form needed.  With
one temperature the upper bound is log p(x, z) - log r(z) at the exact posterior draw,
whose mean exceeds log p(x) by KL(p(z|x) || r(z)).

The bounds hold for data from the model, not for the test data: the gap is a check of the
AIS settings (temperatures, leapfrog steps, initial distribution) for this model, to be
trusted on real data only as far as the posterior on simulated data resembles it there.

References:

1. Grosse, Ghahramani, Adams (2015). Sandwiching the marginal likelihood using
   bidirectional Monte Carlo. arXiv:1511.02543.
2. Wu, Burda, Salakhutdinov, Grosse (2017). On the Quantitative Analysis of
   Decoder-Based Generative Models. ICLR.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pyro import poutine

from pyrovae.ais import (
    AISResult,
    Initial,
    Schedule,
    ais_log_marginal_likelihood,
    anneal_points,
    annealed_sites,
    check_ais_settings,
    flatten_latents,
    temperature_schedule,
)
from pyrovae.devices import seeded
from pyrovae.diagnostics import log_mean_exp_standard_error
from pyrovae.evaluation import mean_and_standard_error
from pyrovae.programs import Program, ProgramError, as_data, as_program, evaluates

#: simulated points of ``pyrovae evaluate --sandwich`` by default
DEFAULT_POINTS = 100


@dataclass(frozen=True)
class Simulation:
    """Data drawn from the model, with the latents they were drawn from.

    :ivar data: the model's data arguments ``(N, ...)``: the observed ones simulated, the
        others (labels the model conditions on) as given.
    :ivar latents: ``(N, L)`` the continuous latent sites, flattened and side by side in
        program order (as AIS orders them): exact draws from p(z | x).
    :ivar sites: the names of those sites.
    """

    data: tuple[torch.Tensor, ...]
    latents: torch.Tensor
    sites: tuple[str, ...]


def _matching_argument(value: torch.Tensor, args: Sequence[torch.Tensor]) -> int | None:
    for index, arg in enumerate(args):
        if arg.numel() == value.numel() and torch.equal(arg.reshape(value.shape).to(value.dtype),
                                                          value):
            return index
    return None


@contextlib.contextmanager
def _stream(seed: int | None, device: torch.device) -> Iterator[None]:
    if seed is None:
        yield
    else:
        with seeded(seed, device=device):
            yield


def _stream_seed(seed: int | None, index: int) -> int | None:
    """An unrelated seed per stage (simulation, forward, reverse) from one user seed."""
    if seed is None:
        return None
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint32)[0])


@torch.no_grad()
@evaluates
def simulate(program: Any, x: torch.Tensor | Sequence[torch.Tensor], num_points: int | None = None,
             *, seed: int | None = None) -> Simulation:
    """Draw ``num_points`` pairs (x, z) ~ p(x, z) ancestrally through the program's model.

    The model runs once under ``poutine.uncondition``, which samples every observed site
    from its distribution instead of scoring the observation; each observed site must
    observe one of the data arguments (reshaped at most), which the draw replaces.  ``x``
    serves as a template only: its first ``num_points`` rows give the plate size and the
    arguments that are not observed (labels the model conditions on).

    :param program: a VAE, an object with ``model`` and ``guide``, or a ``(model, guide)`` pair.
    :param x: template data, or a tuple of the model's data arguments.
    :param num_points: N, at most the number of template points; ``None``: all of them.
    :param seed: draw from a stream seeded by ``seed``; ``None``: the global RNG.
    :returns: a :class:`Simulation`.
    :raises ProgramError: an observed site that is not a data argument, or a model that
        reads its data other than as an observation (an autoregressive decoder), for which
        one run of the model is not an ancestral draw.
    """
    program = as_program(program)
    args = program.check_data(as_data(x))
    available = args[0].shape[0]
    num_points = available if num_points is None else num_points
    if not isinstance(num_points, int) or not 1 <= num_points <= available:
        raise ValueError(f"num_points must be an integer in [1, {available}] (the template "
                         f"points), got {num_points!r}")
    template = tuple(a[:num_points].to(program.device) for a in args)
    structure = program.structure(*template)
    with _stream(seed, program.device):
        conditioned = poutine.trace(program.model).get_trace(*template)
        simulated = poutine.trace(poutine.uncondition(program.model)).get_trace(*template)
    data = list(template)
    for name in structure.observed_sites:
        index = _matching_argument(conditioned.nodes[name]["value"], template)
        if index is None:
            raise ProgramError(f"observed site {name!r} observes no data argument of the model; "
                               f"simulating needs every observation to be one (x, or a label)")
        data[index] = simulated.nodes[name]["value"].reshape(template[index].shape) \
            .to(template[index].dtype)
    sites = annealed_sites(structure)
    values = {name: simulated.nodes[name]["value"] for name in sites}
    # one ancestral draw only if the model reads x through obs= alone: rescoring the draw
    # with the simulated data as arguments must give the same observation densities
    rescored = poutine.trace(poutine.condition(program.model, data=values)).get_trace(*data)
    for name in structure.observed_sites:
        drawn = simulated.nodes[name]
        again = rescored.nodes[name]
        if not torch.allclose(drawn["fn"].log_prob(drawn["value"]),
                              again["fn"].log_prob(again["value"]), rtol=1e-5, atol=1e-5):
            raise ProgramError(f"the model's distribution of observed site {name!r} depends on "
                               f"the data arguments beyond the observation (an autoregressive "
                               f"decoder?): one run of it is not a draw from p(x, z)")
    return Simulation(tuple(data), flatten_latents(values, sites, (num_points,)), tuple(sites))


@dataclass(frozen=True)
class SandwichResult:
    """Forward and reverse AIS on simulated data, per point, in nats (tensors on the CPU).

    :ivar simulation: the simulated data and their exact latents.
    :ivar forward: forward AIS on the simulated data (its ``log_marginal_likelihood`` is
        the lower bound).
    :ivar upper: ``(N,)`` -log (1/C) sum_c w_rev,c, a stochastic upper bound on log p(x).
    :ivar upper_standard_error: ``(N,)`` delta-method Monte Carlo error over the C reverse chains.
    :ivar reverse_log_weights: ``(C, N)`` log w_rev of every reverse chain.
    :ivar reverse_acceptance_rate: ``(N,)`` mean HMC acceptance of the reverse chains.
    :ivar reverse_step_size: ``(N,)`` their leapfrog step size at the end.
    """

    simulation: Simulation
    forward: AISResult
    upper: torch.Tensor
    upper_standard_error: torch.Tensor
    reverse_log_weights: torch.Tensor
    reverse_acceptance_rate: torch.Tensor
    reverse_step_size: torch.Tensor

    @property
    def lower(self) -> torch.Tensor:
        """``(N,)`` the forward AIS estimate, a stochastic lower bound on log p(x)."""
        return self.forward.log_marginal_likelihood

    @property
    def lower_standard_error(self) -> torch.Tensor:
        """``(N,)`` its Monte Carlo error over the C forward chains."""
        return self.forward.standard_error

    @property
    def gap(self) -> torch.Tensor:
        """``(N,)`` upper - lower: how far either bound can be from log p(x), up to noise."""
        return self.upper - self.lower

    @property
    def num_points(self) -> int:
        return int(self.upper.numel())

    def summary(self) -> dict[str, Any]:
        """Means over the simulated points with standard errors over points, and the settings."""
        lower = mean_and_standard_error(self.lower)
        upper = mean_and_standard_error(self.upper)
        gap = mean_and_standard_error(self.gap)
        forward = self.forward
        return {
            "num_points": self.num_points,
            "num_temperatures": forward.num_temperatures,
            "num_chains": forward.num_chains,
            "num_leapfrog_steps": forward.num_leapfrog_steps,
            "initial": forward.initial,
            "schedule": forward.schedule,
            "lower_mean": lower.mean, "lower_standard_error": lower.standard_error,
            "upper_mean": upper.mean, "upper_standard_error": upper.standard_error,
            "gap_mean": gap.mean, "gap_standard_error": gap.standard_error,
            "gap_max": float(self.gap.max()),
            "forward_acceptance_rate": float(forward.acceptance_rate.mean()),
            "reverse_acceptance_rate": float(self.reverse_acceptance_rate.mean()),
        }

    def __str__(self) -> str:
        s = self.summary()
        return (f"BDMC on {s['num_points']} simulated points (T={s['num_temperatures']}, "
                f"C={s['num_chains']}): lower {s['lower_mean']:.3f}, upper {s['upper_mean']:.3f}, "
                f"gap {s['gap_mean']:.3f} ± {s['gap_standard_error']:.3f} nats")


@evaluates
def bidirectional_monte_carlo(vae: Any, x: torch.Tensor | Sequence[torch.Tensor],
                              num_points: int | None = None, *,
                              num_temperatures: int = 200, num_chains: int = 16,
                              num_leapfrog_steps: int = 5, step_size: float = 0.05,
                              adapt_step_size: bool = True, target_accept: float = 0.65,
                              initial: Initial = "guide", schedule: Schedule = "sigmoid",
                              batch_size: int = 100, seed: int | None = None) -> SandwichResult:
    """Sandwich log p(x) on ``num_points`` points simulated from the model: forward AIS
    below, reverse AIS from the exact latents above.

    Both directions use the same temperatures, chains, leapfrog steps and step-size
    adaptation as :func:`~pyrovae.ais.ais_log_marginal_likelihood` (whose arguments these
    are); the reverse chains of a point all start at its one exact latent.  Cost: twice
    that of AIS on ``num_points`` points.

    :param vae: the program (see :func:`~pyrovae.ais.ais_log_marginal_likelihood`).
    :param x: template data for :func:`simulate` (its values are not used, only its
        size and the arguments that are not observed).
    :param num_points: N points to simulate, at most the template's; ``None``: all.
    :param seed: seed the simulation, the forward and the reverse chains (three unrelated
        streams); ``None``: the global RNG.
    :returns: a :class:`SandwichResult`; bounds ``(N,)`` in nats.

    Example::

        result = bidirectional_monte_carlo(vae, x_test, num_points=100, num_temperatures=1000)
        print(result)  # lower, upper and their mean gap in nats
    """
    check_ais_settings(num_temperatures=num_temperatures, num_chains=num_chains,
                       num_leapfrog_steps=num_leapfrog_steps, step_size=step_size,
                       target_accept=target_accept, batch_size=batch_size)
    program: Program = as_program(vae)
    betas = temperature_schedule(num_temperatures, schedule)
    simulation = simulate(program, x, num_points, seed=_stream_seed(seed, 0))
    settings = {"num_chains": num_chains, "num_leapfrog_steps": num_leapfrog_steps,
                "step_size": step_size, "adapt_step_size": adapt_step_size,
                "target_accept": target_accept, "initial": initial, "batch_size": batch_size}
    forward = ais_log_marginal_likelihood(program, simulation.data,
                                          num_temperatures=num_temperatures, schedule=schedule,
                                          seed=_stream_seed(seed, 1), **settings)
    reverse = anneal_points(program, simulation.data, betas.flip(0), seed=_stream_seed(seed, 2),
                            start=simulation.latents, **settings)
    log_reverse = reverse["log_weights"]
    return SandwichResult(
        simulation=Simulation(tuple(a.cpu() for a in simulation.data),
                              simulation.latents.cpu(), simulation.sites),
        forward=forward,
        upper=-(torch.logsumexp(log_reverse, 0) - math.log(num_chains)),
        upper_standard_error=log_mean_exp_standard_error(log_reverse),
        reverse_log_weights=log_reverse,
        reverse_acceptance_rate=reverse["rate"],
        reverse_step_size=reverse["step"],
    )
