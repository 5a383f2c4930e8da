"""The ``pyrovae`` command: ``train``, ``evaluate`` and ``sample``.

Errors caused by input (bad flags, data, files) print one line and exit with status 2.

``pyrovae train`` started by ``torchrun`` trains one model data-parallel (see
:mod:`pyrovae.distributed`); ``pyrovae train --nproc N`` starts those ``N`` processes on
this machine through torch's own launcher, ``torch.distributed.run``.  ``pyrovae evaluate``
started by ``torchrun`` splits the test points over the processes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch

from pyrovae import __version__, distributed
from pyrovae.argtypes import positive_int
from pyrovae.checkpoint import CHECKPOINT_NAME, load_vae
from pyrovae.config import TrainConfig, build_vae
from pyrovae.data import load_dataset
from pyrovae.errors import ConfigError, PyrovaeError
from pyrovae.evaluation import elbo, log_marginal_likelihood, mean_and_standard_error
from pyrovae.models import VAE
from pyrovae.provenance import provenance
from pyrovae.report import add_report_arguments, report_command
from pyrovae.train import (
    TrainingInterrupted,
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


def _write_json(path: Path, values: dict[str, Any]) -> None:
    path.write_text(json.dumps(values, indent=2) + "\n")


def evaluate_vae(vae: VAE, x_test: torch.Tensor, *, num_samples: int, batch_size: int = 100,
                 chunk_size: int = 500, distributed: bool = False) -> dict[str, Any]:
    """Test ELBO and importance-sampled log p(x), each as mean and standard error in nats.

    :param distributed: every process of the ``torch.distributed`` group calls this; the
        test points are split over them and every process gets the same numbers.
    """
    started = time.perf_counter()
    test_elbo = mean_and_standard_error(elbo(vae, x_test, batch_size=batch_size,
                                             distributed=distributed))
    log_px = mean_and_standard_error(log_marginal_likelihood(
        vae, x_test, num_samples, batch_size=batch_size, chunk_size=chunk_size,
        distributed=distributed))
    return {
        "test_elbo": test_elbo.mean,
        "test_elbo_standard_error": test_elbo.standard_error,
        "log_marginal_likelihood": log_px.mean,
        "log_marginal_likelihood_standard_error": log_px.standard_error,
        "num_samples": num_samples,
        "num_test_points": log_px.num_points,
        "evaluation_seconds": time.perf_counter() - started,
    }


def save_sample_grid(vae: VAE, path: Path, image_shape: Sequence[int] | None,
                     num_samples: int = 64) -> None:
    """Decode ``num_samples`` z ~ p(z) and save E[x|z] as an image grid PNG."""
    from torchvision.utils import save_image

    if image_shape is None:
        raise ConfigError("the data are not images (no image shape); cannot draw a grid")
    images = vae.sample(num_samples).reshape(num_samples, *image_shape).clamp(0, 1)
    save_image(images.cpu(), str(path), nrow=int(num_samples**0.5) or 1)


def _prepare_run_dir(config: TrainConfig) -> Path:
    run_dir = Path(config.out_dir)
    existing = [name for name in (CHECKPOINT_NAME, CONFIG_NAME, "metrics.csv")
                if (run_dir / name).exists()]
    if existing and not config.overwrite:
        raise ConfigError(
            f"{run_dir} already holds a run ({', '.join(existing)}); choose another --out-dir "
            f"or pass --overwrite to replace it"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


#: flags that may change when a run is resumed; the others would make it another run
RESUME_OVERRIDES = frozenset({"epochs", "device", "progress", "data_dir", "download",
                              "eval_samples", "checkpoint_every", "keep_last",
                              "max_minutes", "log_px_every", "log_px_samples", "log_px_size"})


def _resumed_config(run_dir: Path, train_argv: Sequence[str]) -> TrainConfig:
    """The run's saved config, with the flags in ``train_argv`` that may change applied."""
    if not (run_dir / CONFIG_NAME).is_file() or not (run_dir / CHECKPOINT_NAME).is_file():
        raise ConfigError(f"nothing to resume in {run_dir}: it needs {CONFIG_NAME} and "
                          f"{CHECKPOINT_NAME} from an earlier pyrovae train")
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
    parallel = distributed.is_distributed()
    main_process = distributed.is_main_process()
    if run_dir is None:
        # rank 0 checks and creates the folder; every rank learns its verdict
        run_dir = distributed.rank0_call(lambda: _prepare_run_dir(config))
    data = load_dataset(config.dataset, config.data_dir, binarize=config.binarize,
                        download=config.download, test_fraction=config.test_fraction)
    data = data.subset(config.train_size, config.test_size).with_validation(config.valid_size)
    data = data.to(device)
    seed_everything(config.seed)
    vae = build_vae(config, data_dim=data.data_dim, image_shape=data.image_shape).to(device)
    check_training_data(vae, data, config.batch_size)
    if main_process:
        config.save(run_dir / CONFIG_NAME)
    processes = f", {distributed.get_world_size()} processes" if parallel else ""
    logger.info("training on %d images (%s%s), testing on %d; run directory %s",
                data.train.shape[0], device, processes, data.test.shape[0], run_dir)
    started = time.perf_counter()
    history = fit_from_config(vae, data, config, run_dir=run_dir, resume=resume)
    results: dict[str, Any] = {
        "train_seconds": time.perf_counter() - started,
        "epochs": len(history),
        "final_train_elbo": history[-1].train_elbo,
        "seed": config.seed,
        "config": config.to_dict(),
    }
    if data.image_shape is not None and main_process:
        save_sample_grid(vae, run_dir / SAMPLES_NAME, data.image_shape)
    if config.eval_samples > 0:
        seed_everything(config.seed)
        results.update(evaluate_vae(vae, data.test, num_samples=config.eval_samples,
                                    distributed=parallel))
    if parallel:
        results["num_processes"] = distributed.get_world_size()
    if not main_process:
        return 0
    if config.eval_samples > 0:
        print(f"test ELBO {results['test_elbo']:.2f} ± {results['test_elbo_standard_error']:.2f}"
              f" nats; log p(x) (K={config.eval_samples}) "
              f"{results['log_marginal_likelihood']:.2f} ± "
              f"{results['log_marginal_likelihood_standard_error']:.2f} nats")
    results.update(provenance(device))
    _write_json(run_dir / RESULTS_NAME, results)
    print(f"run saved in {run_dir}")
    return 0


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
    if parallel and args.report:
        raise ConfigError("evaluate --report runs in one process; start it without torchrun")
    vae, config, _ = load_vae(args.checkpoint, device)
    data_dir = args.data_dir if args.data_dir is not None else config.data_dir
    data = load_dataset(config.dataset, data_dir, binarize=config.binarize,
                        download=config.download, test_fraction=config.test_fraction)
    x_test = data.test[: args.test_size or config.test_size].to(device)
    seed_everything(args.seed)
    if args.report:
        return report_command(args, vae, x_test, Path(args.output or _run_dir_of(args.checkpoint)))
    results = evaluate_vae(vae, x_test, num_samples=args.num_samples, batch_size=args.batch_size,
                           chunk_size=args.chunk_size, distributed=parallel)
    results.update({"checkpoint": str(args.checkpoint), "seed": args.seed})
    if parallel:
        results["num_processes"] = distributed.get_world_size()
    if not distributed.is_main_process():
        return 0
    results.update(provenance(device))
    output = Path(args.output) if args.output else _run_dir_of(args.checkpoint) / EVALUATION_NAME
    _write_json(output, results)
    print(f"test ELBO {results['test_elbo']:.2f} ± {results['test_elbo_standard_error']:.2f} nats")
    print(f"log p(x) (K={args.num_samples}) {results['log_marginal_likelihood']:.2f} ± "
          f"{results['log_marginal_likelihood_standard_error']:.2f} nats "
          f"over {results['num_test_points']} test points")
    print(f"written to {output}")
    return 0


