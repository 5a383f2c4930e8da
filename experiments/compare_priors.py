"""Priors compared on statically binarized MNIST: N(0, I), mixture of Gaussians, VampPrior,
autoregressive flow.

The same 784-200-200 tanh encoder/decoder, Bernoulli likelihood and diagonal guide for
every prior, 40 latent dimensions, on the fixed Larochelle & Murray binarization
(``binarized_mnist.npz``: 50,000 train, 10,000 test).

Published (Tomczak & Welling 2018, one stochastic layer, 40 latents, static MNIST):
VampPrior 85.57 nats, standard normal prior about 88.5 (negative test log-likelihood).
Their networks were gated MLPs of 300 units with 100 epochs of KL warm-up and 500
pseudo-inputs; here the MLP is the IWAE paper's, and warm-up is ``--kl-warmup-epochs``
(10 by default, for every prior).  The learned priors need it: without warm-up a VampPrior
run can settle on the factorised-Bernoulli plateau (ELBO -206.5 nats) in its first epoch,
every code at one point, because the prior follows the codes as they contract.

Writes into ``--out-dir``: one run directory per prior, ``results.json``,
``elbo_curves.png``, ``samples_<prior>.png``, ``reconstructions_<prior>.png``.

Usage::

    python experiments/compare_priors.py --epochs 100 --priors normal mog vamp flow
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import common

from pyrovae import PRIORS

#: published test log p(x) in nats per prior (Tomczak & Welling 2018)
PUBLISHED = {"normal": -88.5, "vamp": -85.57}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="compare_priors.py", description=__doc__.split("\n\n")[0])
    common.add_common_arguments(parser, out_dir="runs/compare_priors", epochs=100, latent_dim=40)
    parser.add_argument("--priors", nargs="+", default=["normal", "mog", "vamp", "flow"],
                        choices=tuple(PRIORS), help="priors to train (default: %(default)s)")
    parser.add_argument("--num-components", type=int, default=500,
                        help="mixture components (mog) and pseudo-inputs (vamp) (default: %(default)s)")
    parser.add_argument("--prior-flows", type=int, default=4,
                        help="autoregressive steps of the flow prior (default: %(default)s)")
    parser.add_argument("--kl-warmup-epochs", type=int, default=10,
                        help="linear KL warm-up over this many epochs, the same for every prior "
                             "(default: %(default)s)")
    return parser


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    out_dir = Path(args.out_dir)
    device = common.device_of(args)
    shared = {"dataset": "binarized_mnist", "binarize": "static",
              "num_components": args.num_components, "prior_flows": args.prior_flows,
              "kl_warmup_epochs": args.kl_warmup_epochs}
    data = common.load_data(common.base_config(args, **shared), device)
    runs, summaries, final, figures = [], [], {}, []
    for prior in args.priors:
        config = common.base_config(args, prior=prior, **shared)
        trained, evaluation = common.train_and_evaluate(prior, config, data, args)
        runs.append(trained)
        final[prior] = evaluation["log_marginal_likelihood"]
        summaries.append(common.run_summary(
            trained, evaluation, setting=f"static MNIST, {prior} prior",
            published=PUBLISHED.get(prior),
            source=common.TOMCZAK_2018 if prior in PUBLISHED else None))
        figures += common.save_run_figures(trained, data, out_dir, seed=args.seed)
    common.plot_elbo_curves(runs, out_dir / "elbo_curves.png", published=PUBLISHED, final=final,
                            title=f"priors, static MNIST, {args.latent_dim} latents")
    figures.append("elbo_curves.png")
    common.write_results(out_dir, "compare_priors", args, summaries, started=started,
                         device=device, figures=figures,
                         dataset="binarized_mnist (Larochelle & Murray 2011 static binarization)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return common.run_main(run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
