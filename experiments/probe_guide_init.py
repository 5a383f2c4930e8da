"""How the initial size of a guide's correlation head changes a short training run.

The full-covariance guide's strictly lower Cholesky entries are ``off_diagonal_scale`` times
a head that starts at zero; the low-rank guide's factor W is ``factor_scale`` times a head
with PyTorch's default initialisation (a zero W is a saddle: W W^T has no gradient there).
Adam moves each weight by up to ``lr`` per step whatever its gradient, so the scale sets
how far noise can push the correlations.  This script trains the 784-200-200-50 tanh VAE
on dynamically binarized MNIST with the diagonal guide and with each scale, every setting
from the same encoder and decoder initialisation: the numbers behind
``FullCovarianceNormalGuide.OFF_DIAGONAL_SCALE`` and ``LowRankNormalGuide.FACTOR_SCALE``.

Writes ``--output`` (JSON: provenance and each setting's test ELBO curve per seed, nats per
image) and prints the last epoch's test ELBO of each setting, averaged over ``--seeds``.

Usage::

    python experiments/probe_guide_init.py --train-size 10000 --test-size 2000 --epochs 15 \
        --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import common

from pyrovae import TrainConfig, build_vae
from pyrovae.argtypes import positive_float, positive_int
from pyrovae.errors import PyrovaeError
from pyrovae.guides import DiagonalNormalGuide, FullCovarianceNormalGuide, LowRankNormalGuide
from pyrovae.models import VAE
from pyrovae.provenance import provenance
from pyrovae.train import fit, resolve_device, seed_everything


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="probe_guide_init.py",
                                     description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--data-dir", default=common.default_data_dir(),
        help="folder holding MNIST/raw (default: $PYROVAE_DATA, else ../shared/data)")
    add("--train-size", type=positive_int, default=10_000,
        help="first N training images (default: %(default)s)")
    add("--test-size", type=positive_int, default=2_000,
        help="first N test images, for the test ELBO (default: %(default)s)")
    add("--epochs", type=positive_int, default=15, help="epochs per setting (default: %(default)s)")
    add("--hidden-dims", type=positive_int, nargs="+", default=[200, 200],
        help="encoder widths; the decoder mirrors them (default: %(default)s)")
    add("--latent-dim", type=positive_int, default=50, help="dimension of z (default: %(default)s)")
    add("--fullcov-scales", type=positive_float, nargs="*", default=[1.0, 0.3, 0.1, 0.03, 0.01],
        help="off_diagonal_scale values of the full-covariance guide (default: %(default)s)")
    add("--lowrank-scales", type=positive_float, nargs="*", default=[1.0, 0.3, 0.1, 0.03],
        help="factor_scale values of the low-rank guide (default: %(default)s)")
    add("--rank", type=positive_int, default=2, help="low-rank guide's rank (default: %(default)s)")
    add("--seeds", type=int, nargs="+", default=[0],
        help="random seeds; every setting trains once per seed (default: %(default)s)")
    add("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    add("--output", default="runs/probe_guide_init.json", help="JSON written (default: %(default)s)")
    add("--progress", action=argparse.BooleanOptionalAction, default=False,
        help="show a progress bar per setting")
    return parser


def settings(args: argparse.Namespace) -> list[tuple[str, str, float | None]]:
    """``(name, guide, scale)`` for the diagonal guide and every requested scale."""
    return ([("diagonal", "diagonal", None)]
            + [(f"fullcov, scale {s:g}", "fullcov", s) for s in args.fullcov_scales]
            + [(f"lowrank {args.rank}, scale {s:g}", "lowrank", s) for s in args.lowrank_scales])


def vae_with_guide(config: TrainConfig, data_dim: int, guide: str, scale: float | None) -> VAE:
    """The config's VAE with a fresh guide family built after the networks, so every setting
    with the same seed starts from the same encoder and decoder (and loc/scale heads)."""
    vae = build_vae(config, data_dim=data_dim)
    feature_dim = vae.encoder.feature_dim
    if guide == "fullcov":
        family = FullCovarianceNormalGuide(feature_dim, config.latent_dim, off_diagonal_scale=scale)
    elif guide == "lowrank":
        family = LowRankNormalGuide(feature_dim, config.latent_dim, config.rank,
                                    factor_scale=scale)
    else:
        family = DiagonalNormalGuide(feature_dim, config.latent_dim)
    vae.guide_family = family
    return vae


def print_table(records: Sequence[dict]) -> None:
    """Per setting: the last epoch's test ELBO averaged over seeds, then each seed's."""
    print(f"{'setting':<24} {'mean test ELBO':>14}  per seed (last epoch, nats)")
    names = list(dict.fromkeys(record["name"] for record in records))
    for name in names:
        finals = [r["test_elbo"][-1] for r in records if r["name"] == name]
        print(f"{name:<24} {sum(finals) / len(finals):>14.2f}  "
              + " ".join(f"{final:.2f}" for final in finals))


def run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    config = TrainConfig(dataset="mnist", binarize="dynamic", data_dir=args.data_dir,
                         download=False, train_size=args.train_size, test_size=args.test_size,
                         hidden_dims=tuple(args.hidden_dims), latent_dim=args.latent_dim,
                         rank=args.rank)
    data = common.load_data(config, device)
    records = []
    for seed in args.seeds:
        for name, guide, scale in settings(args):
            seed_everything(seed)
            vae = vae_with_guide(config, data.data_dim, guide, scale).to(device)
            started = time.perf_counter()
            history = fit(vae, data, epochs=args.epochs, batch_size=config.batch_size,
                          lr=config.lr, seed=seed, progress=args.progress)
            seconds = time.perf_counter() - started
            records.append({"name": name, "guide": guide, "scale": scale, "seed": seed,
                            "test_elbo": [record.test_elbo for record in history],
                            "seconds_per_epoch": seconds / args.epochs})
            print(f"[{name}, seed {seed}] test ELBO {history[-1].test_elbo:.2f} nats after "
                  f"{args.epochs} epochs", file=sys.stderr)
    print_table(records)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({
        **provenance(device), "experiment": "probe_guide_init", "seeds": args.seeds,
        "epochs": args.epochs, "train_size": int(data.train.shape[0]),
        "test_size": int(data.test.shape[0]), "hidden_dims": args.hidden_dims,
        "latent_dim": args.latent_dim, "rank": args.rank, "settings": records,
    }, indent=2) + "\n")
    print(f"written to {output}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run(args)
    except PyrovaeError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
