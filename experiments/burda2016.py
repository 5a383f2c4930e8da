"""The IWAE paper's one-layer VAE at the paper's own protocol, banked in pieces.

``pyrovae train --preset burda2016`` sets the protocol of Burda, Grosse & Salakhutdinov
(2016) as their code has it: 59,600 dynamically binarized MNIST training images, minibatch
20, Adam(0.99, 0.999, eps 1e-4) with the second moment started at 1, 3280 epochs in eight
stages at 1e-3 x (1.0, 0.72, 0.52, 0.37, 0.27, 0.19, 0.14, 0.1), the decoder's output bias
at the logit of the training mean, test log p(x) with K = 5000.  That is about 9.8 million
updates: many hours on a CPU, so the run is trained a budget at a time and its latest
checkpoint kept in the repository (``experiments/results/burda2016_vae/``), from which any
machine resumes it bit for bit.

Commands::

    # train (or continue) for at most 60 minutes, into runs/burda2016_vae; further flags go
    # to pyrovae train
    python experiments/burda2016.py train --data-dir ../shared/data --minutes 60
    # bank it: checkpoint, config, metrics and a results.json with the learning curve
    python experiments/burda2016.py bank

``train`` starts from the banked checkpoint when ``runs/burda2016_vae`` does not exist and
one is in the repository.  The learning curve is the test log p(x) with K = 1000 on the
first 1000 test images every 20 epochs (``--log-px-every``); the final K = 5000 estimate on
all 10,000 test images is computed once the 3280 epochs are done.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from pyrovae.provenance import provenance

REPO = Path(__file__).resolve().parents[1]
RUN_DIR = REPO / "runs" / "burda2016_vae"
BANK = REPO / "experiments" / "results" / "burda2016_vae"
#: the files a resumed run needs, and the learning curve
BANKED_FILES = ("checkpoint.pt", "config.json", "metrics.csv", "training_sessions.jsonl")
PUBLISHED = -86.76  # Burda et al. 2016, Table 1, VAE, one stochastic layer, k = 1
TOTAL_EPOCHS = 3280


def train(data_dir: str, minutes: float, run_dir: Path, bank_dir: Path,
          extra: list[str]) -> int:
    """Start or continue the run for at most ``minutes`` of wall clock, one thread;
    ``extra`` flags go to ``pyrovae train`` (a resumed run takes only those that may change,
    such as ``--epochs``)."""
    if not (run_dir / "checkpoint.pt").is_file() and (bank_dir / "checkpoint.pt").is_file():
        run_dir.mkdir(parents=True, exist_ok=True)
        for name in BANKED_FILES:
            if (bank_dir / name).is_file():
                shutil.copy2(bank_dir / name, run_dir / name)
    common = ["--data-dir", data_dir, "--max-minutes", str(minutes), "--eval-samples", "0",
              "--no-progress"]
    if (run_dir / "checkpoint.pt").is_file():
        command = ["train", "--resume", str(run_dir), *common, *extra]
    else:
        command = ["train", "--preset", "burda2016", "--seed", "0", "--log-px-every", "20",
                   "--log-px-samples", "1000", "--log-px-size", "1000", "--out-dir",
                   str(run_dir), *common, *extra]
    return subprocess.call([sys.executable, "-m", "pyrovae", *command],
                           env={**os.environ, "OMP_NUM_THREADS": "1"})


def _read_metrics(path: Path) -> list[dict[str, float]]:
    with path.open(newline="") as handle:
        return [{key: float(value) if value not in ("", "nan") else math.nan
                 for key, value in row.items()} for row in csv.DictReader(handle)]


def bank(run_dir: Path, bank_dir: Path, notes: list[str] | None = None) -> int:
    """Copy the run's checkpoint, config and metrics into ``bank_dir`` and write
    ``results.json`` there (epochs and updates done, the learning curve, provenance)."""
    if not (run_dir / "checkpoint.pt").is_file():
        print(f"burda2016.py: error: no run in {run_dir} to bank", file=sys.stderr)
        return 2
    bank_dir.mkdir(parents=True, exist_ok=True)
    for name in BANKED_FILES:
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, bank_dir / name)
    rows = _read_metrics(run_dir / "metrics.csv")
    config = json.loads((run_dir / "config.json").read_text())
    curve = [{"epoch": int(row["epoch"]), "updates": int(row["step"]),
              "test_log_px_k1000_n1000": row["test_log_px"], "test_elbo": row["test_elbo"]}
             for row in rows if not math.isnan(row.get("test_log_px", math.nan))]
    last = rows[-1]
    # the hardware line names the threads: those `train` runs at (OMP_NUM_THREADS=1)
    torch.set_num_threads(1)
    previous = bank_dir / "results.json"
    kept_notes = json.loads(previous.read_text()).get("notes", []) if previous.is_file() else []
    results = {
        "protocol": "burda2016 (pyrovae train --preset burda2016)",
        # what a later reader needs beside the numbers (which code trained which epochs)
        "notes": kept_notes + list(notes or []),
        "seed": config["seed"],
        "epochs_done": int(last["epoch"]),
        "epochs_of_protocol": TOTAL_EPOCHS,
        "updates_done": int(last["step"]),
        "finished": int(last["epoch"]) >= TOTAL_EPOCHS,
        "last_test_elbo": last["test_elbo"],
        "learning_curve": curve,
        "published_log_marginal_likelihood": PUBLISHED,
        "train_seconds": sum(row["epoch_seconds"] for row in rows),
        "config": config,
        **provenance("cpu"),
    }
    (bank_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    latest = curve[-1] if curve else None
    print(f"banked epoch {results['epochs_done']} of {TOTAL_EPOCHS} "
          f"({results['updates_done']} updates) in {bank_dir}"
          + (f"; test log p(x) {latest['test_log_px_k1000_n1000']:.2f} (K=1000, first 1000 "
             f"test images) at epoch {latest['epoch']}" if latest else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train_parser = commands.add_parser("train", help="start or continue the run")
    train_parser.add_argument("--data-dir", required=True)
    train_parser.add_argument("--minutes", type=float, required=True)
    bank_parser = commands.add_parser("bank", help="copy the run into the repository")
    for sub in (train_parser, bank_parser):
        sub.add_argument("--run-dir", type=Path, default=RUN_DIR)
        sub.add_argument("--bank-dir", type=Path, default=BANK)
    bank_parser.add_argument("--note", action="append", default=[],
                             help="a line of provenance to keep in results.json (repeatable)")
    args, extra = parser.parse_known_args(argv)
    if args.command == "train":
        return train(args.data_dir, args.minutes, args.run_dir, args.bank_dir, extra)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return bank(args.run_dir, args.bank_dir, args.note)


if __name__ == "__main__":
    sys.exit(main())
