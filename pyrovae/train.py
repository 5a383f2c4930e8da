"""Training a :class:`~pyrovae.models.VAE` by stochastic variational inference.

:func:`fit` minimises a Pyro ELBO by minibatch gradient steps with Adam, reports the running train
ELBO in a progress bar, the test ELBO every few epochs, writes ``metrics.csv`` and a
checkpoint every epoch, and resumes exactly from a checkpoint.  ELBO values are per data
point, in nats.

Launched by ``torchrun`` (a process group is initialized), the same loop trains one model
data-parallel: each process takes its slice of every global batch and the gradients are
summed over processes after each backward pass (see :mod:`pyrovae.distributed`).
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import pyro
import torch
from tqdm.auto import tqdm

from pyrovae import distributed
from pyrovae.activity import (
    ACTIVE_UNIT_THRESHOLD,
    guide_sites,
    mutual_information,
    posterior_mean_variances,
)
from pyrovae.checkpoint import (
    CHECKPOINT_FILES,
    CHECKPOINT_NAME,
    check_resumable,
    history_path,
    keep_history,
    mark_best,
    param_store_entry,
    program_record,
    restore_rng_state,
    save_checkpoint,
    stored_param_values,
)
from pyrovae.compilation import COMPILE_MODES, compile_networks
from pyrovae.config import TrainConfig
from pyrovae.data import DataSplits, outside_unit_interval
from pyrovae.devices import resolve_device, seed_everything, seeded  # noqa: F401  (re-exported)
from pyrovae.distributed import Shard
from pyrovae.errors import CheckpointError, ConfigError, InvalidDataError, PyrovaeError
from pyrovae.evaluation import elbo, log_marginal_likelihood
from pyrovae.likelihoods import bits_per_dim
from pyrovae.models import VAE
from pyrovae.objectives import AuxiliaryLoss, LatentScale, make_objective
from pyrovae.optim import (
    OUTPUT_BIAS_INITS,
    AdamSettings,
    init_output_bias,
    logit_of_mean,
    make_adam,
    normalize_gradients_,
)
from pyrovae.programs import Program, ProgramError, Structure, as_program, program_parameters
from pyrovae.registration import parameters_owned
from pyrovae.rundir import clear_run, remove_temporaries, write_text
from pyrovae.schedules import check_plateau, plateau_step, scheduled_kl_weight, scheduled_lr
from pyrovae.validation import check_data

logger = logging.getLogger(__name__)

METRICS_NAME = "metrics.csv"
METRIC_COLUMNS = ("epoch", "step", "train_elbo", "test_elbo", "epoch_seconds", "valid_elbo",
                  "test_log_px")


class TrainingDivergedError(PyrovaeError):
    """The loss became NaN or infinite."""


def _arguments(batch: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """A minibatch as the program's positional data arguments: ``(x,)``, or ``(x, y)`` where
    the data carry labels (:meth:`~pyrovae.data.DataSplits.train_batches`)."""
    return batch if isinstance(batch, tuple) else (batch,)


@dataclass
class EpochRecord:
    """One line of ``metrics.csv``; ELBOs and log p(x) per data point in nats (NaN where not
    computed).  ``test_log_px`` is the importance-sampled estimate on the first
    ``log_px_size`` test points (:class:`FitOptions`' ``log_px_every``); ``active_units``
    (of all latent sites together), ``active_units_per_site`` (``{site: count}``) and
    ``mutual_information`` (I(x; z) under q, nats) are the latent usage on the same points
    (``activity_every``, :mod:`pyrovae.activity`).  ``stopped_early`` marks the epoch after
    which early stopping ended the run (kept in the checkpoint's history, not in
    ``metrics.csv``)."""

    epoch: int
    step: int
    train_elbo: float
    test_elbo: float
    epoch_seconds: float
    valid_elbo: float = math.nan
    test_log_px: float = math.nan
    active_units: float = math.nan
    mutual_information: float = math.nan
    active_units_per_site: dict[str, int] | None = None
    stopped_early: bool = False


def check_training_data(vae: VAE, data: DataSplits, batch_size: int | None = None) -> None:
    """Raise :class:`~pyrovae.errors.InvalidDataError` if ``data`` cannot train ``vae``."""
    if data.dynamic_binarization:
        # the stored grey levels are Bernoulli probabilities; batches are draws from them
        check_data(data.train, vae.data_dim, name="training data")
        problem = outside_unit_interval(data.train, "training data", "for dynamic binarization")
        if problem:
            raise InvalidDataError(problem)
    else:
        vae.check_data(data.train, name="training data")
    vae.check_data(data.test, name="test data")
    if data.valid is not None:
        vae.check_data(data.valid, name="validation data")
    if batch_size is not None and batch_size > data.train.shape[0]:
        raise InvalidDataError(
            f"batch size {batch_size} is larger than the training set ({data.train.shape[0]} points)"
        )


def _output_bias_of_mean(vae: VAE, x: torch.Tensor) -> torch.Tensor:
    """The decoder output whose likelihood mean is the per-pixel mean of ``x``: ``(D,)``."""
    from pyrovae.likelihoods import BernoulliLikelihood, GaussianLikelihood, PixelGaussianLikelihood

    if isinstance(vae.likelihood, BernoulliLikelihood):
        return logit_of_mean(x)
    if isinstance(vae.likelihood, GaussianLikelihood | PixelGaussianLikelihood):
        return x.mean(0)
    raise PyrovaeError(f"output_bias_init='data_mean' is defined for Bernoulli and Gaussian "
                       f"likelihoods, not {type(vae.likelihood).__name__}")


def _check_local_parameters(structure: Structure, data: DataSplits, batch_size: int) -> bool:
    """Whether every step must take the whole training set in its order: a guide with a
    parameter per data point (:attr:`~pyrovae.programs.Structure.local_parameters`, an
    ``AutoNormal`` of a model's local latents) learns those points, as Pyro's ``SVI`` stepping
    on all of them does.

    :raises ProgramError: such a guide with minibatches, several processes, or held-out
        splits that are not the training points.
    """
    if not structure.local_parameters:
        return False
    names = ", ".join(structure.local_parameters)
    n = data.train.shape[0]
    where = f"the guide keeps parameters for each training point ({names})"
    if batch_size < n:
        raise ProgramError(f"{where}: every step must see all {n} points in their order, as "
                           f"SVI on the whole data does; set batch_size to {n} (or subsample "
                           f"inside the program: pyro.plate(..., {n}, subsample_size=...))")
    if distributed.get_world_size() > 1:
        raise ProgramError(f"{where}: one process must see all of them; train it in one")
    for name, split in (("test", data.test), ("validation", data.valid)):
        if split is not None and (split.shape != data.train.shape or
                                  not torch.equal(split, data.train)):
            raise ProgramError(f"{where}: it has nothing to say about other points, so the "
                               f"{name} split must be the training points (DataSplits."
                               f"from_tensors(x) without test data)")
    return True


def _check_dtypes(program: Program, data: DataSplits) -> None:
    """Data and parameters in one floating dtype, or one line that says how to convert."""
    parameter = next(iter(program.module.parameters()), None) if program.module is not None \
        else None
    if parameter is None or not data.train.is_floating_point():
        return
    if data.train.dtype != parameter.dtype:
        raise InvalidDataError(
            f"the data are {data.train.dtype} but the model's parameters are {parameter.dtype}; "
            f"convert one to the other (e.g. DataSplits.from_tensors(x.float(), ...) or "
            f"vae.double())")


DIVERGENCE_POLICIES = ("stop", "rollback")
#: how many times ``on_divergence="rollback"`` halves the learning rate before giving up
MAX_ROLLBACKS = 5
#: a loss per data point above its first value plus this many times its scale (the larger
#: of that value and the data dimension) counts as diverged, though finite
DIVERGED_LOSS_FACTOR = 10.0
class TrainingInterrupted(PyrovaeError):
    """SIGINT or SIGTERM arrived; a checkpoint of the last finished step was written."""

    def __init__(self, message: str, signal_number: int) -> None:
        super().__init__(message)
        self.signal_number = signal_number


@dataclass(frozen=True)
class FitOptions:
    """How :func:`fit` trains; each field is the :class:`~pyrovae.config.TrainConfig` field
    (and ``pyrovae train`` flag) of the same name (:meth:`from_config`).

    :param epochs: passes over the training set.
    :param batch_size: data points per gradient step; in a multi-process run the global
        batch, split into contiguous per-process slices.
    :param lr: Adam's learning rate, the base of ``lr_schedule``.
    :param objective: a key of :data:`~pyrovae.objectives.OBJECTIVES`.
    :param num_particles: samples of z per data point in the objective.
    :param seed: seeds the shuffling order and all random number generators.
    :param test_every: compute the test and validation ELBO (1 sample per point) every this
        many epochs and after the last; the checkpoint with the best validation ELBO (the
        test ELBO where ``data.valid`` is ``None``) is kept as ``checkpoint_best.pt``.
    :param progress: show a progress bar.
    :param beta: the KL weight after warm-up (:func:`~pyrovae.objectives.kl_weight`);
        ``None`` takes the config's ``beta``, or 1 without a config.
    :param kl_warmup_epochs: epochs of linear KL warm-up; ``None`` takes the config's, or 0
        (none) without a config.
    :param checkpoint_every: also checkpoint every this many steps within an epoch (0: only
        at epoch ends).
    :param keep_last: also keep copies of the last this many epoch checkpoints in
        ``run_dir/checkpoints/``.
    :param clip_norm: clip the gradient of all parameters together to this total norm, or
        ``None``; a non-finite gradient norm then stops the run like a NaN loss.
    :param on_divergence: ``"stop"`` raises on a NaN/inf loss; ``"rollback"`` reloads the
        last checkpoint, halves the learning rate and carries on (up to
        :data:`MAX_ROLLBACKS` times).
    :param fused: use torch's fused Adam kernel where the device has one (same update).
    :param compile: ``"off"``, or the ``torch.compile`` mode to compile the program's
        networks with before training (:func:`~pyrovae.compilation.compile_networks`; the
        Pyro program stays eager).
    :param max_minutes: a wall-clock budget for one call: stop at the end of the first
        epoch after which another epoch of the same length would overrun it (the checkpoint
        then holds finished epochs only, and ``resume`` carries on); ``None``: no budget.
    :param lr_schedule: the learning rate of each epoch, :func:`scheduled_lr` of ``lr``
        (halved once per rollback), set at the start of every epoch: ``"constant"``,
        ``"iwae"`` (Burda et al. 2016), ``"cosine"`` (to ``lr_min`` over ``epochs``) or
        ``"plateau"``: ``lr`` times ``lr_plateau_factor`` whenever the held-out ELBO (the
        one early stopping watches) has not improved for ``lr_plateau_patience`` evaluated
        epochs, never below ``lr_min`` (:func:`~pyrovae.schedules.plateau_step`).
    :param log_px_every: every this many epochs (and after the last) estimate the test
        log p(x) of the first ``log_px_size`` test points with ``log_px_samples`` importance
        samples (the ``test_log_px`` column); 0: never.
    :param activity_every: every this many epochs (and after the last) count the active
        latent units, per latent site and in total, and estimate the mutual information
        I(x; z) under q, on the first ``log_px_size`` test points
        (:func:`~pyrovae.activity.posterior_mean_variances`,
        :func:`~pyrovae.activity.mutual_information`); 0: never.
    :param adam: Adam's betas, epsilon and second-moment start
        (:class:`~pyrovae.optim.AdamSettings`); ``None``: torch's defaults.
    :param output_bias_init: ``"data_mean"`` starts the decoder's output bias at the logit
        of the training set's mean pixel (Bernoulli) or at the mean (Gaussian likelihoods).
    :param early_stopping_patience: stop once the validation ELBO (the test ELBO where
        ``data.valid`` is ``None``) has not improved for this many epochs; epochs of the KL
        warm-up do not count, since the ELBO they train is not yet the one evaluated.  The
        parameters are then the last epoch's; ``checkpoint_best.pt`` holds the best ones.
        0: train all ``epochs``.
    :param kl_schedule: the KL weight of each epoch
        (:func:`~pyrovae.schedules.scheduled_kl_weight`): ``"linear"``, the
        ``kl_warmup_epochs`` warm-up; ``"cyclical"``, ``kl_cycles`` cycles over ``epochs``,
        each rising over its first ``kl_cycle_ratio`` (Fu et al. 2019).
    :param free_bits: positive: train the ELBO with a floor of this many nats under the
        minibatch-mean KL of each ``free_bits_group`` (``"dimension"`` or ``"site"``;
        :class:`~pyrovae.free_bits.FreeBitsELBO`).

    Example::

        options = FitOptions(epochs=5, batch_size=64)
        history = fit(vae, data, options, run_dir="runs/small")
    """

    epochs: int = 10
    batch_size: int = 100
    lr: float = 1e-3
    objective: str = "trace_elbo"
    num_particles: int = 1
    seed: int = 0
    test_every: int = 1
    progress: bool = True
    beta: float | None = None
    kl_warmup_epochs: int | None = None
    checkpoint_every: int = 0
    keep_last: int = 0
    clip_norm: float | None = None
    on_divergence: str = "stop"
    fused: bool = True
    compile: str = "off"
    max_minutes: float | None = None
    lr_schedule: str = "constant"
    log_px_every: int = 0
    log_px_samples: int = 1000
    log_px_size: int = 1000
    activity_every: int = 0
    adam: AdamSettings | None = None
    output_bias_init: str = "zero"
    early_stopping_patience: int = 0
    kl_schedule: str = "linear"
    kl_cycles: int = 4
    kl_cycle_ratio: float = 0.5
    free_bits: float = 0.0
    free_bits_group: str = "dimension"
    lr_min: float = 0.0
    lr_plateau_factor: float = 0.5
    lr_plateau_patience: int = 10

    def __post_init__(self) -> None:
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise PyrovaeError(f"epochs must be a positive integer, got {self.epochs!r}")
        if self.on_divergence not in DIVERGENCE_POLICIES:
            raise PyrovaeError(f"on_divergence must be one of {', '.join(DIVERGENCE_POLICIES)}, "
                               f"got {self.on_divergence!r}")
        # an unknown schedule stops here, before training
        scheduled_lr(1, lr=self.lr, schedule=self.lr_schedule, epochs=self.epochs,
                     lr_min=self.lr_min)
        check_plateau(self.lr_plateau_factor, self.lr_plateau_patience, self.lr_min)
        scheduled_kl_weight(1, schedule=self.kl_schedule, epochs=self.epochs,
                            cycles=self.kl_cycles, ratio=self.kl_cycle_ratio)
        if self.compile not in ("off", *COMPILE_MODES):
            raise PyrovaeError(f"compile must be off or one of {', '.join(COMPILE_MODES)}, "
                               f"got {self.compile!r}")
        if self.output_bias_init not in OUTPUT_BIAS_INITS:
            raise PyrovaeError(f"output_bias_init must be one of {', '.join(OUTPUT_BIAS_INITS)}, "
                               f"got {self.output_bias_init!r}")

    @classmethod
    def from_config(cls, config: TrainConfig) -> FitOptions:
        """The options ``config`` sets (what ``pyrovae train`` trains with)."""
        return cls(**{option.name: getattr(config, option.name) for option in fields(cls)})

    @classmethod
    def of(cls, options: FitOptions | None, overrides: dict[str, Any]) -> FitOptions:
        """``options`` (default: the defaults) with the fields named in ``overrides`` set.

        :raises TypeError: a name that is no option.
        """
        unknown = sorted(set(overrides) - {option.name for option in fields(cls)})
        if unknown:
            raise TypeError(f"unknown training option(s) {', '.join(unknown)}; the options are "
                            f"FitOptions' fields")
        return replace(options if options is not None else cls(), **overrides)

    def resolved(self, config: TrainConfig | None) -> FitOptions:
        """These options with ``beta`` and ``kl_warmup_epochs`` decided: the config's where
        they are ``None``, else 1 and 0."""
        beta = self.beta if self.beta is not None else (config.beta if config else 1.0)
        warmup = self.kl_warmup_epochs if self.kl_warmup_epochs is not None else (
            config.kl_warmup_epochs if config else 0)
        return replace(self, beta=beta, kl_warmup_epochs=warmup)


def fit(vae: VAE | Program | Any, data: DataSplits, options: FitOptions | None = None, *,
        run_dir: str | Path | None = None, config: TrainConfig | None = None,
        resume: bool = False, validate: bool = False,
        on_epoch_end: Callable[[EpochRecord, TrainingLoop], None] | None = None,
        auxiliary: Sequence[AuxiliaryLoss] = (),
        **option_values: Any) -> list[EpochRecord]:
    """Train a program on ``data.train`` by SVI; return one record per epoch.

    ``vae`` is the program: a :class:`~pyrovae.models.VAE` (or a subclass), an object with
    ``model`` and ``guide`` methods, or a ``(model, guide)`` pair (:mod:`pyrovae.programs`).
    Each step minimises ``objective.differentiable_loss(model, guide, x)`` of the Pyro ELBO
    named by ``options.objective``, evaluated on the program itself, with one
    ``torch.optim.Adam`` over every parameter the program reaches: its module's parameters
    and the ``pyro.param`` sites of its model and guide, found from a trace as Pyro's
    ``SVI`` finds them.  A program with enumerated sites trains with ``TraceEnum_ELBO``.
    Where ``data`` carries labels (:attr:`~pyrovae.data.DataSplits.has_labels`), each
    minibatch is ``(x, y)`` and the program is called as ``model(x, y)``, ``guide(x, y)``; the
    test and validation ELBOs and log p(x) then take ``(x, y)`` too.

    Before the first step the prior gets :meth:`~pyrovae.priors.Prior.init_from_data` on
    the training data (the VampPrior's pseudo-inputs; a no-op for the other priors).

    With a ``run_dir``, every epoch (and every ``checkpoint_every`` steps) writes
    ``checkpoint.pt`` atomically with the parameters, optimizer state, RNG states and the
    loop's position, and ``metrics.csv``; ``resume=True`` continues from it and ends with
    the same parameters as an uninterrupted run with the same seed (bit for bit on the same
    CPU).  SIGINT and SIGTERM finish the current step, write a checkpoint and raise
    :class:`TrainingInterrupted`.

    Multi-process: when a ``torch.distributed`` process group of several processes is
    running (``torchrun``), every process calls ``fit`` with the same arguments; the batch
    is global, split into contiguous per-process slices
    (:func:`~pyrovae.distributed.local_batches`), and the gradients are summed over
    processes.  Each process draws its own noise, so a run agrees with one process in
    distribution (as with ``DistributedDataParallel``), not bit for bit.  Rank 0 alone
    writes files; a stop signal on any process stops all of them at the same step.  Rank
    0's initial parameters are given to all processes.

    :param data: train/test splits on the program's device (see :meth:`DataSplits.to`).
    :param options: how to train (:class:`FitOptions`); ``option_values``, its fields as
        keywords (``fit(vae, data, epochs=5)``), are set on top of it.
    :param run_dir: where ``metrics.csv`` and the checkpoints go (nothing is written if
        ``None``).
    :param config: stored in the checkpoint so the model can be rebuilt from it.
    :param resume: continue from ``run_dir/checkpoint.pt``.
    :param validate: Pyro's distribution argument checks; off by default because they cost
        time in the hot loop, and the data are checked once up front instead.
    :param on_epoch_end: ``on_epoch_end(record, loop)`` after each epoch on the main process
        (e.g. :class:`pyrovae.tensorboard.TensorBoardWriter`).
    :param auxiliary: further losses (:class:`~pyrovae.objectives.AuxiliaryLoss`), each a
        gradient step of its own after the program's at every step, on the same batch (one
        process only); their parameters join the optimizer.
    :returns: the records; ``train_elbo`` there is minus the loss being minimised, i.e. the
        KL-weighted ELBO while beta is not 1, and the IWAE bound for ``objective="iwae"``.
    :raises TrainingDivergedError: the loss became NaN or infinite (checked before the
        update, so the parameters stay finite); the checkpoint of the last good step is kept.
    :raises TrainingInterrupted: on SIGINT/SIGTERM, after writing a checkpoint.
    """
    options = FitOptions.of(options, option_values)
    program = as_program(vae)
    _check_dtypes(program, data)
    if callable(getattr(program.module, "check_data", None)) and \
            getattr(program.module, "data_dim", None) is not None:
        check_training_data(program.module, data, options.batch_size)
    else:
        program.check_data(data.test_inputs)
    distributed.check_batch_size(options.batch_size, distributed.get_world_size(),
                                 num_points=data.train.shape[0])
    if (resume or options.on_divergence == "rollback") and run_dir is None:
        raise PyrovaeError("resuming or rolling back needs a run_dir to hold checkpoints")
    loop = TrainingLoop(program, data, options, run_dir=Path(run_dir) if run_dir else None,
                        config=config, on_epoch_end=on_epoch_end, auxiliary=auxiliary)
    # torchrun's agent forwards a signal it receives to every worker, so a repeated signal
    # is not the user insisting; the agent kills workers that do not stop in time
    escalate = not distributed.is_distributed()
    with pyro.validation_enabled(validate), _StopSignals(escalate=escalate) as stop:
        loop.start(resume)
        history = loop.run(stop)
    program.train(False)
    return history


def fit_from_config(vae: VAE, data: DataSplits, config: TrainConfig, *,
                    run_dir: str | Path | None = None, resume: bool = False,
                    validate: bool = False,
                    on_epoch_end: Callable[[EpochRecord, TrainingLoop], None] | None = None,
                    ) -> list[EpochRecord]:
    """:func:`fit` with the options ``config`` sets (:meth:`FitOptions.from_config`; what
    ``pyrovae train`` runs)."""
    return fit(vae, data, FitOptions.from_config(config), run_dir=run_dir, config=config,
               resume=resume, validate=validate, on_epoch_end=on_epoch_end)


class _StopSignals:
    """Turn SIGINT/SIGTERM into a flag the loop checks between steps (main thread only).

    A signal the loop did not act on (it came after the last check) is not dropped:
    leaving the block raises :class:`TrainingInterrupted`, unless an exception is already
    on its way.  With ``message``, for work with no steps to stop between (a final
    evaluation), a signal raises :class:`TrainingInterrupted` at once, with the signal's
    name and ``message``.
    """

    def __init__(self, escalate: bool = True, message: str | None = None) -> None:
        self.signal_number: int | None = None
        self.escalate = escalate
        self.message = message
        #: set by whoever acted on the signal (raised :class:`TrainingInterrupted` for it)
        self.handled = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, signal.SIGTERM):
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def _handle(self, number: int, frame: object) -> None:
        if self.message is not None:
            self.signal_number, self.handled = number, True
            raise TrainingInterrupted(f"{signal.Signals(number).name} {self.message}", number)
        if self.signal_number is not None and self.escalate:  # a second signal: stop at once
            raise KeyboardInterrupt
        self.signal_number = number

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)  # type: ignore[arg-type]
        self._previous = {}
        if exc_type is None and self.signal_number is not None and not self.handled:
            self.handled = True
            raise TrainingInterrupted(
                f"{signal.Signals(self.signal_number).name} after the last training step; the "
                f"last checkpoint holds every finished epoch: resume the run to finish it",
                self.signal_number)


class TrainingLoop:
    """The state of one training run, driven by :func:`fit`: the optimizer, the objective,
    and the position a checkpoint must hold to resume the run exactly.

    :meth:`train_step` is one gradient step on a minibatch (what ``benchmark_speed.py``
    times); ``options`` and ``option_values`` are :func:`fit`'s.  In a multi-process run
    it takes this process's slice of the global batch and sums gradients over processes.
    """

    def __init__(self, vae: VAE | Program | Any, data: DataSplits,
                 options: FitOptions | None = None, *, run_dir: Path | None = None,
                 config: TrainConfig | None = None,
                 on_epoch_end: Callable[[EpochRecord, TrainingLoop], None] | None = None,
                 auxiliary: Sequence[AuxiliaryLoss] = (),
                 **option_values: Any) -> None:
        #: how this run trains, ``beta`` and ``kl_warmup_epochs`` decided
        self.options = options = FitOptions.of(options, option_values).resolved(config)
        #: called on the main process after each epoch's record (e.g. a TensorBoard writer)
        self.on_epoch_end = on_epoch_end
        self.program = as_program(vae)
        #: what the caller passed: its class is recorded in checkpoints
        self.given_program = vae
        # the module whose state a checkpoint holds (empty for plain callables)
        self.vae = self.program.module if self.program.module is not None else torch.nn.Module()
        self.data, self.config, self.run_dir = data, config, run_dir
        # the schedule's base rate, halved by every rollback
        self.lr, self.rollbacks = options.lr, 0
        batch_size = options.batch_size
        train_inputs = data.train_inputs
        # the program's first call is on a training batch, as SVI's first step is: a lazily
        # built guide (a Pyro autoguide) is built for the points it will be trained on
        batch = tuple(argument[:batch_size] for argument in _arguments(train_inputs))
        structure = self.program.structure(*batch)
        #: every step takes the whole training set in its order (a guide with a parameter
        #: per data point: its parameters belong to those points)
        self.whole_data = _check_local_parameters(structure, data, batch_size)
        # some sites show only on some points (a semi-supervised model enumerates the label
        # of unlabelled ones): read the program on test points too
        first = tuple(argument[:batch_size] for argument in _arguments(data.test_inputs))
        structure = structure.merged(self.program.structure(*first))
        with pyro.validation_enabled(False):
            self.parameters = program_parameters(self.program, *batch)
        #: (model, guide, objective) of each auxiliary loss, stepped after the program's
        self.auxiliary = self._auxiliary(auxiliary, batch)
        owned = {id(parameter) for parameter in self.vae.parameters()}
        store = pyro.get_param_store()
        # pyro.param sites outside the module: saved beside its state dict in a checkpoint
        self.store_parameters = {store.param_name(p): p for p in self.parameters
                                 if id(p) not in owned and store.param_name(p) is not None}
        self.optimizer = make_adam(self.parameters, lr=options.lr, settings=options.adam,
                                   fused=options.fused and self.program.device.type in ("cpu", "cuda"))
        if options.compile != "off":
            if self.program.module is None:
                raise ConfigError("compile needs the program's networks: pass a VAE or a module "
                                  "with model and guide methods, not two functions")
            compiled = compile_networks(self.program.module, options.compile)
            logger.info("compiled %s (torch.compile, mode %s)", ", ".join(compiled) or "nothing",
                        options.compile)
        self.kl_scale = LatentScale(self.kl_weight(1))
        self.elbo = make_objective(options.objective, options.num_particles, structure=structure,
                                   free_bits=options.free_bits,
                                   free_bits_group=options.free_bits_group)
        self.model = self.kl_scale(self.program.model)
        self.guide = self.kl_scale(self.program.guide)
        self.generator = torch.Generator()
        # the loop's position: ``epoch`` is the epoch under way (from 1), ``batch`` the
        # batches of it already done; ``epoch_generator_state`` replays its shuffling order
        self.epoch, self.batch, self.step = 1, 0, 0
        self.total_loss, self.seen = 0.0, 0
        self.epoch_generator_state = self.generator.get_state()
        self.best_elbo = -math.inf
        # epochs since the held-out ELBO last improved, KL warm-up epochs not counted
        self.epochs_without_improvement = 0
        # evaluated epochs since the held-out ELBO last improved or the rate was reduced
        self.plateau_epochs = 0
        self.history: list[EpochRecord] = []
        #: the latent sites whose active units ``activity_every`` counts (None: off)
        self.activity_sites = guide_sites(self.program, *first) if options.activity_every \
            else None
        self.rank, self.world_size = distributed.get_rank(), distributed.get_world_size()
        self.is_main = self.rank == 0
        #: the stop signal all processes agreed on at the last step (multi-process runs)
        self.agreed_stop: int | None = None
        self._stop: _StopSignals | None = None

    def _auxiliary(self, auxiliary: Sequence[AuxiliaryLoss],
                   batch: tuple[torch.Tensor, ...]) -> list[tuple[Any, Any, Any]]:
        """Read each auxiliary pair's structure and add its parameters to
        :attr:`parameters` (before the optimizer is made)."""
        if auxiliary and distributed.get_world_size() > 1:
            raise ConfigError("auxiliary losses train in one process")
        steps = []
        #: the ids of the parameters the program, then each auxiliary pair, reaches
        self._reached = [{id(parameter) for parameter in self.parameters}]
        for index, loss in enumerate(auxiliary):
            if not isinstance(loss, AuxiliaryLoss):
                raise TypeError(f"auxiliary[{index}] is a {type(loss).__name__}, not an "
                                f"AuxiliaryLoss(model, guide)")
            pair = Program(loss.model, loss.guide)
            structure = pair.structure(*batch)
            with pyro.validation_enabled(False):
                known = {id(parameter) for parameter in self.parameters}
                reached = program_parameters(pair, *batch)
                self.parameters += [parameter for parameter in reached
                                    if id(parameter) not in known]
            self._reached.append({id(parameter) for parameter in reached})
            steps.append((loss.model, loss.guide,
                          make_objective("trace_elbo", 1, structure=structure)))
        return steps

    def _steps_with_auxiliary(self, x: torch.Tensor | tuple[torch.Tensor, ...],
                              epoch: int) -> float:
        """The program's gradient step, then each auxiliary loss's, on the batch ``x``.

        Each step updates the parameters its own pair reaches, as Pyro's ``SVI`` steps the
        parameters of its traces: gradients are zeroed between steps, not dropped, so a
        parameter of the pair that its loss does not reach this time is stepped on a zero
        gradient (Adam's moments decay) once it has had one."""
        value = 0.0
        for index, (reached, loss_of) in enumerate(self._pairs(x)):
            self.optimizer.zero_grad(set_to_none=False)
            loss = loss_of()
            self._check_loss(loss.item(), epoch, auxiliary=index > 0)
            if index == 0:
                value = loss.item()
            loss.backward()
            outside = [p for p in self.parameters if id(p) not in reached and p.grad is not None]
            kept = [p.grad for p in outside]
            for parameter in outside:
                parameter.grad = None
            self._clip_and_update(epoch)
            for parameter, grad in zip(outside, kept, strict=True):
                parameter.grad = grad
        return value

    def _pairs(self, x: torch.Tensor | tuple[torch.Tensor, ...]
               ) -> list[tuple[set[int], Callable[[], torch.Tensor]]]:
        """(the ids of the parameters it reaches, its loss) of the program and each
        auxiliary pair, in the order they step."""
        def auxiliary_loss(model: Any, guide: Any, objective: Any) -> Callable[[], torch.Tensor]:
            def loss() -> torch.Tensor:
                with parameters_owned():
                    return objective.differentiable_loss(model, guide, *_arguments(x))
            return loss

        return [(self._reached[0], lambda: self._loss(x))] + [
            (reached, auxiliary_loss(*step))
            for reached, step in zip(self._reached[1:], self.auxiliary, strict=True)]

    def kl_weight(self, epoch: int) -> float:
        """The KL weight of ``epoch`` under the options' schedule."""
        options = self.options
        return scheduled_kl_weight(epoch, beta=options.beta, schedule=options.kl_schedule,
                                   warmup_epochs=options.kl_warmup_epochs, epochs=options.epochs,
                                   cycles=options.kl_cycles, ratio=options.kl_cycle_ratio)

    def _loss(self, x: torch.Tensor, shard: Shard | None = None) -> torch.Tensor:
        """Minus the (KL-weighted) objective of the program summed over the minibatch,
        differentiable.

        :param shard: where ``x`` lies in the global batch (multi-process runs only).
        """
        # a NaN loss is caught and named by _check_loss; Pyro's own warning would only repeat it
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Encountered NaN", category=UserWarning)
            # self.optimizer holds the parameters: re-registering them every step is not needed
            with parameters_owned():
                if shard is None:
                    return self.elbo.differentiable_loss(self.model, self.guide, *_arguments(x))
                # Pyro draws inside its trace; per-rank streams keep the ranks' draws independent
                with distributed.rank_seeded(self.program.device):
                    return self.elbo.differentiable_loss(self.model, self.guide,
                                                         *_arguments(x))

    def train_step(self, x: torch.Tensor, epoch: int = 1, *, global_rows: int | None = None) -> float:
        """One gradient step; raises before updating if the loss or gradient is not finite.

        :param x: the minibatch, or in a multi-process run this process's slice of it: a
            tensor, or a tuple of the program's data arguments (``(x, y)``).
        :param global_rows: the size of the global batch ``x`` is a slice of; needed in a
            multi-process run (ignored in one process).
        :returns: the loss summed over the whole (global) batch, nats.
        """
        if self.world_size > 1:
            if global_rows is None:
                raise ValueError("a multi-process train_step needs global_rows, the size of the "
                                 "global batch x is a slice of")
            return self._distributed_step(x, epoch, distributed.shard_of(global_rows))
        if self.auxiliary:
            return self._steps_with_auxiliary(x, epoch)
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._loss(x)
        value = loss.item()
        self._check_loss(value, epoch)
        loss.backward()
        self._clip_and_update(epoch)
        return value

    def _distributed_step(self, x: torch.Tensor, epoch: int, shard: Shard) -> float:
        if _arguments(x)[0].shape[0] != shard.num_rows:
            raise ValueError(f"rank {self.rank} holds {_arguments(x)[0].shape[0]} rows of a global batch of "
                             f"{shard.global_rows}; expected {shard.num_rows}")
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._loss(x, shard)
        if loss.requires_grad:
            loss.backward()
        local_stop = self._stop.signal_number if self._stop is not None else None
        value, stop_votes = distributed.all_reduce_gradients(
            self.parameters, [loss.item(), float(local_stop is not None)])
        if stop_votes > 0:
            self.agreed_stop = local_stop if local_stop is not None else signal.SIGTERM
        # every rank sees the same global loss, so all raise together and none waits
        self._check_loss(value, epoch)
        self._clip_and_update(epoch)
        return value

    def _check_loss(self, value: float, epoch: int, *, auxiliary: bool = False) -> None:
        """Raise :class:`TrainingDivergedError` on a loss that is not finite, or that grew
        past :data:`DIVERGED_LOSS_FACTOR` times its scale at this call's first step (a finite
        divergence: a working model's loss falls from its start); an ``auxiliary`` loss is
        checked for finiteness only."""
        where = f"at epoch {epoch}, step {self.step + 1}"
        if not math.isfinite(value):
            raise TrainingDivergedError(
                f"{'an auxiliary ' if auxiliary else ''}loss is {value} {where}; "
                f"{self._kept_checkpoint()}; try a lower learning rate (--lr) or --clip-norm")
        if auxiliary:
            return
        per_point = value / self.options.batch_size
        first = getattr(self, "_first_loss", None)
        if first is None:
            self._first_loss = per_point
            return
        scale = max(abs(first), float(self.data.data_dim), 1.0)
        if per_point > first + DIVERGED_LOSS_FACTOR * scale:
            raise TrainingDivergedError(
                f"loss is {per_point:.4g} nats per data point {where}, up from {first:.4g} at "
                f"the first step: training diverged; {self._kept_checkpoint()}; try a lower "
                f"learning rate (--lr) or --clip-norm")

    def _clip_and_update(self, epoch: int) -> None:
        if self.options.adam is not None and self.options.adam.normalize_gradients:
            norms = normalize_gradients_(self.parameters)
            if norms is not None:
                self._refuse_non_finite_gradient(norms.max(), epoch)
        if self.options.clip_norm:
            norm = torch.nn.utils.clip_grad_norm_(self.parameters, self.options.clip_norm)
            self._refuse_non_finite_gradient(norm, epoch)
        self.optimizer.step()

    def _refuse_non_finite_gradient(self, norm: torch.Tensor, epoch: int) -> None:
        """Stop the run like a NaN loss when the gradient's norm (measured anyway, to clip
        or normalise it) is not finite."""
        if not bool(torch.isfinite(norm)):
            raise TrainingDivergedError(
                f"gradient norm is {float(norm)} at epoch {epoch}, step {self.step + 1}; "
                f"{self._kept_checkpoint()}; try a lower learning rate (--lr)"
            )

    def _kept_checkpoint(self) -> str:
        """What a run stopped now leaves behind, for its error message."""
        kept = self.run_dir is not None and (self.run_dir / CHECKPOINT_NAME).exists()
        return "the last good checkpoint is kept" if kept else "no checkpoint was written"

    # --- starting and resuming -------------------------------------------------------
    def start(self, resume: bool) -> None:
        if resume:
            assert self.run_dir is not None
            self._load(self.run_dir / CHECKPOINT_NAME)
            done = self.epoch - 1
            if done > self.options.epochs:
                raise ConfigError(f"{self.run_dir} has trained {done} epochs, more than the "
                                  f"{self.options.epochs} asked for; resume with epochs >= {done}")
            if self.is_main:
                remove_temporaries(self.run_dir)
                _write_metrics(self.run_dir / METRICS_NAME, self.history, self.activity_sites)
                # a kill between the checkpoint and its history copy left the copy undone
                if self.options.keep_last and self.batch == 0 and done > 0 and \
                        not history_path(self.run_dir, done).exists():
                    keep_history(self.run_dir, done, self.options.keep_last)
                logger.info("resuming at epoch %d, step %d", self.epoch, self.step)
            return
        seed_everything(self.options.seed)
        prior = getattr(self.vae, "prior", None)
        if callable(getattr(prior, "init_from_data", None)):
            prior.init_from_data(self.data.train)
        if self.options.output_bias_init == "data_mean":
            if not (hasattr(self.vae, "decoder") and hasattr(self.vae, "likelihood")):
                raise PyrovaeError("output_bias_init='data_mean' needs a model with a decoder "
                                   "and a likelihood (a VAE, a HierarchicalVAE)")
            init_output_bias(self.vae.decoder, _output_bias_of_mean(self.vae, self.data.train))
        distributed.broadcast_parameters(self.vae)
        self.generator.manual_seed(self.options.seed)
        self.epoch_generator_state = self.generator.get_state()
        if self.run_dir is not None and self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            # a fresh run owns its folder: an earlier run's checkpoints must not be taken for
            # this one's (by a rollback, a resume or --keep-last)
            clear_run(self.run_dir, CHECKPOINT_FILES)
            _write_metrics(self.run_dir / METRICS_NAME, [], self.activity_sites)

    def _position(self) -> dict[str, object]:
        return {
            "epoch": self.epoch, "batch": self.batch, "step": self.step,
            "total_loss": self.total_loss, "seen": self.seen, "lr": self.lr,
            "epoch_generator_state": self.epoch_generator_state,
            "best_elbo": self.best_elbo, "rollbacks": self.rollbacks,
            "epochs_without_improvement": self.epochs_without_improvement,
            "plateau_epochs": self.plateau_epochs,
            "history": [asdict(record) for record in self.history],
        }

    def _save(self) -> None:
        """Write the checkpoint (rank 0; every rank checks the parameters, which all share)."""
        assert self.run_dir is not None
        for parameter in self.parameters:
            if not bool(torch.isfinite(parameter).all()):
                raise TrainingDivergedError(
                    f"parameters became NaN/inf by step {self.step} (epoch {self.epoch}); "
                    f"not overwriting the last good checkpoint; try a lower --lr or --clip-norm"
                )
        if not self.is_main:
            return
        completed_epochs = self.epoch - 1
        config = self.config.to_dict() if self.config is not None else None
        save_checkpoint(self.run_dir / CHECKPOINT_NAME, self.vae, self.optimizer, completed_epochs,
                        config, self.data.image_shape, progress=self._position(),
                        data_dim=self.data.data_dim,
                        param_store=param_store_entry(self.store_parameters),
                        program=program_record(self.given_program, config))

    def _load(self, path: Path) -> None:
        # rank 0 reads and sends it to the others: no shared file system needed to resume
        # everything is checked before anything is changed (check_resumable)
        checkpoint = distributed.rank0_call(
            lambda: check_resumable(path, self.vae, self.parameters))
        position = checkpoint["progress"]
        try:
            history = [EpochRecord(**record) for record in position["history"]]
        except TypeError as error:
            raise CheckpointError(f"checkpoint {path}: an epoch record of its history is "
                                  f"malformed ({error})") from None
        self.vae.load_state_dict(checkpoint["model"])
        saved_store = stored_param_values(checkpoint)
        missing = sorted(set(self.store_parameters) - set(saved_store))
        if missing:
            raise CheckpointError(f"checkpoint {path} lacks the Pyro parameters "
                                  f"{', '.join(missing)} of this program")
        with torch.no_grad():
            for name, parameter in self.store_parameters.items():
                parameter.copy_(saved_store[name])
        try:
            self.optimizer.load_state_dict(checkpoint["optimizer"])
        except (ValueError, KeyError) as error:
            raise CheckpointError(f"the optimizer state in {path} does not match this model "
                                  f"({error})") from None
        self.epoch, self.batch, self.step = position["epoch"], position["batch"], position["step"]
        self.total_loss, self.seen = position["total_loss"], position["seen"]
        self.lr, self.rollbacks = position["lr"], position["rollbacks"]
        self.epoch_generator_state = position["epoch_generator_state"]
        self.best_elbo = position["best_elbo"]
        self.epochs_without_improvement = position.get("epochs_without_improvement", 0)
        self.plateau_epochs = position.get("plateau_epochs", 0)
        self.history = history
        restore_rng_state(checkpoint["rng"])
        # a checkpoint holds rank 0's GPU state; every rank puts it on its own GPU
        distributed.share_rng_state(self.program.device)

    # --- the loop ----------------------------------------------------------------------
    def run(self, stop: _StopSignals) -> list[EpochRecord]:
        steps_per_epoch = math.ceil(self.data.train.shape[0] / self.options.batch_size)
        self.program.train()
        self._stop = stop
        # a worker of `pyrovae train --nproc` whose launcher died (kill -9) is adopted by
        # another process: it stops as on SIGTERM instead of training unsupervised
        self._launcher = os.getppid() if distributed.is_distributed() else None
        started = time.perf_counter()
        with tqdm(total=self.options.epochs * steps_per_epoch, initial=self.step,
                  disable=not (self.options.progress and self.is_main), unit="step",
                  dynamic_ncols=True) as bar:
            while self.epoch <= self.options.epochs and not self.stopped_early:
                epoch_started = time.perf_counter()
                try:
                    self._run_epoch(bar, stop)
                except TrainingDivergedError:
                    if self.options.on_divergence != "rollback" or self.rollbacks >= MAX_ROLLBACKS:
                        raise
                    self._roll_back()
                    continue
                if self.epoch <= self.options.epochs and not self.stopped_early and \
                        self._out_of_time(started, epoch_started):
                    logger.info("time budget of %g minutes: stopping after epoch %d of %d",
                                self.options.max_minutes, self.epoch - 1, self.options.epochs)
                    break
        return self.history

    def _out_of_time(self, started: float, epoch_started: float) -> bool:
        """Would one more epoch as long as the last one overrun ``max_minutes``?"""
        if self.options.max_minutes is None:
            return False
        now = time.perf_counter()
        # clocks differ between processes: rank 0 decides for all
        decision, = distributed.broadcast_from_main(
            [(now - started) + (now - epoch_started) > 60 * self.options.max_minutes])
        return decision

    def _run_epoch(self, bar: tqdm, stop: _StopSignals) -> None:
        epoch = self.epoch
        self.kl_scale.beta = self.kl_weight(epoch)
        self._apply_lr()
        started = time.perf_counter()
        self.generator.set_state(self.epoch_generator_state)
        n = self.data.train.shape[0]
        batch_size = self.options.batch_size
        batches = self.data.train_batches(batch_size, shuffle=False, start=self.batch) \
            if self.whole_data else \
            distributed.local_batches(self.data, batch_size, generator=self.generator,
                                      start=self.batch, rank=self.rank,
                                      world_size=self.world_size)
        for x in batches:
            global_rows = min(batch_size, n - self.batch * batch_size)
            if self._launcher is not None and stop.signal_number is None and \
                    os.getppid() != self._launcher:
                logger.warning("the launcher of this process is gone: stopping")
                stop.signal_number = signal.SIGTERM
            loss = self.train_step(x, epoch, global_rows=global_rows)
            self.step += 1
            self.batch += 1
            self.total_loss += loss
            self.seen += global_rows
            bar.update()
            bar.set_postfix(epoch=epoch, elbo=f"{-self.total_loss / self.seen:.2f}", refresh=False)
            # several processes stop on the signal they agreed on in the step, all together
            signal_number = stop.signal_number if self.world_size == 1 else self.agreed_stop
            if signal_number is not None:
                self._interrupt(signal_number)
            if self.run_dir is not None and self.options.checkpoint_every and \
                    self.step % self.options.checkpoint_every == 0:
                self._save()
        self._finish_epoch(time.perf_counter() - started)

    def _finish_epoch(self, seconds: float) -> None:
        epoch = self.epoch
        test_elbo = valid_elbo = math.nan
        if epoch % self.options.test_every == 0 or epoch == self.options.epochs:
            # rank 0 evaluates from a stream of its own, seeded by (seed, epoch): the training
            # stream is untouched, so a run extended later (or evaluated on other epochs)
            # draws exactly what an uninterrupted one does
            if self.is_main:
                self.program.train(False)
                with seeded(self.options.seed, epoch, device=self.program.device):
                    # a guide with per-point parameters is evaluated on all its points at once
                    rows = max(1000, self.data.train.shape[0]) if self.whole_data else 1000
                    test_elbo = elbo(self.program, self.data.test_inputs,
                                     batch_size=rows).mean().item()
                    if self.data.valid is not None:
                        valid_elbo = elbo(self.program, self.data.valid_inputs,
                                          batch_size=rows).mean().item()
                self.program.train()
            test_elbo, valid_elbo = distributed.broadcast_from_main([test_elbo, valid_elbo])
            distributed.share_rng_state(self.program.device)
        test_log_px = self._test_log_px(epoch)
        record = EpochRecord(epoch, self.step, -self.total_loss / self.seen, test_elbo, seconds,
                             valid_elbo, test_log_px, *self._activity(epoch))
        self.history.append(record)
        validation = "" if math.isnan(valid_elbo) else f", validation ELBO {valid_elbo:.3f}"
        if not math.isnan(test_log_px):
            validation += f", test log p(x) {test_log_px:.3f} (K={self.options.log_px_samples})"
            levels = getattr(getattr(self.vae, "likelihood", None), "num_levels", None)
            if levels is not None:  # a probability over the data's values
                validation += f" = {bits_per_dim(test_log_px, self.data.data_dim):.4f} bits/dim"
        log = logger.info if self.is_main else logger.debug
        if not math.isnan(record.active_units):
            validation += (f", {record.active_units:.0f} active units, I(x; z) "
                           f"{record.mutual_information:.3f}")
        log("epoch %d: train ELBO %.3f, test ELBO %.3f%s nats (%.1fs)", epoch,
                    record.train_elbo, record.test_elbo, validation, seconds)
        # the best checkpoint is chosen on the validation set where there is one
        held_out = valid_elbo if self.data.valid is not None else test_elbo
        improved = held_out > self.best_elbo
        if improved:
            self.best_elbo = held_out
        self._count_for_early_stopping(record, improved, evaluated=not math.isnan(held_out))
        if self.options.lr_schedule == "plateau" and not math.isnan(held_out):
            self._reduce_on_plateau(improved)
        if self.on_epoch_end is not None and self.is_main:
            self.on_epoch_end(record, self)
        # the next epoch starts from the generator state this one left
        self.epoch, self.batch, self.total_loss, self.seen = epoch + 1, 0, 0.0, 0
        self.epoch_generator_state = self.generator.get_state()
        if self.run_dir is not None:
            self._save()
            if self.is_main:
                _write_metrics(self.run_dir / METRICS_NAME, self.history, self.activity_sites)
                if self.options.keep_last:
                    keep_history(self.run_dir, epoch, self.options.keep_last)
                if improved:
                    mark_best(self.run_dir)
        # a signal that came during this epoch's evaluation stops the run here, at an epoch
        # boundary (several processes agree on a signal at each step instead)
        if self._stop is not None and self.world_size == 1 and \
                self._stop.signal_number is not None:
            self._interrupt(self._stop.signal_number)

    def _reduce_on_plateau(self, improved: bool) -> None:
        """Count this evaluated epoch towards a reduction of the base rate (``lr_schedule``
        ``"plateau"``); the next epoch starts at the reduced rate."""
        options = self.options
        lr, self.plateau_epochs = plateau_step(
            self.lr, self.plateau_epochs, improved, factor=options.lr_plateau_factor,
            patience=options.lr_plateau_patience, lr_min=options.lr_min)
        if lr != self.lr and self.is_main:
            logger.info("the held-out ELBO has not improved for %d evaluated epochs: learning "
                        "rate %.3g -> %.3g", options.lr_plateau_patience, self.lr, lr)
        self.lr = lr

    @property
    def stopped_early(self) -> bool:
        """Whether early stopping ended the run (after the last epoch of :attr:`history`)."""
        return bool(self.history) and self.history[-1].stopped_early

    def _count_for_early_stopping(self, record: EpochRecord, improved: bool, *,
                                  evaluated: bool) -> None:
        """Count the epochs since the held-out ELBO improved (not during the KL warm-up) and
        mark ``record`` as the last one once they reach the patience at an evaluated epoch
        before the last."""
        if improved or record.epoch < self.options.kl_warmup_epochs:
            self.epochs_without_improvement = 0
        else:
            self.epochs_without_improvement += 1
        patience = self.options.early_stopping_patience
        if patience and evaluated and record.epoch < self.options.epochs and \
                self.epochs_without_improvement >= patience:
            record.stopped_early = True
            if self.is_main:
                logger.info("early stopping after epoch %d: the held-out ELBO has not improved "
                            "for %d epochs (best %.3f nats)", record.epoch,
                            self.epochs_without_improvement, self.best_elbo)

    def _test_log_px(self, epoch: int) -> float:
        """The mean importance-sampled log p(x) of the first ``log_px_size`` test points at
        this epoch's end, or NaN when this epoch has none; seeded, so the training's
        random stream is untouched (every process computes its share)."""
        every = self.options.log_px_every
        if not every or (epoch % every and epoch != self.options.epochs):
            return math.nan
        self.program.train(False)
        # a guide with a parameter per point is evaluated on all its points at once
        size = None if self.whole_data else self.options.log_px_size
        rows = {"batch_size": self.data.train.shape[0]} if self.whole_data else {}
        log_px = distributed.sharded(
            log_marginal_likelihood, self.program,
            tuple(argument[:size] for argument in _arguments(self.data.test_inputs)),
            num_samples=self.options.log_px_samples, seed=self.options.seed, **rows)
        self.program.train()
        return log_px.mean().item()

    def _activity(self, epoch: int) -> tuple[float, float, dict[str, int] | None]:
        """The active units of all latent sites, I(x; z) and the active units per site on
        the first ``log_px_size`` test points at this epoch's end, or NaN, NaN, None when
        this epoch has none.  Rank 0 computes them from a stream of its own, seeded by
        (seed, epoch), so the training's random stream is untouched."""
        every = self.options.activity_every
        if not every or (epoch % every and epoch != self.options.epochs):
            return math.nan, math.nan, None
        values: list[Any] = [math.nan, math.nan, None]
        points = tuple(argument[: self.options.log_px_size]
                       for argument in _arguments(self.data.test_inputs))
        if self.is_main and points[0].shape[0] >= 2:
            self.program.train(False)
            with seeded(self.options.seed, epoch, 1, device=self.program.device):
                variances = posterior_mean_variances(self.program, points)
                information = mutual_information(self.program, points)
            self.program.train()
            per_site = {site: int((variance > ACTIVE_UNIT_THRESHOLD).sum())
                        for site, variance in variances.items()}
            values = [float(sum(per_site.values())), information, per_site]
        total, information, per_site = distributed.broadcast_from_main(values)
        return total, information, per_site

    def _interrupt(self, signal_number: int) -> None:
        name = signal.Signals(signal_number).name
        if self.run_dir is None:
            raise TrainingInterrupted(f"{name} at epoch {self.epoch}, step {self.step}; "
                                      f"no run directory, nothing saved", signal_number)
        self._save()
        # the launcher stops every process once one exits: none leaves before rank 0 has saved
        distributed.barrier()
        if self._stop is not None:
            self._stop.handled = True
        if self.epoch > self.options.epochs:
            raise TrainingInterrupted(
                f"{name} after the last epoch ({self.options.epochs}): checkpoint written; pyrovae "
                f"train --resume {self.run_dir} finishes the run (its final evaluation)",
                signal_number)
        raise TrainingInterrupted(
            f"{name} at epoch {self.epoch}, step {self.step}: checkpoint written; continue with "
            f"pyrovae train --resume {self.run_dir}", signal_number)

    def _roll_back(self) -> None:
        assert self.run_dir is not None
        path = self.run_dir / CHECKPOINT_NAME
        if not distributed.rank0_call(path.exists):  # rank 0 holds the checkpoints
            raise TrainingDivergedError("the loss diverged before the first checkpoint; "
                                        "nothing to roll back to; try a lower --lr")
        rollbacks = self.rollbacks + 1
        lr = self.lr / 2
        self._load(path)
        self.rollbacks, self.lr = rollbacks, lr
        scheduled = self._apply_lr()
        logger.warning("loss diverged; rolled back to epoch %d, step %d with lr %.3g "
                       "(rollback %d of %d)", self.epoch, self.step, scheduled, rollbacks,
                       MAX_ROLLBACKS)

    def _apply_lr(self) -> float:
        """Set the optimizer to the scheduled rate of the epoch under way; return it."""
        lr = scheduled_lr(self.epoch, lr=self.lr, schedule=self.options.lr_schedule,
                          epochs=self.options.epochs, lr_min=self.options.lr_min)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr


#: the columns of metrics.csv where the latent usage is counted (``activity_every``); a
#: hierarchy also gets ``active_units_<site>`` for each latent site, after ``active_units``
ACTIVITY_COLUMNS = ("active_units", "mutual_information")
_SITE_COLUMN = "active_units_"


def _metric_columns(records: list[EpochRecord],
                    activity_sites: list[str] | None) -> tuple[str, ...]:
    """:data:`METRIC_COLUMNS`, and the activity columns where the loop counts the latent
    usage or an earlier session of the run did."""
    if activity_sites is None:
        activity_sites = next((list(record.active_units_per_site) for record in records
                               if record.active_units_per_site), None)
    if activity_sites is None:
        return METRIC_COLUMNS
    sites = tuple(_SITE_COLUMN + site for site in activity_sites) if len(activity_sites) > 1 \
        else ()
    return (*METRIC_COLUMNS, ACTIVITY_COLUMNS[0], *sites, ACTIVITY_COLUMNS[1])


def _cell(record: EpochRecord, column: str) -> object:
    if column == "active_units":
        return int(record.active_units) if math.isfinite(record.active_units) else math.nan
    if column.startswith(_SITE_COLUMN):
        return (record.active_units_per_site or {}).get(column[len(_SITE_COLUMN):], math.nan)
    return getattr(record, column)


def _write_metrics(path: Path, records: list[EpochRecord],
                   activity_sites: list[str] | None = None) -> None:
    """Write ``metrics.csv`` with every record, atomically (rewritten whole each epoch, so a
    kill never leaves half a row); with ``activity_sites``, the latent usage columns too
    (NaN on the epochs that did not count it)."""
    columns = _metric_columns(records, activity_sites)
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(columns)
    for record in records:
        writer.writerow([_cell(record, column) for column in columns])
    write_text(path, text.getvalue())


def _number(row: dict[str, str], column: str) -> float:
    return float(row.get(column) or math.nan)


def read_metrics(path: str | Path) -> list[EpochRecord]:
    """Read ``metrics.csv`` back into records (a column the file lacks reads as NaN)."""
    with Path(path).open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    records = []
    for row in rows:
        per_site = {column[len(_SITE_COLUMN):]: int(float(value)) for column, value in row.items()
                    if column.startswith(_SITE_COLUMN) and value and value != "nan"}
        records.append(EpochRecord(
            int(row["epoch"]), int(row["step"]), float(row["train_elbo"]),
            float(row["test_elbo"]), float(row["epoch_seconds"]), _number(row, "valid_elbo"),
            _number(row, "test_log_px"), _number(row, "active_units"),
            _number(row, "mutual_information"), per_site or None))
    return records
