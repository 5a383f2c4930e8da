"""Milliseconds per training update of each setting of ``gpu_table1.py``'s grid, for its time
estimate: the ``burda2016`` networks (one layer, or ``--latent-dims 100 50``), minibatch 20,
``iwae`` and ``iwae_dreg`` at K = 1, 5, 50, on random binary 784-pixel data (the time of an
update does not depend on the pixels).

Each setting is timed alone (the median of ``--repeats`` blocks of ``--steps`` updates of
pyrovae's training step), then, with ``--concurrent``, all of them at once in separate
processes, as ``gpu_table1.py`` runs them: the updates each process makes per second while
all share the device.

Usage::

    python experiments/step_times.py --device cuda --concurrent --output step_times.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pyro
import torch

from pyrovae import DataSplits, TrainConfig, build_vae
from pyrovae.provenance import provenance
from pyrovae.train import TrainingLoop

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_table1 import PROTOCOL_EPOCHS, settings  # noqa: E402

#: updates per epoch of the protocol: 59,600 training images in minibatches of 20
UPDATES_PER_EPOCH = 59600 // 20


def step_function(setting: dict[str, object], device: str):
    """One training update of ``setting``'s model (:class:`TrainingLoop`'s own step)."""
    layers = {"latent_dims": (100, 50)} if setting["layers"] == 2 else {}
    config = TrainConfig.from_preset("burda2016", objective=setting["objective"],
                                     num_particles=setting["num_particles"], **layers)
    vae = build_vae(config, data_dim=784).to(device)
    x = torch.bernoulli(torch.full((1000, 784), 0.13))
    data = DataSplits.from_tensors(x[:600], x[600:]).to(device)
    loop = TrainingLoop(vae, data, epochs=1, batch_size=20, lr=1e-3,
                        objective=str(setting["objective"]),
                        num_particles=int(setting["num_particles"]),  # type: ignore[arg-type]
                        seed=0, test_every=1, run_dir=None, config=None, progress=False,
                        beta=1.0, kl_warmup_epochs=0, checkpoint_every=0, keep_last=0,
                        clip_norm=None, on_divergence="stop", fused=True)
    batch = data.train[:20]
    return lambda: loop.train_step(batch)


def time_setting(setting: dict[str, object], device: str, steps: int, repeats: int) -> float:
    """Median seconds per update over ``repeats`` blocks of ``steps`` (after a warm-up)."""
    step = step_function(setting, device)
    blocks = []
    with pyro.validation_enabled(False):
        for _ in range(steps):
            step()
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(steps):
                step()  # its loss.item() waits for the device
            blocks.append((time.perf_counter() - start) / steps)
    return statistics.median(blocks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--concurrent", action="store_true",
                        help="also time every setting at once, one process each")
    parser.add_argument("--only", default=None, help=argparse.SUPPRESS)  # one child process
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    grid = settings()
    if args.only is not None:
        setting = next(s for s in grid if s["name"] == args.only)
        print(json.dumps({"name": args.only, "seconds": time_setting(
            setting, args.device, args.steps, args.repeats)}))
        return 0
    rows = []
    for setting in grid:
        seconds = time_setting(setting, args.device, args.steps, args.repeats)
        rows.append({"name": setting["name"], "alone_ms": 1e3 * seconds,
                     "protocol_hours_alone": seconds * UPDATES_PER_EPOCH * PROTOCOL_EPOCHS / 3600})
        print(f"{setting['name']}: {1e3 * seconds:.2f} ms/update alone", flush=True)
    if args.concurrent:
        children = [subprocess.Popen([sys.executable, __file__, "--device", args.device,
                                      "--steps", str(args.steps), "--repeats", str(args.repeats),
                                      "--only", str(s["name"])], stdout=subprocess.PIPE,
                                     text=True) for s in grid]
        for row, child in zip(rows, children, strict=True):
            out, _ = child.communicate()
            seconds = json.loads(out.strip().splitlines()[-1])["seconds"]
            row["concurrent_ms"] = 1e3 * seconds
            row["protocol_hours_concurrent"] = (seconds * UPDATES_PER_EPOCH * PROTOCOL_EPOCHS
                                                / 3600)
            print(f"{row['name']}: {1e3 * seconds:.2f} ms/update with all "
                  f"{len(grid)} at once", flush=True)
    results = {"batch_size": 20, "updates_per_epoch": UPDATES_PER_EPOCH,
               "protocol_epochs": PROTOCOL_EPOCHS, "steps": args.steps,
               "repeats": args.repeats, "rows": rows, **provenance(args.device)}
    if args.output is not None:
        args.output.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
