"""Training objectives: Pyro ELBO implementations selectable by name, and the KL weight.

- ``trace_elbo``: :class:`pyro.infer.Trace_ELBO`, the Monte Carlo ELBO with the
  reparameterisation trick (score-function terms for sites that are not reparameterised);
- ``meanfield_elbo``: :class:`pyro.infer.TraceMeanField_ELBO`, which uses the analytic
  KL(q(z|x) || p(z)) where the pair has one and falls back to Monte Carlo otherwise
  (mixture, VampPrior and flow priors; full-covariance, low-rank and IAF guides against
  a diagonal prior);
- ``iwae``: :class:`ImportanceWeightedELBO`, the K-sample importance-weighted bound per
  data point, K = ``num_particles``.

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
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from pyro.infer import ELBO, Trace_ELBO, TraceEnum_ELBO, TraceMeanField_ELBO
from pyro.poutine.messenger import Messenger

from pyrovae.errors import ConfigError
from pyrovae.evaluation import log_weights, particle_traces
from pyrovae.programs import Program, ProgramError, Structure
from pyrovae.registration import ignores_module_parameters


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
                raise ProgramError(f"the iwae objective needs reparameterised guide sites; "
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
}


def make_objective(name: str, num_particles: int = 1, *,
                   structure: Structure | None = None) -> ELBO:
    """An objective from :data:`OBJECTIVES` that draws ``num_particles`` z per data point, vectorized.

    The loss it returns is minus the objective summed over the minibatch, in nats.

    :param structure: the program's :class:`~pyrovae.programs.Structure` (its plate nesting
        and enumerated sites).  A program with enumerated sites trains ``trace_elbo`` and
        ``meanfield_elbo`` with :class:`pyro.infer.TraceEnum_ELBO`, which sums those sites out
        exactly (the same ELBO, with the Monte Carlo KL of the continuous sites).
    """
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
    if structure is not None and structure.enumerates and name != "iwae":
        objective = TraceEnum_ELBO  # the iwae bound sums them out in its log weights
    return objective(num_particles=num_particles, vectorize_particles=num_particles > 1,
                     max_plate_nesting=nesting)
