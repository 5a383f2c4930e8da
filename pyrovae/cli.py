"""The ``pyrovae`` command: ``train``, ``evaluate`` and ``sample``.

Errors caused by input (bad flags, data, files) print one line and exit with status 2.

``pyrovae train`` started by ``torchrun`` trains one model data-parallel (see
:mod:`pyrovae.distributed`); ``pyrovae train --nproc N`` starts those ``N`` processes on
this machine through torch's own launcher, ``torch.distributed.run``.  ``pyrovae evaluate``
started by ``torchrun`` splits the test points over the processes.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from pyrovae import __version__, distributed
from pyrovae.activity import ACTIVE_UNIT_THRESHOLD, posterior_mean_variance
from pyrovae.argtypes import device_name, positive_int, seed
from pyrovae.checkpoint import BEST_CHECKPOINT_NAME, CHECKPOINT_NAME, check_resumable, load_vae
from pyrovae.config import LABEL_MODELS, TrainConfig, apply_label_settings, build_vae
from pyrovae.data import DataSplits, load_dataset
from pyrovae.diagnostics import KHAT_THRESHOLD, importance_summary, unreliable_fraction
from pyrovae.errors import CheckpointError, ConfigError, PyrovaeError
from pyrovae.evaluation import elbo, log_marginal_likelihood, mean_and_standard_error
from pyrovae.labels import classification_error, log_marginal_likelihood_over_labels
from pyrovae.models import VAE, SemiSupervisedVAE
from pyrovae.provenance import provenance
from pyrovae.report import SANDWICH_NAME, add_report_arguments, report_command, sandwich_command
from pyrovae.rundir import (
    LOCK_NAME,
    RunLock,
    check_run_dir_path,
    check_writable,
    clear_run,
    describe_os_error,
    make_run_dir,
    remove_temporaries,
    write_atomically,
    write_json,
)
from pyrovae.train import (
    TrainingInterrupted,
    _StopSignals,
    check_training_data,
    fit_from_config,
    resolve_device,
    seed_everything,
)

logger = logging.getLogger("pyrovae")

CONFIG_NAME = "config.json"
RESULTS_NAME = "results.json"
EVALUATION_NAME = "evaluation.json"
SAMPLES_NAME = "samples.png"
TENSORBOARD_NAME = "tensorboard"


#: the fraction of test points with k-hat above the threshold from which a log p(x) is
#: reported with a warning
KHAT_WARNING_FRACTION = 0.1
#: test points per progress-bar step of the final evaluation (a multiple of any batch size
#: the bar is used with keeps the random draws those of one pass)
_PROGRESS_POINTS = 1000


def evaluate_vae(vae: VAE, x_test: torch.Tensor, *, num_samples: int, batch_size: int = 100,
                 chunk_size: int | None = None, distributed: bool = False,
                 progress: bool = False) -> dict[str, Any]:
    """Test ELBO and importance-sampled log p(x), each as mean and standard error in nats,
    and how far to trust the latter: the fraction of test points whose PSIS k-hat exceeds
    0.7 (:func:`~pyrovae.diagnostics.pareto_k`; ``None`` for K < 25 and under
    ``distributed``, where the per-point weights are not gathered).

    :param distributed: every process of the ``torch.distributed`` group calls this; the
        test points are split over them and every process gets the same numbers.
    :param progress: show a progress bar over the test points.

    With labels, ``x_test`` is ``(x, y)``: a conditional VAE's estimate is then log p(x | y),
    and M2's (:class:`~pyrovae.models.SemiSupervisedVAE`) log p(x) with y summed out, beside
    the test classification error of q(y | x) (``test_classification_error``).
    """
    if isinstance(vae, SemiSupervisedVAE):
        return _evaluate_semi_supervised(vae, *x_test, num_samples=num_samples,
                                         batch_size=batch_size, chunk_size=chunk_size,
                                         distributed=distributed)
    started = time.perf_counter()
    test_elbo = mean_and_standard_error(elbo(vae, x_test, batch_size=batch_size,
                                             distributed=distributed))
    khat_fraction = None
    if distributed:
        log_px_values = log_marginal_likelihood(
            vae, x_test, num_samples, batch_size=batch_size, chunk_size=chunk_size,
            distributed=True)
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
    return {
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
    test_elbo = mean_and_standard_error(elbo(m2, (x_test, y_test), batch_size=batch_size,
                                             distributed=distributed))
    log_px = mean_and_standard_error(log_marginal_likelihood_over_labels(
        m2, x_test, m2.num_classes, num_samples, batch_size=batch_size, chunk_size=chunk_size,
        distributed=distributed))
    return {
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


def _unreliable_fraction(khat: torch.Tensor) -> float | None:
    """:func:`~pyrovae.diagnostics.unreliable_fraction`, ``None`` (JSON null) where no point
    has a k-hat (too few samples)."""
    fraction = unreliable_fraction(khat)
    return None if math.isnan(fraction) else fraction


def _log_px_line(results: dict[str, Any]) -> str:
    """The printed log p(x), with its k-hat diagnostic."""
    line = (f"{results.get('log_marginal_likelihood_of', 'log p(x)')} (K={results['num_samples']}) "
            f"{results['log_marginal_likelihood']:.2f} ± "
            f"{results['log_marginal_likelihood_standard_error']:.2f} nats over "
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


def save_sample_grid(vae: VAE, path: Path, image_shape: Sequence[int] | None,
                     num_samples: int = 64, label: int | None = None) -> None:
    """Decode ``num_samples`` z ~ p(z) and save E[x|z] as an image grid PNG (atomically).

    :param label: a model of labelled data draws this class (0..C-1) only; without one, its
        grid holds every class in turn, one row per class where ``num_samples`` is a
        multiple of C.  A model without labels refuses a ``label`` (:class:`ConfigError`).
    """
    from torchvision.utils import save_image

    if image_shape is None:
        raise ConfigError("the data are not images (no image shape); cannot draw a grid")
    shape = tuple(image_shape)
    if len(shape) != 3 or math.prod(shape) != vae.data_dim:
        raise ConfigError(f"image shape {shape} is not (channels, height, width) of the "
                          f"model's {vae.data_dim} values per data point")
    num_classes = getattr(vae, "num_classes", None)
    nrow = int(num_samples**0.5) or 1
    if num_classes is None:
        if label is not None:
            raise ConfigError(f"--label needs a model of labelled data (--model "
                              f"{' or '.join(LABEL_MODELS)}); this one is a "
                              f"{type(vae).__name__} without labels")
        images = vae.sample(num_samples)
    elif label is None:
        images = vae.sample(num_samples, label=torch.arange(num_samples) * num_classes // num_samples)
        nrow = num_samples // num_classes if num_samples % num_classes == 0 else nrow
    else:
        images = vae.sample(num_samples, label=vae.check_label(label))
    images = images.reshape(num_samples, *shape).clamp(0, 1)
    write_atomically(path, lambda handle: save_image(
        images.cpu(), handle, format="png", nrow=nrow))


#: the files whose presence means a folder holds a run
_RUN_MARKERS = (CHECKPOINT_NAME, CONFIG_NAME, "metrics.csv")


def _existing_run(run_dir: Path) -> list[str]:
    return [name for name in _RUN_MARKERS if (run_dir / name).exists()]


#: a prior whose log p(z) per training step costs more than this many GFLOP is announced
EXPENSIVE_PRIOR_GFLOP = 10.0


def _check_prior_cost(vae: VAE, config: TrainConfig) -> None:
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


def _check_out_dir(config: TrainConfig) -> None:
    """Refuse, before any work, an ``--out-dir`` that is a file or holds a run (without
    ``--overwrite``).  Nothing is created."""
    run_dir = Path(config.out_dir)
    check_run_dir_path(run_dir)
    existing = _existing_run(run_dir) if run_dir.is_dir() else []
    if existing and not config.overwrite:
        raise ConfigError(
            f"{run_dir} already holds a run ({', '.join(existing)}); choose another --out-dir "
            f"or pass --overwrite to replace it"
        )


def _open_run_dir(run_dir: Path, stack: contextlib.ExitStack, *, overwrite: bool = False,
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
        existing = _existing_run(run_dir)
        if existing and not overwrite:
            raise ConfigError(f"{run_dir} already holds a run ({', '.join(existing)}); choose "
                              f"another --out-dir or pass --overwrite to replace it")
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


#: flags that may change when a run is resumed; the others would make it another run
RESUME_OVERRIDES = frozenset({"epochs", "device", "progress", "data_dir", "download",
                              "eval_samples", "checkpoint_every", "keep_last",
                              "max_minutes", "log_px_every", "log_px_samples", "log_px_size",
                              "tensorboard"})


def _given_flags(train_argv: Sequence[str]) -> dict[str, Any]:
    """The TrainConfig fields set explicitly in ``train_argv``, with their values."""
    explicit = argparse.ArgumentParser(add_help=False)
    TrainConfig.add_arguments(explicit, with_defaults=False)
    given = vars(explicit.parse_known_args(list(train_argv))[0])
    given.pop("preset", None)
    return given


def _resumed_config(run_dir: Path, train_argv: Sequence[str]) -> TrainConfig:
    """The run's saved config, with the flags in ``train_argv`` that may change applied."""
    if not (run_dir / CHECKPOINT_NAME).is_file():
        raise ConfigError(f"nothing to resume in {run_dir}: it needs {CONFIG_NAME} and "
                          f"{CHECKPOINT_NAME} from an earlier pyrovae train")
    if not (run_dir / CONFIG_NAME).is_file():
        raise ConfigError(
            f"cannot resume {run_dir}: it has {CHECKPOINT_NAME} but no {CONFIG_NAME} (a run "
            f"trained by fit() from Python?); the command needs the TrainConfig: save it there "
            f"with config.save(), as pyrovae train does")
    config = TrainConfig.load(run_dir / CONFIG_NAME)
    explicit = argparse.ArgumentParser(add_help=False)
    TrainConfig.add_arguments(explicit, with_defaults=False)
    given = vars(explicit.parse_known_args(list(train_argv))[0])
    fixed = sorted(set(given) - RESUME_OVERRIDES)
    if fixed:
        flags = ", ".join("--" + name.replace("_", "-") for name in fixed)
        raise ConfigError(f"{flags} cannot change when resuming {run_dir} (only "
                          f"{', '.join('--' + n.replace('_', '-') for n in sorted(RESUME_OVERRIDES))})")
    values = config.to_dict()
    values.update(given)
    values["out_dir"] = str(run_dir)
    return TrainConfig.from_dict(values)


