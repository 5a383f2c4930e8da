"""Kingma et al. (2014)'s M2 with 100 and 3000 labels: test error of q(y | x) and log p(x).

Each run is ``pyrovae train --model semi_supervised --labelled N`` on dynamically binarized
MNIST: N training labels kept (balanced over the ten digits, chosen by the seed), the rest
hidden and summed out by enumeration in the ELBO; the classification term alpha log q(y | x)
at the paper's alpha = 0.1 N_train / N_labelled per labelled image; networks as in the paper
(one hidden layer of 500 softplus units in q(y | x), q(z | x, y) and p(x | y, z), 50 latents);
Adam at 3e-4, minibatch 200.  The test classification error is that of argmax q(y | x) on
all 10,000 test images; log p(x) sums y exactly (K importance samples per class) on the
first ``--eval-size`` test images.

Published (Kingma et al. 2014, Table 1, M2): 11.97% (+- 1.71) test error with 100 labels and
3.92% with 3000, after training to convergence.

With ``--preset pyro_m2`` the runs follow Pyro's ``examples/vae/ss_vae_M2.py`` instead
(:data:`pyrovae.config.PRESETS`: grey levels under the Bernoulli likelihood, the auxiliary
loss at 46 per labelled image, one batch of labelled images every 50000 / N batches, Adam at
4.2e-4, batch 200, or N where fewer labels): trained on the first 50,000 training images,
every epoch's checkpoint kept, the validation and test error of each epoch computed on all
10,000 validation and test images, and the test error reported at the best validation
accuracy (the first epoch that reaches it), as Pyro's tutorial reports it.  Each run's
``results.json`` and that epoch's checkpoint (without the optimizer's state) are banked in
``--out-dir``/``pyro_m2_<N>_labels_seed<S>``; ``pyrovae evaluate CHECKPOINT --num-samples 1``
recomputes its test error.  Flags the script does not know go to ``pyrovae train``, e.g.
``--alpha none`` (Kingma et al.'s weight), ``--binarize dynamic --likelihood bernoulli``.

Commands::

    python experiments/semi_supervised.py                        # the results table's budget
    python experiments/semi_supervised.py --seeds 0 1 2 --epochs 100
    python experiments/semi_supervised.py --preset pyro_m2 --seeds 0 1 2 3 4   # 50 epochs
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cli_runs
import torch

from pyrovae.checkpoint import history_checkpoints, load_vae, read_checkpoint
from pyrovae.labels import classification_error
from pyrovae.runs import load_run_data

#: Kingma et al. (2014), Table 1: M2's MNIST test error (%) by the number of labels
PUBLISHED_ERROR = {100: 11.97, 3000: 3.92}
FLAGS = ["--model", "semi_supervised", "--hidden-dims", "500", "--latent-dim", "50",
         "--activation", "softplus", "--lr", "3e-4", "--batch-size", "200",
         "--binarize", "dynamic"]
TEST_IMAGES = 10_000
#: Pyro's tutorial, Table 1, "enumerate y + auxiliary loss": test error (%) at the best
#: validation accuracy, mean of 5 labelled sets (accuracy 93.19% and 95.82%)
PYRO_TUTORIAL_ERROR = {100: 6.81, 3000: 4.18}
#: the preset runs' file of per-epoch validation and test errors, in the run directory
CURVE_NAME = "classification_curve.json"


def run(args: argparse.Namespace) -> int:
    rows, summaries = [], []
    for labelled in args.labelled:
        errors = []
        for seed in args.seeds:
            name = f"m2_{labelled}_labels_seed{seed}"
            run_dir = args.runs_dir / name
            seconds = cli_runs.train(run_dir, [*FLAGS, "--labelled", str(labelled)],
                                     args, seed=seed)
            # K = 1 on every test image gives the classification error cheaply
            classified = cli_runs.evaluate(run_dir, args, num_samples=1,
                                           test_size=min(TEST_IMAGES, args.classify_size),
                                           name="classification.json")
            evaluation = cli_runs.evaluate(run_dir, args)
            error = 100 * classified["test_classification_error"]
            errors.append(error)
            rows.append({
                "run": name, "labelled": labelled, "seed": seed,
                "epochs": cli_runs.epochs_done(run_dir), "train_seconds": seconds,
                "test_classification_error_percent": error,
                "num_classified": classified["num_test_points"],
                "test_log_marginal_likelihood": evaluation["log_marginal_likelihood"],
                "test_log_marginal_likelihood_standard_error":
                    evaluation["log_marginal_likelihood_standard_error"],
                "test_elbo_of_x_and_y": evaluation["test_elbo"],
                "published_error_percent": PUBLISHED_ERROR.get(labelled),
            })
            print(f"{name}: test error {error:.2f}% ({classified['num_test_points']} images), "
                  f"log p(x) {evaluation['log_marginal_likelihood']:.2f} ± "
                  f"{evaluation['log_marginal_likelihood_standard_error']:.2f} nats after "
                  f"{rows[-1]['epochs']} epochs", flush=True)
        spread = statistics.stdev(errors) if len(errors) > 1 else None
        summaries.append({"labelled": labelled, "seeds": list(args.seeds),
                     "mean_error_percent": statistics.fmean(errors),
                     "std_error_percent": spread,
                     "published_error_percent": PUBLISHED_ERROR.get(labelled)})
    path = cli_runs.write_results(args.out_dir, "semi_supervised", args,
                                  {"flags": " ".join(FLAGS), "runs": rows,
                                   "summary": summaries})
    for summary in summaries:
        spread = summary["std_error_percent"]
        print(f"{summary['labelled']} labels: test error {summary['mean_error_percent']:.2f}%"
              + (f" ± {spread:.2f}" if spread is not None else "")
              + f" over seeds {summary['seeds']}; published {summary['published_error_percent']}%")
    print(f"written to {path}")
    return 0


def preset_batch_size(labelled: int) -> int:
    """The batch of Pyro's example for ``labelled`` labels: 200, or ``labelled`` where
    fewer, so that the labelled images fill whole batches (100 labels: batches of 100)."""
    return min(200, labelled)


def classification_curve(run_dir: Path) -> list[dict[str, Any]]:
    """Each kept epoch checkpoint's classification error (argmax q(y|x)) on all validation
    and test images of the run's data, oldest first; cached in ``run_dir/CURVE_NAME``."""
    path = run_dir / CURVE_NAME
    cached = {row["epoch"]: row for row in json.loads(path.read_text())} if path.is_file() \
        else {}
    data = None
    rows = []
    for checkpoint in history_checkpoints(run_dir):
        epoch = int(checkpoint.stem.split("-")[1])
        if epoch not in cached:
            m2, config, _ = load_vae(checkpoint)
            if data is None:
                _, data = load_run_data(config, torch.device("cpu"))
            cached[epoch] = {
                "epoch": epoch,
                "validation_error": classification_error(m2, data.valid, data.valid_labels),
                "test_error": classification_error(m2, data.test, data.test_labels)}
        rows.append(cached[epoch])
    path.write_text(json.dumps(rows, indent=1) + "\n")
    return rows


