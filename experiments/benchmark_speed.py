"""pyrovae against the same VAE written in plain PyTorch: training steps, importance
sampling, a full epoch, and how time scales with batch size, K and N.

Both sides use identical networks (784-200-200-50 tanh MLPs, Bernoulli likelihood,
diagonal Gaussian guide, shared initial weights), batch, dtype and thread count, the same
Monte Carlo ELBO (one reparameterised sample; log p(z) - log q(z|x) sampled) and Adam, in
one process; the two are interleaved over several repetitions and the medians compared.
Three training paths are timed: Pyro's own ``SVI`` + ``pyro.optim.Adam`` + ``Trace_ELBO``
(the reference a Pyro user writes), pyrovae's training step (:class:`pyrovae.train.TrainingLoop`)
and plain PyTorch.  The two-layer rows time pyrovae's step on Burda et al. (2016)'s
two-stochastic-layer VAE (``--latent-dims 100 50``) against a plain two-layer reference
written the same way (``--two-layer-batch-sizes``; ``--only-two-layer`` times nothing else).

Importance sampling compares :func:`pyrovae.log_marginal_likelihood` (Pyro traces) with a
hand-written vectorized estimator using the same batch and chunk sizes; peak memory is
measured in a fresh subprocess per setting (max RSS above the process's baseline); on a
GPU (``--device cuda``) it is the peak of CUDA memory allocated, on ``--memory-points``
images.  GPU timings synchronise the device before reading the clock.

Usage::

    python experiments/benchmark_speed.py --data-dir ../shared/data --output experiments/results/speed.json
    python experiments/benchmark_speed.py --device cuda --data-dir ../shared/data --epoch --scaling \
        --memory --output experiments/results/speed_cuda.json
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO

from pyrovae import TrainConfig, build_vae, log_marginal_likelihood
from pyrovae.data import DataSplits, load_mnist
from pyrovae.evaluation import default_chunk_size
from pyrovae.likelihoods import bernoulli_log_prob
from pyrovae.provenance import provenance
from pyrovae.train import TrainingLoop, fit


def cross_entropy_log_prob(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """log Bernoulli(x; sigmoid(logits)) elementwise, as a PyTorch user writes it."""
    return -torch.nn.functional.binary_cross_entropy_with_logits(
        logits, x.expand_as(logits), reduction="none")


class PlainVAE(torch.nn.Module):
    """The reference: the pyrovae networks, with the ELBO written by hand.

    ``bernoulli_log_prob`` scores the decoder's logits: torch's cross-entropy by default (the
    idiomatic reference), or :func:`pyrovae.likelihoods.bernoulli_log_prob`, the kernel
    pyrovae's Bernoulli likelihood uses (the "same kernel" reference, which isolates what the
    Pyro program costs beyond the arithmetic)."""

    def __init__(self, encoder: torch.nn.Module, decoder: torch.nn.Module,
                 loc_head: torch.nn.Module, scale_head: torch.nn.Module,
                 bernoulli_log_prob: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
                 = cross_entropy_log_prob) -> None:
        super().__init__()
        self.encoder, self.decoder = encoder, decoder
        self.loc_head, self.scale_head = loc_head, scale_head
        self.bernoulli_log_prob = bernoulli_log_prob

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x)
        return self.loc_head(h), torch.nn.functional.softplus(self.scale_head(h)) + 1e-4

    def log_weights(self, x: torch.Tensor, num_samples: int) -> torch.Tensor:
        """``(K, N)`` log p(x, z_k) - log q(z_k | x)."""
        z_loc, z_scale = self.posterior(x)
        z = z_loc + z_scale * torch.randn(num_samples, *z_loc.shape, device=z_loc.device)
        logits = self.decoder(z)
        log_lik = self.bernoulli_log_prob(logits, x).sum(-1)
        log_prior = (-0.5 * z**2 - 0.5 * math.log(2 * math.pi)).sum(-1)
        # log q written out like log p: torch's Normal would validate its arguments, a
        # host-device synchronisation per call on a GPU that the reference should not pay
        log_q = (-((z - z_loc) ** 2) / (2 * z_scale**2) - z_scale.log()
                 - 0.5 * math.log(2 * math.pi)).sum(-1)
        return log_lik + log_prior - log_q

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        """Minus the single-sample ELBO summed over the batch, as Trace_ELBO computes it."""
        return -self.log_weights(x, 1).sum()

    @torch.no_grad()
    def log_marginal_likelihood(self, x: torch.Tensor, num_samples: int, batch_size: int,
                                chunk_size: int) -> torch.Tensor:
        results = []
        for start in range(0, len(x), batch_size):
            batch = x[start:start + batch_size]
            running = torch.full((len(batch),), -math.inf, device=batch.device)
            for first in range(0, num_samples, chunk_size):
                log_w = self.log_weights(batch, min(chunk_size, num_samples - first))
                running = torch.logaddexp(running, torch.logsumexp(log_w, 0))
            results.append(running - math.log(num_samples))
        return torch.cat(results).cpu()  # as pyrovae returns it


#: where the benchmark runs (``--device``)
DEVICE = torch.device("cpu")


def make_models(seed: int = 0, same_kernel: bool = False):
    """pyrovae's default VAE and the plain reference with identical initial weights; with
    ``same_kernel`` the reference scores the logits with pyrovae's Bernoulli kernel."""
    torch.manual_seed(seed)
    config = TrainConfig(hidden_dims=(200, 200), latent_dim=50)
    vae = build_vae(config, data_dim=784)
    copy = build_vae(config, data_dim=784)  # the reference gets identical initial weights
    copy.load_state_dict(vae.state_dict())
    plain = PlainVAE(copy.encoder, copy.decoder, copy.guide_family.loc_head,
                     copy.guide_family.scale_head,
                     bernoulli_log_prob if same_kernel else cross_entropy_log_prob)
    return vae.to(DEVICE), plain.to(DEVICE)