def train_command(args: argparse.Namespace) -> int:
    resume = args.resume is not None
    if resume:
        run_dir = Path(args.resume)
        config = _resumed_config(run_dir, args.train_argv)
    else:
        config = TrainConfig.from_args(args)
        if config.preset is not None:
            config = TrainConfig.from_preset(config.preset, **_given_flags(args.train_argv))
            logger.info("preset %s; flags given beside it: %s", config.preset,
                        ", ".join(sorted(_given_flags(args.train_argv))) or "none")
    if args.nproc is not None and args.nproc > 1 and not distributed.launched_by_torchrun():
        distributed.check_batch_size(config.batch_size, args.nproc)
        gpus = torch.cuda.device_count()
        if resolve_device(config.device).type == "cuda" and args.nproc > gpus:
            raise ConfigError(f"--nproc {args.nproc} on CUDA needs one GPU per process and this "
                              f"machine has {gpus}; use --nproc {gpus} or --device cpu")
        return launch(args.nproc, args.argv)
    # under torchrun: join the process group (gloo on CPU, nccl with one GPU per process)
    device = distributed.init_from_environment(config.device)
    try:
        code = _train(config, resume, run_dir if resume else None, device)
    except BaseException:
        distributed.shut_down(wait=False)  # the launcher stops the other processes
        raise
    distributed.shut_down()
    return code


