"""The ``pyrovae`` command: ``train``, ``evaluate``, ``sample``, and ``encode`` and
``reconstruct`` (:mod:`pyrovae.encoding`).

Errors caused by input (bad flags, data, files) print one line and exit with status 2.

``pyrovae train`` started by ``torchrun`` trains one model data-parallel (see
:mod:`pyrovae.distributed`); ``pyrovae train --nproc N`` starts those ``N`` processes on
this machine through torch's own launcher, ``torch.distributed.run``.  ``pyrovae evaluate``
started by ``torchrun`` splits the test points over the processes.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch
from tqdm.contrib.logging import logging_redirect_tqdm

from pyrovae import __version__, distributed, runs
from pyrovae.argtypes import (
    device_name,
    integer,
    non_negative_int,
    positive_float,
    positive_int,
    positive_ints,
    seed,
)
from pyrovae.config import BUILT_IN_MODEL_FIELDS, MAX_IMPORTANCE_SAMPLES, TrainConfig
from pyrovae.devices import resolve_device
from pyrovae.encoding import add_commands as add_encoding_commands
from pyrovae.errors import ConfigError, PyrovaeError
from pyrovae.provenance import git_commit
from pyrovae.report import DEFAULT_AIS, DEFAULT_KS
from pyrovae.rundir import describe_os_error
from pyrovae.sandwich import DEFAULT_POINTS
from pyrovae.train import TrainingInterrupted

logger = logging.getLogger("pyrovae")


def _given_flags(train_argv: Sequence[str], *, with_preset: bool = False) -> dict[str, Any]:
    """The TrainConfig fields set explicitly in ``train_argv``, with their values
    (``preset`` among them only ``with_preset``)."""
    explicit = argparse.ArgumentParser(add_help=False)
    TrainConfig.add_arguments(explicit, with_defaults=False)
    given = vars(explicit.parse_known_args(list(train_argv))[0])
    if not with_preset:
        given.pop("preset", None)
    return given


def train_command(args: argparse.Namespace) -> int:
    resume = args.resume is not None
    if resume:
        # a preset given to a resume must be the run's own, like any fixed flag
        given = _given_flags(args.train_argv, with_preset=True)
        _check_resumed_program(Path(args.resume), given.pop("program", None))
        config = runs.resumed_config(Path(args.resume), given)
    else:
        config = TrainConfig.from_args(args)
        if config.program is not None:
            _refuse_built_in_flags(args.train_argv)
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
        runs.train_and_evaluate(config, device, resume=resume, reevaluate=args.reevaluate)
    except BaseException:
        distributed.shut_down(wait=False)  # the launcher stops the other processes
        raise
    distributed.shut_down()
    return 0


def _check_resumed_program(run_dir: Path, given: str | None) -> None:
    """``train --resume`` of a run of your own program needs ``--program`` again, equal to
    the recorded one (read from ``config.json`` as data: nothing is imported before)."""
    config_path = run_dir / runs.CONFIG_NAME
    if config_path.is_file():
        runs.check_program_named(run_dir, given, TrainConfig.load(config_path),
                                 command="train --resume")


def _refuse_built_in_flags(train_argv: Sequence[str]) -> None:
    """Refuse flags of the built-in model given beside ``--program``: they would be
    recorded, and silently ignored."""
    given = sorted(set(_given_flags(train_argv, with_preset=True)) & BUILT_IN_MODEL_FIELDS)
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        what = "is a flag" if len(given) == 1 else "are flags"
        raise ConfigError(f"{flags} {what} of the built-in model; with --program the program "
                          f"is the model: pass its settings in --program-args")


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
        if args.report or args.sandwich:
            _report(args, device)
        else:
            runs.evaluate_checkpoint(args.checkpoint, device, num_samples=args.num_samples,
                                     batch_size=args.batch_size, chunk_size=args.chunk_size,
                                     test_size=args.test_size, data_dir=args.data_dir,
                                     seed=args.seed, progress=args.progress, output=args.output,
                                     force=args.force, program=args.program)
    except BaseException:
        distributed.shut_down(wait=False)
        raise
    distributed.shut_down()
    return 0


def _report(args: argparse.Namespace, device: torch.device) -> None:
    """``evaluate --report`` / ``--sandwich``: the bounds and diagnostics of :mod:`pyrovae.report`."""
    ais = {"num_temperatures": args.ais_temperatures, "num_chains": args.ais_chains,
           "num_leapfrog_steps": args.ais_leapfrog_steps, "step_size": args.ais_step_size,
           "initial": args.ais_init}
    where = {"checkpoint": args.checkpoint, "device": device, "batch_size": args.batch_size,
             "test_size": args.test_size, "data_dir": args.data_dir, "seed": args.seed,
             "output": args.output, "program": args.program}
    if args.report:
        runs.report_checkpoint(**where, ks=args.ks, ais=ais, chunk_size=args.chunk_size,
                               sandwich_points=args.sandwich_points if args.sandwich else 0,
                               progress=args.progress)
    else:
        runs.sandwich_checkpoint(**where, ais=ais, sandwich_points=args.sandwich_points,
                                 force=args.force)


#: the most leapfrog steps per HMC transition of AIS (published runs use 5 to 20)
MAX_LEAPFROG_STEPS = 1000


def importance_samples(text: str) -> int:
    """``text`` as a number of importance samples K: 1 to :data:`MAX_IMPORTANCE_SAMPLES`."""
    return _at_most(positive_int(text), MAX_IMPORTANCE_SAMPLES, "importance samples K per point")


def importance_sample_list(text: str) -> tuple[int, ...]:
    """``text`` as comma-separated Ks, each 1 to :data:`MAX_IMPORTANCE_SAMPLES`."""
    values = positive_ints(text)
    for value in values:
        _at_most(value, MAX_IMPORTANCE_SAMPLES, "importance samples K per point")
    return values


def leapfrog_steps(text: str) -> int:
    """``text`` as leapfrog steps per HMC transition: 1 to :data:`MAX_LEAPFROG_STEPS`."""
    return _at_most(positive_int(text), MAX_LEAPFROG_STEPS, "leapfrog steps per transition")


def _at_most(value: int, maximum: int, what: str) -> int:
    if value > maximum:
        raise argparse.ArgumentTypeError(
            f"{value} is more than pyrovae runs ({maximum} {what}); the time grows in "
            f"proportion")
    return value


def _add_report_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--report`` and ``--sandwich`` flags of ``pyrovae evaluate``."""
    group = parser.add_argument_group(
        "report", "with --report: ELBO, IWAE_K for each K and AIS on the same test points, "
                  "with k-hat/ESS diagnostics; writes bounds.csv, bounds.md, bounds.png, "
                  "diagnostics.nc and report.json into the run directory or --output folder. "
                  f"It runs on the first {runs.REPORT_TEST_SIZE} test points unless --test-size "
                  f"says otherwise: about 1 CPU-second per MNIST point with the default Ks "
                  f"and AIS")
    group.add_argument("--report", action="store_true",
                       help="write the bound-curve report instead of evaluation.json")
    group.add_argument("--ks", type=importance_sample_list, default=DEFAULT_KS,
                       help=f"comma-separated Ks of the IWAE bound, each at most "
                            f"{MAX_IMPORTANCE_SAMPLES} (default: 1,5,50,500,5000)")
    group.add_argument("--ais-temperatures", type=non_negative_int,
                       default=DEFAULT_AIS["num_temperatures"],
                       help="AIS temperatures T; 0 skips AIS (default: %(default)s)")
    group.add_argument("--ais-chains", type=positive_int, default=DEFAULT_AIS["num_chains"],
                       help="AIS chains per test point (default: %(default)s)")
    group.add_argument("--ais-leapfrog-steps", type=leapfrog_steps,
                       default=DEFAULT_AIS["num_leapfrog_steps"],
                       help=f"leapfrog steps per HMC transition, at most {MAX_LEAPFROG_STEPS} "
                            f"(default: %(default)s)")
    group.add_argument("--ais-step-size", type=positive_float, default=DEFAULT_AIS["step_size"],
                       help="initial leapfrog step size, adapted towards 0.65 acceptance "
                            "(default: %(default)s)")
    group.add_argument("--ais-init", choices=("guide", "prior"), default=DEFAULT_AIS["initial"],
                       help="start AIS chains from q(z|x) or p(z) (default: %(default)s)")
    group.add_argument("--sandwich", action="store_true",
                       help="bidirectional Monte Carlo with the --ais-* settings: forward AIS "
                            "(a lower bound) and reverse AIS from the exact latents (an upper "
                            "bound) on points simulated from the model; in the report with "
                            f"--report, else printed and written to {runs.SANDWICH_NAME} (or "
                            f"--output)")
    group.add_argument("--sandwich-points", type=positive_int, default=DEFAULT_POINTS,
                       help="points simulated for --sandwich, at most the test points "
                            "(default: %(default)s)")


