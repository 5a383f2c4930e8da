"""Train a published protocol's run a budget at a time, and bank it in the repository.

A paper's full protocol (``pyrovae train --preset NAME``) takes many hours on a CPU, more
than one session has, so it is trained ``--minutes`` at a time into ``runs/<run>/`` and its
latest checkpoint, config and metrics are copied ("banked") into
``experiments/results/<run>/``, from which any machine resumes it exactly where it stopped.
``burda2016.py`` and ``tomczak2018.py`` are this module for one protocol each.

``train`` starts from the bank when the run directory has no checkpoint and the bank has
one; ``final`` runs the protocol's own evaluation (``pyrovae evaluate`` with K = 5000 on
every test image) once the run has finished, on the checkpoint the paper reports (the best
validation ELBO where the run stops early, the last one otherwise); ``bank`` copies the run
and writes ``results.json`` with the learning curve (the ``test_log_px`` column of
``metrics.csv``: test log p(x) every ``log_px_every`` epochs), how far the protocol has got,
the final evaluation where there is one, and provenance.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pyrovae.checkpoint import BEST_CHECKPOINT_NAME, CHECKPOINT_NAME
from pyrovae.provenance import provenance
from pyrovae.runs import CONFIG_NAME, SESSIONS_NAME
from pyrovae.train import METRICS_NAME, read_metrics

REPO = Path(__file__).resolve().parents[1]
#: the files a resumed run needs, and the learning curve; the best checkpoint is banked only
#: where it differs from the latest (which stands for it otherwise)
BANKED_FILES = (CHECKPOINT_NAME, BEST_CHECKPOINT_NAME, CONFIG_NAME, METRICS_NAME, SESSIONS_NAME)
#: ``final``'s output (``pyrovae evaluate``'s JSON), in the run and, once banked, the bank
FINAL_EVALUATION_NAME = "final_evaluation.json"
#: the published protocols' test estimate: K importance samples on every test image
FINAL_NUM_SAMPLES = 5000


@dataclass(frozen=True)
class Protocol:
    """One published protocol's long run.

    :param preset: the ``pyrovae train --preset`` that sets it.
    :param run: the run's name: ``runs/<run>/`` and ``experiments/results/<run>/``.
    :param epochs: the protocol's epochs (its most, where it stops early).
    :param published: the paper's test log p(x) in nats, and where it is printed.
    :param start_flags: flags for a fresh start beside the preset (the learning curve's
        schedule, an objective other than the preset's).
    :param script: the script's file name, for its messages (default ``<preset>.py``).
    :param bank_best: bank the best validation ELBO's checkpoint too where it differs from
        the latest (``False``: the latest only, for a protocol that reports the last one).
    """

    preset: str
    run: str
    epochs: int
    published: float
    published_source: str
    start_flags: tuple[str, ...]
    script: str = ""
    bank_best: bool = True

    @property
    def script_name(self) -> str:
        return self.script or f"{self.preset}.py"

    @property
    def run_dir(self) -> Path:
        return REPO / "runs" / self.run

    @property
    def bank_dir(self) -> Path:
        return REPO / "experiments" / "results" / self.run


def train(protocol: Protocol, data_dir: str, minutes: float, run_dir: Path, bank_dir: Path,
          extra: list[str]) -> int:
    """Start or continue the run for at most ``minutes`` of wall clock, one thread;
    ``extra`` flags go to ``pyrovae train`` (a resumed run takes only those that may change,
    such as ``--epochs``)."""
    if not (run_dir / CHECKPOINT_NAME).is_file() and (bank_dir / CHECKPOINT_NAME).is_file():
        run_dir.mkdir(parents=True, exist_ok=True)
        for name in BANKED_FILES:
            if (bank_dir / name).is_file():
                shutil.copy2(bank_dir / name, run_dir / name)
        results = bank_dir / "results.json"
        if results.is_file() and json.loads(results.read_text()).get("best_is_latest"):
            shutil.copy2(run_dir / CHECKPOINT_NAME, run_dir / BEST_CHECKPOINT_NAME)
    common = ["--data-dir", data_dir, "--max-minutes", str(minutes), "--eval-samples", "0",
              "--no-progress"]
    if (run_dir / CHECKPOINT_NAME).is_file():
        command = ["train", "--resume", str(run_dir), *common, *extra]
    else:
        command = ["train", "--preset", protocol.preset, "--seed", "0", *protocol.start_flags,
                   "--out-dir", str(run_dir), *common, *extra]
    return subprocess.call([sys.executable, "-m", "pyrovae", *command],
                           env={**os.environ, "OMP_NUM_THREADS": "1"})


def progress(protocol: Protocol, rows: list[dict[str, float]],
             config: dict[str, object]) -> dict[str, object]:
    """How far the run is: epochs and updates done, and, where its config stops early, the
    best validation epoch after the KL warm-up and whether the patience has run out."""
    last = rows[-1]
    done = {"epochs_done": int(last["epoch"]), "epochs_of_protocol": protocol.epochs,
            "updates_done": int(last["step"])}
    finished = done["epochs_done"] >= protocol.epochs
    patience = int(config.get("early_stopping_patience") or 0)
    if patience:
        warmup = int(config.get("kl_warmup_epochs") or 0)
        counted = [row for row in rows if row["epoch"] > warmup
                   and not math.isnan(row.get("valid_elbo", math.nan))]
        if counted:
            best = max(counted, key=lambda row: row["valid_elbo"])
            since = done["epochs_done"] - int(best["epoch"])
            done.update(best_valid_epoch=int(best["epoch"]), best_valid_elbo=best["valid_elbo"],
                        epochs_since_best=since)
            finished = finished or since >= patience
    done["finished"] = finished
    return done


def read_run(run_dir: Path) -> tuple[list[dict[str, float]], dict[str, object]]:
    """The run's ``metrics.csv`` rows (one dict an epoch) and its ``config.json``."""
    rows = [asdict(record) for record in read_metrics(run_dir / METRICS_NAME)]
    return rows, json.loads((run_dir / CONFIG_NAME).read_text())


def reported_checkpoint(run_dir: Path, config: dict[str, object]) -> Path:
    """The checkpoint a paper reports: the best validation ELBO's where the run stops early
    (``early_stopping_patience``), the last one otherwise."""
    best = run_dir / BEST_CHECKPOINT_NAME
    if config.get("early_stopping_patience") and best.is_file():
        return best
    return run_dir / CHECKPOINT_NAME


def final(protocol: Protocol, run_dir: Path, num_samples: int, before_the_end: bool,
          extra: list[str]) -> int:
    """Evaluate the finished run as its paper did (:func:`reported_checkpoint`, ``pyrovae
    evaluate`` with ``num_samples`` importance samples on every test image, one thread)
    into ``run_dir/final_evaluation.json``; a run that has not finished is refused unless
    ``before_the_end``.  ``extra`` flags go to ``pyrovae evaluate``."""
    script = protocol.script_name
    if not (run_dir / CHECKPOINT_NAME).is_file():
        print(f"{script}: error: no run in {run_dir} to evaluate", file=sys.stderr)
        return 2
    rows, config = read_run(run_dir)
    done = progress(protocol, rows, config)
    if not done["finished"] and not before_the_end:
        since = (f", {done['epochs_since_best']} since its best validation ELBO"
                 if "epochs_since_best" in done else "")
        print(f"{script}: error: the run is at epoch {done['epochs_done']} of "
              f"{protocol.epochs}{since} and has not finished its protocol; train it on, or "
              f"pass --before-the-end to evaluate it now", file=sys.stderr)
        return 2
    # written beside the last one and put in its place only once complete: a failed or
    # interrupted evaluation leaves the earlier one as it was
    partial = run_dir / f"{FINAL_EVALUATION_NAME}.partial"
    partial.unlink(missing_ok=True)
    command = ["evaluate", str(reported_checkpoint(run_dir, config)), "--num-samples",
               str(num_samples), "--no-progress", "--output", str(partial), *extra]
    code = subprocess.call([sys.executable, "-m", "pyrovae", *command],
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    if code == 0:  # where the run stood when it was evaluated, for the bank to say
        evaluation = json.loads(partial.read_text())
        evaluation.update(epochs_trained=done["epochs_done"], run_finished=done["finished"])
        partial.write_text(json.dumps(evaluation, indent=2) + "\n")
        destination = run_dir / FINAL_EVALUATION_NAME
        partial.replace(destination)
        # evaluate names the partial file it wrote; this is where the evaluation now is
        print(f"{script}: final evaluation in {destination} (`{script} bank` records it)")
    return code


def final_summary(evaluation: dict[str, object], done: dict[str, object]) -> dict[str, object]:
    """The final evaluation's numbers for ``results.json``: log p(x) ± SE in nats, K, the test
    images, the checkpoint's epoch, whether the run had finished when it was evaluated, and
    whether it has trained on since (``stale``)."""
    return {"log_marginal_likelihood": evaluation["log_marginal_likelihood"],
            "log_marginal_likelihood_standard_error":
                evaluation["log_marginal_likelihood_standard_error"],
            "test_elbo": evaluation["test_elbo"],
            "num_samples": evaluation["num_samples"],
            "num_test_points": evaluation["num_test_points"],
            "checkpoint_epoch": evaluation["checkpoint_epoch"],
            "epochs_trained": evaluation["epochs_trained"],
            "run_finished": evaluation["run_finished"],
            # trained on since: the numbers are of an earlier checkpoint than the bank's
            "stale": evaluation["epochs_trained"] != done["epochs_done"],
            "commit": evaluation.get("commit")}


def bank(protocol: Protocol, run_dir: Path, bank_dir: Path,
         notes: list[str] | None = None) -> int:
    """Copy the run's checkpoint, config and metrics into ``bank_dir`` and write
    ``results.json`` there (epochs and updates done, the learning curve, provenance)."""
    script = protocol.script_name
    if not (run_dir / CHECKPOINT_NAME).is_file():
        print(f"{script}: error: no run in {run_dir} to bank", file=sys.stderr)
        return 2
    bank_dir.mkdir(parents=True, exist_ok=True)
    best = run_dir / BEST_CHECKPOINT_NAME
    best_is_latest = best.is_file() and filecmp.cmp(best, run_dir / CHECKPOINT_NAME, shallow=False)
    for name in BANKED_FILES:
        if name == BEST_CHECKPOINT_NAME and (best_is_latest or not protocol.bank_best):
            (bank_dir / name).unlink(missing_ok=True)  # the latest checkpoint stands for it
        elif (run_dir / name).is_file():
            shutil.copy2(run_dir / name, bank_dir / name)
    rows, config = read_run(run_dir)
    curve = [{"epoch": int(row["epoch"]), "updates": int(row["step"]),
              "test_log_px": row["test_log_px"], "test_elbo": row["test_elbo"]}
             for row in rows if not math.isnan(row.get("test_log_px", math.nan))]
    # the hardware line names the threads: those `train` runs at (OMP_NUM_THREADS=1)
    torch.set_num_threads(1)
    previous = bank_dir / "results.json"
    kept_notes = json.loads(previous.read_text()).get("notes", []) if previous.is_file() else []
    done = progress(protocol, rows, config)
    # the run's own, or the one banked before (a run resumed from the bank has none)
    final_evaluation = bank_dir / FINAL_EVALUATION_NAME
    if (run_dir / FINAL_EVALUATION_NAME).is_file():
        shutil.copy2(run_dir / FINAL_EVALUATION_NAME, final_evaluation)
    results = {
        "protocol": f"{protocol.preset} (pyrovae train --preset {protocol.preset})",
        # what a later reader needs beside the numbers (which code trained which epochs)
        "notes": kept_notes + list(notes or []),
        "seed": config["seed"],
        **done,
        "best_is_latest": best_is_latest,
        "last_test_elbo": rows[-1]["test_elbo"],
        "learning_curve": curve,
        "learning_curve_estimator": "test log p(x), IWAE bound with --log-px-samples samples "
                                    "on the first --log-px-size test images (see config)",
        "final_evaluation": (final_summary(json.loads(final_evaluation.read_text()), done)
                             if final_evaluation.is_file() else None),
        "published_log_marginal_likelihood": protocol.published,
        "published_source": protocol.published_source,
        "train_seconds": sum(row["epoch_seconds"] for row in rows),
        "config": config,
        **provenance("cpu"),
    }
    (bank_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    latest, last = curve[-1] if curve else None, results["final_evaluation"]
    print(f"banked epoch {results['epochs_done']} of {protocol.epochs} "
          f"({results['updates_done']} updates) in {bank_dir}"
          + (f"; test log p(x) {latest['test_log_px']:.2f} at epoch {latest['epoch']}"
             if latest else "")
          + (f"; final log p(x) {last['log_marginal_likelihood']:.2f} ± "
             f"{last['log_marginal_likelihood_standard_error']:.2f} (K={last['num_samples']}, "
             f"{last['num_test_points']} test images, epoch {last['checkpoint_epoch']})"
             if last else ""))
    return 0


def main(protocol: Protocol, argv: list[str] | None = None, description: str = "") -> int:
    """``train`` / ``final`` / ``bank`` for ``protocol``; unknown flags of ``train`` go to
    ``pyrovae train``, those of ``final`` to ``pyrovae evaluate``."""
    parser = argparse.ArgumentParser(description=description)
    commands = parser.add_subparsers(dest="command", required=True)
    train_parser = commands.add_parser("train", help="start or continue the run")
    train_parser.add_argument("--data-dir", required=True)
    train_parser.add_argument("--minutes", type=float, required=True)
    final_parser = commands.add_parser(
        "final", help="evaluate the finished run as the paper did (K=5000, every test image)")
    final_parser.add_argument("--num-samples", type=int, default=FINAL_NUM_SAMPLES,
                              help=f"importance samples K (default: {FINAL_NUM_SAMPLES})")
    final_parser.add_argument("--before-the-end", action="store_true",
                              help="evaluate a run that has not finished its protocol")
    bank_parser = commands.add_parser("bank", help="copy the run into the repository")
    for sub in (train_parser, final_parser, bank_parser):
        sub.add_argument("--run-dir", type=Path, default=protocol.run_dir)
        sub.add_argument("--bank-dir", type=Path, default=protocol.bank_dir)
    bank_parser.add_argument("--note", action="append", default=[],
                             help="a line of provenance to keep in results.json (repeatable)")
    args, extra = parser.parse_known_args(argv)
    if args.command == "train":
        return train(protocol, args.data_dir, args.minutes, args.run_dir, args.bank_dir, extra)
    if args.command == "final":
        return final(protocol, args.run_dir, args.num_samples, args.before_the_end, extra)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return bank(protocol, args.run_dir, args.bank_dir, args.note)
