"""Experiments as sequences of ``pyrovae`` commands: train a run, evaluate it, draw from it.

The structured-model experiments (``hierarchical.py``, ``semi_supervised.py``,
``conditional.py``) are what a user would type: ``pyrovae train`` into a run directory,
``pyrovae evaluate`` on it, ``pyrovae sample`` from it.  Running the command line itself keeps
every run directory rule (refuse, resume, lock, atomic files) in one place, the CLI's, and
makes each row of the results table reproducible by the commands written beside it.

A run that already holds its epochs is not trained again and an evaluation already written
with the same K and test points is read back, so a script stopped half way continues where
it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pyrovae.checkpoint import CHECKPOINT_NAME
from pyrovae.provenance import provenance
from pyrovae.report import SUMMARY_NAME
from pyrovae.runs import EVALUATION_NAME
from pyrovae.train import METRICS_NAME, read_metrics

REPO = Path(__file__).resolve().parents[1]


class CommandFailed(RuntimeError):
    """A ``pyrovae`` command exited with a non-zero status (its message is on stderr)."""


def add_arguments(parser: argparse.ArgumentParser, *, name: str, epochs: int,
                  eval_samples: int, test_size: int) -> None:
    """The options every structured-model experiment takes; ``name`` names its folders."""
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"),
                        help="folder holding MNIST/raw (default: ../shared/data)")
    parser.add_argument("--out-dir", type=Path, default=REPO / "experiments" / "results" / name,
                        help=f"where results.json and the figures go (default: "
                             f"experiments/results/{name})")
    parser.add_argument("--runs-dir", type=Path, default=REPO / "runs" / name,
                        help=f"where the run directories go (default: runs/{name})")
    parser.add_argument("--epochs", type=int, default=epochs,
                        help=f"epochs of every run (default: {epochs})")
    parser.add_argument("--eval-samples", type=int, default=eval_samples,
                        help=f"K of the test log p(x) (default: {eval_samples})")
    parser.add_argument("--eval-size", type=int, default=test_size,
                        help=f"the first N test images to evaluate (default: {test_size})")
    parser.add_argument("--seed", type=int, default=0, help="seed of every run (default: 0)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: cpu)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads of every command (default: 1)")


def pyrovae(*arguments: str, threads: int = 1) -> None:
    """Run ``python -m pyrovae ARGUMENTS``; raise :class:`CommandFailed` when it fails."""
    command = [sys.executable, "-m", "pyrovae", *arguments]
    print("$ pyrovae " + " ".join(arguments), flush=True)
    status = subprocess.call(command, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if status != 0:
        raise CommandFailed(f"pyrovae {arguments[0]} exited with status {status}")


def epochs_done(run_dir: Path) -> int:
    """Epochs recorded in ``run_dir/metrics.csv`` (0 for a run not started)."""
    metrics = run_dir / METRICS_NAME
    return len(read_metrics(metrics)) if metrics.is_file() else 0


def train(run_dir: Path, flags: Sequence[str], args: argparse.Namespace, *,
          seed: int | None = None) -> float:
    """Train ``run_dir`` to ``epochs`` with ``pyrovae train FLAGS`` (or continue it with
    ``--resume``) to ``args.epochs``; returns the training seconds recorded in its metrics.

    :param flags: the run's own ``pyrovae train`` flags; ``args`` gives the data folder,
        epochs, seed, device, threads and the script's extra ``train_flags``.
    :param seed: this run's seed, where it is not ``args.seed``.
    """
    done = epochs_done(run_dir)
    common = ["--data-dir", args.data_dir, "--epochs", str(args.epochs), "--eval-samples", "0",
              "--no-progress", "--device", args.device]
    if done >= args.epochs:
        print(f"{run_dir.name}: {done} epochs already trained", flush=True)
    elif (run_dir / CHECKPOINT_NAME).is_file():
        pyrovae("train", "--resume", str(run_dir), *common, threads=args.threads)
    else:
        seed = args.seed if seed is None else seed
        pyrovae("train", *flags, "--seed", str(seed), "--out-dir", str(run_dir), *common,
                *args.train_flags, threads=args.threads)
    return training_seconds(run_dir)


def training_seconds(run_dir: Path) -> float:
    """The sum of the epoch times in ``run_dir/metrics.csv``."""
    return sum(record.epoch_seconds for record in read_metrics(run_dir / METRICS_NAME))


def _fresh(path: Path, run_dir: Path) -> bool:
    """Whether ``path`` was written after the run's latest checkpoint (so it describes it)."""
    checkpoint = run_dir / CHECKPOINT_NAME
    return (path.is_file() and checkpoint.is_file()
            and path.stat().st_mtime >= checkpoint.stat().st_mtime)


