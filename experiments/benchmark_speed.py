"""Time one SVI training step of pyrovae against the same VAE written in plain PyTorch.

Both sides use identical networks (784-200-200-50 tanh MLPs, Bernoulli likelihood,
diagonal Gaussian guide), batch, dtype and thread count, the same Monte Carlo ELBO
(one reparameterised sample, log p(z) - log q(z|x) sampled, not the analytic KL) and
Adam, in one process.  Reports the median over repetitions and the ratio.

Usage::

    python experiments/benchmark_speed.py --batch-sizes 100 1000 --output results.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO
from torch.distributions import Normal

from pyrovae import TrainConfig, build_vae
from pyrovae.provenance import provenance


class PlainVAE(torch.nn.Module):
    """The reference: the pyrovae networks, with the ELBO written by hand."""

    def __init__(self, encoder: torch.nn.Module, decoder: torch.nn.Module,
                 loc_head: torch.nn.Module, scale_head: torch.nn.Module) -> None:
        super().__init__()
        self.encoder, self.decoder = encoder, decoder
        self.loc_head, self.scale_head = loc_head, scale_head

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        """Minus the single-sample ELBO summed over the batch, as Trace_ELBO computes it."""
        h = self.encoder(x)
        z_loc = self.loc_head(h)
        z_scale = torch.nn.functional.softplus(self.scale_head(h)) + 1e-4
        z = z_loc + z_scale * torch.randn_like(z_loc)
        logits = self.decoder(z)
        log_lik = -torch.nn.functional.binary_cross_entropy_with_logits(
            logits, x, reduction="none").sum(-1)
        log_prior = Normal(0.0, 1.0).log_prob(z).sum(-1)
        log_q = Normal(z_loc, z_scale).log_prob(z).sum(-1)
        return -(log_lik + log_prior - log_q).sum()


def make_models(seed: int) -> tuple[object, PlainVAE]:
    torch.manual_seed(seed)
    config = TrainConfig(hidden_dims=(200, 200), latent_dim=50)
    vae = build_vae(config, data_dim=784)
    # the reference gets its own copy of identical initial weights
    copy = build_vae(config, data_dim=784)
    copy.load_state_dict(vae.state_dict())
    plain = PlainVAE(copy.encoder, copy.decoder, copy.guide_family.loc_head,
                     copy.guide_family.scale_head)
    return vae, plain


def median_step_seconds(step: Callable[[], object], steps: int, repeats: int) -> float:
    for _ in range(max(3, steps // 5)):  # warm-up
        step()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(steps):
            step()
        times.append((time.perf_counter() - started) / steps)
    return statistics.median(times)


def load_batches(data_dir: str | None, batch_size: int) -> torch.Tensor:
    if data_dir is not None:
        from pyrovae.data import load_mnist

        images = load_mnist(data_dir, binarize="static").train[:batch_size]
    else:
        images = torch.bernoulli(torch.full((batch_size, 784), 0.13))
    return images


def benchmark_training_step(batch_size: int, steps: int, repeats: int, data_dir: str | None,
                            seed: int = 0) -> dict[str, float]:
    x = load_batches(data_dir, batch_size)
    pyro.clear_param_store()
    vae, plain = make_models(seed)
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())
    optimizer = torch.optim.Adam(plain.parameters(), lr=1e-3)

    def plain_step() -> float:
        optimizer.zero_grad()
        loss = plain.loss(x)
        loss.backward()
        optimizer.step()
        return loss.item()

    with pyro.validation_enabled(False):
        # interleave the two so that machine noise hits both alike
        pyro_times, plain_times = [], []
        for _ in range(repeats):
            pyro_times.append(median_step_seconds(lambda: svi.step(x), steps, 1))
            plain_times.append(median_step_seconds(plain_step, steps, 1))
    pyro_seconds, plain_seconds = statistics.median(pyro_times), statistics.median(plain_times)
    return {"batch_size": batch_size, "pyrovae_ms": 1e3 * pyro_seconds,
            "plain_pytorch_ms": 1e3 * plain_seconds, "ratio": pyro_seconds / plain_seconds}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--steps", type=int, default=50, help="steps per repetition")
    parser.add_argument("--repeats", type=int, default=7, help="repetitions (median reported)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--data-dir", default=None,
                        help="folder with MNIST/raw (default: random binary images)")
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [benchmark_training_step(batch, args.steps, args.repeats, args.data_dir)
            for batch in args.batch_sizes]
    print(f"SVI training step, 784-200-200-50 tanh MLP, Bernoulli, {args.threads} threads")
    print(f"{'batch':>6} {'pyrovae ms':>11} {'PyTorch ms':>11} {'ratio':>6}")
    for row in rows:
        print(f"{row['batch_size']:>6} {row['pyrovae_ms']:>11.2f} {row['plain_pytorch_ms']:>11.2f} "
              f"{row['ratio']:>6.2f}")
    if args.output:
        record = {"training_step": rows, "threads": args.threads, "steps": args.steps,
                  "repeats": args.repeats, **provenance("cpu")}
        Path(args.output).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
