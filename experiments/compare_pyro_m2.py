"""Pyro's own semi-supervised M2 example beside pyrovae's ``pyro_m2`` preset: the same labelled
sets, the same validation split, the same budget, Pyro's own code and accuracy.

Pyro's ``examples/vae/ss_vae_M2.py`` is not part of pyrovae and is not copied into it: fetch
Pyro's repository yourself and pass its ``examples/vae`` folder as ``--pyro-examples``.  The
script imports the example's module and runs its ``main`` with the example's own defaults
(``--aux-loss``, multiplier 46, parallel enumeration, 50 latents, one hidden layer of 500,
Adam 4.2e-4 with beta1 0.9, batch 200, 100 where fewer labels than 200) except for two things
it replaces from outside:

* the labelled set: the example draws 10 images per class itself with numpy's global RNG;
  here its ``get_ss_indices_per_class`` is replaced by one that returns the labelled images
  pyrovae's ``--labelled N --seed S`` keeps (:meth:`pyrovae.data.DataSplits.with_labelled` on
  the first 50,000 training images), and the images the example then holds are checked
  against pyrovae's, so both libraries learn from the very same labels;
* the data folder: the example reads MNIST's IDX files from ``--data-dir`` (no download).

Its split (first 50,000 training images to train, last 10,000 to validate), schedule (one
labelled batch every 50000 / N batches), losses and ``get_accuracy`` are its own.  Its log
file gives the validation and test accuracy after every epoch and the test accuracy at the
best validation accuracy, which this script reads back into ``results.json`` per run:
``pyro_m2_<N>_labels_seed<S>/results.json`` under ``--out-dir``.

Without ``--pyro-examples`` (or without the example there) the script says why in one line
and exits with status 0.

Usage::

    git clone https://github.com/pyro-ppl/pyro /tmp/pyro
    python experiments/compare_pyro_m2.py --pyro-examples /tmp/pyro/examples/vae \\
        --labelled 100 3000 --seeds 0 1 2 3 4 --epochs 50

References:

1. Kingma, Rezende, Mohamed, Welling (2014). Semi-Supervised Learning with Deep Generative
   Models. NeurIPS.
2. Pyro's tutorial "The Semi-Supervised VAE" (examples/vae/ss_vae_M2.py).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import statistics
import sys
import tempfile
import time
import types
from argparse import Namespace
from pathlib import Path
from typing import TYPE_CHECKING, Any

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))

# torch, Pyro and pyrovae are imported once the example is known to be there, so that a
# skipped comparison says so at once
if TYPE_CHECKING:
    import torch

#: the example's file, under ``--pyro-examples``
EXAMPLE = "ss_vae_M2.py"
#: Pyro's tutorial, Table 1, "enumerate y + auxiliary loss": test accuracy (%) at the best
#: validation accuracy, mean of 5 labelled sets
PUBLISHED_ACCURACY = {100: 93.19, 3000: 95.82}
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
               "t10k-labels-idx1-ubyte")
EPOCH_LINE = re.compile(r"^(\d+) epoch: .* validation accuracy ([0-9.]+) test accuracy ([0-9.]+)")
FINAL_LINE = re.compile(r"best validation accuracy ([0-9.]+) corresponding testing accuracy "
                        r"([0-9.]+) last testing accuracy ([0-9.]+)")
TRAIN_SIZE, VALID_SIZE = 50_000, 10_000


def batch_size_for(labelled: int, batch_size: int = 200) -> int:
    """The example's batch size for ``labelled`` labels: 200, or the labelled set's size
    where smaller (Pyro's tutorial trains 100 labels in batches of 100)."""
    return min(batch_size, labelled)


def labelled_indices(data_dir: str, labelled: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions among the first 50,000 training images of the labels pyrovae keeps
    with ``--labelled labelled --seed seed``, and those images' grey levels ``(N, 784)``."""
    import torch

    from pyrovae.data import HIDDEN_LABEL, load_dataset

    data = load_dataset("mnist", data_dir, binarize="none", labels=True)
    data = data.with_validation(VALID_SIZE).with_labelled(labelled, seed=seed)
    assert data.train_labels is not None and data.train.shape[0] == TRAIN_SIZE
    kept = torch.nonzero(data.train_labels != HIDDEN_LABEL).flatten()
    return kept, data.train[kept]


def import_example(folder: Path) -> types.ModuleType:
    """Pyro's example module, imported from ``folder`` (its ``utils`` package beside it); the
    plotting-only ``visdom`` it imports is stubbed where it is not installed."""
    sys.path.insert(0, str(folder))
    try:
        importlib.import_module("visdom")
    except ImportError:
        stub = types.ModuleType("visdom")
        stub.Visdom = None  # type: ignore[attr-defined]
        sys.modules["visdom"] = stub
    return importlib.import_module(Path(EXAMPLE).stem)


def mnist_root(data_dir: str, folder: Path) -> Path:
    """A folder laid out as the example's ``MNISTCached`` dataset looks for MNIST
    (``ROOT/MNISTCached/raw``), its files links to those in ``data_dir/MNIST/raw``."""
    raw = folder / "MNISTCached" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in MNIST_FILES:
        source = Path(data_dir) / "MNIST" / "raw" / name
        if not source.is_file():
            raise FileNotFoundError(f"{source} is missing: MNIST's IDX files are needed")
        if not (raw / name).exists():
            os.symlink(source, raw / name)
    return folder


def run_example(example: types.ModuleType, labelled: int, seed: int, epochs: int,
                data_dir: str, log_path: Path, *, aux_loss_multiplier: float = 46.0) -> float:
    """Run the example's ``main`` on pyrovae's labelled set of (``labelled``, ``seed``);
    its log goes to ``log_path``.  Returns the wall-clock seconds."""
    import pyro
    import torch

    cached = importlib.import_module("utils.mnist_cached")
    kept, images = labelled_indices(data_dir, labelled, seed)
    positions = set(kept.tolist())

    def same_labelled_set(y: torch.Tensor, sup_per_class: int) -> tuple[list[int], list[int]]:
        if y.shape[0] != TRAIN_SIZE or sup_per_class * 10 != labelled:
            raise RuntimeError(f"the example asked for {sup_per_class} labels per class of "
                               f"{y.shape[0]} images; expected {labelled // 10} of {TRAIN_SIZE}")
        return kept.tolist(), [i for i in range(TRAIN_SIZE) if i not in positions]

    cached.get_ss_indices_per_class = same_labelled_set
    # the example caches its splits in class attributes: a fresh split for every run
    cached.MNISTCached.train_data_sup = None
    pyro.clear_param_store()
    with tempfile.TemporaryDirectory() as folder:
        root = mnist_root(data_dir, Path(folder))
        original = example.setup_data_loaders

        def setup_data_loaders(*arguments: Any, **options: Any) -> Any:
            loaders = original(*arguments, root=str(root), download=False, **options)
            held = cached.MNISTCached.train_data_sup
            if not torch.allclose(held.cpu(), images, atol=1e-6):
                raise RuntimeError("the example's labelled images differ from pyrovae's")
            return loaders

        example.setup_data_loaders = setup_data_loaders
        options = Namespace(
            cuda=False, jit=False, num_epochs=epochs, aux_loss=True,
            aux_loss_multiplier=aux_loss_multiplier, enum_discrete="parallel",
            sup_num=labelled, z_dim=50, hidden_layers=[500], learning_rate=0.00042,
            beta_1=0.9, batch_size=batch_size_for(labelled), logfile=str(log_path), seed=seed,
            visualize=False)
        started = time.perf_counter()
        try:
            example.main(options)
        finally:
            example.setup_data_loaders = original
    return time.perf_counter() - started


def read_log(path: Path) -> dict[str, Any]:
    """The example's log: validation and test accuracy per epoch, and its final line."""
    validation, test, final = [], [], None
    for line in path.read_text().splitlines():
        if (match := EPOCH_LINE.match(line)) is not None:
            validation.append(float(match[2]))
            test.append(float(match[3]))
        elif (match := FINAL_LINE.search(line)) is not None:
            final = [float(value) for value in match.groups()]
    if final is None or not validation:
        raise RuntimeError(f"{path} has no final accuracy line: the run did not finish")
    # the example keeps the first epoch of the highest validation accuracy (a strict <)
    best = validation.index(max(validation))
    return {"validation_accuracy_per_epoch": validation, "test_accuracy_per_epoch": test,
            "best_validation_epoch": best + 1, "best_validation_accuracy": final[0],
            "test_accuracy_at_best_validation": final[1], "last_test_accuracy": final[2]}


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and standard deviation of the test error over seeds, per number of labels."""
    summary = []
    for labelled in sorted({row["labelled"] for row in rows}):
        errors = [row["test_error_percent"] for row in rows if row["labelled"] == labelled]
        summary.append({
            "labelled": labelled, "runs": len(errors),
            "mean_test_error_percent": statistics.fmean(errors),
            "std_test_error_percent": statistics.stdev(errors) if len(errors) > 1 else None,
            "published_test_error_percent": (round(100 - PUBLISHED_ACCURACY[labelled], 2)
                                             if labelled in PUBLISHED_ACCURACY else None)})
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="compare_pyro_m2.py",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--pyro-examples", type=Path, default=None,
                        help="a fetched copy of Pyro's examples/vae folder (holding "
                             f"{EXAMPLE} and utils/)")
    parser.add_argument("--labelled", type=int, nargs="+", default=[100, 3000],
                        help="numbers of labelled images, multiples of 10 (default: 100 3000)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="labelled sets (pyrovae's --seed) and the example's --seed")
    parser.add_argument("--epochs", type=int, default=50, help="epochs per run (default: 50)")
    parser.add_argument("--aux-loss-multiplier", type=float, default=46.0,
                        help="the example's --aux-loss-multiplier (default: its 46)")
    parser.add_argument("--data-dir", default=str(REPOSITORY.parent / "shared" / "data"),
                        help="folder holding MNIST/raw (default: ../shared/data)")
    parser.add_argument("--out-dir", type=Path,
                        default=REPOSITORY / "experiments" / "results" /
                        "semi_supervised_pyro_preset",
                        help="where pyro_m2_<N>_labels_seed<S>/results.json go")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    args = parser.parse_args(argv)
    folder = args.pyro_examples
    if folder is None or not (folder / EXAMPLE).is_file():
        where = "no --pyro-examples given" if folder is None else f"no {EXAMPLE} in {folder}"
        print(f"skipped: {where}; fetch Pyro's repository and pass its examples/vae folder "
              f"(Pyro's example code is not part of pyrovae)")
        return 0
    bad = [n for n in args.labelled if n < 10 or n % 10]
    if bad:
        parser.error(f"--labelled {bad[0]}: the example needs a positive multiple of 10")
    import pyro
    import torch

    from pyrovae.provenance import provenance

    torch.set_num_threads(args.threads)
    example = import_example(folder.resolve())
    rows = []
    for labelled in args.labelled:
        for seed in args.seeds:
            run_dir = args.out_dir / f"pyro_example_{labelled}_labels_seed{seed}"
            run_dir.mkdir(parents=True, exist_ok=True)
            log_path = run_dir / "pyro_example.log"
            seconds = run_example(example, labelled, seed, args.epochs, args.data_dir,
                                  log_path, aux_loss_multiplier=args.aux_loss_multiplier)
            log = read_log(log_path)
            row = {"library": "pyro example", "labelled": labelled, "seed": seed,
                   "epochs": len(log["validation_accuracy_per_epoch"]),
                   "batch_size": batch_size_for(labelled),
                   "aux_loss_multiplier": args.aux_loss_multiplier,
                   "wall_seconds": seconds, **log,
                   "test_error_percent": 100 * (1 - log["test_accuracy_at_best_validation"]),
                   "pyro_version": pyro.__version__, **provenance("cpu")}
            (run_dir / "results.json").write_text(json.dumps(row, indent=2) + "\n")
            rows.append(row)
            print(f"pyro example, {labelled} labels, seed {seed}: test error "
                  f"{row['test_error_percent']:.2f}% at the best validation accuracy (epoch "
                  f"{log['best_validation_epoch']} of {row['epochs']}, {seconds:.0f} s)",
                  flush=True)
    for line in summarise(rows):
        spread = line["std_test_error_percent"]
        print(f"{line['labelled']} labels: {line['mean_test_error_percent']:.2f}%"
              + (f" ± {spread:.2f}" if spread is not None else "")
              + f" over {line['runs']} runs; Pyro's tutorial "
              f"{line['published_test_error_percent']}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
