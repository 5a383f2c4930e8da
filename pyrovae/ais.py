"""Annealed importance sampling (AIS) of log p(x) per data point, with vectorized HMC.

For each data point x, C independent chains start at z_0 ~ r(z), where r is the guide
q(z|x) or the prior p(z), and move through the tempered densities

    f_t(z) = r(z)^(1 - beta_t) p(x, z)^beta_t,   0 = beta_0 < beta_1 < ... < beta_T = 1,

by one HMC transition leaving f_t invariant after each weight update

    log w += (beta_t - beta_{t-1}) (log p(x, z_{t-1}) - log r(z_{t-1})),   t = 1..T.

exp(log w) is an unbiased estimate of p(x), so log (1/C) sum_c w_c is a stochastic lower
bound on log p(x) whose gap shrinks as T grows.  With T = 1 it is plain importance
sampling from r with C samples.

log p(x, z), log r(z) and their gradients in z come from Pyro traces of the program's model
(conditioned on z, every continuous latent site; enumerated sites summed out) and guide (or
the latent sites of the model), inside a particle plate of size C left of the data plate:
any prior, likelihood, guide and number of latent layers work.  The leapfrog
integrator is written here and runs on all chains and data points at once; each data
point has its own step size, adapted after every transition towards a target acceptance
rate (as in Wu et al. 2017; the adaptation makes each kernel depend on the chains' past,
a small departure from exact AIS that the papers accept).

The same loop (:func:`anneal_points`) runs the betas backwards from given start states:
the reverse AIS of bidirectional Monte Carlo (:mod:`pyrovae.sandwich`).

References:

1. Neal (2001). Annealed importance sampling. Statistics and Computing 11:125-139.
2. Wu, Burda, Salakhutdinov, Grosse (2017). On the Quantitative Analysis of
   Decoder-Based Generative Models. ICLR.
3. Grosse, Ghahramani, Adams (2015). Sandwiching the marginal likelihood using
   bidirectional Monte Carlo. arXiv:1511.02543 (the sigmoid schedule).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import pyro
import torch
from pyro import poutine

from pyrovae.diagnostics import effective_sample_size, log_mean_exp_standard_error
from pyrovae.evaluation import data_batches, trace_log_prob
from pyrovae.programs import (
    Program,
    ProgramError,
    Structure,
    as_data,
    as_program,
    evaluates,
    is_real_support,
)
from pyrovae.sites import PARTICLE_PLATE

logger = logging.getLogger(__name__)

Initial = Literal["guide", "prior"]
Schedule = Literal["sigmoid", "linear", "geometric"]

#: step sizes stay within these bounds while adapting
MIN_STEP_SIZE, MAX_STEP_SIZE = 1e-4, 10.0
#: multiplicative step-size change per transition
ADAPT_FACTOR = 1.05


def temperature_schedule(num_temperatures: int, schedule: Schedule = "sigmoid", *,
                         sharpness: float = 4.0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Inverse temperatures beta_0 = 0 < ... < beta_T = 1.

    ``sigmoid``: beta_t ∝ sigmoid(sharpness (2 t / T - 1)), rescaled to [0, 1] (Grosse et al.
    2015), dense at both ends; ``linear``: t / T; ``geometric``: 10^(4 (t/T - 1)) after beta_0.

    :param num_temperatures: T >= 1.
    :returns: ``(T + 1,)`` betas.
    """
    if num_temperatures < 1:
        raise ValueError(f"num_temperatures must be positive, got {num_temperatures}")
    t = torch.linspace(0, 1, num_temperatures + 1, dtype=dtype)
    if schedule == "linear":
        return t
    if schedule == "geometric":
        betas = 10.0 ** (4 * (t - 1))
        betas[0] = 0.0
        return betas
    if schedule == "sigmoid":
        if num_temperatures == 1:
            return t
        raw = torch.sigmoid(sharpness * (2 * t - 1))
        return (raw - raw[0]) / (raw[-1] - raw[0])
    raise ValueError(f"unknown schedule {schedule!r}: choose sigmoid, linear or geometric")


