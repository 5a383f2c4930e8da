"""Two stochastic layers against one: the IWAE paper's Table 1 architectures at equal budget.

Four runs of ``pyrovae train --preset burda2016`` (dynamically binarized MNIST, batch 20,
the paper's Adam and learning-rate stages, output bias at the data mean), stopped after
``--epochs`` of the protocol's 3280:

* one layer: z (50), x -> 200 -> 200 -> z, z -> 200 -> 200 -> x;
* two layers (``--latent-dims 100 50``): q: x -> 200 -> 200 -> z1 -> 100 -> 100 -> z2,
  p: z2 -> 100 -> 100 -> z1 -> 200 -> 200 -> x;

each trained with the ELBO (VAE) and with the IWAE bound at k = 5.  Each run is evaluated
on the first ``--eval-size`` test images with K = ``--eval-samples`` importance samples
(``pyrovae evaluate --report``), with its active units per layer (Cov_x E_q[z_u | x] > 0.01,
as the paper counts them).  Published (Burda et al. 2016, Table 1, K = 5000 on all 10,000
test images, 3280 epochs): one layer VAE -86.76 / IWAE k=5 -85.54; two layers -85.33 / -83.89.

Commands::

    python experiments/hierarchical.py                 # the budget of the results table
    python experiments/hierarchical.py --epochs 3280 --eval-samples 5000 --eval-size 10000
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import arviz
import cli_runs
import numpy as np

from pyrovae.report import NETCDF_NAME

#: Burda et al. (2016), Table 1: test log p(x) (K = 5000) and active units (their counts)
PUBLISHED = {
    "one_layer_vae": {"log_px": -86.76, "active_units": "19"},
    "one_layer_iwae5": {"log_px": -85.54, "active_units": "22"},
    "two_layer_vae": {"log_px": -85.33, "active_units": "16+5"},
    "two_layer_iwae5": {"log_px": -83.89, "active_units": "21+5"},
}
RUNS = {
    "one_layer_vae": [],
    "one_layer_iwae5": ["--objective", "iwae", "--num-particles", "5"],
    "two_layer_vae": ["--latent-dims", "100", "50"],
    "two_layer_iwae5": ["--latent-dims", "100", "50", "--objective", "iwae",
                        "--num-particles", "5"],
}


def iwae_bound(report: dict[str, Any], num_samples: int) -> dict[str, float]:
    """The IWAE_K row of a ``report.json``: mean and standard error over points (nats)."""
    for row in report["bounds"]:
        if row["estimator"] == "IWAE" and row["num_samples"] == num_samples:
            return {"mean": row["mean"], "standard_error": row["standard_error"]}
    raise KeyError(f"report has no IWAE bound at K={num_samples}")


def per_point_log_px(run_dir: Path) -> np.ndarray:
    """The run's per-point IWAE_K estimates of log p(x) (nats) from its ``diagnostics.nc``."""
    data = arviz.from_netcdf(str(run_dir / NETCDF_NAME))
    return np.asarray(data["sample_stats"]["log_marginal_likelihood"]).reshape(-1)


def paired_difference(better: np.ndarray, worse: np.ndarray) -> dict[str, float]:
    """Mean and standard error of the per-point difference of two models' log p(x) on the same
    test images (nats): the points' own spread cancels, so it is far tighter than the two
    standard errors side by side."""
    difference = better - worse
    return {"mean": float(difference.mean()),
            "standard_error": float(difference.std(ddof=1) / math.sqrt(difference.size)),
            "fraction_of_points_higher": float((difference > 0).mean())}


def run(args: argparse.Namespace) -> int:
    rows = []
    for name, flags in RUNS.items():
        run_dir = args.runs_dir / name
        seconds = cli_runs.train(run_dir, ["--preset", "burda2016", *flags], args)
        report = cli_runs.report(run_dir, args)
        usage = report["latent_usage"]
        log_px = iwae_bound(report, args.eval_samples)
        rows.append({
            "run": name, "flags": " ".join(["--preset", "burda2016", *flags]),
            "epochs": cli_runs.epochs_done(run_dir), "train_seconds": seconds,
            "test_log_marginal_likelihood": log_px["mean"],
            "test_log_marginal_likelihood_standard_error": log_px["standard_error"],
            "test_elbo": report["bounds"][0]["mean"],
            "active_units": {site: entry["active_units"] for site, entry in usage["sites"].items()},
            "mutual_information": usage["mutual_information"],
            "fraction_khat_above_threshold":
                report["diagnostics"]["num_unreliable"] / report["num_points"],
            "published_log_marginal_likelihood": PUBLISHED[name]["log_px"],
            "published_active_units": PUBLISHED[name]["active_units"],
        })
        print(f"{name}: log p(x) {log_px['mean']:.2f} ± {log_px['standard_error']:.2f} nats "
              f"(K={args.eval_samples}, {args.eval_size} test images), active units "
              f"{'+'.join(str(n) for n in rows[-1]['active_units'].values())} after "
              f"{rows[-1]['epochs']} epochs; published {PUBLISHED[name]['log_px']}", flush=True)
    by_name = {row["run"]: row["test_log_marginal_likelihood"] for row in rows}
    two_beats_one = {objective: by_name[f"two_layer_{objective}"] > by_name[f"one_layer_{objective}"]
                     for objective in ("vae", "iwae5")}
    # the same test images under both depths: the per-point difference and its standard error
    differences = {objective: paired_difference(
        per_point_log_px(args.runs_dir / f"two_layer_{objective}"),
        per_point_log_px(args.runs_dir / f"one_layer_{objective}"))
        for objective in ("vae", "iwae5")}
    path = cli_runs.write_results(args.out_dir, "hierarchical", args,
                                  {"protocol": "burda2016 preset, stopped early", "runs": rows,
                                   "two_layers_beat_one": two_beats_one,
                                   "two_minus_one_layer_log_px": differences})
    for objective, difference in differences.items():
        print(f"{objective}: two layers minus one, per test image: {difference['mean']:+.2f} ± "
              f"{difference['standard_error']:.2f} nats (higher on "
              f"{100 * difference['fraction_of_points_higher']:.0f}% of the images)")
    print(f"two layers beat one: {two_beats_one}; written to {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hierarchical.py", description=__doc__.split("\n\n")[0])
    cli_runs.add_arguments(parser, name="hierarchical", epochs=5,
                           eval_samples=1000, test_size=2000)
    return cli_runs.main(run, parser, argv)


if __name__ == "__main__":
    sys.exit(main())
