"""One run directory, and what is done with it: create it, train one run into it, resume it,
evaluate it.

A run directory holds one trained model and what was learnt of it::

    config.json              the TrainConfig (TrainConfig.load reads it back)
    metrics.csv              one row per epoch (pyrovae.train.METRIC_COLUMNS)
    checkpoint.pt            the last finished step (pyrovae.checkpoint)
    checkpoint_best.pt       the best held-out ELBO so far
    checkpoints/             the last --keep-last epoch checkpoints
    samples.png              decoded prior samples after training
    results.json             the final evaluation of pyrovae train, with provenance
    evaluation.json          pyrovae evaluate's numbers (or an experiment's, cached)
    training_sessions.jsonl  where each call trained it (experiment scripts)
    tensorboard/             event files (--tensorboard)

A folder holding any of :data:`RUN_MARKERS` holds a run: a new run refuses it unless told to
overwrite, and a resumed run must be the same run (:data:`RESUME_OVERRIDES` name what may
change).  The folder is locked (:class:`~pyrovae.rundir.RunLock`) while a run trains in it.
The command line (:mod:`pyrovae.cli`) and the experiment scripts call these functions; the
file-level helpers (atomic writes, the lock, clearing a run) are :mod:`pyrovae.rundir`'s.
Values are nats per data point.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pyro
import torch
from tqdm.auto import tqdm

from pyrovae import distributed
from pyrovae.activity import ACTIVE_UNIT_THRESHOLD, posterior_mean_variance
from pyrovae.checkpoint import (
    BEST_CHECKPOINT_NAME,
    CHECKPOINT_NAME,
    check_checkpoint,
    check_param_store,
    check_resumable,
    check_state_dict,
    load_program_state,
    load_vae,
    read_checkpoint,
)
from pyrovae.config import (
    LABEL_MODELS,
    TrainConfig,
    apply_label_settings,
    build_vae,
    fit_batch_to_data,
)
from pyrovae.data import DataSplits, load_dataset
from pyrovae.devices import seed_everything
from pyrovae.diagnostics import KHAT_THRESHOLD, importance_summary, unreliable_fraction
from pyrovae.distributed import sharded
from pyrovae.errors import CheckpointError, ConfigError, PyrovaeError
from pyrovae.evaluation import elbo, log_marginal_likelihood, mean_and_standard_error
from pyrovae.labels import classification_error, log_marginal_likelihood_over_labels
from pyrovae.likelihoods import bits_per_dim
from pyrovae.models import VAE, SemiSupervisedVAE
from pyrovae.plotting import save_program_samples, save_sample_grid
from pyrovae.program_spec import canonical_spec, load_program
from pyrovae.programs import as_data, as_program
from pyrovae.provenance import provenance
from pyrovae.report import DEFAULT_AIS, DEFAULT_KS, build_report, save_report
from pyrovae.rundir import (
    LOCK_NAME,
    RunFileError,
    RunLock,
    RunLockedError,
    check_run_dir_path,
    check_writable,
    clear_run,
    describe_os_error,
    json_safe,
    make_run_dir,
    remove_temporaries,
    write_json,
)
from pyrovae.sandwich import DEFAULT_POINTS, bidirectional_monte_carlo
from pyrovae.train import (
    METRICS_NAME,
    EpochRecord,
    TrainingDivergedError,
    _StopSignals,
    check_training_data,
    fit_from_config,
    read_metrics,
)

logger = logging.getLogger(__name__)

# --- the layout -------------------------------------------------------------------------------

CONFIG_NAME = "config.json"
RESULTS_NAME = "results.json"
#: ``pyrovae evaluate --sandwich``'s bounds, without ``--report``
SANDWICH_NAME = "sandwich.json"
EVALUATION_NAME = "evaluation.json"
SAMPLES_NAME = "samples.png"
TENSORBOARD_NAME = "tensorboard"
#: one JSON line per call that trained the run: the epoch it started at, commit, machine
SESSIONS_NAME = "training_sessions.jsonl"
#: the files whose presence means a folder holds a run
RUN_MARKERS = (CHECKPOINT_NAME, CONFIG_NAME, METRICS_NAME)


def run_dir_of(checkpoint: str | Path) -> Path:
    """The run directory of ``checkpoint`` (a checkpoint file, or the directory itself)."""
    path = Path(checkpoint)
    return path if path.is_dir() else path.parent


def existing_run(run_dir: Path) -> list[str]:
    """The :data:`RUN_MARKERS` present in ``run_dir``."""
    return [name for name in RUN_MARKERS if (run_dir / name).exists()]


def _refuse_existing(run_dir: Path, existing: list[str]) -> None:
    raise ConfigError(f"{run_dir} already holds a run ({', '.join(existing)}); choose another "
                      f"--out-dir, pass --overwrite to replace it or --resume to continue it")


def check_out_dir(config: TrainConfig) -> None:
    """Refuse, before any work, a ``config.out_dir`` that is a file or holds a run (unless
    ``config.overwrite``).  Nothing is created."""
    if not str(config.out_dir).strip():
        raise ConfigError("--out-dir is empty; name the folder to write the run into "
                          "(e.g. --out-dir runs/vae)")
    run_dir = Path(config.out_dir)
    check_run_dir_path(run_dir)
    existing = existing_run(run_dir) if run_dir.is_dir() else []
    if existing and not config.overwrite:
        _refuse_existing(run_dir, existing)


def open_run_dir(run_dir: Path, stack: contextlib.ExitStack, *, overwrite: bool = False,
                 fresh: bool = True) -> Path:
    """Create ``run_dir``, take its lock for the rest of ``stack``, and with ``fresh``
    check again (now under the lock) that it holds no run, or clear the old one with
    ``overwrite``; then check that it can be written.

    A folder this call created is removed again if ``stack`` closes on an error before
    anything was written into it.
    """
    created = not run_dir.exists()
    make_run_dir(run_dir)
    if created:
        stack.callback(_remove_if_unused, run_dir)
    stack.enter_context(RunLock(run_dir))
    if fresh:
        existing = existing_run(run_dir)
        if existing and not overwrite:
            _refuse_existing(run_dir, existing)
        if overwrite:
            clear_run(run_dir)
    remove_temporaries(run_dir)
    check_writable(run_dir)
    return run_dir


def _remove_if_unused(run_dir: Path) -> None:
    """Remove ``run_dir`` if it holds nothing but its lock file (a start that failed)."""
    with contextlib.suppress(OSError):
        if {path.name for path in run_dir.iterdir()} <= {LOCK_NAME}:
            (run_dir / LOCK_NAME).unlink(missing_ok=True)
            run_dir.rmdir()


# --- resuming -------------------------------------------------------------------------------

#: config fields that may change when a run is resumed; the others would make it another run
RESUME_OVERRIDES = frozenset({"epochs", "device", "progress", "data_dir", "download",
                              "eval_samples", "checkpoint_every", "keep_last",
                              "max_minutes", "log_px_every", "log_px_samples", "log_px_size",
                              "activity_every", "tensorboard", "compile"})
#: fields that never make another run: where it is written, and whether it replaced another
_ALWAYS_FREE = frozenset({"out_dir", "overwrite"})


def _flags(names: list[str] | frozenset[str]) -> str:
    return ", ".join("--" + name.replace("_", "-") for name in sorted(names))


def resumed_config(run_dir: Path, changes: Mapping[str, Any], *,
                   may_change: frozenset[str] = RESUME_OVERRIDES) -> TrainConfig:
    """The config saved in ``run_dir`` with ``changes`` applied, for resuming it.

    :param changes: config fields to set, e.g. the flags given to ``pyrovae train --resume``.
    :param may_change: the fields a resume may change (``out_dir`` and ``overwrite`` always).
        A run stopped before its first checkpoint has only its config: :func:`train_run`
        starts it afresh from that.
    :raises ConfigError: nothing to resume, or a change to a field outside ``may_change``.
    """
    if not (run_dir / CHECKPOINT_NAME).is_file() and not (run_dir / CONFIG_NAME).is_file():
        raise ConfigError(f"nothing to resume in {run_dir}: it needs {CONFIG_NAME} and "
                          f"{CHECKPOINT_NAME} from an earlier pyrovae train")
    if not (run_dir / CONFIG_NAME).is_file():
        raise ConfigError(
            f"cannot resume {run_dir}: it has {CHECKPOINT_NAME} but no {CONFIG_NAME} (a run "
            f"trained by fit() from Python?); the command needs the TrainConfig: save it there "
            f"with config.save(), as pyrovae train does")
    values = TrainConfig.load(run_dir / CONFIG_NAME).to_dict()
    _check_changes(run_dir, values, changes, may_change=may_change)
    values.update(changes)
    values["out_dir"] = str(run_dir)
    return TrainConfig.from_dict(values)


def _check_changes(run_dir: Path, saved: Mapping[str, Any], changes: Mapping[str, Any], *,
                  may_change: frozenset[str] = RESUME_OVERRIDES) -> None:
    """Refuse ``changes`` to the ``saved`` config of ``run_dir`` outside ``may_change``.

    :raises ConfigError: naming the fields, their saved and new values, and what may change.
    """
    fixed = sorted(name for name, value in changes.items()
                   if name not in may_change | _ALWAYS_FREE and saved.get(name) != value)
    if fixed:
        details = ", ".join(f"{saved.get(name)!r} -> {changes[name]!r}" for name in fixed)
        raise ConfigError(f"{_flags(fixed)} cannot change when resuming {run_dir} ({details}; "
                          f"only {_flags(may_change)} may)")


def changes_from(run_dir: Path, config: TrainConfig) -> dict[str, Any]:
    """The fields of ``config`` that differ from the config saved in ``run_dir``."""
    saved = TrainConfig.load(run_dir / CONFIG_NAME).to_dict()
    return {name: value for name, value in config.to_dict().items() if saved.get(name) != value}


def check_resume(run_dir: Path, config: TrainConfig, vae: VAE) -> None:
    """Everything a resume of ``run_dir`` needs, checked before its config is rewritten:
    a checkpoint ``vae`` can continue, trained with ``config`` (aside from
    :data:`RESUME_OVERRIDES`), with no more epochs than ``config.epochs``."""
    if config.program is None:
        checkpoint = check_resumable(run_dir / CHECKPOINT_NAME, vae)
    else:
        # the optimizer state also covers the program's pyro.param sites, which the
        # training loop finds and checks (TrainingLoop._load)
        checkpoint = _check_program_resumable(run_dir / CHECKPOINT_NAME, vae)
    if checkpoint.get("config") is not None:
        refuse_foreign(run_dir / CHECKPOINT_NAME, TrainConfig.from_dict(checkpoint["config"]),
                       config, run_dir / CONFIG_NAME)
    done = checkpoint["progress"]["epoch"] - 1
    if done > config.epochs:
        raise ConfigError(f"{run_dir} has trained {done} epochs; --epochs {config.epochs} would "
                          f"drop some: resume with --epochs {done} or more")


def refuse_foreign(checkpoint_path: Path, embedded: TrainConfig, config: TrainConfig,
                   config_path: Path) -> None:
    """Raise :class:`CheckpointError` if the checkpoint was trained with another config than
    the run's ``config.json`` (fields that may change on resume aside)."""
    ignored = RESUME_OVERRIDES | _ALWAYS_FREE
    mine, theirs = config.to_dict(), embedded.to_dict()
    differ = [name for name in mine if name not in ignored and mine[name] != theirs.get(name)]
    if differ:
        details = ", ".join(f"{name} {theirs.get(name)!r} vs {mine[name]!r}"
                            for name in differ[:3])
        raise CheckpointError(
            f"{checkpoint_path} was not trained with {config_path}: {details}"
            + (f" and {len(differ) - 3} more" if len(differ) > 3 else "")
            + "; use the checkpoint with its own run directory")