def sample_command(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    vae, _, checkpoint = load_vae(args.checkpoint, device)
    seed_everything(args.seed)
    output = Path(args.output) if args.output else _run_dir_of(args.checkpoint) / SAMPLES_NAME
    save_sample_grid(vae, output, checkpoint.get("image_shape"), args.num_samples)
    print(f"{args.num_samples} samples written to {output}")
    return 0


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
    evaluate.add_argument("--num-samples", "-k", type=positive_int, default=5000,
                          help="importance samples K per data point (default: 5000)")
    evaluate.add_argument("--test-size", type=positive_int, default=None,
                          help="evaluate only the first N test points (default: all)")
    evaluate.add_argument("--batch-size", type=positive_int, default=100,
                          help="test points per vectorized trace (default: 100)")
    evaluate.add_argument("--chunk-size", type=positive_int, default=500,
                          help="importance samples per vectorized trace (default: 500)")
    evaluate.add_argument("--data-dir", default=None, help="override the run's data folder")
    evaluate.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    evaluate.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    evaluate.add_argument("--output", "-o", default=None,
                          help="JSON file to write (default: evaluation.json in the run directory);"
                               " with --report, the folder to write into")
    add_report_arguments(evaluate)
    evaluate.set_defaults(handler=evaluate_command)

    sample = commands.add_parser("sample", help="decode samples from the prior into a PNG grid")
    sample.add_argument("checkpoint", help="checkpoint.pt or the run directory holding it")
    sample.add_argument("--num-samples", "-n", type=positive_int, default=64,
                        help="number of images (default: 64)")
    sample.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    sample.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
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
    level = logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    prefix = f"pyrovae (rank {rank})" if rank else "pyrovae"
    try:
        return args.handler(args)
    except TrainingInterrupted as error:
        if rank == 0:
            print(f"{prefix}: {error}", file=sys.stderr)
        return 128 + error.signal_number
    except PyrovaeError as error:
        print(f"{prefix}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pyrovae: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
