"""Training objectives: Pyro ELBO implementations selectable by name, and the KL weight.

- ``trace_elbo``: :class:`pyro.infer.Trace_ELBO`, the Monte Carlo ELBO with the
  reparameterisation trick (score-function terms for sites that are not reparameterised);
- ``meanfield_elbo``: :class:`pyro.infer.TraceMeanField_ELBO`, which uses the analytic
  KL(q(z|x) || p(z)) where the pair has one and falls back to Monte Carlo otherwise
  (mixture, VampPrior and flow priors; full-covariance, low-rank and IAF guides against
  a diagonal prior);
- ``iwae``: :class:`ImportanceWeightedELBO`, the K-sample importance-weighted bound per
  data point, K = ``num_particles``;
- ``stl_elbo``: :class:`PathDerivativeELBO`, the ELBO with the path-derivative ("sticking
  the landing") gradient for the guide;
- ``iwae_dreg``: :class:`DoublyReparameterizedIWAE`, the IWAE bound with doubly
  reparameterised gradients for the guide and IWAE's for the model.

The last two are written once on Pyro traces (:func:`path_log_weights`: the guide's log
density re-scored with its parameters held fixed), so they apply to any program whose guide
sites are reparameterised.

The training loop takes them as :class:`LoopTrace_ELBO` and :class:`LoopTraceMeanField_ELBO`:
Pyro's classes, whose loss and gradient they compute with Pyro's own per-particle code,
without the NaN check (a backward hook and a synchronisation) and the ``.item()`` that Pyro's
``differentiable_loss`` adds to every call; the loop checks every loss itself, and the gradient
wherever it measures its norm (``--clip-norm``, ``--adam-normalize-gradients``).

KL warm-up and beta-VAE weighting multiply the log densities of every latent site by a
weight beta (:class:`LatentScale`), leaving the likelihood term alone:

    ELBO_beta = E_q[log p(x|z)] - beta KL(q(z|x) || p(z)).

References:

1. Burda, Grosse, Salakhutdinov (2016). Importance Weighted Autoencoders. ICLR.
2. Bowman, Vilnis, Vinyals, Dai, Jozefowicz, Bengio (2016). Generating Sentences from a
   Continuous Space. CoNLL (KL annealing).
3. Sønderby, Raiko, Maaløe, Sønderby, Winther (2016). Ladder Variational Autoencoders.
   NeurIPS (linear KL warm-up).
4. Higgins et al. (2017). beta-VAE. ICLR.
5. Roeder, Wu, Duvenaud (2017). Sticking the Landing: Simple, Lower-Variance Gradient
   Estimators for Variational Inference. NeurIPS.
6. Tucker, Lawson, Gu, Maddison (2019). Doubly Reparameterized Gradient Estimators for Monte
   Carlo Objectives. ICLR.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.infer import ELBO, Trace_ELBO, TraceEnum_ELBO, TraceMeanField_ELBO
from pyro.poutine.messenger import Messenger

from pyrovae.errors import ConfigError
from pyrovae.evaluation import log_weights, particle_traces, trace_log_prob
from pyrovae.programs import Program, ProgramError, Structure, is_sample_site
from pyrovae.registration import ignores_module_parameters
from pyrovae.sites import PARTICLE_PLATE


class ImportanceWeightedELBO(ELBO):
    """The IWAE bound as a training loss: minus the sum over data points of

        L_K(x_n) = log (1/K) sum_k p(x_n, z_k) / q(z_k | x_n),   z_k ~ q(z | x_n),

    from one vectorized trace with a ``"particles"`` plate (``dim=-2``), so the K weights
    of each data point are combined per point, never across the minibatch. Gradients use
    reparameterised draws. At K = 1 it is the ``Trace_ELBO`` estimator; for K > 1,
    E[L_K] >= ELBO and rises with K towards log p(x).

    Site scales (:class:`LatentScale`, subsampling) multiply the log densities before the
    log-sum-exp.

    With the :class:`~pyrovae.models.VAE`, Pyro's ``RenyiELBO(alpha=0, num_particles=K,
    vectorize_particles=True)`` computes the same quantity (every site shares the data
    plate, so it is not summed before the log-sum-exp; ``tests/test_objectives.py`` checks the
    loss and gradients agree); this class skips the guide sites' score parts that
    ``RenyiELBO`` also computes, and gives the bound per data point (:meth:`bound`).

    :param num_particles: K, importance samples per data point.
    :param elbo_options: other :class:`pyro.infer.ELBO` options (``max_plate_nesting``,
        ``vectorize_particles``), accepted for compatibility with :func:`make_objective`;
        the particles are always vectorized.

    Example::

        svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}),
                  ImportanceWeightedELBO(num_particles=5))
        svi.step(x)  # minus the summed 5-sample bound, nats

    References:

    1. Burda, Grosse, Salakhutdinov (2016). Importance Weighted Autoencoders. ICLR.
    """

    #: the objective's name in :data:`OBJECTIVES`, for messages
    objective_name = "iwae"

    def __init__(self, num_particles: int = 5, **elbo_options: Any) -> None:
        if num_particles < 1:
            raise ValueError(f"num_particles must be positive, got {num_particles}")
        super().__init__(num_particles=num_particles, **elbo_options)
        # the program's structure is read once per (model, guide) pair, not every step
        self._programs: dict[tuple[int, int], Program] = {}

    def _program(self, model: Callable[..., object], guide: Callable[..., object],
                 args: tuple[Any, ...]) -> Program:
        key = (id(model), id(guide))
        if key not in self._programs:
            program = Program(model, guide)
            stiff = program.structure(*args).non_reparameterized_sites
            if stiff:
                raise ProgramError(f"the {self.objective_name} objective needs reparameterised "
                                   f"guide sites; "
                                   f"{', '.join(map(repr, stiff))} cannot be reparameterised")
            self._programs = {key: program}
        return self._programs[key]

    def _get_trace(self, model: Callable[..., object], guide: Callable[..., object],
                   args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
        # one vectorized trace pair holds all K particles
        nesting = self._program(model, guide, args).structure(*args).max_plate_nesting
        return particle_traces(model, guide, *args, num_samples=self.num_particles,
                               max_plate_nesting=nesting)

    def bound(self, model: Callable[..., object], guide: Callable[..., object],
              *args: torch.Tensor) -> torch.Tensor:
        """L_K(x_n) for every data point, differentiable: ``(N,)`` nats."""
        log_w = log_weights(self._program(model, guide, args), *args,
                            num_samples=self.num_particles, scaled=True)
        return torch.logsumexp(log_w, dim=0) - math.log(self.num_particles)

    def differentiable_loss(self, model: Callable[..., object], guide: Callable[..., object],
                            *args: torch.Tensor) -> torch.Tensor:
        """Minus the summed bound, a scalar tensor in nats."""
        return -self.bound(model, guide, *args).sum()

    def loss(self, model: Callable[..., object], guide: Callable[..., object],
             *args: torch.Tensor) -> float:
        """Minus the summed bound, in nats, without gradients."""
        with torch.no_grad():
            return self.differentiable_loss(model, guide, *args).item()

    def loss_and_grads(self, model: Callable[..., object], guide: Callable[..., object],
                       *args: torch.Tensor) -> float:
        """Minus the summed bound, in nats; accumulates its gradients into the parameters."""
        loss = self.differentiable_loss(model, guide, *args)
        loss.backward(retain_graph=self.retain_graph)
        return loss.item()


def _with_values(trace: poutine.Trace, values: dict[str, torch.Tensor]) -> poutine.Trace:
    """A shallow copy of ``trace`` whose sites ``values`` hold the given values instead."""
    copy = trace.copy()
    for name, value in values.items():
        copy.nodes[name] = {**trace.nodes[name], "value": value}
    return copy


def path_log_weights(model: Callable[..., object], guide: Callable[..., object],
                     *args: torch.Tensor, num_particles: int, structure: Structure
                     ) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, int]]]:
    """Log importance weights whose gradient reaches the guide only through its draws.

    The value is that of :func:`~pyrovae.evaluation.log_weights` with site scales,
    log w_k = log p(x, z_k) - log q_phi(z_k | x), z_k = g_phi(eps_k, x).  The gradient is
    that of log p(x, z_k) - log q_{sg(phi)}(z_k): the guide's log density is re-scored with
    its parameters held fixed, so that d log w_k / d phi is the path derivative

        (d log w_k / d z_k) (d z_k / d phi),

    without the score term d log q_phi(z) / d phi at fixed z, whose expectation is zero.  This
    holds for any program, whatever holds phi (modules, ``pyro.param``): log q_{sg(phi)}(z) is
    written as log q_phi(z) - log q_phi(sg(z)) + sg(log q_phi(z)), the two re-scorings
    having the same partial derivative in phi.  A guide with one sample site re-scores that
    site's distribution; a guide with several (z2 ~ q(z2 | z1)) is replayed twice, once on
    the draws and once on their detached copies, so that d log q(z2 | z1) / d z1 is kept.  A
    distribution that scores a value by inverting a transform (IAF) pays that inverse here.

    :param num_particles: K, draws per data point, in the ``"particles"`` plate.
    :param structure: the program's :class:`~pyrovae.programs.Structure`; its guide sites
        must be reparameterised.
    :returns: ``(log_w, draws)``: ``(K, N)`` log weights in nats, and for each latent site of
        the guide ``(z, event_dim)``, the tensor through which the log weights see its draws
        (a hook on it reweights their path gradient per particle and point).
    """
    nesting = structure.max_plate_nesting
    particle_dim = -(nesting + 1)
    with pyro.plate(PARTICLE_PLATE, num_particles, dim=particle_dim):
        guide_trace = poutine.trace(guide).get_trace(*args)
        sites = [name for name, site in guide_trace.nodes.items() if is_sample_site(site)]
        latent = [name for name in sites if not guide_trace.nodes[name]["is_observed"]]
        # an alias of each draw: the only way the log weights see it
        draws = {name: guide_trace.nodes[name]["value"].view_as(guide_trace.nodes[name]["value"])
                 for name in latent}
        seen = _with_values(guide_trace, draws)
        fixed = _with_values(guide_trace, {name: z.detach() for name, z in draws.items()})
        replayed = poutine.replay(model, trace=seen)
        if structure.enumerated_sites:
            replayed = poutine.enum(replayed, first_available_dim=particle_dim - 1)
        model_trace = poutine.trace(replayed).get_trace(*args)
        if len(sites) > 1:  # a later site's distribution may depend on an earlier draw
            seen = poutine.trace(poutine.replay(guide, trace=seen)).get_trace(*args)
            fixed = poutine.trace(poutine.replay(guide, trace=fixed)).get_trace(*args)
    log_p = trace_log_prob(model_trace, nesting, True, len(structure.enumerated_sites))
    log_q = trace_log_prob(seen, nesting, True)
    fixed_log_q = trace_log_prob(fixed, nesting, True)
    # value log q; gradient only through the draws (the phi-partials cancel)
    log_q = log_q - fixed_log_q + fixed_log_q.detach()
    num_points = args[0].shape[0]
    events = {name: (z, guide_trace.nodes[name]["fn"].event_dim) for name, z in draws.items()}
    return (log_p - log_q).expand(num_particles, num_points), events


class PathDerivativeELBO(ImportanceWeightedELBO):
    """The ELBO with the path-derivative ("sticking the landing") gradient: minus the sum over
    data points of

        ELBO_K(x_n) = (1/K) sum_k [log p(x_n, z_k) - log q_{sg(phi)}(z_k | x_n)],
        z_k = g_phi(eps_k, x_n),

    where sg stops the gradient: log q is evaluated with the guide's parameters phi held
    fixed (:func:`path_log_weights`).  Its value is the Monte Carlo ELBO of
    :class:`pyro.infer.Trace_ELBO`; its gradient drops the score term E_q[d log q_phi(z) /
    d phi] = 0, so it is unbiased, and it vanishes for every draw when q(z|x) = p(z|x)
    (then log w_k = log p(x) does not depend on z_k), where ``Trace_ELBO``'s does not.  The
    model's parameters get ``Trace_ELBO``'s gradient.

    Every guide site must be reparameterised.

    :param num_particles: K, draws per data point (averaged).

    Example::

        svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}),
                  PathDerivativeELBO(num_particles=1))

    References:

    1. Roeder, Wu, Duvenaud (2017). Sticking the Landing: Simple, Lower-Variance Gradient
       Estimators for Variational Inference. NeurIPS.
    """

    objective_name = "stl_elbo"

    def __init__(self, num_particles: int = 1, **elbo_options: Any) -> None:
        super().__init__(num_particles=num_particles, **elbo_options)

    def _path_log_weights(self, model: Callable[..., object], guide: Callable[..., object],
                          args: tuple[torch.Tensor, ...]
                          ) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, int]]]:
        structure = self._program(model, guide, args).structure(*args)
        return path_log_weights(model, guide, *args, num_particles=self.num_particles,
                                structure=structure)

    def bound(self, model: Callable[..., object], guide: Callable[..., object],
              *args: torch.Tensor) -> torch.Tensor:
        """The ELBO estimate of every data point with the path-derivative gradient: ``(N,)``
        nats."""
        log_w, _ = self._path_log_weights(model, guide, args)
        return log_w.mean(0)


class DoublyReparameterizedIWAE(PathDerivativeELBO):
    """The IWAE bound with doubly reparameterised gradients for the guide (DReG).

    The value is the K-sample bound of :class:`ImportanceWeightedELBO`,
    L_K(x) = log (1/K) sum_k w_k, with normalised weights w~_k = w_k / sum_j w_j.  Its
    gradient in the model's parameters theta is IWAE's, sum_k w~_k d log w_k / d theta.  In
    the guide's parameters phi, IWAE's gradient sum_k w~_k d log w_k / d phi carries score
    terms whose variance grows with K while the signal shrinks (Rainforth et al. 2018).
    Reparameterising the score term a second time (Tucker et al. 2019) gives an estimator of
    the same expectation without them:

        d L_K / d phi  ~=  sum_k w~_k^2 (d log w_k / d z_k) (d z_k / d phi).

    One surrogate gives both gradients in one backward pass.  With log w_k from
    :func:`path_log_weights` (a path-only gradient in phi), the surrogate is
    S = sum_k sg(w~_k) log w_k, whose theta-gradient is IWAE's; its phi-gradient would be
    sum_k w~_k (path of log w_k), so a gradient hook on each draw z_k multiplies the gradient
    arriving there by w~_k a second time.  The hook sits on the alias through which the log
    weights see z_k, not on z_k itself, so in a hierarchical guide (z2 drawn from z1) the
    gradient reaching z1 through z2 is weighted once, not twice.  The loss is
    -sum_n [sg(L_K(x_n)) + S_n - sg(S_n)]: the bound's value, the surrogate's gradient.

    At K = 1 it is :class:`PathDerivativeELBO`; when q(z|x) = p(z|x) the guide's gradient is
    zero for every draw.  Every guide site must be reparameterised (and, as for every
    objective here, inside the data plate).

    :param num_particles: K, importance samples per data point.

    Example::

        svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}),
                  DoublyReparameterizedIWAE(num_particles=5))

    References:

    1. Tucker, Lawson, Gu, Maddison (2019). Doubly Reparameterized Gradient Estimators for
       Monte Carlo Objectives. ICLR.
    2. Rainforth, Kosiorek, Le, Maddison, Igl, Wood, Teh (2018). Tighter Variational Bounds
       are Not Necessarily Better. ICML.
    3. Burda, Grosse, Salakhutdinov (2016). Importance Weighted Autoencoders. ICLR.
    """

    objective_name = "iwae_dreg"

    def __init__(self, num_particles: int = 5, **elbo_options: Any) -> None:
        super().__init__(num_particles=num_particles, **elbo_options)

    def bound(self, model: Callable[..., object], guide: Callable[..., object],
              *args: torch.Tensor) -> torch.Tensor:
        """L_K(x_n) for every data point, with the DReG gradient: ``(N,)`` nats."""
        log_w, draws = self._path_log_weights(model, guide, args)
        weights = torch.softmax(log_w.detach(), dim=0)  # (K, N)
        num_particles, num_points = weights.shape
        for z, event_dim in draws.values():
            if z.requires_grad:
                # batch shape (K, inner plates..., N), the data plate at -1
                aligned = weights.reshape(num_particles, *(1,) * (z.dim() - event_dim - 2),
                                          num_points, *(1,) * event_dim)
                z.register_hook(lambda grad, aligned=aligned: grad * aligned)
        surrogate = (weights * log_w).sum(0)
        value = torch.logsumexp(log_w.detach(), dim=0) - math.log(num_particles)
        return value + (surrogate - surrogate.detach())


@ignores_module_parameters  # it scales sample sites only
class LatentScale(Messenger):
    """Multiply the log densities of every latent site (model and guide) by ``beta``.

    Wrap both model and guide, so that both log p(z) and log q(z|x) are weighted and the
    KL term (analytic or Monte Carlo) is multiplied by beta; change ``beta`` between steps
    for a warm-up. Evaluation (:mod:`pyrovae.evaluation`) ignores site scales, so log p(x)
    is unaffected.

    :param beta: the KL weight, > 0.

    Example::

        kl = LatentScale(beta=0.1)
        svi = SVI(kl(vae.model), kl(vae.guide), optimizer, Trace_ELBO())
        kl.beta = kl_weight(epoch, warmup_epochs=10)  # at the start of each epoch
    """

    def __init__(self, beta: float = 1.0) -> None:
        super().__init__()
        self.beta = beta

    def _process_message(self, msg: dict[str, Any]) -> None:
        if msg["type"] == "sample" and not msg["is_observed"] and self.beta != 1.0:
            msg["scale"] = self.beta * msg["scale"]


def kl_weight(epoch: int, *, beta: float = 1.0, warmup_epochs: int = 0) -> float:
    """The KL weight of a linear warm-up: ``beta * min(1, epoch / warmup_epochs)``.

    :param epoch: the epoch about to run, counted from 1, so the first epoch already has a
        positive weight ``beta / warmup_epochs``.
    :param beta: the weight after the warm-up (1 for the ELBO, other values for a beta-VAE).
    :param warmup_epochs: length of the warm-up; 0 means none.
    """
    if epoch < 1:
        raise ValueError(f"epochs count from 1, got {epoch}")
    if warmup_epochs <= 0:
        return beta
    return beta * min(1.0, epoch / warmup_epochs)


class _LossCheckedByTheLoop:
    """``differentiable_loss`` from Pyro's per-particle losses (``_get_traces`` and
    ``_differentiable_loss_particle`` of the Pyro class it is mixed into), minus two costs of
    Pyro's own wrapper: a NaN check that registers a backward hook and synchronises with the
    device, and ``loss + (surrogate - surrogate.item())``, another synchronisation, written
    here as ``loss + (surrogate - surrogate.detach())``: the same value (the ELBO) and the
    same gradient (the surrogate's).  For a loop that checks each loss itself; a NaN gradient
    of a finite loss no longer warns."""

    num_particles: int

    def differentiable_loss(self, model: Callable[..., object], guide: Callable[..., object],
                            *args: Any, **kwargs: Any) -> torch.Tensor:
        loss: Any = 0.0
        surrogate: Any = 0.0
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):  # type: ignore[attr-defined]
            particle, surrogate_particle = self._differentiable_loss_particle(  # type: ignore[attr-defined]
                model_trace, guide_trace)
            loss = loss + particle / self.num_particles
            surrogate = surrogate + surrogate_particle / self.num_particles
        if not torch.is_tensor(surrogate):  # a program without sample sites
            return torch.as_tensor(loss)
        return loss + (surrogate - surrogate.detach())


class LoopTrace_ELBO(_LossCheckedByTheLoop, Trace_ELBO):
    """:class:`pyro.infer.Trace_ELBO` for pyrovae's training loop (see the module doc)."""


class LoopTraceMeanField_ELBO(_LossCheckedByTheLoop, TraceMeanField_ELBO):
    """:class:`pyro.infer.TraceMeanField_ELBO` for pyrovae's training loop."""


@dataclass(frozen=True)
class AuxiliaryLoss:
    """A further model/guide pair that :func:`~pyrovae.train.fit` trains at every step, on
    the same batch and with the same optimizer, after the program's own loss: a separate
    gradient step each, in order, as a list of Pyro ``SVI`` objects sharing one optimizer
    steps (Kingma et al.'s auxiliary classification loss, trained as Pyro's ``ss_vae_M2.py``
    trains it: a model that observes the labels under ``poutine.scale``, a guide without
    sample sites).  Its loss is minus its ELBO, with ``TraceEnum_ELBO`` where it enumerates.

    :param model: ``model(*batch)``, taking the program's data arguments.
    :param guide: ``guide(*batch)``.

    Example::

        fit(m2, data, auxiliary=[AuxiliaryLoss(m2.model_classify, m2.guide_classify)])
    """

    model: Callable[..., object]
    guide: Callable[..., object]


#: objectives selectable by name from the CLI and config
OBJECTIVES: dict[str, type[ELBO]] = {
    "trace_elbo": LoopTrace_ELBO,
    "meanfield_elbo": LoopTraceMeanField_ELBO,
    "iwae": ImportanceWeightedELBO,
    "stl_elbo": PathDerivativeELBO,
    "iwae_dreg": DoublyReparameterizedIWAE,
}

#: objectives that need reparameterised guide sites (they differentiate through the draws)
REPARAMETERIZED_OBJECTIVES = ("iwae", "stl_elbo", "iwae_dreg")


def make_objective(name: str, num_particles: int = 1, *,
                   structure: Structure | None = None, free_bits: float = 0.0,
                   free_bits_group: str = "dimension") -> ELBO:
    """An objective from :data:`OBJECTIVES` that draws ``num_particles`` z per data point, vectorized.

    The loss it returns is minus the objective summed over the minibatch, in nats.

    :param structure: the program's :class:`~pyrovae.programs.Structure` (its plate nesting
        and enumerated sites).  A program with enumerated sites trains ``trace_elbo`` and
        ``meanfield_elbo`` with :class:`pyro.infer.TraceEnum_ELBO`, which sums those sites out
        exactly (the same ELBO, with the Monte Carlo KL of the continuous sites).
    :param free_bits: positive: the ELBO with a floor of this many nats under the KL of each
        ``free_bits_group`` (:class:`~pyrovae.free_bits.FreeBitsELBO`; its analytic KL
        where torch has one under ``meanfield_elbo``).
    """
    if free_bits:
        return _free_bits_objective(name, num_particles, structure, free_bits, free_bits_group)
    if name not in OBJECTIVES:
        raise ConfigError(f"unknown objective {name!r}; known: {', '.join(OBJECTIVES)}")
    if num_particles < 1:
        raise ConfigError(f"num_particles must be positive, got {num_particles}")
    nesting = structure.max_plate_nesting if structure is not None else 1
    if name == "meanfield_elbo" and structure is not None and len(structure.latent_sites) > 1:
        # TraceMeanField_ELBO's KL terms assume each latent's parents in the model are drawn
        # before it in the guide; a hierarchy's guide z1 -> z2 breaks that, silently
        raise ConfigError(f"meanfield_elbo needs a program with one latent site; this one has "
                          f"{', '.join(structure.latent_sites)}: use trace_elbo")
    objective = OBJECTIVES[name]
    if structure is not None and structure.enumerates and name not in REPARAMETERIZED_OBJECTIVES:
        objective = TraceEnum_ELBO  # the importance-weighted log weights sum them out
    return objective(num_particles=num_particles, vectorize_particles=num_particles > 1,
                     max_plate_nesting=nesting)


def _free_bits_objective(name: str, num_particles: int, structure: Structure | None,
                         free_bits: float, group: str) -> ELBO:
    """:func:`make_objective` with free bits, or one line saying why it cannot apply."""
    from pyrovae.free_bits import FreeBitsELBO

    if name not in ("trace_elbo", "meanfield_elbo"):
        raise ConfigError(f"free bits floors the KL term of the ELBO, which the {name} "
                          f"objective does not have: use trace_elbo or meanfield_elbo")
    if structure is not None and structure.enumerates:
        summed = structure.enumerated_sites + structure.guide_enumerated_sites
        raise ConfigError(f"free bits needs every latent site drawn by the guide; this program "
                          f"sums {', '.join(summed)} out")
    nesting = structure.max_plate_nesting if structure is not None else 1
    return FreeBitsELBO(free_bits, group, analytic=name == "meanfield_elbo",
                        num_particles=num_particles, max_plate_nesting=nesting)
