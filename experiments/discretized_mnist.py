"""Grey-level (8-bit) MNIST in bits per dimension: discretized likelihoods against a Gaussian.

The 784-200-200-50 tanh VAE on MNIST's 8-bit grey levels k/255 (no binarization), with

- ``discretized_logistic``: a logistic per pixel (location and log-scale from the decoder)
  integrated over the pixel value's bin, the bins of 0 and 255 taking the tails
  (``--likelihood discretized_logistic``, Kingma et al. 2016, Salimans et al. 2017);
- ``discretized_gaussian``: the same with a Gaussian per pixel;
- ``gaussian_pixel``: the continuous Gaussian N(f(z), diag sigma^2), one learned sigma per
  pixel, trained on the same data as a density.  Its log p(x) in nats is a density of
  continuous values and is not comparable with the others; for a comparison in bits/dim
  the trained model is scored as the discrete model it implies, each pixel's Gaussian
  integrated over the pixel value's bin (:class:`BinnedGaussian`), with the same guide.

Every setting reports the test ELBO and log p(x) (importance sampled, K = ``--eval-samples``)
in nats and in bits per dimension, -log p(x) / (784 ln 2): the unit image models report.

Writes into ``--out-dir``: one run directory per setting, ``results.json`` and
``reconstructions.png`` (test images and E[x|z], one row per setting).

Usage::

    python experiments/discretized_mnist.py --epochs 10 --eval-samples 100
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import common
import pyro.distributions as dist
import torch

from pyrovae import plotting, runs
from pyrovae.errors import ConfigError
from pyrovae.likelihoods import DiscretizedGaussian, Likelihood, PixelGaussianLikelihood
from pyrovae.train import seed_everything

#: the settings by name: their likelihood
SETTINGS = {"discretized_logistic": "discretized_logistic",
            "discretized_gaussian": "discretized_gaussian",
            "gaussian_pixel": "gaussian_pixel"}


class BinnedGaussian(Likelihood):
    """A trained :class:`~pyrovae.likelihoods.PixelGaussianLikelihood` as the discrete model it
    implies on 8-bit data: each pixel's N(f_d(z), sigma_d^2) integrated over its value's bin,
    the edge bins taking the tails (:class:`~pyrovae.likelihoods.DiscretizedGaussian`)."""

    num_levels = 256

    def __init__(self, continuous: PixelGaussianLikelihood) -> None:
        super().__init__()
        self.continuous = continuous

    def forward(self, params: torch.Tensor) -> dist.Distribution:
        log_sigma = self.continuous.sigma.log()
        return DiscretizedGaussian(params, log_sigma.expand_as(params)).to_event(1)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return self(params).base_dist.mean


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="discretized_mnist.py",
                                     description=__doc__.split("\n\n")[0])
    common.add_common_arguments(parser, out_dir="runs/discretized_mnist", epochs=10,
                                eval_samples=100)
    parser.add_argument("--settings", nargs="+", choices=tuple(SETTINGS), default=list(SETTINGS),
                        help="which likelihoods to train (default: all)")
    return parser


def binned_evaluation(run: runs.Run, x: torch.Tensor, *, num_samples: int, seed: int) -> dict:
    """The test ELBO and log p(x) of ``run``'s continuous Gaussian model scored as the
    discrete model it implies (:class:`BinnedGaussian`), with the same decoder and guide."""
    vae = run.vae
    continuous = vae.likelihood
    if not isinstance(continuous, PixelGaussianLikelihood):
        raise ConfigError(f"{run.name}: the binned score is for the per-pixel Gaussian")
    vae.likelihood = BinnedGaussian(continuous)
    try:
        seed_everything(seed)
        results = runs.evaluate_vae(vae, x, num_samples=num_samples)
    finally:
        vae.likelihood = continuous
    return results


def summary_of(trained: runs.Run, evaluation: dict, binned: dict | None) -> dict:
    discrete = binned if binned is not None else evaluation
    extra = {"log_px_bits_per_dim": discrete["log_marginal_likelihood_bits_per_dim"],
             "log_px_bits_per_dim_standard_error":
                 discrete["log_marginal_likelihood_bits_per_dim_standard_error"],
             "elbo_bits_per_dim": discrete["test_elbo_bits_per_dim"]}
    if binned is not None:
        extra.update(binned_log_marginal_likelihood=binned["log_marginal_likelihood"],
                     binned_test_elbo=binned["test_elbo"],
                     note="trained as a density; bits/dim of its Gaussians integrated over "
                          "each 8-bit bin; its log p(x) in nats is a density, not comparable")
    return common.run_summary(trained, evaluation, setting=f"grey 8-bit MNIST, {trained.name}",
                              **extra)


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    out_dir = Path(args.out_dir)
    device = common.device_of(args)
    shared = {"dataset": "mnist", "binarize": "none"}
    data = common.load_data(common.base_config(args, **shared, likelihood="gaussian"), device)
    summaries, reconstructions = [], {}
    for name in args.settings:
        config = common.base_config(args, **shared, likelihood=SETTINGS[name])
        trained, evaluation = common.train_and_evaluate(name, config, data, args)
        binned = None
        if name == "gaussian_pixel":
            binned = binned_evaluation(trained, data.test, num_samples=args.eval_samples,
                                       seed=args.seed)
        summary = summary_of(trained, evaluation, binned)
        summaries.append(summary)
        print(f"[{name}] test log p(x) {summary['log_px_bits_per_dim']:.4f} ± "
              f"{summary['log_px_bits_per_dim_standard_error']:.4f} bits/dim "
              f"(K={args.eval_samples}, {evaluation['num_test_points']} test images, "
              f"{len(trained.history)} epochs, {trained.train_seconds:.0f} s)", file=sys.stderr)
        seed_everything(args.seed)
        reconstructions[name] = trained.vae.reconstruct(data.test[:10])
    plotting.plot_image_rows({"data": data.test[:10], **reconstructions},
                             out_dir / "reconstructions.png", data.image_shape,
                             title="test images and E[x|z], z ~ q(z|x)")
    common.write_results(out_dir, "discretized_mnist", args, summaries, started=started,
                         device=device, figures=["reconstructions.png"],
                         bits_per_dim="-log p(x) / (784 ln 2) of the discrete models; the "
                                      "gaussian_pixel row's is its binned score")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return common.run_main(run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