def _train(config: TrainConfig, resume: bool, run_dir: Path | None, device: torch.device) -> int:
    fresh = run_dir is None
    run_dir = Path(config.out_dir) if run_dir is None else run_dir
    if fresh:
        # rank 0 checks the folder, creating nothing before the data and model are known good
        distributed.rank0_call(lambda: _check_out_dir(config))
    data = load_dataset(config.dataset, config.data_dir, binarize=config.binarize,
                        download=config.download, test_fraction=config.test_fraction,
                        labels=config.model in LABEL_MODELS)
    data = data.subset(config.train_size, config.test_size).with_validation(config.valid_size)
    config, data = apply_label_settings(config, data)  # --labelled, num_classes, alpha
    data = data.to(device)
    seed_everything(config.seed)
    vae = build_vae(config, data_dim=data.data_dim, image_shape=data.image_shape).to(device)
    check_training_data(vae, data, config.batch_size)
    _check_prior_cost(vae, config)
    with contextlib.ExitStack() as stack:
        # rank 0 creates and locks the folder (held until the run ends), checks the
        # checkpoint to resume, then writes the config; every rank learns its verdict
        distributed.rank0_call(lambda: _start_run(config, run_dir, vae, stack, fresh=fresh))
        code = _train_and_evaluate(config, resume, run_dir, vae, data, device)
    return code


