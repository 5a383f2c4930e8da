"""Training throughput of data-parallel pyrovae with 1 and more processes.

Each setting starts ``nproc`` processes with ``torch.multiprocessing.spawn`` that join one
``torch.distributed`` group (``gloo`` on CPU, ``nccl`` on CUDA with one GPU per process)
and run :meth:`pyrovae.train.TrainingLoop.train_step` on their slices of global MNIST
batches (784-200-200-50 tanh MLP, Bernoulli likelihood, diagonal Gaussian guide, fused
Trace_ELBO, dynamic binarization, Adam), exactly as ``pyrovae train --nproc`` does.  One
process runs without a process group.  Timing is on rank 0 between barriers, over
``--steps`` steps per repetition; settings alternate over ``--rounds`` rounds (fresh
processes each) against drift in the machine's load, and the median over all
``rounds x repeats`` repetitions is reported as images per second (global batch rows per
second).

On CPU every process gets ``cores // nproc`` torch threads (``--threads-per-process``
overrides), so settings use the same cores.  On CUDA one process per GPU: with one GPU
only ``--nprocs 1`` is possible.

Usage::

    python experiments/benchmark_distributed.py --data-dir ../shared/data \\
        --output experiments/results/distributed.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pyrovae import TrainConfig, build_vae
from pyrovae.data import load_mnist, resolve_data_dir
from pyrovae.distributed import local_batches
from pyrovae.provenance import cpu_model, provenance
from pyrovae.train import TrainingLoop


def _loop(vae, data, batch_size: int) -> TrainingLoop:
    return TrainingLoop(vae, data, epochs=1, batch_size=batch_size, lr=1e-3,
                        objective="trace_elbo", num_particles=1, seed=0, test_every=1,
                        run_dir=None, config=None, progress=False, beta=1.0,
                        kl_warmup_epochs=0, checkpoint_every=0, keep_last=0, clip_norm=None,
                        on_divergence="stop", fused=True)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if dist.is_initialized():
        dist.barrier()


def _worker(rank: int, nproc: int, settings: dict, output: str) -> None:
    torch.set_num_threads(settings["threads"])
    device = torch.device(settings["device"])
    if device.type == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    if nproc > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"file://{settings['rendezvous']}",
                                rank=rank, world_size=nproc,
                                device_id=device if device.type == "cuda" else None)
    data = load_mnist(settings["data_dir"], binarize="dynamic", download=False)
    data = data.subset(settings["train_size"], 100).to(device)
    rows = []
    for batch_size in settings["batch_sizes"]:
        torch.manual_seed(0)
        vae = build_vae(TrainConfig(hidden_dims=(200, 200), latent_dim=50), data_dim=784).to(device)
        loop = _loop(vae, data, batch_size)
        stream = _batches(data, batch_size, rank, nproc)
        for _ in range(settings["warmup"]):
            x, global_rows = next(stream)
            loop.train_step(x, global_rows=global_rows)
        seconds = []
        for _ in range(settings["repeats"]):
            _synchronize(device)
            started = time.perf_counter()
            for _ in range(settings["steps"]):
                x, global_rows = next(stream)
                loop.train_step(x, global_rows=global_rows)
            _synchronize(device)
            seconds.append((time.perf_counter() - started) / settings["steps"])
        rows.append({"nproc": nproc, "batch_size": batch_size, "seconds": seconds})
    if rank == 0:
        Path(output).write_text(json.dumps(rows))
    if dist.is_initialized():
        dist.destroy_process_group()


def _batches(data, batch_size: int, rank: int, nproc: int) -> Iterator[tuple[torch.Tensor, int]]:
    """This rank's slices of global batches, epoch after epoch, with the global batch size."""
    generator = torch.Generator().manual_seed(0)
    n = data.train.shape[0]
    while True:
        for index, x in enumerate(local_batches(data, batch_size, generator=generator, rank=rank,
                                                world_size=nproc)):
            yield x, min(batch_size, n - index * batch_size)


