"""Train a published protocol's run a budget at a time, and bank it in the repository.

A paper's full protocol (``pyrovae train --preset NAME``) takes many hours on a CPU, more
than one session has, so it is trained ``--minutes`` at a time into ``runs/<run>/`` and its
latest checkpoint, config and metrics are copied ("banked") into
``experiments/results/<run>/``, from which any machine resumes it exactly where it stopped.
``burda2016.py`` and ``tomczak2018.py`` are this module for one protocol each.

``train`` starts from the bank when the run directory has no checkpoint and the bank has
one; ``bank`` copies the run and writes ``results.json`` with the learning curve (the
``test_log_px`` column of ``metrics.csv``: test log p(x) every ``log_px_every`` epochs),
how far the protocol has got, and provenance.
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


@dataclass(frozen=True)
class Protocol:
    """One published protocol's long run.

    :param preset: the ``pyrovae train --preset`` that sets it.
    :param run: the run's name: ``runs/<run>/`` and ``experiments/results/<run>/``.
    :param epochs: the protocol's epochs (its most, where it stops early).
    :param published: the paper's test log p(x) in nats, and where it is printed.
    :param start_flags: flags for a fresh start beside the preset (the learning curve's
        schedule).
    """

    preset: str
    run: str
    epochs: int
    published: float
    published_source: str
    start_flags: tuple[str, ...]

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


def bank(protocol: Protocol, run_dir: Path, bank_dir: Path,
         notes: list[str] | None = None) -> int:
    """Copy the run's checkpoint, config and metrics into ``bank_dir`` and write
    ``results.json`` there (epochs and updates done, the learning curve, provenance)."""
    script = f"{protocol.preset}.py"
    if not (run_dir / CHECKPOINT_NAME).is_file():
        print(f"{script}: error: no run in {run_dir} to bank", file=sys.stderr)
        return 2
    bank_dir.mkdir(parents=True, exist_ok=True)
    best = run_dir / BEST_CHECKPOINT_NAME
    best_is_latest = best.is_file() and filecmp.cmp(best, run_dir / CHECKPOINT_NAME, shallow=False)
    for name in BANKED_FILES:
        if name == BEST_CHECKPOINT_NAME and best_is_latest:
            (bank_dir / name).unlink(missing_ok=True)  # the latest checkpoint stands for it
        elif (run_dir / name).is_file():
            shutil.copy2(run_dir / name, bank_dir / name)
    rows = [asdict(record) for record in read_metrics(run_dir / METRICS_NAME)]
    config = json.loads((run_dir / CONFIG_NAME).read_text())
    curve = [{"epoch": int(row["epoch"]), "updates": int(row["step"]),
              "test_log_px": row["test_log_px"], "test_elbo": row["test_elbo"]}
             for row in rows if not math.isnan(row.get("test_log_px", math.nan))]
    # the hardware line names the threads: those `train` runs at (OMP_NUM_THREADS=1)
    torch.set_num_threads(1)
    previous = bank_dir / "results.json"
    kept_notes = json.loads(previous.read_text()).get("notes", []) if previous.is_file() else []
    results = {
        "protocol": f"{protocol.preset} (pyrovae train --preset {protocol.preset})",
        # what a later reader needs beside the numbers (which code trained which epochs)
        "notes": kept_notes + list(notes or []),
        "seed": config["seed"],
        **progress(protocol, rows, config),
        "best_is_latest": best_is_latest,
        "last_test_elbo": rows[-1]["test_elbo"],
        "learning_curve": curve,
        "learning_curve_estimator": "test log p(x), IWAE bound with --log-px-samples samples "
                                    "on the first --log-px-size test images (see config)",
        "published_log_marginal_likelihood": protocol.published,
        "published_source": protocol.published_source,
        "train_seconds": sum(row["epoch_seconds"] for row in rows),
        "config": config,
        **provenance("cpu"),
    }
    (bank_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    latest = curve[-1] if curve else None
    print(f"banked epoch {results['epochs_done']} of {protocol.epochs} "
          f"({results['updates_done']} updates) in {bank_dir}"
          + (f"; test log p(x) {latest['test_log_px']:.2f} at epoch {latest['epoch']}"
             if latest else ""))
    return 0


def main(protocol: Protocol, argv: list[str] | None = None, description: str = "") -> int:
    """``train`` / ``bank`` for ``protocol``; unknown flags of ``train`` go to ``pyrovae
    train``."""
    parser = argparse.ArgumentParser(description=description)
    commands = parser.add_subparsers(dest="command", required=True)
    train_parser = commands.add_parser("train", help="start or continue the run")
    train_parser.add_argument("--data-dir", required=True)
    train_parser.add_argument("--minutes", type=float, required=True)
    bank_parser = commands.add_parser("bank", help="copy the run into the repository")
    for sub in (train_parser, bank_parser):
        sub.add_argument("--run-dir", type=Path, default=protocol.run_dir)
        sub.add_argument("--bank-dir", type=Path, default=protocol.bank_dir)
    bank_parser.add_argument("--note", action="append", default=[],
                             help="a line of provenance to keep in results.json (repeatable)")
    args, extra = parser.parse_known_args(argv)
    if args.command == "train":
        return train(protocol, args.data_dir, args.minutes, args.run_dir, args.bank_dir, extra)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return bank(protocol, args.run_dir, args.bank_dir, args.note)