def _start_run(config: TrainConfig, run_dir: Path, vae: VAE, stack: contextlib.ExitStack, *,
               fresh: bool) -> None:
    _open_run_dir(run_dir, stack, overwrite=config.overwrite, fresh=fresh)
    if not fresh:
        _check_resume(run_dir, config, vae)
    config.save(run_dir / CONFIG_NAME)


def _check_resume(run_dir: Path, config: TrainConfig, vae: VAE) -> None:
    """Everything a resume of ``run_dir`` needs, checked before its config is rewritten."""
    checkpoint = check_resumable(run_dir / CHECKPOINT_NAME, vae)
    if checkpoint.get("config") is not None:
        _refuse_foreign(run_dir / CHECKPOINT_NAME, TrainConfig.from_dict(checkpoint["config"]),
                        config, run_dir / CONFIG_NAME)
    done = checkpoint["progress"]["epoch"] - 1
    if done > config.epochs:
        raise ConfigError(f"{run_dir} has trained {done} epochs; --epochs {config.epochs} would "
                          f"drop some: resume with --epochs {done} or more")


def _refuse_foreign(checkpoint_path: Path, embedded: TrainConfig, config: TrainConfig,
                    config_path: Path) -> None:
    """Raise :class:`CheckpointError` if the checkpoint was trained with another config than
    the run's ``config.json`` (flags that may change on resume aside)."""
    ignored = RESUME_OVERRIDES | {"out_dir", "overwrite"}
    mine, theirs = config.to_dict(), embedded.to_dict()
    differ = [name for name in mine if name not in ignored and mine[name] != theirs.get(name)]
    if differ:
        details = ", ".join(f"{name} {theirs.get(name)!r} vs {mine[name]!r}"
                            for name in differ[:3])
        raise CheckpointError(
            f"{checkpoint_path} was not trained with {config_path}: {details}"
            + (f" and {len(differ) - 3} more" if len(differ) > 3 else "")
            + "; use the checkpoint with its own run directory")


