"""A VAE with a two-dimensional latent space on dynamically binarized MNIST, drawn.

Three pictures of the learned latent space, after Kingma & Welling (2014), Fig. 4:

- ``latent_means.png``: the guide's mean E_q[z|x] of every test image, coloured by its
  digit (labels: torchvision's MNIST test targets; the test split keeps MNIST's order);
- ``manifold.png``: decoded E[x|z] on a grid of z whose coordinates are the inverse normal
  CDF of equally spaced probabilities, so that under the N(0, I) prior every cell holds
  equal prior mass;
- ``interpolations.png``: E[x|z] along straight lines between the latent means of pairs
  of test digits.

Also ``results.json`` (test log p(x) and ELBO), ``elbo_curves.png``, samples and
reconstructions.

Usage::

    python experiments/latent_space.py --epochs 50

References:

1. Kingma, Welling (2014). Auto-Encoding Variational Bayes. ICLR.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import common
import torch
from matplotlib import pyplot as plt

from pyrovae import plotting
from pyrovae.data import resolve_data_dir
from pyrovae.errors import ConfigError
from pyrovae.models import VAE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latent_space.py", description=__doc__.split("\n\n")[0])
    common.add_common_arguments(parser, out_dir="runs/latent_space", epochs=50, latent_dim=2)
    parser.add_argument("--grid-size", type=int, default=20,
                        help="images per side of the manifold grid (default: %(default)s)")
    parser.add_argument("--interpolation-steps", type=int, default=10,
                        help="images per interpolation, ends included (default: %(default)s)")
    return parser


def mnist_test_labels(data_dir: str | None, count: int) -> torch.Tensor:
    """The digit labels of the first ``count`` MNIST test images."""
    from torchvision.datasets import MNIST

    root, _ = resolve_data_dir(data_dir)
    return MNIST(str(root), train=False, download=False).targets[:count]


def plot_latent_means(z: torch.Tensor, labels: torch.Tensor, path: Path) -> None:
    figure, axis = plt.subplots(figsize=(6.5, 5.5))
    points = axis.scatter(z[:, 0], z[:, 1], c=labels, cmap="tab10", vmin=-0.5, vmax=9.5, s=3,
                          alpha=0.7, rasterized=True)
    figure.colorbar(points, ax=axis, ticks=range(10), label="digit")
    axis.set_xlabel("z_1")
    axis.set_ylabel("z_2")
    axis.set_title(f"E_q[z | x] of {len(z)} test images")
    figure.tight_layout()
    figure.savefig(path, dpi=150)
    plt.close(figure)


@torch.no_grad()
def manifold(vae: VAE, grid_size: int) -> torch.Tensor:
    """E[x|z] on the grid z = (Phi^-1(p_i), Phi^-1(p_j)), p equally spaced in (0, 1).

    :returns: ``(grid_size ** 2, data_dim)``, rows of increasing z_2 from the top, z_1 left
        to right.
    """
    probabilities = (torch.arange(grid_size, dtype=torch.float32) + 0.5) / grid_size
    coordinates = torch.distributions.Normal(0.0, 1.0).icdf(probabilities)
    z2, z1 = torch.meshgrid(coordinates.flip(0), coordinates, indexing="ij")
    z = torch.stack([z1.flatten(), z2.flatten()], dim=-1).to(vae.device)
    return vae.likelihood.mean(vae.decoder(z)).cpu()


@torch.no_grad()
def interpolations(vae: VAE, x: torch.Tensor, labels: torch.Tensor, steps: int) -> torch.Tensor:
    """E[x|z] along lines between the latent means of a test image of digit d and one of
    digit d + 1, for the digits present; ``(pairs * steps, data_dim)``."""
    firsts = {int(label): index for index, label in reversed(list(enumerate(labels.tolist())))}
    pairs = [(firsts[d], firsts[d + 1]) for d in range(0, 9, 2) if d in firsts and d + 1 in firsts]
    if not pairs:  # too few test images for two different digits: use the first two
        pairs = [(0, min(1, len(x) - 1))]
    means = vae.encode(x).mean
    weights = torch.linspace(0, 1, steps, device=means.device)[:, None]
    rows = [(1 - weights) * means[a] + weights * means[b] for a, b in pairs]
    z = torch.cat(rows)
    return vae.likelihood.mean(vae.decoder(z)).cpu()


def run(args: argparse.Namespace) -> int:
    if args.latent_dim != 2:
        raise ConfigError(f"the latent-space pictures need --latent-dim 2, got {args.latent_dim}")
    started = time.perf_counter()
    out_dir = Path(args.out_dir)
    device = common.device_of(args)
    config = common.base_config(args, dataset="mnist", binarize="dynamic")
    data = common.load_data(config, device)
    trained, evaluation = common.train_and_evaluate("latent2d", config, data, args)
    figures = common.save_run_figures(trained, data, out_dir, seed=args.seed)
    labels = mnist_test_labels(args.data_dir, data.test.shape[0])
    plot_latent_means(trained.vae.encode(data.test).mean.cpu(), labels, out_dir / "latent_means.png")
    plotting.save_image_grid(manifold(trained.vae, args.grid_size), out_dir / "manifold.png",
                             data.image_shape, nrow=args.grid_size)
    plotting.save_image_grid(interpolations(trained.vae, data.test, labels,
                                            args.interpolation_steps),
                             out_dir / "interpolations.png", data.image_shape,
                             nrow=args.interpolation_steps)
    common.plot_elbo_curves([trained], out_dir / "elbo_curves.png",
                            final={trained.name: evaluation["log_marginal_likelihood"]},
                            title="2-D latent VAE, dynamically binarized MNIST")
    figures += ["latent_means.png", "manifold.png", "interpolations.png", "elbo_curves.png"]
    summary = common.run_summary(trained, evaluation, setting="dynamic MNIST, 2-D latent")
    common.write_results(out_dir, "latent_space", args, [summary], started=started, device=device,
                         figures=figures, dataset="mnist, dynamic binarization")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return common.run_main(run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
