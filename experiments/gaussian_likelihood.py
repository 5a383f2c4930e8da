"""Gaussian likelihood N(f(z), sigma^2 I) on grey-level MNIST: fixed sigmas against a learned one.

The 784-200-200-50 tanh VAE on MNIST grey levels in [0, 1] (no binarization), with
p(x|z) = N(x; f(z), sigma^2 I).  sigma weighs the reconstruction error against the KL
term: ELBO = -||x - f(z)||^2 / (2 sigma^2) - D log sigma - D/2 log 2 pi - KL(q(z|x) || p(z)).
A small sigma buys sharp reconstructions with a large KL (more information in z); a large
sigma lets the KL collapse and the decoder output blurry averages.  ``learned`` fits one
global sigma by maximising the ELBO.

For each setting: test reconstruction term E_q[log p(x|z)], KL(q(z|x) || p(z)) (Monte
Carlo, from the model and guide traces), ELBO, the squared reconstruction error, and
log p(x).  These are *densities* of continuous grey levels, in nats per image: they are
not comparable with the log-probabilities of binary images (e.g. -86.76 nats), and not
across datasets or preprocessing.

Writes into ``--out-dir``: one run directory per setting, ``results.json``,
``sigma_tradeoff.png`` (reconstruction term and KL against sigma), ``reconstructions.png``
and ``samples.png`` (one row per setting), ``elbo_curves.png``.

Usage::

    python experiments/gaussian_likelihood.py --epochs 50 --sigmas 1 0.3 0.1 0.03
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import common
from matplotlib import pyplot as plt

from pyrovae import mean_and_standard_error, plotting
from pyrovae.errors import ConfigError
from pyrovae.evaluation import elbo_terms
from pyrovae.train import seed_everything

NOT_COMPARABLE = ("log p(x) here is a density of continuous grey levels in [0, 1] (nats per "
                  "image under a Gaussian likelihood); it is not comparable with log-probabilities "
                  "of binarized MNIST such as the published 86.76 nats, nor across likelihoods "
                  "with different supports")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gaussian_likelihood.py",
                                     description=__doc__.split("\n\n")[0])
    common.add_common_arguments(parser, out_dir="runs/gaussian_likelihood", epochs=50,
                                eval_samples=1000)
    parser.add_argument("--sigmas", type=float, nargs="*", default=[1.0, 0.3, 0.1, 0.03],
                        help="fixed sigma values (default: %(default)s)")
    parser.add_argument("--learned-sigma-init", type=float, default=1.0,
                        help="initial sigma of the learned setting (default: %(default)s)")
    parser.add_argument("--no-learned", dest="learned", action="store_false",
                        help="leave out the learned-sigma setting")
    parser.add_argument("--term-samples", type=int, default=10,
                        help="z samples per test image for the reconstruction/KL split "
                             "(default: %(default)s)")
    return parser


def settings(args: argparse.Namespace) -> dict[str, dict[str, object]]:
    named = {f"sigma_{sigma:g}": {"sigma": sigma, "learn_sigma": False} for sigma in args.sigmas}
    if args.learned:
        named["learned"] = {"sigma": args.learned_sigma_init, "learn_sigma": True}
    if not named:
        raise ConfigError("nothing to train: give --sigmas or leave out --no-learned")
    return named


def plot_tradeoff(summaries: Sequence[dict], path: Path) -> None:
    """Reconstruction term and KL against sigma (log axis); the learned sigma is starred."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    ordered = sorted(summaries, key=lambda s: s["sigma"])
    for axis, key, label in ((left, "reconstruction", "E_q[log p(x|z)]"),
                             (right, "kl", "KL(q(z|x) || p(z))")):
        fixed = [s for s in ordered if not s["learn_sigma"]]
        axis.errorbar([s["sigma"] for s in fixed], [s[key] for s in fixed],
                      yerr=[s[f"{key}_standard_error"] for s in fixed], marker="o", capsize=3,
                      label="fixed sigma")
        for s in ordered:
            if s["learn_sigma"]:
                axis.plot([s["sigma"]], [s[key]], marker="*", ms=14, ls="",
                          label=f"learned sigma = {s['sigma']:.3g}")
        axis.set_xscale("log")
        axis.set_xlabel("sigma")
        axis.set_ylabel(f"{label}, nats per image")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    left.set_title("reconstruction term (higher: sharper fit)")
    right.set_title("KL term (higher: more information in z)")
    figure.suptitle("Gaussian likelihood on grey-level MNIST (test set)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    out_dir = Path(args.out_dir)
    device = common.device_of(args)
    shared = {"dataset": "mnist", "binarize": "none", "likelihood": "gaussian"}
    data = common.load_data(common.base_config(args, **shared), device)
    runs, summaries = [], []
    reconstructions, samples = {}, {}
    for name, setting in settings(args).items():
        config = common.base_config(args, **shared, **setting)
        trained, evaluation = common.train_and_evaluate(name, config, data, args)
        seed_everything(args.seed)
        terms = elbo_terms(trained.vae, data.test, num_samples=args.term_samples)
        reconstruction = mean_and_standard_error(terms["reconstruction"])
        kl = mean_and_standard_error(terms["kl"])
        sigma = float(trained.vae.likelihood.sigma.detach())
        seed_everything(args.seed)
        reconstructed = trained.vae.reconstruct(data.test[:10])
        squared_error = ((trained.vae.reconstruct(data.test) - data.test) ** 2).sum(-1)
        runs.append(trained)
        summaries.append(common.run_summary(
            trained, evaluation, setting=f"grey MNIST (a density: not comparable), Gaussian, {name}",
            sigma=sigma, learn_sigma=bool(setting["learn_sigma"]),
            reconstruction=reconstruction.mean,
            reconstruction_standard_error=reconstruction.standard_error,
            kl=kl.mean, kl_standard_error=kl.standard_error,
            squared_error=mean_and_standard_error(squared_error).mean,
            term_samples=args.term_samples, comparable_to_binary=False))
        label = f"sigma={sigma:.3g}" + ("\n(learned)" if setting["learn_sigma"] else "")
        reconstructions[label] = reconstructed
        seed_everything(args.seed)
        samples[label] = trained.vae.sample(10)
    shape = data.image_shape
    plotting.plot_image_rows({"data": data.test[:10], **reconstructions},
                             out_dir / "reconstructions.png", shape,
                             title="test images and E[x|z], z ~ q(z|x)")
    plotting.plot_image_rows(samples, out_dir / "samples.png", shape,
                             title="E[x|z] = f(z), z ~ p(z) (means, no pixel noise)")
    plot_tradeoff(summaries, out_dir / "sigma_tradeoff.png")
    common.plot_elbo_curves(runs, out_dir / "elbo_curves.png",
                            title="Gaussian likelihood, grey-level MNIST")
    figures = ["reconstructions.png", "samples.png", "sigma_tradeoff.png", "elbo_curves.png"]
    common.write_results(out_dir, "gaussian_likelihood", args, summaries, started=started,
                         device=device, figures=figures, dataset="mnist, grey levels in [0, 1]",
                         note=NOT_COMPARABLE,
                         terms="reconstruction = E_q[log p(x|z)], kl = E_q[log q(z|x) - log p(z)], "
                               "Monte Carlo over term_samples draws; ELBO = reconstruction - kl; "
                               "squared_error = ||x - E[x|z]||^2 for one z ~ q(z|x)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return common.run_main(run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
