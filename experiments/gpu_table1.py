"""Burda et al. (2016)'s Table 1 grid at their protocol on one GPU: IWAE against IWAE with
doubly reparameterised encoder gradients (DReG), one and two stochastic layers, K = 1, 5, 50.

Twelve runs of ``pyrovae train --preset burda2016`` (3280 epochs, minibatch 20, about 9.8
million updates each), ``--objective iwae`` or ``iwae_dreg``, ``--num-particles K``, and
``--latent-dims 100 50`` for two layers, all started at once on the one GPU (each process
drives its own small kernels; at batch 20 a step is bound by launch latency, not by the
GPU's arithmetic).  Each invocation trains every run for at most ``--minutes`` and resumes
it from its checkpoint the next time, so the grid goes a budget at a time.  Once a run has
its 3280 epochs, the paper's estimate is taken: ``pyrovae evaluate`` with K = 5000 on every
test image, into ``final_evaluation.json`` in its directory.  Then the GPU rows of
``benchmark_speed.py --device cuda`` are written (``--no-speed``: skipped), and
``results.json`` in ``--out-dir`` gathers the grid: epochs and updates done, seconds per
update, the last learning-curve point, the final estimate, and the published row.

Time: the updates per second of every run are measured as it trains (``seconds_per_update``
in ``results.json``); ``--epochs 1 --train-size 4000`` measures them in a few minutes.
``experiments/README.md`` records the estimate for the whole grid.

Usage::

    # the grid, 10 hours at a time (run it again to continue; finished runs are skipped)
    python experiments/gpu_table1.py --data-dir ../shared/data --out-dir runs/gpu_table1 --minutes 600
    # a few minutes' try, which measures the step time of every setting
    python experiments/gpu_table1.py --data-dir ../shared/data --out-dir /tmp/try --minutes 5 \\
        --epochs 1 --train-size 4000 --no-final --no-speed

References:

1. Burda, Grosse, Salakhutdinov (2016). Importance Weighted Autoencoders. ICLR.
2. Tucker, Lawson, Gu, Maddison (2019). Doubly Reparameterized Gradient Estimators for Monte
   Carlo Objectives. ICLR.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

from pyrovae.checkpoint import CHECKPOINT_NAME
from pyrovae.provenance import provenance
from pyrovae.runs import CONFIG_NAME
from pyrovae.train import METRICS_NAME, read_metrics

PROTOCOL_EPOCHS = 3280
FINAL_NUM_SAMPLES = 5000
#: Burda et al. 2016, Table 1, MNIST: test log p(x) in nats (minus the printed NLL), k = 1, 5, 50
PUBLISHED_IWAE = {1: {1: -86.76, 5: -85.54, 50: -84.78}, 2: {1: -85.33, 5: -83.89, 50: -82.90}}
OBJECTIVES = ("iwae", "iwae_dreg")
LAYERS = (1, 2)
NUM_PARTICLES = (1, 5, 50)


def settings() -> list[dict[str, object]]:
    """The grid: one dict per run, with its name and the flags of a fresh start."""
    grid = []
    for layers in LAYERS:
        for num_particles in NUM_PARTICLES:
            for objective in OBJECTIVES:
                flags = ["--objective", objective, "--num-particles", str(num_particles)]
                if layers == 2:
                    flags += ["--latent-dims", "100", "50"]
                grid.append({"name": f"{objective}_k{num_particles}_{layers}layer",
                             "objective": objective, "num_particles": num_particles,
                             "layers": layers, "flags": flags})
    return grid


def train_command(setting: dict[str, object], run_dir: Path, args: argparse.Namespace,
                  extra: list[str]) -> list[str]:
    common = ["--device", args.device, "--max-minutes", str(args.minutes), "--eval-samples",
              "0", "--no-progress", "--compile", args.compile]
    if (run_dir / CHECKPOINT_NAME).is_file():
        resumed = ["--epochs", str(args.epochs)] if args.epochs else []
        return ["train", "--resume", str(run_dir), *common, *resumed]
    fresh = ["--epochs", str(args.epochs)] if args.epochs else []
    return ["train", "--preset", "burda2016", "--seed", "0", *setting["flags"],  # type: ignore[misc]
            "--data-dir", args.data_dir, "--out-dir", str(run_dir), "--log-px-every", "20",
            "--log-px-samples", "1000", "--log-px-size", "1000", *common, *fresh, *extra]


def summary(setting: dict[str, object], run_dir: Path, epochs: int) -> dict[str, object]:
    """What ``results.json`` says of one run."""
    row = {key: setting[key] for key in ("name", "objective", "num_particles", "layers")}
    row["published_iwae_log_px"] = PUBLISHED_IWAE[setting["layers"]][setting["num_particles"]]  # type: ignore[index]
    if not (run_dir / METRICS_NAME).is_file():
        return {**row, "epochs_done": 0}
    records = read_metrics(run_dir / METRICS_NAME)
    config = json.loads((run_dir / CONFIG_NAME).read_text())
    last = records[-1]
    updates_per_epoch = last.step // last.epoch
    # the first epoch pays start-up (compilation, warm-up): leave it out where there are more
    timed = records[1:] or records
    seconds = sum(record.epoch_seconds for record in timed)
    curve = [{"epoch": r.epoch, "test_log_px": r.test_log_px} for r in records
             if not math.isnan(r.test_log_px)]
    final = run_dir / "final_evaluation.json"
    return {**row, "epochs_done": last.epoch, "epochs_of_protocol": epochs,
            "updates_done": last.step, "train_size": config.get("train_size"),
            "seconds_per_update": seconds / (updates_per_epoch * len(timed)),
            "last_test_elbo": last.test_elbo,
            "last_learning_curve_point": curve[-1] if curve else None,
            "final_evaluation": json.loads(final.read_text()) if final.is_file() else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--minutes", type=float, required=True,
                        help="training budget of this invocation, per run (all run at once)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--epochs", type=int, default=None,
                        help="train to this many epochs instead of the protocol's 3280")
    parser.add_argument("--compile", default="off",
                        help="pyrovae train --compile (reduce-overhead: CUDA graphs)")
    parser.add_argument("--only", nargs="*", default=None, help="run only these settings")
    parser.add_argument("--no-final", action="store_true", help="skip the K=5000 evaluations")
    parser.add_argument("--no-speed", action="store_true", help="skip benchmark_speed.py")
    args, extra = parser.parse_known_args(argv)
    grid = [s for s in settings() if args.only is None or s["name"] in args.only]
    if args.only is not None and len(grid) != len(args.only):
        known = ", ".join(str(s["name"]) for s in settings())
        parser.error(f"--only names a setting not in the grid; known: {known}")
    epochs = args.epochs or PROTOCOL_EPOCHS
    args.out_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    processes = []
    for setting in grid:
        run_dir = args.out_dir / str(setting["name"])
        done = (run_dir / METRICS_NAME).is_file() and \
            read_metrics(run_dir / METRICS_NAME)[-1].epoch >= epochs
        if done:
            continue
        log = (args.out_dir / f"{setting['name']}.log").open("a")
        command = [sys.executable, "-m", "pyrovae", *train_command(setting, run_dir, args, extra)]
        processes.append((setting, subprocess.Popen(command, stdout=log, stderr=log, env=env)))
    failed = [str(s["name"]) for s, process in processes if process.wait() != 0]
    if not args.no_final:
        for setting in grid:
            run_dir = args.out_dir / str(setting["name"])
            final = run_dir / "final_evaluation.json"
            if final.is_file() or not (run_dir / METRICS_NAME).is_file() or \
                    read_metrics(run_dir / METRICS_NAME)[-1].epoch < epochs:
                continue
            code = subprocess.call([sys.executable, "-m", "pyrovae", "evaluate", str(run_dir),
                                    "--num-samples", str(FINAL_NUM_SAMPLES), "--device",
                                    args.device, "--no-progress", "--output", str(final)],
                                   env=env)
            if code != 0:
                failed.append(f"{setting['name']} (evaluation)")
    if not args.no_speed:
        script = Path(__file__).resolve().parent / "benchmark_speed.py"
        code = subprocess.call([sys.executable, str(script), "--device", args.device,
                                "--data-dir", args.data_dir, "--epoch", "--scaling", "--memory",
                                "--output", str(args.out_dir / "speed_cuda.json")])
        if code != 0:
            failed.append("benchmark_speed.py")
    results = {"protocol": "burda2016 (pyrovae train --preset burda2016)",
               "epochs": epochs,
               "runs": [summary(s, args.out_dir / str(s["name"]), epochs) for s in grid],
               "published_source": "Burda et al. 2016, Table 1, MNIST, IWAE rows",
               **provenance(args.device)}
    (args.out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    for row in results["runs"]:
        print(f"{row['name']}: epoch {row['epochs_done']} of {epochs}"
              + (f", {1e3 * row['seconds_per_update']:.2f} ms/update"
                 if "seconds_per_update" in row else ""))
    if failed:
        print(f"gpu_table1.py: error: {', '.join(failed)} failed (see the logs in "
              f"{args.out_dir})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