def load_best(run_dir: Path, vae: VAE, *, stopped_early: bool,
              program: bool = False) -> dict[str, Any]:
    """Load ``checkpoint_best.pt``'s parameters into ``vae`` for the final evaluation (early
    stopping selects the model on the held-out ELBO); what the results record of it.

    :param program: ``vae`` is your own program: its ``pyro.param`` sites are loaded too
        (:func:`~pyrovae.checkpoint.load_program_state`).
    """
    path = run_dir / BEST_CHECKPOINT_NAME
    if program:
        checkpoint = load_program_state(vae, path)
    else:
        checkpoint = distributed.rank0_call(lambda: check_resumable(path, vae))
        vae.load_state_dict(checkpoint["model"])
    logger.info("final evaluation with the best checkpoint (epoch %d)%s", checkpoint["epoch"],
                ", early stopping ended training" if stopped_early else "")
    return {"stopped_early": stopped_early, "evaluated_checkpoint": BEST_CHECKPOINT_NAME,
            "evaluated_checkpoint_epoch": checkpoint["epoch"]}


# --- your own program ------------------------------------------------------------------------
# A run of a user's program records its spec in config.json; the spec is only ever imported
# when the user names it again on the command line (check_program_named), never because a
# run directory names it: a config.json is data anyone may have edited.

def check_program_named(run_dir: Path, given: str | None, config: TrainConfig | None, *,
                        command: str) -> None:
    """Refuse, before anything is imported, a ``--program`` that is not the one ``config``
    (the run's) records, or none where it records one.

    :param given: the ``--program`` of the command line, or ``None``.
    :param command: the command for the message (``"evaluate"``).
    :raises ConfigError: one line naming both programs.
    """
    recorded = config.program if config is not None else None
    if recorded is None:
        if given is not None:
            raise ConfigError(f"--program {given}: {run_dir} holds a run of the built-in "
                              f"model, not of a program; leave --program out")
        return
    if given is None:
        raise ConfigError(f"{run_dir} holds a run of your program {recorded}; pyrovae imports "
                          f"no code that a run directory names: name it again, pyrovae "
                          f"{command} {run_dir} --program {recorded}")
    if canonical_spec(given) != recorded:
        raise ConfigError(f"--program {canonical_spec(given)} is not the program {run_dir} was "
                          f"trained with ({recorded}); name that one")


def build_user_program(config: TrainConfig, device: torch.device) -> Any:
    """Import and build ``config.program`` with ``config.program_args``
    (:func:`~pyrovae.program_spec.load_program`), on ``device``.  Only for a spec the user
    named on the command line (:func:`check_program_named` first, for a recorded one)."""
    assert config.program is not None
    # a run starts from an empty parameter store: pyro.module would otherwise hand this
    # program the tensors an earlier program in this process registered under its names
    pyro.clear_param_store()
    program = load_program(config.program, config.program_args)
    if isinstance(program, torch.nn.Module):
        program = program.to(device)
    return program


def _check_program_resumable(path: Path, program: Any) -> dict[str, Any]:
    """:func:`~pyrovae.checkpoint.check_resumable` of a user's program, the optimizer aside."""
    checkpoint = read_checkpoint(path)
    check_checkpoint(checkpoint, path, resumable=True)
    module = as_program(program).module
    check_state_dict(module if module is not None else torch.nn.Module(), checkpoint["model"],
                     path, "this program")
    check_param_store(checkpoint, path)
    return checkpoint