def _train_and_evaluate(config: TrainConfig, resume: bool, run_dir: Path, vae: VAE,
                        data: DataSplits, device: torch.device) -> int:
    parallel = distributed.is_distributed()
    main_process = distributed.is_main_process()
    processes = f", {distributed.get_world_size()} processes" if parallel else ""
    logger.info("training on %d images (%s%s), testing on %d; run directory %s",
                data.train.shape[0], device, processes, data.test.shape[0], run_dir)
    started = time.perf_counter()
    writer = None
    if config.tensorboard and main_process:
        from pyrovae.tensorboard import TensorBoardWriter

        writer = TensorBoardWriter(run_dir / TENSORBOARD_NAME, image_shape=data.image_shape)
    try:
        history = fit_from_config(vae, data, config, run_dir=run_dir, resume=resume,
                                  on_epoch_end=writer)
    finally:
        if writer is not None:
            writer.close()
    results: dict[str, Any] = {
        # all sessions of a resumed run (the epochs' own times, test ELBOs included)
        "train_seconds": sum(record.epoch_seconds for record in history),
        "session_seconds": time.perf_counter() - started,
        "epochs": len(history),
        "final_train_elbo": history[-1].train_elbo,
        "seed": config.seed,
        "config": config.to_dict(),
    }
    if config.early_stopping_patience:
        results.update(_load_best(run_dir, vae, stopped_early=history[-1].stopped_early))
    # the final evaluation has no steps to stop between: a signal stops it at once
    with _StopSignals(message=f"during the final evaluation: training is complete and "
                              f"checkpointed; pyrovae train --resume {run_dir} evaluates it"):
        if main_process:
            if data.image_shape is not None:
                save_sample_grid(vae, run_dir / SAMPLES_NAME, data.image_shape)
            results.update(_posterior_activity(vae, data.test) if not data.has_labels else
                           {"active_units": None, "posterior_collapsed": False})
        if config.eval_samples > 0:
            seed_everything(config.seed)
            results.update(evaluate_vae(vae, data.test_inputs, num_samples=config.eval_samples,
                                        distributed=parallel,
                                        progress=config.progress and main_process))
    if parallel:
        results["num_processes"] = distributed.get_world_size()
    if not main_process:
        return 0
    # printed before saving, so that a failed write does not lose them
    if config.eval_samples > 0:
        print(f"test ELBO {results['test_elbo']:.2f} ± {results['test_elbo_standard_error']:.2f}"
              f" nats; {_log_px_line(results)}")
    if results["posterior_collapsed"]:
        print(f"warning: the posterior collapsed: no latent unit is active (the variance over "
              f"test points of every E[z_d|x] is below {ACTIVE_UNIT_THRESHOLD}); q(z|x) ignores "
              f"x; warm the KL up (--kl-warmup-epochs) or train longer")
    results.update(provenance(device))
    write_json(run_dir / RESULTS_NAME, results)
    print(f"run saved in {run_dir}")
    return 0


def _load_best(run_dir: Path, vae: VAE, *, stopped_early: bool) -> dict[str, Any]:
    """Load ``checkpoint_best.pt``'s parameters into ``vae`` for the final evaluation (early
    stopping selects the model on the held-out ELBO); what the results record of it."""
    path = run_dir / BEST_CHECKPOINT_NAME
    checkpoint = distributed.rank0_call(lambda: check_resumable(path, vae))
    vae.load_state_dict(checkpoint["model"])
    logger.info("final evaluation with the best checkpoint (epoch %d)%s", checkpoint["epoch"],
                ", early stopping ended training" if stopped_early else "")
    return {"stopped_early": stopped_early, "evaluated_checkpoint": BEST_CHECKPOINT_NAME,
            "evaluated_checkpoint_epoch": checkpoint["epoch"]}


#: test points used to count active units at the end of training
_ACTIVITY_POINTS = 1000


def _posterior_activity(vae: VAE, x_test: torch.Tensor) -> dict[str, Any]:
    """Active latent units on the first test points, and whether the posterior collapsed."""
    x = x_test[:_ACTIVITY_POINTS]
    if x.shape[0] < 2:
        return {"active_units": None, "posterior_collapsed": False}
    variance = posterior_mean_variance(vae, x)
    active = int((variance > ACTIVE_UNIT_THRESHOLD).sum())
    logger.info("active latent units: %d of %d", active, variance.numel())
    return {"active_units": active, "posterior_collapsed": active == 0,
            "posterior_mean_variance_max": float(variance.max())}


