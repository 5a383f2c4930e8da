"""Training a Pyro program by stochastic variational inference: a small loop and its callbacks.

:func:`fit` minimises a Pyro ELBO by minibatch gradient steps with Adam.  The loop
(:class:`TrainingLoop`) takes the steps, counts epochs and keeps the position a checkpoint
must hold to resume the run exactly; every run-time policy (the held-out ELBO every few
epochs, early stopping, ``metrics.csv``, checkpoints, divergence rollback, a time budget,
stopping on a signal) is a :class:`~pyrovae.callbacks.Callback` it calls at fixed points,
and a user's own callbacks join them (``fit(..., callbacks=[...])``).  ELBO values are per
data point, in nats.

Launched by ``torchrun`` (a process group is initialized), the same loop trains one model
data-parallel behind a strategy object (:mod:`pyrovae.strategy`): each process takes its
slice of every global batch and the gradients are summed over processes after each
backward pass (see :mod:`pyrovae.distributed`).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyro
import torch
from tqdm.auto import tqdm

from pyrovae.activity import guide_sites
from pyrovae.callbacks import (  # noqa: F401  (MAX_ROLLBACKS re-exported)
    MAX_ROLLBACKS,
    Callback,
    EpochFunction,
    StopSignals,
    policy_callbacks,
    run_callbacks,
)
from pyrovae.checkpoint import (
    CHECKPOINT_NAME,
    check_resumable,
    param_store_entry,
    program_record,
    restore_rng_state,
    save_checkpoint,
    stored_param_values,
)
from pyrovae.compilation import COMPILE_MODES, compile_networks
from pyrovae.data import DataSplits, outside_unit_interval
from pyrovae.devices import resolve_device, seed_everything, seeded  # noqa: F401  (re-exported)
from pyrovae.errors import (  # noqa: F401  (the training errors re-exported)
    CheckpointError,
    ConfigError,
    InvalidDataError,
    PyrovaeError,
    TrainingDivergedError,
    TrainingInterrupted,
)
from pyrovae.metrics import (  # noqa: F401  (re-exported)
    ACTIVITY_COLUMNS,
    METRIC_COLUMNS,
    METRICS_NAME,
    EpochRecord,
    read_metrics,
    write_metrics,
)
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
from pyrovae.programs import (
    Program,
    ProgramError,
    Structure,
    as_data,
    as_program,
    program_parameters,
)
from pyrovae.registration import parameters_owned
from pyrovae.schedules import check_plateau, scheduled_kl_weight, scheduled_lr
from pyrovae.strategy import SingleProcess, current_strategy
from pyrovae.validation import check_data

if TYPE_CHECKING:
    from pyrovae.config import TrainConfig

logger = logging.getLogger(__name__)

#: the stop-signal catcher under its earlier name
_StopSignals = StopSignals


def _arguments(batch: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """A minibatch as the program's positional data arguments: ``(x,)``, or ``(x, y)`` where
    the data carry labels (:meth:`~pyrovae.data.DataSplits.train_batches`)."""
    return batch if isinstance(batch, tuple) else (batch,)


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


def _check_local_parameters(structure: Structure, data: DataSplits, batch_size: int,
                            world_size: int = 1) -> bool:
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
    if world_size > 1:
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
#: a loss per data point above its first value plus this many times its scale (the larger
#: of that value and the data dimension) counts as diverged, though finite
DIVERGED_LOSS_FACTOR = 10.0


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

    def resolved(self, config: TrainConfig | dict[str, Any] | None) -> FitOptions:
        """These options with ``beta`` and ``kl_warmup_epochs`` decided: the config's where
        they are ``None``, else 1 and 0."""
        values = _config_dict(config) or {}
        beta = self.beta if self.beta is not None else values.get("beta", 1.0)
        warmup = self.kl_warmup_epochs if self.kl_warmup_epochs is not None else \
            values.get("kl_warmup_epochs", 0)
        return replace(self, beta=beta, kl_warmup_epochs=warmup)


def _config_dict(config: Any) -> dict[str, Any] | None:
    """A run's config as the plain dict a checkpoint stores (a ``TrainConfig``'s ``to_dict``)."""
    if config is None or isinstance(config, dict):
        return config
    return config.to_dict()


def fit(vae: VAE | Program | Any, data: DataSplits, options: FitOptions | None = None, *,
        run_dir: str | Path | None = None, config: TrainConfig | dict[str, Any] | None = None,
        resume: bool = False, validate: bool = False,
        on_epoch_end: Callable[[EpochRecord, TrainingLoop], None] | None = None,
        callbacks: Sequence[Callback] = (), auxiliary: Sequence[AuxiliaryLoss] = (),
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
    (:class:`~pyrovae.strategy.DataParallel`), and the gradients are summed over
    processes.  Each process draws its own noise, so a run agrees with one process in
    distribution (as with ``DistributedDataParallel``), not bit for bit.  Rank 0 alone
    writes files; a stop signal on any process stops all of them at the same step.  Rank
    0's initial parameters are given to all processes.

    :param data: train/test splits on the program's device (see :meth:`DataSplits.to`).
    :param options: how to train (:class:`FitOptions`); ``option_values``, its fields as
        keywords (``fit(vae, data, epochs=5)``), are set on top of it.
    :param run_dir: where ``metrics.csv`` and the checkpoints go (nothing is written if
        ``None``).
    :param config: stored in the checkpoint (as a plain dict) so the model can be rebuilt
        from it.
    :param resume: continue from ``run_dir/checkpoint.pt``.
    :param validate: Pyro's distribution argument checks; off by default because they cost
        time in the hot loop, and the data are checked once up front instead.
    :param on_epoch_end: ``on_epoch_end(record, loop)`` after each epoch on the main process.
    :param callbacks: your own :class:`~pyrovae.callbacks.Callback` objects, called on every
        process after the evaluation and policies the options ask for and before the
        checkpoint is written (so a state they change is saved with the epoch).
    :param auxiliary: further losses (:class:`~pyrovae.objectives.AuxiliaryLoss`), each a
        gradient step of its own after the program's at every step, on the same batch (one
        process only); their parameters join the optimizer.
    :returns: the records; ``train_elbo`` there is minus the loss being minimised, i.e. the
        KL-weighted ELBO while beta is not 1, and the IWAE bound for ``objective="iwae"``.
    :raises TrainingDivergedError: the loss became NaN or infinite (checked before the
        update, so the parameters stay finite); the checkpoint of the last good step is kept.
    :raises TrainingInterrupted: on SIGINT/SIGTERM, after writing a checkpoint.

    Example::

        class Printer(Callback):
            def on_epoch_end(self, loop, record):
                print(f"epoch {record.epoch}: test ELBO {record.test_elbo:.2f} nats")

        history = fit(vae, data, epochs=5, callbacks=[Printer()])
    """
    options = FitOptions.of(options, option_values)
    program = as_program(vae)
    strategy = current_strategy()
    _check_dtypes(program, data)
    if callable(getattr(program.module, "check_data", None)) and \
            getattr(program.module, "data_dim", None) is not None:
        check_training_data(program.module, data, options.batch_size)
    else:
        program.check_data(data.test_inputs)
    strategy.check_batch_size(options.batch_size, data.train.shape[0])
    if (resume or options.on_divergence == "rollback") and run_dir is None:
        raise PyrovaeError("resuming or rolling back needs a run_dir to hold checkpoints")
    given = [*callbacks, *([EpochFunction(on_epoch_end)] if on_epoch_end is not None else [])]
    # torchrun's agent forwards a signal it receives to every worker, so a repeated signal
    # is not the user insisting; the agent kills workers that do not stop in time
    stop = StopSignals(escalate=not strategy.is_distributed)
    loop = TrainingLoop(program, data, options, run_dir=Path(run_dir) if run_dir else None,
                        config=config, callbacks=given, signals=stop, strategy=strategy,
                        auxiliary=auxiliary)
    with pyro.validation_enabled(validate), stop:
        loop.start(resume)
        history = loop.run()
    program.train(False)
    return history