def bank_checkpoint(source: Path, destination: Path) -> None:
    """Copy the checkpoint ``source`` to ``destination`` without the optimizer's moments
    (a third of its size): enough to evaluate it, not to resume it.  A banked copy of the
    same epoch is left as it is, so a rerun does not rewrite a committed file."""
    checkpoint = read_checkpoint(source)
    if destination.is_file() and read_checkpoint(destination)["epoch"] == checkpoint["epoch"]:
        return
    checkpoint["optimizer"] = {}
    destination.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, destination)


def run_preset(args: argparse.Namespace) -> int:
    rows = []
    for labelled in args.labelled:
        for seed in args.seeds:
            name = f"{args.preset}_{labelled}_labels_seed{seed}"
            run_dir = args.runs_dir / name
            flags = ["--model", "semi_supervised", "--preset", args.preset, "--labelled",
                     str(labelled), "--batch-size", str(preset_batch_size(labelled)),
                     "--keep-last", str(max(args.epochs, 1000))]
            seconds = cli_runs.train(run_dir, flags, args, seed=seed)
            curve = classification_curve(run_dir)
            best = min(curve, key=lambda row: row["validation_error"])  # the first such epoch
            banked = args.out_dir / name
            bank_checkpoint(run_dir / "checkpoints" / f"epoch-{best['epoch']:04d}.pt",
                            banked / "checkpoint.pt")
            row = {
                "run": name, "labelled": labelled, "seed": seed, "epochs": len(curve),
                "train_seconds": seconds, "best_validation_epoch": best["epoch"],
                "validation_error_percent": 100 * best["validation_error"],
                "test_error_percent": 100 * best["test_error"],
                "last_test_error_percent": 100 * curve[-1]["test_error"],
                "validation_error_percent_per_epoch": [100 * r["validation_error"]
                                                       for r in curve],
                "test_error_percent_per_epoch": [100 * r["test_error"] for r in curve],
                "train_flags": " ".join([*flags, *args.train_flags]),
                "checkpoint": "checkpoint.pt (the best validation epoch's, no optimizer state)",
                "pyro_tutorial_error_percent": PYRO_TUTORIAL_ERROR.get(labelled),
                "kingma_error_percent": PUBLISHED_ERROR.get(labelled),
            }
            if args.eval_samples:
                evaluation = _evaluate_banked(banked, args)
                row.update({
                    "test_log_marginal_likelihood": evaluation["log_marginal_likelihood"],
                    "test_log_marginal_likelihood_standard_error":
                        evaluation["log_marginal_likelihood_standard_error"],
                    "log_marginal_likelihood_samples_per_class": evaluation["num_samples"],
                    "log_marginal_likelihood_test_images": evaluation["num_test_points"]})
            (banked / "results.json").write_text(json.dumps(row, indent=2) + "\n")
            rows.append(row)
            print(f"{name}: test error {row['test_error_percent']:.2f}% at the best validation "
                  f"accuracy (epoch {best['epoch']} of {len(curve)}); validation error per "
                  f"epoch " + " ".join(f"{e:.1f}" for e in
                                       row["validation_error_percent_per_epoch"]), flush=True)
    summaries = []
    for labelled in args.labelled:
        errors = [row["test_error_percent"] for row in rows if row["labelled"] == labelled]
        summaries.append({"labelled": labelled, "seeds": list(args.seeds),
                          "mean_test_error_percent": statistics.fmean(errors),
                          "std_test_error_percent": statistics.stdev(errors)
                          if len(errors) > 1 else None,
                          "pyro_tutorial_error_percent": PYRO_TUTORIAL_ERROR.get(labelled),
                          "kingma_error_percent": PUBLISHED_ERROR.get(labelled)})
    path = cli_runs.write_results(args.out_dir, f"semi_supervised --preset {args.preset}", args,
                                  {"runs": rows, "summary": summaries})
    print(f"written to {path}")
    return 0


