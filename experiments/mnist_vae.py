"""The IWAE paper's one-stochastic-layer model on dynamically binarized MNIST.

784-200-200-50 tanh MLPs, Bernoulli likelihood, diagonal Gaussian guide, N(0, I) prior,
Adam, trained with the ELBO (``trace_elbo``) and with the K-sample IWAE bound
(``iwae5``, ``iwae50``); test log p(x) by importance sampling with K = 5000.

Published (Burda et al. 2016, Table 1, MNIST, 3280 passes with a decaying learning rate):
VAE 86.76 nats, IWAE k=5 85.54, IWAE k=50 84.78 (negative test log-likelihood).  By
default Adam's learning rate stays at ``--lr``; ``--lr-schedule iwae --epochs 3280`` follows
the paper's schedule (3^i epochs at 0.001 * 10^(-i/7), i = 0..7; their Adam eps of 1e-4 is
not copied).

Writes into ``--out-dir``: one pyrovae run directory per objective, ``results.json``,
``elbo_curves.png`` (test ELBO per epoch, final log p(x), published values as dashed
lines), ``samples_<objective>.png`` and ``reconstructions_<objective>.png``.

Usage::

    python experiments/mnist_vae.py --epochs 100 --objectives trace_elbo iwae5 iwae50
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import common

from pyrovae.activity import active_units
from pyrovae.errors import ConfigError

#: published test log p(x) in nats (minus the reported NLL) per objective
PUBLISHED = {"trace_elbo": -86.76, "iwae5": -85.54, "iwae50": -84.78}
#: the same table's active units (Cov_x E_q[z_u | x] > 0.01) of those models
PUBLISHED_ACTIVE_UNITS = {"trace_elbo": 19, "iwae5": 22, "iwae50": 25}


def objective_settings(name: str) -> dict[str, object]:
    """``trace_elbo`` / ``meanfield_elbo`` / ``iwae<K>`` as TrainConfig fields."""
    if name in ("trace_elbo", "meanfield_elbo"):
        return {"objective": name, "num_particles": 1}
    match = re.fullmatch(r"iwae(\d+)", name)
    if match is None or int(match.group(1)) < 1:
        raise ConfigError(f"unknown objective {name!r}; use trace_elbo, meanfield_elbo or iwaeK "
                          f"(e.g. iwae5)")
    return {"objective": "iwae", "num_particles": int(match.group(1))}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mnist_vae.py", description=__doc__.split("\n\n")[0])
    common.add_common_arguments(parser, out_dir="runs/mnist_vae", epochs=100, log_px_every=10)
    parser.add_argument("--objectives", nargs="+", default=["trace_elbo", "iwae5", "iwae50"],
                        help="training objectives: trace_elbo, meanfield_elbo, iwaeK "
                             "(default: %(default)s)")
    return parser


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    out_dir = Path(args.out_dir)
    device = common.device_of(args)
    settings = {name: objective_settings(name) for name in args.objectives}
    data = common.load_data(common.base_config(args), device)
    runs, summaries, final, figures = [], [], {}, []
    for name, setting in settings.items():
        config = common.base_config(args, dataset="mnist", binarize="dynamic", **setting)
        trained, evaluation = common.train_and_evaluate(name, config, data, args)
        runs.append(trained)
        final[name] = evaluation["log_marginal_likelihood"]
        summaries.append(common.run_summary(
            trained, evaluation, setting=f"dynamic MNIST, {name}",
            published=PUBLISHED.get(name), source=common.BURDA_2016 if name in PUBLISHED else None,
            active_units=active_units(trained.vae, data.test),
            published_active_units=PUBLISHED_ACTIVE_UNITS.get(name),
            published_active_units_source=common.BURDA_2016 if name in PUBLISHED else None))
        figures += common.save_run_figures(trained, data, out_dir, seed=args.seed)
    common.plot_elbo_curves(runs, out_dir / "elbo_curves.png", published=PUBLISHED, final=final,
                            title="784-200-200-50 VAE, dynamically binarized MNIST")
    figures.append("elbo_curves.png")
    common.write_results(out_dir, "mnist_vae", args, summaries, started=started, device=device,
                         figures=figures, dataset="mnist, dynamic binarization")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return common.run_main(run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