def fit_from_config(vae: VAE, data: DataSplits, config: TrainConfig, *,
                    run_dir: str | Path | None = None, resume: bool = False,
                    validate: bool = False,
                    on_epoch_end: Callable[[EpochRecord, TrainingLoop], None] | None = None,
                    callbacks: Sequence[Callback] = ()) -> list[EpochRecord]:
    """:func:`fit` with the options ``config`` sets (:meth:`FitOptions.from_config`; what
    ``pyrovae train`` runs)."""
    return fit(vae, data, FitOptions.from_config(config), run_dir=run_dir, config=config,
               resume=resume, validate=validate, on_epoch_end=on_epoch_end,
               callbacks=callbacks)


def _outside_parameters(parameters: list[torch.Tensor],
                        module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The ``pyro.param`` sites among ``parameters`` outside ``module``, by name (saved
    beside the module's state dict in a checkpoint)."""
    owned = {id(parameter) for parameter in module.parameters()}
    store = pyro.get_param_store()
    return {store.param_name(p): p for p in parameters
            if id(p) not in owned and store.param_name(p) is not None}


def _initialise_from_data(module: torch.nn.Module, x: torch.Tensor, output_bias_init: str) -> None:
    """Before the first step: the prior's :meth:`~pyrovae.priors.Prior.init_from_data`, and
    the decoder's output bias where ``output_bias_init`` is ``"data_mean"``."""
    prior = getattr(module, "prior", None)
    if callable(getattr(prior, "init_from_data", None)):
        prior.init_from_data(x)
    if output_bias_init == "data_mean":
        if not (hasattr(module, "decoder") and hasattr(module, "likelihood")):
            raise PyrovaeError("output_bias_init='data_mean' needs a model with a decoder "
                               "and a likelihood (a VAE, a HierarchicalVAE)")
        init_output_bias(module.decoder, _output_bias_of_mean(module, x))


def _compile(program: Program, mode: str) -> None:
    """Compile the program's networks with ``torch.compile`` (the Pyro program stays eager)."""
    if program.module is None:
        raise ConfigError("compile needs the program's networks: pass a VAE or a module "
                          "with model and guide methods, not two functions")
    compiled = compile_networks(program.module, mode)
    logger.info("compiled %s (torch.compile, mode %s)", ", ".join(compiled) or "nothing", mode)


def _restore_parameters(checkpoint: dict[str, Any], path: Path, module: torch.nn.Module,
                        store_parameters: dict[str, torch.Tensor],
                        optimizer: torch.optim.Optimizer) -> None:
    """Set the module's state, the ``pyro.param`` sites outside it and the optimizer's state
    from a checked checkpoint."""
    saved_store = stored_param_values(checkpoint)
    missing = sorted(set(store_parameters) - set(saved_store))
    module.load_state_dict(checkpoint["model"])
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks the Pyro parameters "
                              f"{', '.join(missing)} of this program")
    with torch.no_grad():
        for name, parameter in store_parameters.items():
            parameter.copy_(saved_store[name])
    try:
        optimizer.load_state_dict(checkpoint["optimizer"])
    except (ValueError, KeyError) as error:
        raise CheckpointError(f"the optimizer state in {path} does not match this model "
                              f"({error})") from None



class TrainingLoop:
    """One training run: the optimizer, the objective, the loop's position (what a
    checkpoint holds to resume exactly) and the callbacks it calls (:mod:`pyrovae.callbacks`).

    :meth:`train_step` is one gradient step on a minibatch (what ``benchmark_speed.py``
    times); :meth:`run` the epochs.  ``options`` and ``option_values`` are :func:`fit`'s;
    ``callbacks`` run after the policies the options ask for and before the checkpoint.
    Multi-process work is the ``strategy``'s (:mod:`pyrovae.strategy`).

    Example::

        loop = TrainingLoop(vae, data, epochs=2, progress=False, callbacks=[MyCallback()])
        loop.start(resume=False)
        history = loop.run()
    """

    def __init__(self, vae: VAE | Program | Any, data: DataSplits,
                 options: FitOptions | None = None, *, run_dir: Path | None = None,
                 config: TrainConfig | dict[str, Any] | None = None,
                 callbacks: Sequence[Callback] = (), signals: StopSignals | None = None,
                 strategy: SingleProcess | None = None, auxiliary: Sequence[AuxiliaryLoss] = (),
                 **option_values: Any) -> None:
        self.config = _config_dict(config)
        #: how this run trains, ``beta`` and ``kl_warmup_epochs`` decided
        self.options = options = FitOptions.of(options, option_values).resolved(self.config)
        self.strategy = strategy if strategy is not None else current_strategy()
        self.callbacks: list[Callback] = [*policy_callbacks(options), *callbacks,
                                          *run_callbacks(options, signals)]
        self.program = as_program(vae)
        #: what the caller passed: its class is recorded in checkpoints
        self.given_program = vae
        # the module whose state a checkpoint holds (empty for plain callables)
        self.vae = self.program.module if self.program.module is not None else torch.nn.Module()
        self.data, self.run_dir = data, run_dir
        batch_size = options.batch_size
        # the program's first call is on a training batch, as SVI's first step is: a lazily
        # built guide (a Pyro autoguide) is built for the points it will be trained on
        batch = tuple(argument[:batch_size] for argument in as_data(data.train_inputs))
        structure = self.program.structure(*batch)
        #: every step takes the whole training set in its order (a guide with a parameter
        #: per data point: its parameters belong to those points)
        self.whole_data = _check_local_parameters(structure, data, batch_size,
                                                  self.strategy.world_size)
        # some sites show only on some points (a semi-supervised model enumerates the label
        # of unlabelled ones): read the program on test points too
        first = tuple(argument[:batch_size] for argument in as_data(data.test_inputs))
        structure = structure.merged(self.program.structure(*first))
        with pyro.validation_enabled(False):
            self.parameters = program_parameters(self.program, *batch)
        #: (model, guide, objective) of each auxiliary loss, stepped after the program's
        self.auxiliary = self._auxiliary(auxiliary, batch)
        self.store_parameters = _outside_parameters(self.parameters, self.vae)
        self.optimizer = make_adam(self.parameters, lr=options.lr, settings=options.adam,
                                   fused=options.fused and self.program.device.type in ("cpu", "cuda"))
        if options.compile != "off":
            _compile(self.program, options.compile)
        self.kl_scale = LatentScale(self.kl_weight(1))
        self.elbo = make_objective(options.objective, options.num_particles, structure=structure,
                                   free_bits=options.free_bits,
                                   free_bits_group=options.free_bits_group)
        self.model = self.kl_scale(self.program.model)
        self.guide = self.kl_scale(self.program.guide)
        self.generator = torch.Generator()
        # the position: ``epoch`` is the epoch under way (from 1), ``batch`` the batches of
        # it already done; ``epoch_generator_state`` replays its shuffling order; ``lr`` is
        # the schedule's base rate (halved by rollbacks, reduced on plateaus)
        self.epoch, self.batch, self.step, self.lr = 1, 0, 0, options.lr
        self.total_loss, self.seen = 0.0, 0
        self.epoch_generator_state = self.generator.get_state()
        self.history: list[EpochRecord] = []
        #: the best held-out ELBO (validation, else test), and whether the last epoch's was
        #: evaluated and improved on it
        self.best_elbo, self.evaluated, self.improved = -math.inf, False, False
        #: set by a callback to end the run after the current epoch
        self.should_stop = False
        self.resumed = False
        #: the latent sites whose active units ``activity_every`` counts (None: off)
        self.activity_sites = guide_sites(self.program, *first) if options.activity_every \
            else None
        #: this process's stop signal, voted on at every step; the one all agreed on
        self.stop_vote: Callable[[], int | None] = lambda: None
        self.agreed_stop: int | None = None

    def _hook(self, name: str, *arguments: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, name)(self, *arguments)

    def _auxiliary(self, auxiliary: Sequence[AuxiliaryLoss],
                   batch: tuple[torch.Tensor, ...]) -> list[tuple[Any, Any, Any]]:
        """Read each auxiliary pair's structure and add its parameters to
        :attr:`parameters` (before the optimizer is made)."""
        if auxiliary and self.strategy.is_distributed:
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

    def apply_lr(self) -> float:
        """Set the optimizer to the scheduled rate of the epoch under way; return it."""
        lr = scheduled_lr(self.epoch, lr=self.lr, schedule=self.options.lr_schedule,
                          epochs=self.options.epochs, lr_min=self.options.lr_min)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    @property
    def stopped_early(self) -> bool:
        """Whether early stopping ended the run (after the last epoch of :attr:`history`)."""
        return bool(self.history) and self.history[-1].stopped_early

    # --- one step ------------------------------------------------------------------------
    def _loss(self, x: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Minus the (KL-weighted) objective of the program summed over the minibatch,
        differentiable."""
        # a NaN loss is caught and named by _check_loss; Pyro's own warning would only repeat it
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Encountered NaN", category=UserWarning)
            # self.optimizer holds the parameters: re-registering them every step is not needed
            with parameters_owned():
                return self.elbo.differentiable_loss(self.model, self.guide, *_arguments(x))

    def train_step(self, x: torch.Tensor | tuple[torch.Tensor, ...], epoch: int = 1, *,
                   global_rows: int | None = None) -> float:
        """One gradient step; raises before updating if the loss or gradient is not finite.

        :param x: the minibatch, or in a multi-process run this process's slice of it: a
            tensor, or a tuple of the program's data arguments (``(x, y)``).
        :param global_rows: the size of the global batch ``x`` is a slice of; needed in a
            multi-process run (ignored in one process).
        :returns: the loss summed over the whole (global) batch, nats.
        """
        if self.auxiliary:
            return self._steps_with_auxiliary(x, epoch)
        self.optimizer.zero_grad(set_to_none=True)
        with self.strategy.step_context(self.program.device, _arguments(x)[0].shape[0],
                                        global_rows):
            loss = self._loss(x)
        if loss.requires_grad:
            loss.backward()
        value, agreed = self.strategy.reduce(self.parameters, loss, self.stop_vote())
        if agreed is not None:
            self.agreed_stop = agreed
        # every process sees the same global loss, so all raise together and none waits
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
        norms = []
        if self.options.adam is not None and self.options.adam.normalize_gradients:
            largest = normalize_gradients_(self.parameters)
            norms += [largest.max()] if largest is not None else []
        if self.options.clip_norm:
            norms.append(torch.nn.utils.clip_grad_norm_(self.parameters, self.options.clip_norm))
        for norm in norms:  # measured anyway: a non-finite one stops the run like a NaN loss
            if not bool(torch.isfinite(norm)):
                raise TrainingDivergedError(
                    f"gradient norm is {float(norm)} at epoch {epoch}, step {self.step + 1}; "
                    f"{self._kept_checkpoint()}; try a lower learning rate (--lr)")
        self.optimizer.step()

    def _kept_checkpoint(self) -> str:
        """What a run stopped now leaves behind, for its error message."""
        kept = self.run_dir is not None and (self.run_dir / CHECKPOINT_NAME).exists()
        return "the last good checkpoint is kept" if kept else "no checkpoint was written"

    # --- starting, saving and resuming -----------------------------------------------------
    def start(self, resume: bool) -> None:
        """Resume from ``run_dir/checkpoint.pt``, or start afresh: seed, initialise the
        prior from the data (and the output bias, ``output_bias_init``), and give every
        process the main one's parameters."""
        self.resumed = resume
        if resume:
            assert self.run_dir is not None
            self.load(self.run_dir / CHECKPOINT_NAME)
            done = self.epoch - 1
            if done > self.options.epochs:
                raise ConfigError(f"{self.run_dir} has trained {done} epochs, more than the "
                                  f"{self.options.epochs} asked for; resume with epochs >= {done}")
            if self.strategy.is_main:
                logger.info("resuming at epoch %d, step %d", self.epoch, self.step)
            return
        seed_everything(self.options.seed)
        _initialise_from_data(self.vae, self.data.train, self.options.output_bias_init)
        self.strategy.broadcast_parameters(self.vae)
        self.generator.manual_seed(self.options.seed)
        self.epoch_generator_state = self.generator.get_state()

    def position(self) -> dict[str, Any]:
        """What a checkpoint holds to resume the run exactly: the loop's position and every
        callback's :meth:`~pyrovae.callbacks.Callback.state_dict`."""
        position = {"epoch": self.epoch, "batch": self.batch, "step": self.step,
                    "total_loss": self.total_loss, "seen": self.seen, "lr": self.lr,
                    "epoch_generator_state": self.epoch_generator_state,
                    "best_elbo": self.best_elbo}
        for callback in self.callbacks:
            position.update(callback.state_dict())
        return {**position, "history": [asdict(record) for record in self.history]}

    def save(self) -> None:
        """Write the checkpoint (main process; every process checks the parameters)."""
        assert self.run_dir is not None
        for parameter in self.parameters:
            if not bool(torch.isfinite(parameter).all()):
                raise TrainingDivergedError(
                    f"parameters became NaN/inf by step {self.step} (epoch {self.epoch}); "
                    f"not overwriting the last good checkpoint; try a lower --lr or --clip-norm"
                )
        if self.strategy.is_main:
            save_checkpoint(self.run_dir / CHECKPOINT_NAME, self.vae, self.optimizer,
                            self.epoch - 1, self.config, self.data.image_shape,
                            progress=self.position(), data_dim=self.data.data_dim,
                            param_store=param_store_entry(self.store_parameters),
                            program=program_record(self.given_program, self.config))

    def load(self, path: Path) -> None:
        """Take the parameters, optimizer, RNG states, position and callbacks' states from
        the checkpoint at ``path`` (read by the main process, checked before anything is
        changed, and shared)."""
        checkpoint = self.strategy.on_main(
            lambda: check_resumable(path, self.vae, self.parameters))
        position = checkpoint["progress"]
        try:
            history = [EpochRecord(**record) for record in position["history"]]
        except TypeError as error:
            raise CheckpointError(f"checkpoint {path}: an epoch record of its history is "
                                  f"malformed ({error})") from None
        _restore_parameters(checkpoint, path, self.vae, self.store_parameters, self.optimizer)
        self.epoch, self.batch, self.step = position["epoch"], position["batch"], position["step"]
        self.total_loss, self.seen, self.lr = position["total_loss"], position["seen"], \
            position["lr"]
        self.epoch_generator_state = position["epoch_generator_state"]
        self.best_elbo, self.history, self.should_stop = position["best_elbo"], history, False
        for callback in self.callbacks:
            callback.load_state_dict(position)
        restore_rng_state(checkpoint["rng"])
        # a checkpoint holds the main process's GPU state; every process puts it on its own
        self.strategy.share_rng_state(self.program.device)

    # --- the loop ----------------------------------------------------------------------------
    def run(self) -> list[EpochRecord]:
        """Train the epochs from the position on, calling the callbacks; return the history."""
        steps_per_epoch = math.ceil(self.data.train.shape[0] / self.options.batch_size)
        self.program.train()
        self._hook("on_fit_start")
        with tqdm(total=self.options.epochs * steps_per_epoch, initial=self.step,
                  disable=not (self.options.progress and self.strategy.is_main), unit="step",
                  dynamic_ncols=True) as self._bar:
            while self.epoch <= self.options.epochs and not self.should_stop:
                try:
                    self.run_epoch()
                except TrainingDivergedError as error:
                    if not any(callback.on_divergence(self, error)
                               for callback in self.callbacks):
                        raise
        self._hook("on_fit_end")
        return self.history

    def run_epoch(self) -> None:
        """One epoch from the position on (the rest of it, after a resume mid-epoch)."""
        epoch = self.epoch
        self.kl_scale.beta = self.kl_weight(epoch)
        self.apply_lr()
        self._hook("on_epoch_start")
        started = time.perf_counter()
        self.generator.set_state(self.epoch_generator_state)
        n, batch_size = self.data.train.shape[0], self.options.batch_size
        batches = self.data.train_batches(batch_size, shuffle=False, start=self.batch) \
            if self.whole_data else \
            self.strategy.batches(self.data, batch_size, generator=self.generator,
                                  start=self.batch)
        for x in batches:
            global_rows = min(batch_size, n - self.batch * batch_size)
            self._hook("on_step_start")
            loss = self.train_step(x, epoch, global_rows=global_rows)
            self.step, self.batch = self.step + 1, self.batch + 1
            self.total_loss, self.seen = self.total_loss + loss, self.seen + global_rows
            self._bar.update()
            self._bar.set_postfix(epoch=epoch, elbo=f"{-self.total_loss / self.seen:.2f}",
                                  refresh=False)
            self._hook("on_step_end", loss)
        self._finish_epoch(time.perf_counter() - started)

    def _finish_epoch(self, seconds: float) -> None:
        record = EpochRecord(self.epoch, self.step, -self.total_loss / self.seen, math.nan,
                             seconds)
        self._hook("on_evaluate", record)
        self.history.append(record)
        # the best checkpoint is chosen on the validation set where there is one
        held_out = record.valid_elbo if self.data.valid is not None else record.test_elbo
        self.evaluated, self.improved = not math.isnan(held_out), held_out > self.best_elbo
        if self.improved:
            self.best_elbo = held_out
        # the next epoch starts from the generator state this one left
        self.epoch, self.batch, self.total_loss, self.seen = record.epoch + 1, 0, 0.0, 0
        self.epoch_generator_state = self.generator.get_state()
        self._hook("on_epoch_end", record)