def _user_program_figures(program: Any, run_dir: Path, data: DataSplits) -> dict[str, Any]:
    """``samples.png`` where the program can draw x, and the active units where its guide
    allows counting them; what it cannot do is logged, not fatal, at the end of training."""
    if data.image_shape is not None:
        try:
            save_program_samples(program, run_dir / SAMPLES_NAME, data.image_shape,
                                 data.data_dim)
        except PyrovaeError as error:
            logger.warning("no %s: %s", SAMPLES_NAME, error)
    try:
        return posterior_activity(program, data.test)
    except (PyrovaeError, ValueError, RuntimeError) as error:
        logger.warning("active units not counted: %s", error)
        return {"active_units": None, "posterior_collapsed": False}


# --- training one run -----------------------------------------------------------------------

@dataclass
class Run:
    """One trained run: its directory, config, model (in eval mode) and every epoch's record
    across resumes."""

    run_dir: Path
    config: TrainConfig
    vae: VAE
    history: list[EpochRecord]

    @property
    def name(self) -> str:
        """The run directory's name (an experiment's setting)."""
        return self.run_dir.name

    @property
    def train_seconds(self) -> float:
        """Training time summed over epochs, across resumes (test-ELBO passes excluded)."""
        return sum(record.epoch_seconds for record in self.history)


def load_run_data(config: TrainConfig, device: torch.device) -> tuple[TrainConfig, DataSplits]:
    """The data ``config`` trains on, on ``device``: its dataset cut to ``train_size`` and
    ``test_size``, its validation split, and for a model of labelled data the labels it
    sees; with the config that data completes (:func:`~pyrovae.config.apply_label_settings`)."""
    data = load_dataset(config.dataset, config.data_dir, binarize=config.binarize,
                        download=config.download, test_fraction=config.test_fraction,
                        labels=config.model in LABEL_MODELS,
                        own_validation=config.valid_split == "dataset")
    data = data.subset(config.train_size, config.test_size).with_validation(
        config.valid_size, own=config.valid_split == "dataset")
    config, data = apply_label_settings(config, data)  # --labelled, num_classes, alpha
    config = fit_batch_to_data(config, data.train.shape[0])
    return config, data.to(device)


#: a prior whose log p(z) per training step costs more than this many GFLOP is announced
EXPENSIVE_PRIOR_GFLOP = 10.0


def check_prior_cost(vae: VAE, config: TrainConfig) -> None:
    """Refuse, in one line, a prior whose log p(z) cannot fit in memory (a VampPrior over
    flow or full-covariance posteriors), and say up front what an expensive one costs."""
    check_fits = getattr(vae.prior, "check_fits", None)
    if not callable(check_fits):
        return
    particles = (config.num_particles,) if config.num_particles > 1 else ()
    cost = check_fits(vae.posterior, (*particles, config.batch_size))
    if cost.flops > EXPENSIVE_PRIOR_GFLOP * 1e9:
        logger.warning("expensive prior: %s; a step costs about three times that",
                       cost.describe())


def train_run(config: TrainConfig, data: DataSplits, *, resume: bool = False,
              record_session: bool = False, stack: contextlib.ExitStack | None = None) -> Run:
    """Train ``config`` on ``data`` in the run directory ``config.out_dir``.

    A fresh run refuses a folder that holds a run unless ``config.overwrite`` (then the old
    run is cleared); ``resume`` continues the folder's checkpoint, which must be the same
    run (:func:`check_resume`).  The folder is locked while training, and with ``stack``
    for the rest of it (a final evaluation).  ``config.json`` is written before the first
    step; ``config.tensorboard`` writes event files into ``tensorboard/``.

    :param data: the splits on the model's device (:func:`load_run_data`).
    :param record_session: append to :data:`SESSIONS_NAME` the epoch this call starts at,
        with the commit and machine, so that a run resumed across machines says which
        epochs ran where (:func:`training_sessions`).
    :returns: the run, its model in eval mode.
    """
    run_dir = Path(config.out_dir)
    # stopped between config.json and the first checkpoint: nothing trained, start afresh
    restart = resume and distributed.rank0_call(lambda: not (run_dir / CHECKPOINT_NAME).exists())
    if restart:
        logger.warning("%s has its %s but no checkpoint (stopped before the first one): "
                       "starting it afresh from that config", run_dir, CONFIG_NAME)
        resume = False
    elif not resume:
        distributed.rank0_call(lambda: check_out_dir(config))
    seed_everything(config.seed)
    device = data.train.device
    if config.program is None:
        vae = build_vae(config, data_dim=data.data_dim, image_shape=data.image_shape).to(device)
        check_training_data(vae, data, config.batch_size)
        check_prior_cost(vae, config)
    else:
        vae = build_user_program(config, device)
    with contextlib.ExitStack() as own:
        # rank 0 creates and locks the folder, checks the checkpoint to resume, then writes
        # the config; every rank learns its verdict
        distributed.rank0_call(lambda: _start_run(config, run_dir, vae, stack or own,
                                                  resume=resume, restart=restart,
                                                  session_device=device if record_session
                                                  else None))
        processes = (f", {distributed.get_world_size()} processes"
                     if distributed.is_distributed() else "")
        logger.info("training on %d images (%s%s), testing on %d; run directory %s",
                    data.train.shape[0], device, processes, data.test.shape[0], run_dir)
        writer = None
        if config.tensorboard and distributed.is_main_process():
            from pyrovae.tensorboard import TensorBoardWriter

            writer = TensorBoardWriter(run_dir / TENSORBOARD_NAME, image_shape=data.image_shape)
        try:
            history = fit_from_config(vae, data, config, run_dir=run_dir, resume=resume,
                                      on_epoch_end=writer)
        finally:
            if writer is not None:
                writer.close()
    as_program(vae).train(False)
    return Run(run_dir, config, vae, history)


def _start_run(config: TrainConfig, run_dir: Path, vae: VAE, stack: contextlib.ExitStack, *,
               resume: bool, session_device: torch.device | None, restart: bool = False) -> None:
    open_run_dir(run_dir, stack, overwrite=config.overwrite, fresh=not (resume or restart))
    if restart:  # now under the lock: still no checkpoint, so nothing trained is lost
        if (run_dir / CHECKPOINT_NAME).exists():
            raise ConfigError(f"{run_dir} got a checkpoint while this command started; "
                              f"run pyrovae train --resume {run_dir} again")
        clear_run(run_dir)
    if resume:
        check_resume(run_dir, config, vae)
    if session_device is not None:
        metrics = run_dir / METRICS_NAME
        first = len(read_metrics(metrics)) + 1 if resume and metrics.is_file() else 1
        _record_session(run_dir, first, session_device)
    config.save(run_dir / CONFIG_NAME)


def _record_session(run_dir: Path, first_epoch: int, device: torch.device) -> None:
    record = {"first_epoch": first_epoch,
              **{key: value for key, value in provenance(device).items()
                 if key in ("commit", "date", "device", "hardware")}}
    with (run_dir / SESSIONS_NAME).open("a") as handle:
        handle.write(json.dumps(record) + "\n")


def training_sessions(run_dir: Path, epochs: int) -> list[dict[str, Any]]:
    """The calls that trained ``run_dir`` (:func:`train_run`'s ``record_session``), each with
    ``first_epoch`` and ``last_epoch`` (the next call's start, or ``epochs``); calls that
    trained nothing are left out, and a run without the record gives ``[]``."""
    path = run_dir / SESSIONS_NAME
    if not path.is_file():
        return []
    sessions = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for session, following in zip(sessions, [*sessions[1:], None], strict=True):
        session["last_epoch"] = following["first_epoch"] - 1 if following else epochs
    return [session for session in sessions if session["last_epoch"] >= session["first_epoch"]]