def launch(nproc: int, argv: Sequence[str]) -> int:
    """Run ``pyrovae`` with ``argv`` minus ``--nproc`` in ``nproc`` processes on this machine,
    through ``torch.distributed.run`` (torchrun's ``--standalone`` rendezvous on a free port).

    Each process gets ``OMP_NUM_THREADS`` = cores / ``nproc`` unless it is set already.
    :returns: 0, the first failed process's exit status, or 128 + signal on SIGINT/SIGTERM.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    launcher = get_args_parser().parse_args(
        ["--standalone", "--nproc-per-node", str(nproc), "--module", "pyrovae",
         *_without_nproc(argv)])
    logger.info("starting %d training processes (torch.distributed.run, %s threads each)",
                nproc, os.environ["OMP_NUM_THREADS"])
    try:
        run(launcher)
    except ChildFailedError as error:
        rank, failure = error.get_first_failure()
        print(f"pyrovae: training process {rank} of {nproc} exited with status "
              f"{failure.exitcode}", file=sys.stderr)
        return failure.exitcode if failure.exitcode > 0 else 1
    except SignalException as error:
        print(f"pyrovae: {error.sigval.name}: training processes stopped", file=sys.stderr)
        return 128 + int(error.sigval)
    return 0


def _without_nproc(argv: Sequence[str]) -> list[str]:
    """``argv`` with ``--nproc N`` / ``--nproc=N`` removed."""
    kept: list[str] = []
    skip = False
    for token in argv:
        if skip:
            skip = False
        elif token == "--nproc":
            skip = True
        elif not token.startswith("--nproc="):
            kept.append(token)
    return kept


def evaluate_command(args: argparse.Namespace) -> int:
    # under torchrun the test points are split over the processes (rank 0 writes)
    device = distributed.init_from_environment(args.device)
    try:
        code = _evaluate(args, device)
    except BaseException:
        distributed.shut_down(wait=False)
        raise
    distributed.shut_down()
    return code


def _evaluate(args: argparse.Namespace, device: torch.device) -> int:
    parallel = distributed.is_distributed()
    if parallel and (args.report or args.sandwich):
        raise ConfigError("evaluate --report and --sandwich run in one process; start them "
                          "without torchrun")
    vae, config, checkpoint = _load_run_checkpoint(args.checkpoint, device)
    output = Path(args.output) if args.output else _run_dir_of(args.checkpoint) / (
        SANDWICH_NAME if args.sandwich else EVALUATION_NAME)
    if not args.report and distributed.is_main_process():
        _check_output(output)  # before the long work, not after it
    data_dir = args.data_dir if args.data_dir is not None else config.data_dir
    labelled = config.model in LABEL_MODELS
    data = load_dataset(config.dataset, data_dir, binarize=config.binarize,
                        download=config.download, test_fraction=config.test_fraction,
                        labels=labelled)
    x_test = data.test[: args.test_size or config.test_size].to(device)
    if labelled:
        if args.report:
            raise ConfigError(f"evaluate --report is for models of x alone; this run's model is "
                              f"{config.model}: evaluate it without --report")
        x_test = (x_test, data.test_labels[: x_test.shape[0]].to(device))
    seed_everything(args.seed)
    if args.report:
        return report_command(args, vae, x_test, Path(args.output or _run_dir_of(args.checkpoint)))
    if args.sandwich:
        return sandwich_command(args, vae, x_test, output)
    results = evaluate_vae(vae, x_test, num_samples=args.num_samples, batch_size=args.batch_size,
                           chunk_size=args.chunk_size, distributed=parallel,
                           progress=args.progress and distributed.is_main_process())
    results.update({"checkpoint": str(args.checkpoint), "checkpoint_epoch": checkpoint["epoch"],
                    "seed": args.seed})
    if parallel:
        results["num_processes"] = distributed.get_world_size()
    if not distributed.is_main_process():
        return 0
    results.update(provenance(device))
    # printed before saving, so that a failed write does not lose them
    print(f"test ELBO {results['test_elbo']:.2f} ± {results['test_elbo_standard_error']:.2f} "
          f"nats (checkpoint of epoch {checkpoint['epoch']})")
    print(_log_px_line(results))
    kept = _keep_previous(output)
    write_json(output, results)
    print(f"written to {output}" + (f"; the previous one is kept as {kept}" if kept else ""))
    return 0


def _load_run_checkpoint(path: str, device: torch.device
                         ) -> tuple[VAE, TrainConfig, dict[str, Any]]:
    """:func:`load_vae`, refusing a checkpoint that its run directory's ``config.json``
    (where there is one) does not describe."""
    vae, config, checkpoint = load_vae(path, device)
    config_path = _run_dir_of(path) / CONFIG_NAME
    if config_path.is_file():
        _refuse_foreign(Path(path), config, TrainConfig.load(config_path), config_path)
    return vae, config, checkpoint


def _check_output(path: Path) -> None:
    """Refuse an output file whose folder is missing or read-only, before any work."""
    if path.is_dir():
        raise ConfigError(f"output {path} is a folder; name a file")
    if not path.parent.is_dir():
        raise ConfigError(f"cannot write {path}: folder {path.parent} does not exist")
    check_writable(path.parent, what=path.name)


def _keep_previous(path: Path) -> Path | None:
    """Rename an existing ``path`` to the first free ``stem-N.suffix`` beside it; return that."""
    if not path.exists():
        return None
    backup = _numbered(path)
    os.replace(path, backup)
    return backup


def sample_command(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    vae, _, checkpoint = _load_run_checkpoint(args.checkpoint, device)
    # the grid training drew (samples.png) is kept: a new one gets the next free number
    output = Path(args.output) if args.output else \
        _free_name(_run_dir_of(args.checkpoint) / SAMPLES_NAME)
    _check_output(output)
    seed_everything(args.seed)
    save_sample_grid(vae, output, checkpoint.get("image_shape"), args.num_samples,
                     label=args.label)
    print(f"{args.num_samples} samples written to {output}")
    return 0


def _free_name(path: Path) -> Path:
    """``path`` if it does not exist, else the first free ``stem-N.suffix`` beside it."""
    return path if not path.exists() else _numbered(path)


def _numbered(path: Path) -> Path:
    """The first ``stem-N.suffix`` beside ``path`` (N = 1, 2, ...) that does not exist."""
    return next(candidate for number in itertools.count(1)
                if not (candidate := path.with_name(f"{path.stem}-{number}{path.suffix}"))
                .exists())


def _run_dir_of(checkpoint: str) -> Path:
    path = Path(checkpoint)
    return path if path.is_dir() else path.parent


class _OneLineErrorParser(argparse.ArgumentParser):
    """Report a bad flag in one line (argparse prints the whole usage by default)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineErrorParser(
        prog="pyrovae",
        description="Variational autoencoders as Pyro programs: train, estimate log p(x), sample.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more detail")
    parser.add_argument("--version", action="version", version=f"pyrovae {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser(
        "train", help="train a VAE by SVI and estimate its test log p(x)",
        description="Train a VAE by SVI. Writes config.json, metrics.csv, checkpoint.pt, "
                    "samples.png and results.json into --out-dir.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    TrainConfig.add_arguments(train)
    train.add_argument("--resume", metavar="RUN_DIR", default=None,
                       help="continue the run in RUN_DIR from its last checkpoint, with its saved "
                            "config (--epochs may extend it)")
    train.add_argument("--nproc", type=positive_int, default=None, metavar="N",
                       help="train data-parallel in N processes on this machine (started by "
                            "torch.distributed.run; --batch-size is the global batch)")
    train.set_defaults(handler=train_command)

    evaluate = commands.add_parser(
        "evaluate", help="test ELBO and importance-sampled log p(x) of a checkpoint",
        description="Estimate the test ELBO and log p(x) with K importance samples per test point "
                    "(the IWAE bound); prints them and writes JSON.")
    evaluate.add_argument("checkpoint", help="checkpoint.pt or the run directory holding it")
    evaluate.add_argument("--num-samples", "-k", type=positive_int, default=1000,
                          help="importance samples K per data point (default: 1000, as train's "
                               "--eval-samples; published MNIST numbers use 5000)")
    evaluate.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                          help="show a progress bar")
    evaluate.add_argument("--test-size", type=positive_int, default=None,
                          help="evaluate only the first N test points (default: all)")
    evaluate.add_argument("--batch-size", type=positive_int, default=100,
                          help="test points per vectorized trace (default: 100)")
    evaluate.add_argument("--chunk-size", type=positive_int, default=None,
                          help="importance samples per vectorized trace (default: a fixed "
                               "number of decoder rows per trace, cache-sized on a CPU)")
    evaluate.add_argument("--data-dir", default=None, help="override the run's data folder")
    evaluate.add_argument("--device", type=device_name, default="auto",
                          help="cpu, cuda, cuda:N or auto (default: auto)")
    evaluate.add_argument("--seed", type=seed, default=0, help="random seed (default: 0)")
    evaluate.add_argument("--output", "-o", default=None,
                          help="JSON file to write (default: evaluation.json in the run directory);"
                               " with --report, the folder to write into")
    add_report_arguments(evaluate)
    evaluate.set_defaults(handler=evaluate_command)

    sample = commands.add_parser("sample", help="decode samples from the prior into a PNG grid")
    sample.add_argument("checkpoint", help="checkpoint.pt or the run directory holding it")
    sample.add_argument("--num-samples", "-n", type=positive_int, default=64,
                        help="number of images (default: 64)")
    sample.add_argument("--device", type=device_name, default="auto",
                        help="cpu, cuda, cuda:N or auto (default: auto)")
    sample.add_argument("--seed", type=seed, default=0, help="random seed (default: 0)")
    sample.add_argument("--label", type=int, default=None, metavar="CLASS",
                        help="a model of labelled data (train --model conditional or "
                             "semi_supervised): draw this class, 0..C-1 (default: every class "
                             "in turn)")
    sample.add_argument("--output", "-o", default=None,
                        help="PNG file to write (default: samples.png in the run directory)")
    sample.set_defaults(handler=sample_command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    # the flags after "train", to tell which ones were given when resuming
    args.train_argv = _without_nproc(argv[argv.index("train") + 1:]) if "train" in argv else []
    args.argv = argv
    # under torchrun only rank 0 logs progress; the others report warnings and errors
    rank = int(os.environ.get("RANK", "0")) if distributed.launched_by_torchrun() else 0
    # other libraries say only warnings (arviz, matplotlib and h5py chat at INFO and DEBUG);
    # pyrovae's loggers say what the run does, and its details with -v
    logging.basicConfig(level=logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if rank == 0:
        logger.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    prefix = f"pyrovae (rank {rank})" if rank else "pyrovae"
    try:
        # log lines go above the progress bar instead of through it
        with logging_redirect_tqdm():
            return args.handler(args)
    except TrainingInterrupted as error:
        if rank == 0:
            print(f"{prefix}: {error}", file=sys.stderr)
        return 128 + error.signal_number
    except PyrovaeError as error:
        print(f"{prefix}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # files the libraries open for us: data, outputs
        where = f"{error.filename}: " if error.filename else ""
        print(f"{prefix}: error: {where}{describe_os_error(error)}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as error:
        if not _out_of_memory(error):
            raise  # anything else is a bug: keep its traceback
        print(f"{prefix}: error: not enough memory ({_first_line(error)}); use smaller "
              f"--hidden-dims, --latent-dim, --batch-size or --chunk-size", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pyrovae: interrupted", file=sys.stderr)
        return 130


def _out_of_memory(error: BaseException) -> bool:
    if isinstance(error, MemoryError | torch.OutOfMemoryError):
        return True
    text = str(error)
    return "can't allocate memory" in text or "not enough memory" in text.lower()


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[-1] if lines else type(error).__name__)[:200]


if __name__ == "__main__":
    sys.exit(main())