def _evaluate_banked(banked: Path, args: argparse.Namespace) -> dict[str, Any]:
    """``pyrovae evaluate`` of the banked checkpoint (K = ``args.eval_samples`` per class on
    the first ``args.eval_size`` test images) into ``banked/evaluation.json``, read back;
    reused when one with the same K and points is there."""
    path = banked / "evaluation.json"
    if path.is_file():
        previous = json.loads(path.read_text())
        if previous.get("num_samples") == args.eval_samples and \
                previous.get("num_test_points") == args.eval_size and \
                path.stat().st_mtime >= (banked / "checkpoint.pt").stat().st_mtime:
            return previous
    cli_runs.pyrovae("evaluate", str(banked / "checkpoint.pt"), "--num-samples",
                     str(args.eval_samples), "--test-size", str(args.eval_size),
                     "--data-dir", args.data_dir, "--device", args.device, "--no-progress",
                     "--output", str(path), threads=args.threads)
    # the command's lock beside the checkpoint is no result: not banked
    (banked / ".pyrovae.lock").unlink(missing_ok=True)
    return json.loads(path.read_text())


def main(argv: Sequence[str] | None = None) -> int:
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--preset", choices=["pyro_m2"], default=None)
    preset = first.parse_known_args(argv)[0].preset
    parser = argparse.ArgumentParser(prog="semi_supervised.py",
                                     description=__doc__.split("\n\n")[0])
    if preset is None:
        cli_runs.add_arguments(parser, name="semi_supervised", epochs=10, eval_samples=100,
                               test_size=1000)
    else:
        cli_runs.add_arguments(parser, name="semi_supervised_pyro_preset", epochs=50,
                               eval_samples=0, test_size=1000)
    parser.add_argument("--preset", choices=["pyro_m2"], default=None,
                        help="pyro_m2: Pyro's example's protocol, the test error at the best "
                             "validation accuracy (default: Kingma et al.'s settings above, "
                             "the last epoch)")
    parser.add_argument("--labelled", type=int, nargs="+", default=[100, 3000],
                        help="numbers of labelled training images (default: 100 3000)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="seeds per number of labels (default: 0)")
    parser.add_argument("--classify-size", type=int, default=TEST_IMAGES,
                        help="test images for the classification error (default: all 10000)")
    return cli_runs.main(run if preset is None else run_preset, parser, argv)


if __name__ == "__main__":
    sys.exit(main())