def load_run(run_dir: Path, device: torch.device) -> Run:
    """The run in ``run_dir`` as its checkpoint stands, with its history from ``metrics.csv``.

    :raises ConfigError: no checkpoint.
    """
    if not (run_dir / CHECKPOINT_NAME).is_file():
        raise ConfigError(f"{run_dir} holds no checkpoint; train it first")
    vae, config, _ = load_vae(run_dir, device)
    return Run(run_dir, config, vae, read_metrics(run_dir / METRICS_NAME))


def train_and_evaluate(config: TrainConfig, device: torch.device, *,
                       resume: bool = False, reevaluate: bool = False) -> None:
    """What ``pyrovae train`` does: train ``config`` into ``config.out_dir`` (resume it with
    ``resume``), then draw ``samples.png``, count the active latent units, estimate the test
    ELBO and log p(x) with ``config.eval_samples`` importance samples, print them and write
    ``results.json`` with provenance.

    ``config.data_dir`` is recorded as an absolute path, so that the run can be evaluated
    from any folder.  A resumed run that has finished its epochs and has its
    ``results.json`` is left as it is, with a line saying so, unless ``reevaluate``.

    Every process of a ``torch.distributed`` group calls this; rank 0 writes the files.

    :raises TrainingDivergedError: the trained model is far worse than an untrained one
        (:func:`check_diverged`), after ``results.json`` has recorded it.
    """
    if reevaluate and not resume:
        raise ConfigError("--reevaluate goes with --resume RUN_DIR: it estimates a finished "
                          "run's log p(x) again")
    if config.data_dir is not None:
        config = replace(config, data_dir=os.path.abspath(os.path.expanduser(config.data_dir)))
    if not resume:
        # rank 0 checks the folder, creating nothing before the data and model are known good
        distributed.rank0_call(lambda: check_out_dir(config))
    elif not reevaluate:
        line = distributed.rank0_call(lambda: _finished_run_locked(Path(config.out_dir), config))
        if line is not None:
            if distributed.is_main_process():
                print(line)
            return
    config, data = load_run_data(config, device)
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        run = train_run(config, data, resume=resume, stack=stack)
        _finish(run, data, device, session_seconds=time.perf_counter() - started)


def _finished_run_locked(run_dir: Path, config: TrainConfig) -> str | None:
    """:func:`finished_run`, asked while holding the run's lock (refused as training would
    be while another process holds it)."""
    if not run_dir.is_dir():
        return None
    with RunLock(run_dir):
        return finished_run(run_dir, config)


def finished_run(run_dir: Path, config: TrainConfig) -> str | None:
    """What to say of ``run_dir`` if it has trained exactly ``config.epochs`` (or stopped
    early before) and its ``results.json`` evaluates that last epoch; ``None`` if there is
    training or its final evaluation left to do (or too many epochs to refuse)."""
    results_path = run_dir / RESULTS_NAME
    if not (results_path.is_file() and (run_dir / METRICS_NAME).is_file()):
        return None
    history = read_metrics(run_dir / METRICS_NAME)
    try:
        results = json.loads(results_path.read_text())
    except (OSError, ValueError):
        return None  # unreadable: evaluate it again
    if not history or not isinstance(results, dict) or results.get("epochs") != len(history):
        return None
    stopped_early = history[-1].stopped_early
    if len(history) > config.epochs or (len(history) < config.epochs and not stopped_early):
        return None
    estimate = ""
    if results.get("log_marginal_likelihood") is not None:
        estimate = (f": {results.get('log_marginal_likelihood_of', 'log p(x)')} "
                    f"{results['log_marginal_likelihood']:.2f} nats (K={results['num_samples']},"
                    f" {results['num_test_points']} test points)")
    how = (f"early stopping ended it after {len(history)} of {config.epochs} epochs"
           if stopped_early else f"{len(history)} of {config.epochs} epochs trained")
    more = "" if stopped_early else f"pass --epochs N (more than {len(history)}) to train on, or "
    return (f"{run_dir} is finished ({how}) and evaluated in {RESULTS_NAME}{estimate}, which "
            f"is kept; {more}pass --reevaluate to estimate its log p(x) again")


def _keep_stronger(path: Path, results: Mapping[str, Any]) -> Path | None:
    """If ``path`` holds an estimate stronger than ``results``' (more importance samples or
    more test points), move it to the next free ``results-N.json`` and say so; returns
    where it went."""
    try:
        previous = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(previous, dict) or previous.get("log_marginal_likelihood") is None:
        return None
    weaker = [f"{what} {previous[key]} -> {results.get(key) or 0}"
              for key, what in (("num_samples", "K"), ("num_test_points", "test points"))
              if isinstance(previous.get(key), int) and previous[key] > (results.get(key) or 0)]
    if not weaker:
        return None
    kept = _keep_previous(path)
    logger.warning("this estimate is weaker than the one in %s (%s): that one is kept as %s",
                   path, ", ".join(weaker), kept)
    return kept


#: test points on which a trained model's ELBO is compared with an untrained one's
DIVERGENCE_POINTS = 1000
#: a trained model whose ELBO is below an untrained one's by more than this fraction of the
#: latter's size (plus one nat) has diverged, however finite its loss
DIVERGED_ELBO_FRACTION = 0.1


def check_diverged(vae: VAE, config: TrainConfig, data: DataSplits, *,
                   parallel: bool = False) -> dict[str, Any]:
    """Compare ``vae``'s ELBO on the first :data:`DIVERGENCE_POINTS` test points with that
    of the same model untrained (built again from ``config``'s seed): a run that ends far
    below where it started has diverged, though every loss was finite (too high a
    learning rate).

    :returns: ``diverged``, both ELBOs (nats per point, the same draws) and the points.
    """
    x = data.test_inputs
    x = tuple(part[:DIVERGENCE_POINTS] for part in x) if isinstance(x, tuple) \
        else x[:DIVERGENCE_POINTS]
    device = as_data(x)[0].device
    seed_everything(config.seed)
    untrained = build_vae(config, data_dim=data.data_dim, image_shape=data.image_shape)
    untrained.to(device).eval()
    values = {}
    for name, model in (("elbo", vae), ("untrained_elbo", untrained)):
        seed_everything(config.seed)
        values[name] = mean_and_standard_error(
            _estimate(elbo, model, x, batch_size=100, distributed=parallel)).mean
    margin = DIVERGED_ELBO_FRACTION * abs(values["untrained_elbo"]) + 1.0
    diverged = not math.isfinite(values["elbo"]) or \
        values["elbo"] < values["untrained_elbo"] - margin
    return {"diverged": diverged, **values, "num_points": as_data(x)[0].shape[0]}