def evaluate(run_dir: Path, args: argparse.Namespace, *, num_samples: int | None = None,
             test_size: int | None = None, name: str = EVALUATION_NAME) -> dict[str, Any]:
    """``pyrovae evaluate`` of ``run_dir`` with K = ``num_samples`` (default
    ``args.eval_samples``) on the first ``test_size`` (default ``args.eval_size``) test
    images into ``run_dir/name``, read back; reused when one with the same K and points was
    written after the run's latest checkpoint."""
    num_samples = args.eval_samples if num_samples is None else num_samples
    test_size = args.eval_size if test_size is None else test_size
    path = run_dir / name
    if _fresh(path, run_dir):
        previous = json.loads(path.read_text())
        if (previous.get("num_samples") == num_samples
                and previous.get("num_test_points") == test_size):
            return previous
    if path.is_file():
        path.unlink()  # another K, size or checkpoint: replaced, not kept beside
    pyrovae("evaluate", str(run_dir), "--num-samples", str(num_samples), "--test-size",
            str(test_size), "--device", args.device, "--no-progress", "--output", str(path),
            threads=args.threads)
    return json.loads(path.read_text())


def report(run_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """``pyrovae evaluate --report`` of ``run_dir`` without AIS: the ELBO and IWAE_K bounds
    (K = ``args.eval_samples``) on the first ``args.eval_size`` test images, k-hat and the
    latent usage (active units per latent site, KL per dimension, I(x; z)), read back from
    ``report.json``; reused when one with the same K and points was written after the run's
    latest checkpoint."""
    num_samples, test_size = args.eval_samples, args.eval_size
    path = run_dir / SUMMARY_NAME
    if _fresh(path, run_dir):
        previous = json.loads(path.read_text())
        if previous.get("ks") == [num_samples] and previous.get("num_points") == test_size:
            return previous
    pyrovae("evaluate", str(run_dir), "--report", "--ks", str(num_samples),
            "--ais-temperatures", "0", "--test-size", str(test_size), "--device", args.device,
            "--no-progress", threads=args.threads)
    return json.loads(path.read_text())


def sample(run_dir: Path, output: Path, *, num_samples: int, label: int | None = None,
           seed: int = 0, threads: int = 1) -> None:
    """``pyrovae sample`` of ``run_dir`` into the PNG ``output``."""
    arguments = ["sample", str(run_dir), "--num-samples", str(num_samples), "--seed", str(seed),
                 "--output", str(output), "--device", "cpu"]
    if label is not None:
        arguments += ["--label", str(label)]
    pyrovae(*arguments, threads=threads)


def write_results(out_dir: Path, experiment: str, args: argparse.Namespace,
                  values: dict[str, Any]) -> Path:
    """``out_dir/results.json``: the experiment's values with the commit, seed, device and
    versions they came from."""
    import torch

    torch.set_num_threads(args.threads)
    results = {"experiment": experiment, "command": " ".join(sys.argv), "seed": args.seed,
               "epochs": args.epochs, "eval_samples": args.eval_samples,
               "eval_size": args.eval_size, **values, **provenance(args.device)}
    path = out_dir / "results.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path


def main(body: Any, parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parse, run ``body(args)``; a failed command ends the script with its status line.

    Flags the script does not know go to every new run's ``pyrovae train`` (e.g.
    ``--train-size 1000`` for a quick look), as ``args.train_flags``.
    """
    args, args.train_flags = parser.parse_known_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    try:
        return body(args)
    except CommandFailed as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
