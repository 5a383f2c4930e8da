"""Signal-to-noise ratio of the encoder's and the decoder's gradients against K, ``iwae``
against ``iwae_dreg``, on a trained model (Rainforth et al. 2018's measurement).

For each objective and K, the gradient of the loss on one fixed minibatch of test images is
drawn ``--draws`` times; per parameter, SNR = |mean| / standard deviation over the draws, and
the figure gives the mean over the encoder's parameters (the guide: encoder body and heads)
and over the decoder's.  Rainforth et al. show IWAE's encoder SNR falling like 1/sqrt(K)
while the decoder's rises like sqrt(K); Tucker et al. that DReG's encoder SNR rises with K.
The default model is the banked ``burda2016`` VAE (``results/burda2016_vae``: trained with
the ELBO, so K here changes only the estimator, not the model).

Usage::

    python experiments/gradient_snr.py --data-dir ../shared/data --out-dir results/gradient_snr
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pyro
import torch

from pyrovae.checkpoint import load_vae
from pyrovae.objectives import make_objective
from pyrovae.provenance import provenance
from pyrovae.runs import load_test_points

REPO = Path(__file__).resolve().parents[1]
#: the modules of a one-layer VAE that make up its guide
GUIDE_MODULES = ("encoder", "guide_family")


def gradient_draws(vae: torch.nn.Module, objective_name: str, num_particles: int,
                   x: torch.Tensor, draws: int) -> dict[str, torch.Tensor]:
    """``draws`` gradients of the minibatch loss: ``{"encoder": (draws, P_enc), "decoder":
    (draws, P_dec)}``."""
    objective = make_objective(objective_name, num_particles)
    named = [(name, p) for name, p in vae.named_parameters() if p.requires_grad]
    sides: dict[str, list[torch.Tensor]] = {"encoder": [], "decoder": []}
    for _ in range(draws):
        vae.zero_grad(set_to_none=False)
        objective.differentiable_loss(vae.model, vae.guide, x).backward()
        encoder = [p.grad.flatten() for name, p in named if name.split(".")[0] in GUIDE_MODULES]
        decoder = [p.grad.flatten() for name, p in named
                   if name.split(".")[0] not in GUIDE_MODULES]
        sides["encoder"].append(torch.cat(encoder).clone())
        sides["decoder"].append(torch.cat(decoder).clone())
    return {side: torch.stack(values) for side, values in sides.items()}


def snr(gradients: torch.Tensor) -> float:
    """The mean over parameters of |mean| / std over draws (parameters that never move, whose
    std is zero, left out)."""
    mean, std = gradients.mean(0), gradients.std(0)
    moving = std > 0
    return float((mean[moving].abs() / std[moving]).mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=str(REPO / "experiments" / "results" /
                                                    "burda2016_vae"))
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 5, 10, 50])
    parser.add_argument("--objectives", nargs="+", default=["iwae", "iwae_dreg"])
    parser.add_argument("--draws", type=int, default=100)
    parser.add_argument("--num-points", type=int, default=20,
                        help="the minibatch: the first N test images")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    vae, config, checkpoint = load_vae(args.checkpoint)
    x = load_test_points(config, torch.device("cpu"), data_dir=args.data_dir,
                         test_size=args.num_points)
    pyro.set_rng_seed(args.seed)
    rows = []
    start = time.perf_counter()
    with pyro.validation_enabled(False):
        for objective in args.objectives:
            for k in args.ks:
                draws = gradient_draws(vae, objective, k, x, args.draws)
                rows.append({"objective": objective, "num_particles": k,
                             "encoder_snr": snr(draws["encoder"]),
                             "decoder_snr": snr(draws["decoder"])})
                print(f"{objective} K={k}: encoder SNR {rows[-1]['encoder_snr']:.3f}, "
                      f"decoder SNR {rows[-1]['decoder_snr']:.3f}", flush=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    figure = args.out_dir / "gradient_snr.png"
    plot(rows, figure)
    results = {"checkpoint": str(Path(args.checkpoint).resolve().relative_to(REPO))
               if Path(args.checkpoint).resolve().is_relative_to(REPO) else args.checkpoint,
               "checkpoint_epoch": checkpoint.get("epoch"), "num_points": args.num_points,
               "draws": args.draws,
               "seed": args.seed, "snr": "mean over parameters of |mean| / std over draws of "
                                         "the minibatch gradient",
               "rows": rows, "figures": [figure.name],
               "wall_seconds": time.perf_counter() - start, **provenance("cpu")}
    (args.out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


def plot(rows: list[dict[str, object]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharex=True)
    for side, ax in zip(("encoder", "decoder"), axes, strict=True):
        for objective in dict.fromkeys(row["objective"] for row in rows):
            mine = [row for row in rows if row["objective"] == objective]
            ax.plot([row["num_particles"] for row in mine], [row[f"{side}_snr"] for row in mine],
                    marker="o", label=objective)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("K")
        ax.set_title(f"{side} gradient SNR")
        ax.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


if __name__ == "__main__":
    sys.exit(main())