def _finish(run: Run, data: DataSplits, device: torch.device, *, session_seconds: float) -> None:
    """The final evaluation of a trained run, printed and written to ``results.json``."""
    config, history, vae, run_dir = run.config, run.history, run.vae, run.run_dir
    parallel, main_process = distributed.is_distributed(), distributed.is_main_process()
    results: dict[str, Any] = {
        # all sessions of a resumed run (the epochs' own times, test ELBOs included)
        "train_seconds": run.train_seconds,
        "session_seconds": session_seconds,
        "epochs": len(history),
        "final_train_elbo": history[-1].train_elbo,
        "seed": config.seed,
        "config": config.to_dict(),
    }
    if config.early_stopping_patience:
        results.update(load_best(run_dir, vae, stopped_early=history[-1].stopped_early,
                                 program=config.program is not None))
    # the final evaluation has no steps to stop between: a signal stops it at once
    with _StopSignals(message=f"during the final evaluation: training is complete and "
                              f"checkpointed; pyrovae train --resume {run_dir} evaluates it"):
        if main_process:
            if config.program is not None:
                results.update(_user_program_figures(vae, run_dir, data))
            else:
                if data.image_shape is not None:
                    save_sample_grid(vae, run_dir / SAMPLES_NAME, data.image_shape)
                results.update(posterior_activity(vae, data.test) if not data.has_labels else
                               {"active_units": None, "posterior_collapsed": False})
        # your own program is built by its own code, which may reset the parameters it
        # registered: no untrained copy of it is built beside the trained one
        divergence = (check_diverged(vae, config, data, parallel=parallel)
                      if config.program is None else {"diverged": None})
        results.update(diverged=divergence["diverged"], divergence_check=divergence)
        if divergence["diverged"] and main_process:
            logger.warning("training diverged: %s", _diverged_line(divergence))
        if config.eval_samples > 0:
            seed_everything(config.seed)
            results.update(evaluate_vae(vae, data.test_inputs, num_samples=config.eval_samples,
                                        distributed=parallel,
                                        progress=config.progress and main_process))
    if parallel:
        results["num_processes"] = distributed.get_world_size()
    if not main_process:
        if divergence["diverged"]:
            raise TrainingDivergedError("training diverged (rank 0 says how)")
        return
    # printed before saving, so that a failed write does not lose them
    if config.eval_samples > 0:
        print(f"test ELBO {results['test_elbo']:.2f} ± {results['test_elbo_standard_error']:.2f}"
              f" nats{_bits(results, 'test_elbo')}; {log_px_line(results)}")
    if results["posterior_collapsed"]:
        print(f"warning: the posterior collapsed: no latent unit is active (the variance over "
              f"test points of every E[z_d|x] is below {ACTIVE_UNIT_THRESHOLD}); q(z|x) ignores "
              f"x; warm the KL up (--kl-warmup-epochs) or train longer")
    results.update(provenance(device))
    if (run_dir / RESULTS_NAME).is_file():
        _keep_stronger(run_dir / RESULTS_NAME, results)
    write_json(run_dir / RESULTS_NAME, results)
    print(f"run saved in {run_dir}")
    if divergence["diverged"]:
        raise TrainingDivergedError(f"training diverged: {_diverged_line(divergence)}; "
                                    f"{RESULTS_NAME} records it; try a lower learning rate "
                                    f"(--lr) or --clip-norm")


def _diverged_line(divergence: Mapping[str, Any]) -> str:
    return (f"the trained model's ELBO {divergence['elbo']:.2f} nats is far below the untrained "
            f"model's {divergence['untrained_elbo']:.2f} on the same "
            f"{divergence['num_points']} test points")


#: test points used to count active units at the end of training
ACTIVITY_POINTS = 1000


def posterior_activity(vae: VAE, x_test: torch.Tensor) -> dict[str, Any]:
    """Active latent units on the first :data:`ACTIVITY_POINTS` test points, and whether
    the posterior collapsed (no unit active)."""
    x = x_test[:ACTIVITY_POINTS]
    if x.shape[0] < 2:
        return {"active_units": None, "posterior_collapsed": False}
    variance = posterior_mean_variance(vae, x)
    active = int((variance > ACTIVE_UNIT_THRESHOLD).sum())
    logger.info("active latent units: %d of %d", active, variance.numel())
    return {"active_units": active, "posterior_collapsed": active == 0,
            "posterior_mean_variance_max": float(variance.max())}


# --- evaluating one run ---------------------------------------------------------------------

#: the fraction of test points with k-hat above the threshold from which a log p(x) is
#: reported with a warning
KHAT_WARNING_FRACTION = 0.1
#: test points per progress-bar step of the final evaluation (a multiple of any batch size
#: the bar is used with keeps the random draws those of one pass)
_PROGRESS_POINTS = 1000