def measure(nproc: int, settings: dict) -> list[dict]:
    """Run one setting in ``nproc`` fresh processes; return rank 0's rows."""
    with tempfile.TemporaryDirectory() as folder:
        output = str(Path(folder) / "rows.json")
        settings = {**settings, "rendezvous": str(Path(folder) / "rendezvous")}
        mp.spawn(_worker, args=(nproc, settings, output), nprocs=nproc)
        return json.loads(Path(output).read_text())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nprocs", type=int, nargs="+", default=[1, 2],
                        help="numbers of processes to compare (default: 1 2)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[100, 1000],
                        help="global batch sizes (default: 100 1000)")
    parser.add_argument("--steps", type=int, default=30, help="training steps per repetition")
    parser.add_argument("--repeats", type=int, default=5, help="repetitions per round")
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds over all settings, alternating them (median over all; "
                             "default: 3 when comparing several process counts, else 1)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--train-size", type=int, default=10000, help="MNIST training images used")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    parser.add_argument("--threads-per-process", type=int, default=None,
                        help="torch threads per process on CPU (default: cores // nproc)")
    parser.add_argument("--data-dir", default=None,
                        help="folder holding MNIST/raw (default: $PYROVAE_DATA, then ../shared/data)")
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 3 if len(args.nprocs) > 1 else 1

    data_dir, chosen = resolve_data_dir(args.data_dir)
    if not chosen:
        data_dir = Path(__file__).resolve().parents[2] / "shared" / "data"
    device = torch.device(args.device)
    cores = os.cpu_count() or 1
    if device.type == "cuda":
        gpus = torch.cuda.device_count()
        too_many = [n for n in args.nprocs if n > gpus]
        if too_many:
            parser.error(f"--device cuda runs one process per GPU and this machine has {gpus}; "
                         f"drop --nprocs {' '.join(map(str, too_many))}")
    load_before = os.getloadavg()[0]
    seconds: dict[tuple[int, int], list[float]] = {}
    threads = {nproc: args.threads_per_process or max(1, cores // nproc) for nproc in args.nprocs}
    for _ in range(args.rounds):
        for nproc in args.nprocs:
            settings = {"device": args.device, "data_dir": str(data_dir),
                        "train_size": args.train_size, "batch_sizes": args.batch_sizes,
                        "steps": args.steps, "repeats": args.repeats, "warmup": args.warmup,
                        "threads": threads[nproc]}
            for row in measure(nproc, settings):
                seconds.setdefault((row["nproc"], row["batch_size"]), []).extend(row["seconds"])
    rows = []
    for (nproc, batch_size), values in seconds.items():
        step = statistics.median(values)
        rows.append({"nproc": nproc, "batch_size": batch_size, "seconds_per_step": step,
                     "images_per_second": batch_size / step,
                     "threads_per_process": threads[nproc] if device.type == "cpu" else None,
                     "steps": args.steps, "repetitions": len(values)})
        print(f"{nproc} process(es), batch {batch_size:5d}: {batch_size / step:9.0f} images/s "
              f"({1000 * step:.2f} ms/step, median of {len(values)})", flush=True)
    base = {row["batch_size"]: row["images_per_second"] for row in rows if row["nproc"] == 1}
    for row in rows:
        if row["batch_size"] in base:
            row["speedup"] = row["images_per_second"] / base[row["batch_size"]]
    # other work on the machine distorts CPU timings: the 1-minute load average says how much
    record = {"rows": rows, "cores": cores, "cpu": cpu_model(), "seed": 0,
              "load_average_before": load_before, "load_average_after": os.getloadavg()[0],
              "model": "784-200-200-50 tanh MLP, Bernoulli, diagonal guide, fused Trace_ELBO",
              "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
              **provenance(device if device.type == "cuda" else "cpu")}
    record.pop("hardware", None)
    if device.type == "cuda":
        record["gpu"] = torch.cuda.get_device_name(0)
    if args.output:
        Path(args.output).write_text(json.dumps(record, indent=2) + "\n")
        print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