class PlainHierarchicalVAE(torch.nn.Module):
    """The two-layer reference: the networks of pyrovae's two-layer VAE (Burda et al. 2016:
    q(z1 | x), q(z2 | z1), p(z1 | z2) diagonal Gaussians with std = exp(linear) + 1e-4,
    p(z2) = N(0, I), p(x | z1) Bernoulli), with the single-sample ELBO written by hand."""

    def __init__(self, q1: torch.nn.ModuleList, q2: torch.nn.ModuleList,
                 p1: torch.nn.ModuleList, decoder: torch.nn.Module) -> None:
        super().__init__()
        # each Gaussian layer is (body, loc head, log-scale head)
        self.q1, self.q2, self.p1, self.decoder = q1, q2, p1, decoder

    @staticmethod
    def gaussian(layer: torch.nn.ModuleList, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        body, loc_head, log_scale_head = layer
        features = body(h)
        return loc_head(features), log_scale_head(features).exp() + 1e-4

    @staticmethod
    def log_normal(z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return (-((z - loc) ** 2) / (2 * scale**2) - scale.log()
                - 0.5 * math.log(2 * math.pi)).sum(-1)

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        """Minus the single-sample ELBO summed over the batch, as Trace_ELBO computes it."""
        loc1, scale1 = self.gaussian(self.q1, x)
        z1 = loc1 + scale1 * torch.randn_like(loc1)
        loc2, scale2 = self.gaussian(self.q2, z1)
        z2 = loc2 + scale2 * torch.randn_like(loc2)
        prior_loc1, prior_scale1 = self.gaussian(self.p1, z2)
        logits = self.decoder(z1)
        log_lik = -torch.nn.functional.binary_cross_entropy_with_logits(
            logits, x, reduction="none").sum(-1)
        log_prior = ((-0.5 * z2**2 - 0.5 * math.log(2 * math.pi)).sum(-1)
                     + self.log_normal(z1, prior_loc1, prior_scale1))
        log_q = self.log_normal(z1, loc1, scale1) + self.log_normal(z2, loc2, scale2)
        return -(log_lik + log_prior - log_q).sum()


def make_hierarchical_models(seed: int = 0):
    """pyrovae's two-layer VAE (``--latent-dims 100 50``) and the reference, same weights."""
    torch.manual_seed(seed)
    config = TrainConfig(hidden_dims=(200, 200), latent_dims=(100, 50))
    vae = build_vae(config, data_dim=784)
    copy = build_vae(config, data_dim=784)
    copy.load_state_dict(vae.state_dict())

    def parts(layer: torch.nn.Module) -> torch.nn.ModuleList:
        return torch.nn.ModuleList([layer.body, layer.loc_head, layer.log_scale_head])

    plain = PlainHierarchicalVAE(parts(copy.guide_layers[0]), parts(copy.guide_layers[1]),
                                 parts(copy.prior_layers[0]), copy.decoder.body)
    return vae.to(DEVICE), plain.to(DEVICE)


def synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def clock() -> float:
    """Seconds: this process's CPU time on a CPU (other jobs on a shared machine disturb it
    far less than wall time), wall time on a GPU (the device works while the host waits)."""
    return time.perf_counter() if DEVICE.type == "cuda" else time.process_time()


def seconds_per_call(call: Callable[[], object], calls: int) -> float:
    synchronize()
    started = clock()
    for _ in range(calls):
        call()
    synchronize()
    return (clock() - started) / calls


def interleaved_medians(calls: dict[str, Callable[[], object]], per_repeat: int,
                        repeats: int) -> dict[str, float]:
    """Median seconds per call of each function, measured in alternation against noise."""
    for call in calls.values():  # warm-up
        seconds_per_call(call, max(1, per_repeat // 5))
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            times[name].append(seconds_per_call(call, per_repeat))
    return {name: statistics.median(values) for name, values in times.items()}


def mnist_or_random(data_dir: str | None, n: int) -> DataSplits:
    if data_dir is not None:
        return load_mnist(data_dir, binarize="static").subset(n, 10000).to(DEVICE)
    x = torch.bernoulli(torch.full((max(n, 10000), 784), 0.13))
    return DataSplits.from_tensors(x[:n], x[:10000]).to(DEVICE)


def _steps(vae: torch.nn.Module, plain: torch.nn.Module, data: DataSplits,
           batch_size: int) -> tuple[Callable[[], float], Callable[[], float]]:
    """pyrovae's training step (:class:`TrainingLoop`, fused Adam) and the plain reference's
    (``torch.optim.Adam``, as a user writes it) on the first ``batch_size`` training points."""
    x = data.train[:batch_size]
    loop = TrainingLoop(vae, data, epochs=1, batch_size=batch_size, lr=1e-3,
                        objective="trace_elbo", num_particles=1, seed=0, test_every=1,
                        run_dir=None, config=None, progress=False, beta=1.0, kl_warmup_epochs=0,
                        checkpoint_every=0, keep_last=0, clip_norm=None, on_divergence="stop",
                        fused=True)
    optimizer = torch.optim.Adam(plain.parameters(), lr=1e-3)

    def plain_step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = plain.loss(x)
        value = loss.item()
        loss.backward()
        optimizer.step()
        return value

    return lambda: loop.train_step(x), plain_step


def training_step(batch_size: int, steps: int, repeats: int, data: DataSplits) -> dict[str, float]:
    x = data.train[:batch_size]
    pyro.clear_param_store()
    vae, plain = make_models()
    svi_vae, _ = make_models()
    _, same_kernel = make_models(same_kernel=True)
    svi = SVI(svi_vae.model, svi_vae.guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())
    pyrovae_step, plain_step = _steps(vae, plain, data, batch_size)
    _, same_kernel_step = _steps(make_models()[0], same_kernel, data, batch_size)

    with pyro.validation_enabled(False):
        medians = interleaved_medians({"pyro_svi": lambda: svi.step(x),
                                       "pyrovae": pyrovae_step,
                                       "plain": plain_step,
                                       "plain_same_kernel": same_kernel_step}, steps, repeats)
    return {"batch_size": batch_size, "pyro_svi_ms": 1e3 * medians["pyro_svi"],
            "pyrovae_ms": 1e3 * medians["pyrovae"], "plain_pytorch_ms": 1e3 * medians["plain"],
            "plain_same_kernel_ms": 1e3 * medians["plain_same_kernel"],
            "ratio": medians["pyrovae"] / medians["plain"],
            "ratio_same_kernel": medians["pyrovae"] / medians["plain_same_kernel"],
            "pyro_svi_ratio": medians["pyro_svi"] / medians["plain"]}


def two_layer_training_step(batch_size: int, steps: int, repeats: int,
                            data: DataSplits) -> dict[str, float]:
    """pyrovae's training step on the two-layer VAE against the plain two-layer reference
    (``torch.optim.Adam``, as a user writes it), interleaved."""
    pyro.clear_param_store()
    vae, plain = make_hierarchical_models()
    pyrovae_step, plain_step = _steps(vae, plain, data, batch_size)

    with pyro.validation_enabled(False):
        medians = interleaved_medians({"pyrovae": pyrovae_step,
                                       "plain": plain_step}, steps, repeats)
    return {"batch_size": batch_size, "pyrovae_ms": 1e3 * medians["pyrovae"],
            "plain_pytorch_ms": 1e3 * medians["plain"],
            "ratio": medians["pyrovae"] / medians["plain"]}


def importance_sampling(num_samples: int, num_points: int, repeats: int, data: DataSplits,
                        batch_size: int = 100, chunk_size: int | None = None) -> dict[str, float]:
    """pyrovae's log p(x) against the plain estimator, both at the same batch and chunk
    shape: by default the shape pyrovae picks for the device (cache-sized on a CPU), the best
    one for the reference too; ``"release_s"`` times pyrovae at the shape it used before,
    100 points x 500 samples per trace."""
    x = data.test[:num_points]
    vae, plain = make_models()
    _, same_kernel = make_models(same_kernel=True)
    if chunk_size is None:
        chunk_size = default_chunk_size(batch_size, DEVICE)
    medians = interleaved_medians({
        "pyrovae": lambda: log_marginal_likelihood(vae, x, num_samples, batch_size=batch_size,
                                                   chunk_size=chunk_size),
        "plain": lambda: plain.log_marginal_likelihood(x, num_samples, batch_size, chunk_size),
        "plain_same_kernel": lambda: same_kernel.log_marginal_likelihood(
            x, num_samples, batch_size, chunk_size),
        "release": lambda: log_marginal_likelihood(vae, x, num_samples, batch_size=100,
                                                   chunk_size=500),
    }, 1, repeats)
    return {"num_samples": num_samples, "num_points": num_points, "batch_size": batch_size,
            "chunk_size": chunk_size, "pyrovae_s": medians["pyrovae"],
            "plain_pytorch_s": medians["plain"], "ratio": medians["pyrovae"] / medians["plain"],
            "plain_same_kernel_s": medians["plain_same_kernel"],
            "ratio_same_kernel": medians["pyrovae"] / medians["plain_same_kernel"],
            "release_s": medians["release"],
            "ratio_to_release": medians["pyrovae"] / medians["release"]}


def peak_memory_mb(num_samples: int, num_points: int) -> dict[str, float]:
    """Peak resident memory of a fresh process computing log p(x) for ``num_points`` images
    (on a GPU: peak CUDA memory allocated, in this process)."""
    if DEVICE.type == "cuda":
        return peak_cuda_memory_mb(num_samples, num_points)
    command = [sys.executable, __file__, "--memory-probe", str(num_samples), str(num_points)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def _resident_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def memory_probe(num_samples: int, num_points: int) -> None:
    # random binary images: memory does not depend on the pixel values, and loading MNIST
    # would itself set the process's peak
    x = torch.bernoulli(torch.full((num_points, 784), 0.13))
    vae, _ = make_models()
    log_marginal_likelihood(vae, x[:10], 2)  # import and allocate everything once
    before = _resident_mb()
    log_marginal_likelihood(vae, x, num_samples)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_rss_mb": peak, "peak_growth_mb": peak - before}))


def peak_cuda_memory_mb(num_samples: int, num_points: int) -> dict[str, float]:
    x = torch.bernoulli(torch.full((num_points, 784), 0.13, device=DEVICE))
    vae, _ = make_models()
    log_marginal_likelihood(vae, x[:10], 2)
    synchronize()
    before = torch.cuda.memory_allocated(DEVICE) / 2**20
    torch.cuda.reset_peak_memory_stats(DEVICE)
    started = time.perf_counter()
    log_marginal_likelihood(vae, x, num_samples)
    seconds = time.perf_counter() - started  # the result comes back to the CPU: synchronised
    peak = torch.cuda.max_memory_allocated(DEVICE) / 2**20
    return {"memory_points": num_points, "peak_cuda_mb": peak, "peak_growth_mb": peak - before,
            "memory_run_s": seconds}


def full_epoch(data: DataSplits, batch_size: int = 100, repeats: int = 1) -> dict[str, float]:
    """One pass over the training set, batches drawn as pyrovae's loader does, both sides,
    from fresh models each time; ``repeats`` passes of each, interleaved, medians."""
    def pyrovae_epoch() -> None:
        vae, _ = make_models()
        fit(vae, data, epochs=1, batch_size=batch_size, test_every=10**9, progress=False)

    def plain_epoch() -> None:
        _, plain = make_models()
        optimizer = torch.optim.Adam(plain.parameters(), lr=1e-3)
        generator = torch.Generator().manual_seed(0)
        for x in data.train_batches(batch_size, generator=generator):
            optimizer.zero_grad(set_to_none=True)
            loss = plain.loss(x)
            loss.item()
            loss.backward()
            optimizer.step()
        with torch.no_grad():  # fit ends with a test ELBO; so does the reference
            plain.log_weights(data.test, 1).mean().item()

    times: dict[str, list[float]] = {"pyrovae": [], "plain": []}
    for _ in range(repeats):
        for name, epoch in (("pyrovae", pyrovae_epoch), ("plain", plain_epoch)):
            times[name].append(seconds_per_call(epoch, 1))
    pyrovae_seconds = statistics.median(times["pyrovae"])
    plain_seconds = statistics.median(times["plain"])
    return {"num_points": int(data.train.shape[0]), "batch_size": batch_size,
            "repeats": repeats, "pyrovae_s": pyrovae_seconds, "plain_pytorch_s": plain_seconds,
            "ratio": pyrovae_seconds / plain_seconds}


def print_table(title: str, rows: list[dict[str, float]], columns: Sequence[str]) -> None:
    print(title)
    print("  " + "  ".join(f"{column:>16}" for column in columns))
    for row in rows:
        print("  " + "  ".join(f"{row[column]:>16.4g}" for column in columns))


def _write(output: str | None, record: dict[str, object]) -> None:
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(record, indent=2) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--two-layer-batch-sizes", type=int, nargs="*", default=[20, 100],
                        help="batch sizes of the two-layer (--latent-dims 100 50) training-step "
                             "rows; none given: no such rows")
    parser.add_argument("--only-two-layer", action="store_true",
                        help="time the two-layer training step only")
    parser.add_argument("--only-epoch", action="store_true",
                        help="time the full epoch only (--epoch-batch-size, --epoch-repeats)")
    parser.add_argument("--steps", type=int, default=50, help="training steps per repetition")
    parser.add_argument("--repeats", type=int, default=7, help="repetitions (median reported)")
    parser.add_argument("--num-samples", type=int, nargs="+", default=[1000, 5000],
                        help="K for the importance-sampling benchmark")
    parser.add_argument("--num-points", type=int, default=1000, help="test points for IS")
    parser.add_argument("--memory", action="store_true",
                        help="also measure peak memory of log p(x) for each K")
    parser.add_argument("--epoch", action="store_true", help="also time one full epoch")
    parser.add_argument("--epoch-batch-size", type=int, default=100,
                        help="minibatch of the full-epoch row (default: %(default)s; the IWAE "
                             "paper's protocol uses 20)")
    parser.add_argument("--epoch-repeats", type=int, default=1,
                        help="epochs timed on each side, interleaved (median reported)")
    parser.add_argument("--scaling", action="store_true",
                        help="also time log p(x) against K and N (linear growth expected)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    parser.add_argument("--memory-points", type=int, default=None,
                        help="images for the memory measurement (default: --num-points; "
                             "the full test set is 10000)")
    parser.add_argument("--data-dir", default=None,
                        help="folder with MNIST/raw (default: random binary images)")
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    parser.add_argument("--memory-probe", type=int, nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    global DEVICE
    DEVICE = torch.device(args.device)
    if args.memory_probe:
        memory_probe(*args.memory_probe)
        return 0
    data = mnist_or_random(args.data_dir, 60000 if args.epoch or args.only_epoch else max(
        args.batch_sizes + args.two_layer_batch_sizes))
    record: dict[str, object] = {"threads": args.threads, "steps": args.steps,
                                 "repeats": args.repeats, **provenance(DEVICE)}
    if args.only_epoch:
        record["epoch"] = full_epoch(data, args.epoch_batch_size, args.epoch_repeats)
        print_table("one epoch of MNIST, data loading included (s)", [record["epoch"]],
                    ("num_points", "batch_size", "pyrovae_s", "plain_pytorch_s", "ratio"))
        _write(args.output, record)
        return 0
    if args.two_layer_batch_sizes:
        record["two_layer_training_step"] = [
            two_layer_training_step(b, args.steps, args.repeats, data)
            for b in args.two_layer_batch_sizes]
        print_table(f"training step, two stochastic layers (784-200-200-100, 100-100-100-50 "
                    f"tanh), Bernoulli, {args.threads} thread(s) (ms)",
                    record["two_layer_training_step"],
                    ("batch_size", "pyrovae_ms", "plain_pytorch_ms", "ratio"))
    if args.only_two_layer:
        _write(args.output, record)
        return 0
    record["training_step"] = [training_step(b, args.steps, args.repeats, data)
                               for b in args.batch_sizes]
    threads = f"{args.threads} thread{'' if args.threads == 1 else 's'}"
    print_table(f"SVI training step, 784-200-200-50 tanh MLP, Bernoulli, {threads} (ms)",
                record["training_step"],
                ("batch_size", "pyro_svi_ms", "pyrovae_ms", "plain_pytorch_ms", "ratio",
                 "ratio_same_kernel"))
    record["importance_sampling"] = [
        importance_sampling(k, args.num_points, max(1, args.repeats // 2), data)
        for k in args.num_samples]
    if args.memory:
        for row in record["importance_sampling"]:
            row.update(peak_memory_mb(row["num_samples"], args.memory_points or row["num_points"]))
    print_table(f"log p(x) by importance sampling on {args.num_points} test points (s)",
                record["importance_sampling"],
                ("num_samples", "pyrovae_s", "plain_pytorch_s", "ratio", "ratio_same_kernel")
                + ((("peak_cuda_mb" if DEVICE.type == "cuda" else "peak_rss_mb"), "peak_growth_mb")
                   if args.memory else ()))
    if args.epoch:
        record["epoch"] = full_epoch(data, args.epoch_batch_size, args.epoch_repeats)
        print_table("one epoch of MNIST, data loading included (s)", [record["epoch"]],
                    ("num_points", "batch_size", "pyrovae_s", "plain_pytorch_s", "ratio"))
    if args.scaling:
        vae, _ = make_models()
        log_marginal_likelihood(vae, data.test[:100], 100)  # warm-up, untimed
        rows = []
        for k, n in ((250, 200), (500, 200), (1000, 200), (500, 100), (500, 400)):
            x = data.test[:n]
            rows.append({"num_samples": k, "num_points": n, "seconds": seconds_per_call(
                lambda x=x, k=k: log_marginal_likelihood(vae, x, k), 1)})
        for row in rows:
            row["us_per_sample_and_point"] = 1e6 * row["seconds"] / (row["num_samples"]
                                                                     * row["num_points"])
        record["scaling"] = rows
        print_table("log p(x) time against K and N (linear: constant time per sample and point)",
                    rows, ("num_samples", "num_points", "seconds", "us_per_sample_and_point"))
    _write(args.output, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