def evaluate_vae(vae: VAE, x_test: torch.Tensor | tuple[torch.Tensor, torch.Tensor], *,
                 num_samples: int, batch_size: int = 100, chunk_size: int | None = None,
                 distributed: bool = False, progress: bool = False) -> dict[str, Any]:
    """Test ELBO and importance-sampled log p(x), each as mean and standard error in nats,
    and how far to trust the latter: the fraction of test points whose PSIS k-hat exceeds
    0.7 (:func:`~pyrovae.diagnostics.pareto_k`; ``None`` for K < 25 and under
    ``distributed``, where the per-point weights are not gathered).

    :param x_test: ``(N, D)``; with labels ``(x, y)``: a conditional VAE's estimate is then
        log p(x | y), and M2's (:class:`~pyrovae.models.SemiSupervisedVAE`) log p(x) with y
        summed out, beside the test classification error of q(y | x)
        (``test_classification_error``).
    :param num_samples: importance samples K per test point.
    :param distributed: every process of the ``torch.distributed`` group calls this; the
        test points are split over them and every process gets the same numbers.
    :param progress: show a progress bar over the test points.
    """
    if isinstance(vae, SemiSupervisedVAE):
        return _evaluate_semi_supervised(vae, *x_test, num_samples=num_samples,
                                         batch_size=batch_size, chunk_size=chunk_size,
                                         distributed=distributed)
    started = time.perf_counter()
    test_elbo = mean_and_standard_error(_estimate(elbo, vae, x_test, batch_size=batch_size,
                                                  distributed=distributed))
    khat_fraction = None
    if distributed:
        log_px_values = sharded(log_marginal_likelihood, vae, x_test, num_samples,
                                batch_size=batch_size, chunk_size=chunk_size)
    else:
        # one pass in blocks of whole batches draws what log_marginal_likelihood draws
        block = max(1, _PROGRESS_POINTS // batch_size) * batch_size
        summaries = [importance_summary(vae, part, ks=(num_samples,), batch_size=batch_size,
                                        chunk_size=chunk_size)
                     for part in tqdm(_split(x_test, block), disable=not progress, unit="block",
                                      desc=f"log p(x), K={num_samples}", dynamic_ncols=True)]
        log_px_values = torch.cat([summary.log_marginal_likelihood for summary in summaries])
        khat_fraction = _unreliable_fraction(torch.cat([s.pareto_k for s in summaries]))
    log_px = mean_and_standard_error(log_px_values)
    results = {
        "test_elbo": test_elbo.mean,
        "test_elbo_standard_error": test_elbo.standard_error,
        "log_marginal_likelihood": log_px.mean,
        "log_marginal_likelihood_standard_error": log_px.standard_error,
        "num_samples": num_samples,
        "num_test_points": log_px.num_points,
        "khat_threshold": KHAT_THRESHOLD,
        "fraction_khat_above_threshold": khat_fraction,
        "evaluation_seconds": time.perf_counter() - started,
        **({"log_marginal_likelihood_of": "log p(x | y)"} if isinstance(x_test, tuple) else {}),
    }
    results.update(bits_per_dim_of(results, vae, as_data(x_test)[0].shape[1]))
    return results


def bits_per_dim_of(results: Mapping[str, Any], vae: Any, data_dim: int) -> dict[str, Any]:
    """The test ELBO and log p(x) of ``results`` (nats per data point) in bits per dimension,
    ``-value / (D log 2)``, with their standard errors, where the model's likelihood is a
    probability mass function over data of known bit depth (``num_levels``: binary data,
    8-bit images under a discretized likelihood); ``{}`` for a density."""
    levels = getattr(getattr(vae, "likelihood", None), "num_levels", None)
    if levels is None:
        return {}
    scale = 1 / (data_dim * math.log(2))
    values: dict[str, Any] = {"bits_per_dim_levels": levels}
    for name in ("test_elbo", "log_marginal_likelihood"):
        if results.get(name) is not None:
            values[f"{name}_bits_per_dim"] = bits_per_dim(results[name], data_dim)
            values[f"{name}_bits_per_dim_standard_error"] = \
                results[f"{name}_standard_error"] * scale
    return values


def _bits(results: Mapping[str, Any], name: str) -> str:
    """`` (B ± E bits/dim)`` of ``results[name]`` where it was reported in bits, else ``""``."""
    if results.get(f"{name}_bits_per_dim") is None:
        return ""
    return (f" ({results[f'{name}_bits_per_dim']:.4f} ± "
            f"{results[f'{name}_bits_per_dim_standard_error']:.4f} bits/dim)")


def _estimate(estimator: Any, program: Any, x: Any, *args: Any, distributed: bool,
              **options: Any) -> torch.Tensor:
    """A per-point estimator on this process alone, or shared by the processes of the
    running group (:func:`pyrovae.distributed.sharded`)."""
    if distributed:
        return sharded(estimator, program, x, *args, **options)
    return estimator(program, x, *args, **options)


def _split(data: torch.Tensor | tuple[torch.Tensor, ...], size: int) -> list[Any]:
    """``data`` (a tensor, or a tuple of the program's data arguments) in blocks of ``size``
    points."""
    if not isinstance(data, tuple):
        return list(data.split(size))
    return list(zip(*(argument.split(size) for argument in data), strict=True))


def _evaluate_semi_supervised(m2: SemiSupervisedVAE, x_test: torch.Tensor, y_test: torch.Tensor,
                              *, num_samples: int, batch_size: int, chunk_size: int | None,
                              distributed: bool) -> dict[str, Any]:
    """M2's test numbers: log p(x) with the label summed out (K importance samples per
    class), the ELBO of log p(x, y) on the labelled test points, and the test
    classification error of q(y | x)."""
    started = time.perf_counter()
    test_elbo = mean_and_standard_error(_estimate(elbo, m2, (x_test, y_test),
                                                  batch_size=batch_size, distributed=distributed))
    log_px = mean_and_standard_error(_estimate(
        log_marginal_likelihood_over_labels, m2, x_test, m2.num_classes, num_samples,
        batch_size=batch_size, chunk_size=chunk_size, distributed=distributed))
    results: dict[str, Any] = {
        "test_elbo": test_elbo.mean,
        "test_elbo_standard_error": test_elbo.standard_error,
        "test_elbo_of": "log p(x, y)",
        "log_marginal_likelihood": log_px.mean,
        "log_marginal_likelihood_standard_error": log_px.standard_error,
        "log_marginal_likelihood_of": "log p(x)",
        "num_samples": num_samples,
        "num_test_points": log_px.num_points,
        "test_classification_error": classification_error(m2, x_test, y_test),
        "khat_threshold": KHAT_THRESHOLD,
        "fraction_khat_above_threshold": None,
        "evaluation_seconds": time.perf_counter() - started,
    }
    results.update(bits_per_dim_of(results, m2, x_test.shape[1]))
    return results


def _unreliable_fraction(khat: torch.Tensor) -> float | None:
    """:func:`~pyrovae.diagnostics.unreliable_fraction`, ``None`` (JSON null) where no point
    has a k-hat (too few samples)."""
    fraction = unreliable_fraction(khat)
    return None if math.isnan(fraction) else fraction


def log_px_line(results: Mapping[str, Any]) -> str:
    """The log p(x) of :func:`evaluate_vae`'s ``results`` as printed, with its k-hat
    diagnostic (and a warning where it is unreliable for many points)."""
    line = (f"{results.get('log_marginal_likelihood_of', 'log p(x)')} (K={results['num_samples']}) "
            f"{results['log_marginal_likelihood']:.2f} ± "
            f"{results['log_marginal_likelihood_standard_error']:.2f} nats"
            f"{_bits(results, 'log_marginal_likelihood')} over "
            f"{results['num_test_points']} test points")
    if results.get("test_classification_error") is not None:
        line += (f"; test classification error of q(y|x) "
                 f"{100 * results['test_classification_error']:.2f}%")
    fraction = results.get("fraction_khat_above_threshold")
    if fraction is None:
        return line + " (k-hat not computed: it needs K >= 25 in one process)"
    line += f"; k-hat > {KHAT_THRESHOLD} for {100 * fraction:.1f}% of them"
    if fraction > KHAT_WARNING_FRACTION:
        line += ("\nwarning: for those points the importance weights are heavy-tailed and the "
                 "estimate may be far from log p(x) (still rising with K); train longer, use a "
                 "richer guide or a larger K before trusting it")
    return line


def load_run_checkpoint(path: str | Path, device: torch.device, *, program: str | None = None,
                        command: str = "evaluate") -> tuple[Any, TrainConfig, dict[str, Any]]:
    """:func:`~pyrovae.checkpoint.load_vae`, refusing a checkpoint that its run directory's
    ``config.json`` (where there is one) does not describe.

    A run of your own program needs ``program``, the spec given again on the command line
    and equal to the recorded one (:func:`check_program_named`): only then is it imported,
    built with the recorded ``program_args`` and loaded
    (:func:`~pyrovae.checkpoint.load_program_state`).

    :returns: ``(model, config, checkpoint)``: a VAE, or the user's program object.
    """
    config_path = run_dir_of(path) / CONFIG_NAME
    saved = TrainConfig.load(config_path) if config_path.is_file() else None
    checkpoint = read_checkpoint(path)
    embedded = check_checkpoint(checkpoint, path)
    recorded = saved if saved is not None else embedded
    check_program_named(run_dir_of(path), program, recorded, command=command)
    if recorded is None or recorded.program is None:
        vae, config, checkpoint = load_vae(path, device)
        if saved is not None:
            refuse_foreign(Path(path), config, saved, config_path)
        return vae, config, checkpoint
    if saved is not None and embedded is not None:
        refuse_foreign(Path(path), embedded, saved, config_path)
    config = embedded if embedded is not None else recorded
    user_program = build_user_program(config, device)
    load_program_state(user_program, path)
    return user_program, config, checkpoint


def load_test_points(config: TrainConfig, device: torch.device, *, data_dir: str | None = None,
                test_size: int | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The first ``test_size`` (default ``config.test_size``, else all) test points of the
    run's dataset on ``device``: ``(N, D)``, or ``(x, y)`` for a model of labelled data.

    :param data_dir: read the data there instead of ``config.data_dir``.
    """
    labelled = config.model in LABEL_MODELS
    data = load_dataset(config.dataset, data_dir if data_dir is not None else config.data_dir,
                        binarize=config.binarize, download=config.download,
                        test_fraction=config.test_fraction, labels=labelled)
    x_test = data.test[: test_size or config.test_size].to(device)
    if labelled:
        return x_test, data.test_labels[: x_test.shape[0]].to(device)
    return x_test


def evaluate_checkpoint(checkpoint: str | Path, device: torch.device, *, num_samples: int = 1000,
                        batch_size: int = 100, chunk_size: int | None = None,
                        test_size: int | None = None, data_dir: str | None = None,
                        seed: int = 0, progress: bool = True,
                        output: str | Path | None = None, force: bool = False,
                        program: str | None = None) -> dict[str, Any]:
    """What ``pyrovae evaluate`` does: the test ELBO and log p(x) (:func:`evaluate_vae`) of a
    run's checkpoint, printed and written as JSON to ``output`` (default
    ``evaluation.json`` beside it; an existing file is kept under the next free
    ``stem-N`` name).  Under ``torchrun`` the test points are split over the processes and
    rank 0 writes.  The run is held (:func:`hold_run`) from reading its checkpoint to
    writing.

    :param checkpoint: a checkpoint file or the run directory holding ``checkpoint.pt``.
    :param force: replace an ``output`` that is not an earlier evaluation (refused otherwise).
    :param program: a run of your own program: its spec again (:func:`load_run_checkpoint`).
    :returns: the numbers written.
    """
    # the run's own evaluation.json is kept under another name, whatever it holds
    force = force or not output
    output = Path(output) if output else run_dir_of(checkpoint) / EVALUATION_NAME
    with contextlib.ExitStack() as stack:
        distributed.rank0_call(lambda: hold_run(checkpoint, output, stack))
        return _evaluate_checkpoint(checkpoint, device, num_samples=num_samples,
                                    batch_size=batch_size, chunk_size=chunk_size,
                                    test_size=test_size, data_dir=data_dir, seed=seed,
                                    progress=progress, output=output, force=force,
                                    program=program)


def _evaluate_checkpoint(checkpoint: str | Path, device: torch.device, *, num_samples: int,
                         batch_size: int, chunk_size: int | None, test_size: int | None,
                         data_dir: str | None, seed: int, progress: bool, output: Path,
                         force: bool, program: str | None) -> dict[str, Any]:
    parallel = distributed.is_distributed()
    vae, config, saved = load_run_checkpoint(checkpoint, device, program=program)
    if distributed.is_main_process():
        # before the long work, not after it
        check_output(output, kind="a pyrovae evaluation (JSON)", force=force,
                     same_kind=lambda path: _json_with(path, "log_marginal_likelihood"))
    x_test = load_test_points(config, device, data_dir=data_dir, test_size=test_size)
    seed_everything(seed)
    results = evaluate_vae(vae, x_test, num_samples=num_samples, batch_size=batch_size,
                           chunk_size=chunk_size, distributed=parallel,
                           progress=progress and distributed.is_main_process())
    results.update({"checkpoint": str(checkpoint), "checkpoint_epoch": saved["epoch"],
                    "seed": seed})
    if parallel:
        results["num_processes"] = distributed.get_world_size()
    if not distributed.is_main_process():
        return results
    results.update(provenance(device))
    # printed before saving, so that a failed write does not lose them
    print(f"test ELBO {results['test_elbo']:.2f} ± {results['test_elbo_standard_error']:.2f} "
          f"nats{_bits(results, 'test_elbo')} (checkpoint of epoch {saved['epoch']})")
    print(log_px_line(results))
    kept = _keep_previous(output)
    write_json(output, results)
    print(f"written to {output}" + (f"; the previous one is kept as {kept}" if kept else ""))
    return results


def sample_checkpoint(checkpoint: str | Path, device: torch.device, *, num_samples: int = 64,
                      seed: int = 0, label: int | None = None,
                      output: str | Path | None = None, force: bool = False,
                      program: str | None = None) -> Path:
    """What ``pyrovae sample`` does: decode ``num_samples`` prior samples of a run's
    checkpoint into a PNG grid (:func:`~pyrovae.plotting.save_sample_grid`; for your own
    program, :func:`~pyrovae.plotting.save_program_samples`: its ``sample`` method or its
    model run without observations).

    :param output: the PNG; by default ``samples.png`` beside the checkpoint, or the next
        free ``samples-N.png`` (the grid training drew is kept).  An existing file that is
        not a PNG is refused unless ``force``.
    :param program: a run of your own program: its spec again (:func:`load_run_checkpoint`).
    :returns: the file written.
    :raises ProgramError: your program cannot draw x (one line saying how it could).
    """
    with contextlib.ExitStack() as stack:
        given = Path(output) if output else None
        hold_run(checkpoint, given or run_dir_of(checkpoint) / SAMPLES_NAME, stack)
        vae, config, saved = load_run_checkpoint(checkpoint, device, program=program,
                                                 command="sample")
        path = given or free_name(run_dir_of(checkpoint) / SAMPLES_NAME)
        check_output(path, kind="a PNG image", force=force, same_kind=_is_png)
        seed_everything(seed)
        if config.program is None:
            save_sample_grid(vae, path, saved.get("image_shape"), num_samples, label=label)
            return path
        if label is not None:
            raise ConfigError("--label is for the built-in models of labelled data; this run "
                              "trained your program")
        save_program_samples(vae, path, saved.get("image_shape"), saved["data_dim"],
                             num_samples)
    return path


#: how every PNG file begins
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: an earlier output larger than this is not read to tell its kind (none of ours is)
_MAX_OUTPUT_BYTES = 256 * 2**20


def _is_png(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(len(PNG_SIGNATURE)) == PNG_SIGNATURE


def _json_with(path: Path, key: str) -> bool:
    """Whether ``path`` holds a JSON object with ``key`` (an earlier output of ours)."""
    try:
        if not path.is_file() or path.stat().st_size > _MAX_OUTPUT_BYTES:
            return False
        value = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(value, dict) and key in value


def check_output(path: Path, *, kind: str | None = None,
                 same_kind: Callable[[Path], bool] | None = None, force: bool = False) -> None:
    """Refuse, before any work, an output file whose folder is missing or read-only, or
    an existing ``path`` that ``same_kind`` does not take for an earlier output of ``kind``
    (a user's own file) unless ``force``."""
    if path.is_dir():
        raise ConfigError(f"output {path} is a folder; name a file")
    if not path.parent.is_dir():
        raise ConfigError(f"cannot write {path}: folder {path.parent} does not exist")
    if same_kind is not None and not force and (path.exists() or path.is_symlink()):
        try:
            ours = path.is_file() and same_kind(path)
        except OSError:
            ours = False
        if not ours:
            raise ConfigError(f"{path} exists and is not {kind}; choose another --output, or "
                              f"pass --force to replace it")
    check_writable(path.parent, what=path.name)


def hold_run(checkpoint: str | Path, output: Path, stack: contextlib.ExitStack) -> None:
    """Hold the run directory of ``checkpoint`` shared (:class:`~pyrovae.rundir.RunLock`)
    for the rest of ``stack``: no training, resume or ``--overwrite`` replaces the run
    while it is read and written beside.  A run being trained is refused, unless
    ``output`` lies outside it (evaluating a live run's checkpoint as it stands)."""
    run_dir = run_dir_of(checkpoint)
    if not run_dir.is_dir() or not existing_run(run_dir):
        return
    try:
        stack.enter_context(RunLock(run_dir, shared=True))
    except RunLockedError:
        if _inside(output, run_dir):
            raise
        logger.info("%s is being trained: reading its checkpoint as it stands now", run_dir)


def _inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or lies in it."""
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def _keep_previous(path: Path) -> Path | None:
    """Rename an existing ``path`` to the first free ``stem-N.suffix`` beside it; return that."""
    if not path.exists():
        return None
    backup = _numbered(path)
    os.replace(path, backup)
    return backup


def free_name(path: Path) -> Path:
    """``path`` if it does not exist, else the first free ``stem-N.suffix`` beside it."""
    return path if not path.exists() else _numbered(path)


def _numbered(path: Path) -> Path:
    """The first ``stem-N.suffix`` beside ``path`` (N = 1, 2, ...) that does not exist."""
    return next(candidate for number in itertools.count(1)
                if not (candidate := path.with_name(f"{path.stem}-{number}{path.suffix}"))
                .exists())


# --- the bound-curve report and the sandwich of one run -------------------------------------

#: test points of ``evaluate --report`` unless ``--test-size`` says otherwise (or the run
#: tests on fewer): minutes on a CPU, where all 10,000 of MNIST's would take hours
REPORT_TEST_SIZE = 500


def _report_inputs(checkpoint: str | Path, device: torch.device, *, labelled_ok: bool,
                   data_dir: str | None, test_size: int | None, default_size: int | None = None,
                   program: str | None = None,
                   ) -> tuple[VAE, torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
    """The model of a run's checkpoint and its test points, in one process: the first
    ``test_size``, else at most ``default_size``, else the run's own."""
    if distributed.is_distributed():
        raise ConfigError("evaluate --report and --sandwich run in one process; start them "
                          "without torchrun")
    vae, config, _ = load_run_checkpoint(checkpoint, device, program=program)
    if test_size is None and default_size is not None:
        test_size = min(default_size, config.test_size or default_size)
        logger.info("the report takes the first %d test points (--test-size N for another "
                    "number; the time grows in proportion)", test_size)
    x_test = load_test_points(config, device, data_dir=data_dir, test_size=test_size)
    if not labelled_ok and isinstance(x_test, tuple):
        raise ConfigError(f"evaluate --report is for models of x alone; this run's model is "
                          f"{config.model}: evaluate it without --report")
    return vae, x_test


def sandwich_size(requested: int, x_test: Any, *, ais_temperatures: int) -> int:
    """The points the sandwich simulates: ``requested``, at most the test points (the
    template of the simulation).

    :raises ConfigError: AIS switched off (``ais_temperatures`` 0).
    """
    if ais_temperatures == 0:
        raise ConfigError("--sandwich runs AIS both ways with the --ais-* settings: it needs "
                          "--ais-temperatures of 1 or more")
    available = as_data(x_test)[0].shape[0]
    if requested > available:
        logger.warning("--sandwich-points %d: the simulation takes its size from the %d test "
                       "points; simulating %d", requested, available, available)
    return min(requested, available)


def report_checkpoint(checkpoint: str | Path, device: torch.device, *,
                      ks: tuple[int, ...] = DEFAULT_KS, ais: Mapping[str, Any] | None = None,
                      sandwich_points: int = 0, batch_size: int = 100,
                      chunk_size: int | None = None, test_size: int | None = None,
                      data_dir: str | None = None, seed: int = 0,
                      output: str | Path | None = None, progress: bool = False,
                      program: str | None = None) -> dict[str, Any]:
    """What ``pyrovae evaluate --report`` does: the bound-curve report
    (:func:`~pyrovae.report.write_report`) of a run's checkpoint, written into ``output``
    (default: the run directory), its table printed before the files are written.  The
    folder is checked before the work, and the run held (:func:`hold_run`) throughout.

    :param ais: AIS settings (:data:`~pyrovae.report.DEFAULT_AIS` keys); ``num_temperatures``
        0 skips AIS.
    :param sandwich_points: points of the bidirectional Monte Carlo sandwich in the report
        (0: none).
    :param test_size: the first this many test points; ``None``: :data:`REPORT_TEST_SIZE`,
        or the run's own test set where smaller.
    :param progress: a progress bar for each pass.
    :returns: the report's summary.
    """
    settings = {**DEFAULT_AIS, **(ais or {})}
    output_dir = Path(output) if output else run_dir_of(checkpoint)
    with contextlib.ExitStack() as stack:
        hold_run(checkpoint, output_dir, stack)
        vae, x_test = _report_inputs(checkpoint, device, labelled_ok=False, data_dir=data_dir,
                                     test_size=test_size, default_size=REPORT_TEST_SIZE,
                                     program=program)
        check_report_folder(output_dir)
        points = (sandwich_size(sandwich_points, x_test,
                                ais_temperatures=settings["num_temperatures"])
                  if sandwich_points else 0)
        seed_everything(seed)
        # arviz 0.x logs at INFO on import which optional packages are missing: noise here
        logging.getLogger("arviz").setLevel(logging.WARNING)
        curve, summary = build_report(vae, x_test, ks=ks, ais_kwargs=settings,
                                      ais=settings["num_temperatures"] > 0,
                                      batch_size=batch_size, chunk_size=chunk_size, seed=seed,
                                      extra={"checkpoint": str(checkpoint)},
                                      sandwich_points=points, progress=progress)
        # printed before saving, so that a failed write does not lose it
        print(curve.to_markdown(), end="")
        save_report(curve, summary, output_dir)
    print(f"report written to {output_dir} ({summary['elapsed_seconds']:.1f} s)")
    return summary


def check_report_folder(folder: Path) -> None:
    """Refuse, before the work, a report folder that is a file or cannot be created or
    written."""
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--output {folder} is a file; with --report, name a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RunFileError(f"cannot create the report folder {folder}: "
                           f"{describe_os_error(error)}") from None
    check_writable(folder, what="the report")


def sandwich_checkpoint(checkpoint: str | Path, device: torch.device, *,
                        ais: Mapping[str, Any] | None = None,
                        sandwich_points: int = DEFAULT_POINTS, batch_size: int = 100,
                        test_size: int | None = None, data_dir: str | None = None,
                        seed: int = 0, output: str | Path | None = None,
                        force: bool = False, program: str | None = None) -> dict[str, Any]:
    """What ``pyrovae evaluate --sandwich`` does without ``--report``: bidirectional Monte
    Carlo (:func:`~pyrovae.sandwich.bidirectional_monte_carlo`) on points simulated from a
    run's checkpoint; both bounds' means and their gap printed, and written with the
    per-point bounds as JSON to ``output`` (default ``sandwich.json`` in the run directory;
    an existing ``output`` that is not an earlier sandwich is refused unless ``force``).

    :returns: the numbers written.
    """
    settings = {**DEFAULT_AIS, **(ais or {})}
    force = force or not output  # the run's own sandwich.json is replaced
    output = Path(output) if output else run_dir_of(checkpoint) / SANDWICH_NAME
    with contextlib.ExitStack() as stack:
        hold_run(checkpoint, output, stack)
        return _sandwich_checkpoint(checkpoint, device, settings=settings,
                                    sandwich_points=sandwich_points, batch_size=batch_size,
                                    test_size=test_size, data_dir=data_dir, seed=seed,
                                    output=output, force=force, program=program)


def _sandwich_checkpoint(checkpoint: str | Path, device: torch.device, *,
                         settings: dict[str, Any], sandwich_points: int, batch_size: int,
                         test_size: int | None, data_dir: str | None, seed: int, output: Path,
                         force: bool, program: str | None) -> dict[str, Any]:
    vae, x_test = _report_inputs(checkpoint, device, labelled_ok=True, data_dir=data_dir,
                                 test_size=test_size, program=program)
    # before the long work, not after it
    check_output(output, kind="a pyrovae sandwich (JSON)", force=force,
                 same_kind=lambda path: _json_with(path, "gap_mean"))
    points = sandwich_size(sandwich_points, x_test, ais_temperatures=settings["num_temperatures"])
    seed_everything(seed)
    started = time.perf_counter()
    result = bidirectional_monte_carlo(vae, x_test, points, **settings, batch_size=batch_size,
                                       seed=seed)
    summary = {**result.summary(), "seed": seed, "checkpoint": str(checkpoint),
               "elapsed_seconds": time.perf_counter() - started,
               "points": {"lower": result.lower.tolist(),
                          "lower_standard_error": result.lower_standard_error.tolist(),
                          "upper": result.upper.tolist(),
                          "upper_standard_error": result.upper_standard_error.tolist()}}
    summary.update(provenance(as_program(vae).device))
    # printed before saving, so that a failed write does not lose them
    print(f"{result}\n(points simulated from the model: log p(x) lies between the bounds up to "
          f"Monte Carlo error; the gap bounds the error of AIS with these settings there)")
    write_json(output, json_safe(summary))
    print(f"written to {output}")
    return summary