@dataclass
class _State:
    """Chains of one batch: z ``(C, B, L)``, log densities ``(C, B)`` and their gradients."""

    z: torch.Tensor
    log_joint: torch.Tensor
    log_initial: torch.Tensor
    grad_joint: torch.Tensor
    grad_initial: torch.Tensor

    def log_target(self, beta: float) -> torch.Tensor:
        return self.log_initial + beta * (self.log_joint - self.log_initial)

    def grad_target(self, beta: float) -> torch.Tensor:
        return self.grad_initial + beta * (self.grad_joint - self.grad_initial)

    def where(self, mask: torch.Tensor, other: _State) -> _State:
        """Elementwise ``self`` where ``mask`` ``(C, B)`` else ``other``."""
        event = mask.unsqueeze(-1)
        return _State(torch.where(event, self.z, other.z),
                      torch.where(mask, self.log_joint, other.log_joint),
                      torch.where(mask, self.log_initial, other.log_initial),
                      torch.where(event, self.grad_joint, other.grad_joint),
                      torch.where(event, self.grad_initial, other.grad_initial))


def annealed_sites(structure: Structure) -> list[str]:
    """The latent sites AIS moves: every latent site of the model not summed out by
    enumeration, in program order (the order of z's blocks)."""
    return [name for name in structure.latent_sites if name not in structure.enumerated_sites]


def flatten_latents(values: Mapping[str, torch.Tensor], sites: Sequence[str],
                    batch_shape: Sequence[int]) -> torch.Tensor:
    """The values of ``sites``, each site's event flattened, side by side: ``(*batch, L)``."""
    if not sites:  # a program without latents: an empty z, and AIS is exact at once
        return torch.zeros(*batch_shape, 0)
    return torch.cat([values[name].detach().reshape(*batch_shape, -1) for name in sites], dim=-1)