def _add_program_argument(parser: argparse.ArgumentParser) -> None:
    """``--program`` of ``evaluate`` and ``sample``: a run of your own program names it again."""
    parser.add_argument(
        "--program", default=None, metavar="FILE.py:NAME",
        help="a run of your own program: the program it was trained with, named again "
             "(pyrovae never imports code because a run directory names it); built with the "
             "run's recorded --program-args")


def sample_command(args: argparse.Namespace) -> int:
    output = runs.sample_checkpoint(args.checkpoint, resolve_device(args.device),
                                    num_samples=args.num_samples, seed=args.seed,
                                    label=args.label, output=args.output, force=args.force,
                                    program=args.program)
    print(f"{args.num_samples} samples written to {output}")
    return 0


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
    train.add_argument("--reevaluate", action="store_true",
                       help="with --resume of a finished run: estimate its log p(x) again "
                            "(with --eval-samples) instead of keeping its results.json")
    train.add_argument("--nproc", type=positive_int, default=None, metavar="N",
                       help="train data-parallel in N processes on this machine (started by "
                            "torch.distributed.run; --batch-size is the global batch)")
    train.set_defaults(handler=train_command)

    evaluate = commands.add_parser(
        "evaluate", help="test ELBO and importance-sampled log p(x) of a checkpoint",
        description="Estimate the test ELBO and log p(x) with K importance samples per test point "
                    "(the IWAE bound); prints them and writes JSON.")
    evaluate.add_argument("checkpoint", help="checkpoint.pt or the run directory holding it")
    evaluate.add_argument("--num-samples", "-k", type=importance_samples, default=1000,
                          help=f"importance samples K per data point, at most "
                               f"{MAX_IMPORTANCE_SAMPLES} (default: 1000, as train's "
                               f"--eval-samples; published MNIST numbers use 5000)")
    evaluate.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                          help="show a progress bar")
    evaluate.add_argument("--test-size", type=positive_int, default=None,
                          help=f"evaluate only the first N test points (default: all; with "
                               f"--report the first {runs.REPORT_TEST_SIZE})")
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
    evaluate.add_argument("--force", action="store_true",
                          help="replace an existing --output file that is not an earlier "
                               "evaluation (refused otherwise)")
    _add_program_argument(evaluate)
    _add_report_arguments(evaluate)
    evaluate.set_defaults(handler=evaluate_command)

    sample = commands.add_parser("sample", help="decode samples from the prior into a PNG grid")
    sample.add_argument("checkpoint", help="checkpoint.pt or the run directory holding it")
    sample.add_argument("--num-samples", "-n", type=positive_int, default=64,
                        help="number of images (default: 64)")
    sample.add_argument("--device", type=device_name, default="auto",
                        help="cpu, cuda, cuda:N or auto (default: auto)")
    sample.add_argument("--seed", type=seed, default=0, help="random seed (default: 0)")
    sample.add_argument("--label", type=integer, default=None, metavar="CLASS",
                        help="a model of labelled data (train --model conditional or "
                             "semi_supervised): draw this class, 0..C-1 (default: every class "
                             "in turn)")
    sample.add_argument("--output", "-o", default=None,
                        help="PNG file to write (default: samples.png in the run directory)")
    sample.add_argument("--force", action="store_true",
                        help="replace an existing --output file that is not a PNG image "
                             "(refused otherwise)")
    _add_program_argument(sample)
    sample.set_defaults(handler=sample_command)
    add_encoding_commands(commands)  # encode, reconstruct
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
    git_commit()  # the commit this process runs, for its results files, however long it runs
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
