"""Variational families compared on one model: diagonal, full-covariance and IAF guides.

The IWAE paper's 784-200-200-50 tanh VAE on dynamically binarized MNIST with N(0, I)
prior and Bernoulli likelihood; only q(z|x) changes.  For each guide: test log p(x)
(K importance samples), test ELBO, and the gap log p(x) - ELBO, an estimate of
E_x KL(q(z|x) || p(z|x)) (up to the bias of the K-sample estimate), which a richer guide
should shrink.

Writes into ``--out-dir``: one run directory per guide, ``results.json``,
``elbo_curves.png``, ``gap.png`` (ELBO and log p(x) per guide), ``samples_<guide>.png``,
``reconstructions_<guide>.png``.

Usage::

    python experiments/compare_guides.py --epochs 100 --guides diagonal fullcov iaf
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import common
from matplotlib import pyplot as plt

from pyrovae import GUIDES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="compare_guides.py", description=__doc__.split("\n\n")[0])
    common.add_common_arguments(parser, out_dir="runs/compare_guides", epochs=100)
    parser.add_argument("--guides", nargs="+", default=["diagonal", "fullcov", "iaf"],
                        choices=tuple(GUIDES), help="guides to train (default: %(default)s)")
    parser.add_argument("--num-flows", type=int, default=2,
                        help="IAF steps of the iaf guide (default: %(default)s)")
    return parser


def plot_gap(summaries: Sequence[dict], path: Path) -> None:
    """ELBO and log p(x) per guide, with standard errors; the gap is the distance between."""
    figure, axis = plt.subplots(figsize=(6, 4))
    names = [summary["name"] for summary in summaries]
    positions = range(len(names))
    for key, label, marker in (("test_elbo", "test ELBO", "o"),
                               ("test_log_marginal_likelihood", "test log p(x)", "s")):
        axis.errorbar(positions, [s[key] for s in summaries],
                      yerr=[s[f"{key}_standard_error"] for s in summaries], marker=marker,
                      ls="", capsize=4, label=label)
    for position, summary in zip(positions, summaries, strict=True):
        axis.annotate(f"gap {summary['gap']:.2f}", (position, summary["test_elbo"]),
                      textcoords="offset points", xytext=(8, -4), fontsize=8)
    axis.set_xticks(list(positions), names)
    axis.set_ylabel("nats per image")
    axis.set_title("guides: ELBO vs log p(x)")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    out_dir = Path(args.out_dir)
    device = common.device_of(args)
    shared = {"dataset": "mnist", "binarize": "dynamic", "num_flows": args.num_flows}
    data = common.load_data(common.base_config(args, **shared), device)
    runs, summaries, figures = [], [], []
    for guide in args.guides:
        config = common.base_config(args, guide=guide, **shared)
        trained, evaluation = common.train_and_evaluate(guide, config, data, args)
        runs.append(trained)
        gap = evaluation["log_marginal_likelihood"] - evaluation["test_elbo"]
        summaries.append(common.run_summary(trained, evaluation,
                                            setting=f"dynamic MNIST, {guide} guide", gap=gap))
        figures += common.save_run_figures(trained, data, out_dir, seed=args.seed)
    common.plot_elbo_curves(runs, out_dir / "elbo_curves.png",
                            final={s["name"]: s["test_log_marginal_likelihood"] for s in summaries},
                            title="guides, 784-200-200-50 VAE, dynamically binarized MNIST")
    plot_gap(summaries, out_dir / "gap.png")
    figures += ["elbo_curves.png", "gap.png"]
    common.write_results(out_dir, "compare_guides", args, summaries, started=started,
                         device=device, figures=figures, dataset="mnist, dynamic binarization",
                         gap_definition="test log p(x) - test ELBO, nats per image")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return common.run_main(run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