class _Densities:
    """log p(x, z) and log r(z) of one batch of data, from traces of the program, with
    z-gradients.  z is every continuous latent site of the model, each site's event
    flattened and the sites concatenated: ``(C, B, L)``."""

    def __init__(self, program: Program, args: tuple[torch.Tensor, ...], num_chains: int,
                 initial: Initial) -> None:
        if initial not in ("guide", "prior"):
            raise ValueError(f"initial must be 'guide' or 'prior', got {initial!r}")
        self.program, self.args, self.num_chains = program, args, num_chains
        structure = program.structure(*args)
        self.nesting = structure.max_plate_nesting
        self.num_enumerated = len(structure.enumerated_sites)
        if initial == "prior" and self.num_enumerated:
            raise ProgramError("AIS from the prior needs p(z) in closed form; the model sums "
                               f"out {', '.join(structure.enumerated_sites)}: use the guide")
        self.initial = initial
        self.sites = annealed_sites(structure)
        source = program.guide if initial == "guide" else program.model
        with torch.no_grad(), self._plate():
            trace = poutine.trace(source).get_trace(*args)
        self.event_shapes: dict[str, torch.Size] = {}
        batch = (num_chains, args[0].shape[0])
        for name in self.sites:
            site = trace.nodes[name]
            if not is_real_support(site["fn"].support):
                raise ProgramError(f"AIS moves continuous latents on the real line; site {name!r} "
                                   f"has support {site['fn'].support}")
            if tuple(site["fn"].batch_shape) != batch:
                raise ProgramError(f"AIS needs latent site {name!r} in the data plate only "
                                   f"(batch shape {batch}), got {tuple(site['fn'].batch_shape)}")
            self.event_shapes[name] = site["fn"].event_shape
        self.z0 = flatten_latents({name: trace.nodes[name]["value"] for name in self.sites},
                                  self.sites, batch)
        try:
            self._log_densities(self.z0)
        except (RuntimeError, IndexError, ValueError, TypeError) as error:
            failure = f"{type(error).__name__}: {error}".splitlines()[0]
            raise ProgramError(f"AIS runs its chains batched in one trace, and this program does "
                               f"not run so ({failure}); log_marginal_likelihood samples it one "
                               f"trace at a time") from error

    def _plate(self) -> pyro.plate:
        return pyro.plate(PARTICLE_PLATE, self.num_chains, dim=-(self.nesting + 1))

    def _values(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        sizes = [int(math.prod(shape)) for shape in self.event_shapes.values()]
        return {name: part.reshape(*z.shape[:-1], *shape) for (name, shape), part in
                zip(self.event_shapes.items(), z.split(sizes, dim=-1), strict=True)}

    def _log_densities(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        values = self._values(z)
        model = poutine.condition(self.program.model, data=values)
        if self.num_enumerated:
            model = poutine.enum(model, first_available_dim=-(self.nesting + 2))
        with self._plate():
            model_trace = poutine.trace(model).get_trace(*self.args)
            log_joint = trace_log_prob(model_trace, self.nesting, False, self.num_enumerated)
            if self.initial == "guide":
                guide = poutine.condition(self.program.guide, data=values)
                guide_trace = poutine.trace(guide).get_trace(*self.args)
                log_initial = trace_log_prob(guide_trace, self.nesting, False)
            else:
                latent = poutine.Trace()
                for name in self.sites:
                    latent.add_node(name, **model_trace.nodes[name])
                log_initial = trace_log_prob(latent, self.nesting, False)
        shape = z.shape[:-1]
        return log_joint.expand(shape), log_initial.expand(shape)

    def __call__(self, z: torch.Tensor) -> _State:
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            log_joint, log_initial = self._log_densities(z)
            grad_joint, grad_initial = (
                torch.autograd.grad(log_density.sum(), z, retain_graph=True, allow_unused=True)[0]
                if log_density.requires_grad else None for log_density in (log_joint, log_initial))
            # None: the density does not depend on z (a program without latent sites)
            grad_joint = torch.zeros_like(z) if grad_joint is None else grad_joint
            grad_initial = torch.zeros_like(z) if grad_initial is None else grad_initial
        return _State(z.detach(), log_joint.detach(), log_initial.detach(), grad_joint, grad_initial)


def _hmc_step(densities: _Densities, state: _State, beta: float, step_size: torch.Tensor,
              num_leapfrog_steps: int) -> tuple[_State, torch.Tensor]:
    """One HMC transition leaving f_beta invariant; ``step_size`` is ``(B,)``.

    :returns: the new state and the ``(C, B)`` acceptance indicator.
    """
    eps = step_size.unsqueeze(-1)  # broadcasts over chains and latent dimensions
    momentum = torch.randn_like(state.z)
    current_energy = -state.log_target(beta) + 0.5 * momentum.pow(2).sum(-1)
    proposal = state
    p = momentum + 0.5 * eps * state.grad_target(beta)
    for step in range(num_leapfrog_steps):
        proposal = densities(proposal.z + eps * p)
        if step < num_leapfrog_steps - 1:
            p = p + eps * proposal.grad_target(beta)
    p = p + 0.5 * eps * proposal.grad_target(beta)
    proposed_energy = -proposal.log_target(beta) + 0.5 * p.pow(2).sum(-1)
    log_accept = (current_energy - proposed_energy).clamp(max=0.0)
    uniform = torch.rand_like(log_accept)
    # a non-finite proposal (a divergent trajectory) has NaN energy and is rejected
    accept = torch.isfinite(proposed_energy) & (torch.log(uniform) < log_accept)
    return proposal.where(accept, state), accept


@dataclass(frozen=True)
class AISResult:
    """Annealed importance sampling estimates per data point.

    Tensors are on the CPU; log values in nats.

    :ivar log_marginal_likelihood: ``(N,)`` log (1/C) sum_c w_c, a stochastic lower bound.
    :ivar standard_error: ``(N,)`` delta-method Monte Carlo error from the spread over chains.
    :ivar log_weights: ``(C, N)`` final log weight of every chain.
    :ivar acceptance_rate: ``(N,)`` mean HMC acceptance over chains and transitions.
    :ivar step_size: ``(N,)`` the leapfrog step size at the end.
    :ivar samples: ``(C, N, L)`` final states, approximate draws from p(z|x).
    """

    log_marginal_likelihood: torch.Tensor
    standard_error: torch.Tensor
    log_weights: torch.Tensor
    acceptance_rate: torch.Tensor
    step_size: torch.Tensor
    samples: torch.Tensor
    num_temperatures: int
    num_chains: int
    num_leapfrog_steps: int
    initial: str
    schedule: str

    @property
    def effective_sample_size(self) -> torch.Tensor:
        """``(N,)`` ESS of the C chain weights."""
        return effective_sample_size(self.log_weights)


def _anneal(densities: _Densities, betas: torch.Tensor, num_leapfrog_steps: int,
            step_size: torch.Tensor, adapt: bool, target_accept: float,
            start: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, _State, torch.Tensor]:
    """Run the chains of one batch through ``betas`` in the order given.

    Each weight update is ``(beta_t - beta_{t-1}) (log p(x, z) - log r(z))``, so betas
    running from 1 down to 0 give reverse AIS: log weights whose exponential is an unbiased
    estimate of 1 / p(x) when the chains start at exact posterior draws.

    :param start: ``(C, B, L)`` the chains' first states; ``None``: the draws from r.
    :returns: log weights ``(C, B)``, acceptance rate ``(B,)``, final state, step sizes ``(B,)``.
    """
    state = densities(densities.z0 if start is None else start)
    log_weights = torch.zeros_like(state.log_joint)
    accepted = torch.zeros_like(state.log_joint)
    betas_list = betas.tolist()
    num_transitions = len(betas_list) - 2
    for t in range(1, len(betas_list)):
        log_weights = log_weights + (betas_list[t] - betas_list[t - 1]) * (
            state.log_joint - state.log_initial)
        if t == len(betas_list) - 1:
            break
        state, accept = _hmc_step(densities, state, betas_list[t], step_size, num_leapfrog_steps)
        accept = accept.to(accepted.dtype)
        accepted = accepted + accept
        if adapt:
            rate = accept.mean(0)
            step_size = torch.where(rate > target_accept, step_size * ADAPT_FACTOR,
                                    step_size / ADAPT_FACTOR).clamp(MIN_STEP_SIZE, MAX_STEP_SIZE)
    rate = (accepted / max(num_transitions, 1)).mean(0)
    return log_weights, rate, state, step_size


@evaluates
def ais_log_marginal_likelihood(vae: Any, x: torch.Tensor | Sequence[torch.Tensor], *,
                                num_temperatures: int = 200,
                                num_chains: int = 16, num_leapfrog_steps: int = 5,
                                step_size: float = 0.05, adapt_step_size: bool = True,
                                target_accept: float = 0.65, initial: Initial = "guide",
                                schedule: Schedule = "sigmoid", batch_size: int = 100,
                                seed: int | None = None,
                                batches: Sequence[int] | None = None) -> AISResult:
    """Estimate log p(x) per data point by annealed importance sampling with HMC.

    Cost: ``num_temperatures * num_leapfrog_steps`` gradient evaluations of log p(x, z) on
    ``num_chains * batch_size`` latent points at a time.

    :param vae: the program: a :class:`~pyrovae.models.VAE`, an object with ``model`` and
        ``guide``, or a ``(model, guide)`` pair; its latent sites must be continuous on the
        real line (enumerated discrete sites are summed out).
    :param x: the data, or a tuple of the model's data arguments (points along dim 0).
    :param num_temperatures: T, the number of annealing steps (HMC transitions: T - 1).
    :param num_chains: C, independent chains per data point.
    :param num_leapfrog_steps: leapfrog steps per HMC transition.
    :param step_size: initial leapfrog step size.
    :param adapt_step_size: adapt each point's step size towards ``target_accept``.
    :param target_accept: the acceptance rate aimed at (0.65, as in Wu et al. 2017).
    :param initial: start from the ``"guide"`` q(z|x) or the ``"prior"`` p(z).
    :param schedule: spacing of the betas, see :func:`temperature_schedule`.
    :param batch_size: data points per vectorized trace.
    :param seed: draw each data batch's chains from a stream seeded by ``(seed, batch
        index)``, so a point's estimate does not depend on the number of processes; see
        :func:`~pyrovae.evaluation.log_marginal_likelihood`.  ``None``: the global RNG.
    :param batches: anneal only these batches of ``batch_size`` points (their points, in
        order), see :func:`~pyrovae.evaluation.log_marginal_likelihood`.
    :returns: an :class:`AISResult`; estimates ``(N,)`` in nats.

    Example::

        result = ais_log_marginal_likelihood(vae, x_test[:100], num_temperatures=500)
        mean, stderr = result.log_marginal_likelihood.mean(), result.standard_error
    """
    check_ais_settings(num_temperatures=num_temperatures, num_chains=num_chains,
                       num_leapfrog_steps=num_leapfrog_steps, step_size=step_size,
                       target_accept=target_accept, batch_size=batch_size)
    program = as_program(vae)
    args = program.check_data(as_data(x))
    whole = anneal_points(program, args, temperature_schedule(num_temperatures, schedule),
                          num_chains=num_chains, num_leapfrog_steps=num_leapfrog_steps,
                          step_size=step_size, adapt_step_size=adapt_step_size,
                          target_accept=target_accept, initial=initial, batch_size=batch_size,
                          seed=seed, batches=batches)
    log_weights = whole["log_weights"]
    return AISResult(
        log_marginal_likelihood=torch.logsumexp(log_weights, 0) - math.log(num_chains),
        standard_error=log_mean_exp_standard_error(log_weights),
        log_weights=log_weights,
        acceptance_rate=whole["rate"],
        step_size=whole["step"],
        samples=whole["samples"],
        num_temperatures=num_temperatures,
        num_chains=num_chains,
        num_leapfrog_steps=num_leapfrog_steps,
        initial=initial,
        schedule=schedule,
    )


def check_ais_settings(*, num_temperatures: int, num_chains: int, num_leapfrog_steps: int,
                       step_size: float, target_accept: float, batch_size: int) -> None:
    """Raise ``ValueError`` naming the first AIS setting out of range."""
    for name, value in (("num_temperatures", num_temperatures), ("num_chains", num_chains),
                        ("num_leapfrog_steps", num_leapfrog_steps), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not step_size > 0:
        raise ValueError(f"step_size must be positive, got {step_size}")
    if not 0 < target_accept < 1:
        raise ValueError(f"target_accept must be in (0, 1), got {target_accept}")


def anneal_points(program: Program, args: tuple[torch.Tensor, ...], betas: torch.Tensor, *,
                  num_chains: int, num_leapfrog_steps: int, step_size: float,
                  adapt_step_size: bool, target_accept: float, initial: Initial,
                  batch_size: int, seed: int | None = None,
                  batches: Sequence[int] | None = None,
                  start: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The chains of every data point through ``betas``, in batches: the one loop behind
    forward AIS and the reverse AIS of :mod:`pyrovae.sandwich`.

    :param args: the checked data arguments, points along dim 0.
    :param betas: ``(T + 1,)`` inverse temperatures in the order the chains visit them.
    :param start: ``(N, L)`` a first state per data point, shared by its C chains (the
        latents flattened as :func:`flatten_latents` does); ``None``: draws from r.
    :returns: ``log_weights`` ``(C, N)``, ``rate`` ``(N,)``, ``step`` ``(N,)`` and
        ``samples`` ``(C, N, L)``, float64 (samples in the model's dtype) on the CPU.
    """
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in
                                            ("log_weights", "rate", "step", "samples")}
    # the start states travel with the data, so each batch (and process) gets its own
    batched = args if start is None else (*args, start)
    # validation checks every distribution's arguments at every leapfrog step: slow, and a
    # divergent trajectory (rejected below) would raise instead of being rejected
    with pyro.validation_enabled(False):
        for batch, draws in data_batches(batched, batch_size, program.device, seed=seed,
                                         batches=batches):
            first = None
            if start is not None:
                batch, first = batch[:-1], batch[-1].expand(num_chains, *batch[-1].shape)
            with draws:
                densities = _Densities(program, batch, num_chains, initial)
                if first is not None and first.shape != densities.z0.shape:
                    raise ValueError(f"start states of shape {tuple(first.shape[1:])} for "
                                     f"latents of shape {tuple(densities.z0.shape[1:])}")
                steps = torch.full((batch[0].shape[0],), float(step_size),
                                   device=densities.z0.device, dtype=densities.z0.dtype)
                log_weights, rate, state, steps = _anneal(
                    densities, betas, num_leapfrog_steps, steps, adapt_step_size, target_accept,
                    None if first is None else first.to(densities.z0.dtype))
            parts["log_weights"].append(log_weights.double().cpu())
            parts["rate"].append(rate.double().cpu())
            parts["step"].append(steps.double().cpu())
            parts["samples"].append(state.z.cpu())
            logger.debug("AIS batch of %d points: acceptance %.2f", batch[0].shape[0],
                         float(parts["rate"][-1].mean()))
    data_dims = {"log_weights": 1, "rate": 0, "step": 0, "samples": 1}
    return {name: torch.cat(values, dim=data_dims[name]) for name, values in parts.items()}
