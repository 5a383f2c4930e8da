"""What every experiment script shares: flags, one training run per setting, evaluation,
figures and the results JSON.

Each script trains one or more settings, each in its own pyrovae run directory
``<out-dir>/<setting>/`` (``config.json``, ``metrics.csv``, ``checkpoint.pt``,
``samples.png``, ``evaluation.json``), then writes ``<out-dir>/results.json`` and its figures.
``--resume`` continues every setting from its checkpoint (finished ones are only
re-evaluated, or not even that when ``evaluation.json`` matches), so a long run that was
stopped loses at most the steps since its last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import torch  # noqa: E402
from matplotlib import pyplot as plt  # noqa: E402

from pyrovae import TrainConfig, build_vae, load_dataset  # noqa: E402
from pyrovae.checkpoint import CHECKPOINT_NAME, load_vae  # noqa: E402
from pyrovae.cli import RESUME_OVERRIDES, evaluate_vae, save_sample_grid  # noqa: E402
from pyrovae.data import DATA_DIR_ENV, DataSplits  # noqa: E402
from pyrovae.errors import ConfigError, PyrovaeError  # noqa: E402
from pyrovae.models import VAE  # noqa: E402
from pyrovae.priors import diagonal_normal_components  # noqa: E402
from pyrovae.provenance import provenance  # noqa: E402
from pyrovae.schedules import LR_SCHEDULES  # noqa: E402
from pyrovae.train import (  # noqa: E402
    METRICS_NAME,
    EpochRecord,
    TrainingInterrupted,
    fit_from_config,
    read_metrics,
    resolve_device,
    seed_everything,
)

logger = logging.getLogger("experiments")

REPOSITORY = Path(__file__).resolve().parents[1]
RESULTS_NAME = "results.json"
CONFIG_NAME = "config.json"
EVALUATION_NAME = "evaluation.json"
#: one JSON line per call that trained a run: the epoch it started at, commit, machine
SESSIONS_NAME = "training_sessions.jsonl"
#: largest number of floats one importance-sampling trace may broadcast a mixture prior to
MIXTURE_ELEMENTS = 50_000_000

BURDA_2016 = "Burda, Grosse & Salakhutdinov 2016, Table 1"
TOMCZAK_2018 = "Tomczak & Welling 2018, Table 2"


def default_data_dir() -> str:
    """``$PYROVAE_DATA``, else ``../shared/data`` beside the repository."""
    return os.environ.get(DATA_DIR_ENV) or str(REPOSITORY.parent / "shared" / "data")


def add_common_arguments(parser: argparse.ArgumentParser, *, out_dir: str, epochs: int,
                         eval_samples: int = 5000, latent_dim: int = 50,
                         hidden_dims: Sequence[int] = (200, 200), log_px_every: int = 0) -> None:
    """The flags every experiment has, with the script's own defaults."""
    add = parser.add_argument
    add("--data-dir", default=default_data_dir(),
        help=f"folder holding MNIST/raw and binarized_mnist.npz (default: ${DATA_DIR_ENV}, "
             f"else ../shared/data beside the repository)")
    add("--out-dir", default=out_dir, help="where to write runs, results and figures "
                                           "(default: %(default)s)")
    add("--epochs", type=int, default=epochs, help="passes over the training set per setting "
                                                   "(default: %(default)s)")
    add("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    add("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    add("--resume", action="store_true",
        help="continue the runs in --out-dir from their checkpoints (--epochs may grow)")
    add("--overwrite", action="store_true", help="replace runs already in --out-dir")
    add("--eval-samples", type=int, default=eval_samples,
        help="importance samples K for the test log p(x) (default: %(default)s)")
    add("--eval-chunk-size", type=int, default=500,
        help="importance samples per vectorized trace; lowered automatically for mixture "
             "priors to bound memory (default: %(default)s)")
    add("--train-size", type=int, default=None, help="use only the first N training images")
    add("--test-size", type=int, default=None, help="use only the first N test images")
    add("--hidden-dims", type=int, nargs="+", default=list(hidden_dims),
        help="encoder hidden widths; the decoder mirrors them (default: %(default)s)")
    add("--latent-dim", type=int, default=latent_dim, help="dimension of z (default: %(default)s)")
    add("--batch-size", type=int, default=100, help="minibatch size (default: %(default)s)")
    add("--lr", type=float, default=1e-3, help="Adam learning rate (default: %(default)s)")
    add("--lr-schedule", choices=LR_SCHEDULES, default="constant",
        help="constant, or iwae: Burda et al. 2016's decay from --lr to --lr/10 over 3280 "
             "epochs (default: %(default)s)")
    add("--test-every", type=int, default=1,
        help="test ELBO in metrics.csv every N epochs (default: %(default)s)")
    add("--log-px-every", type=int, default=log_px_every,
        help="test log p(x) in metrics.csv and the ELBO figure every N epochs, on the first "
             "--log-px-size test images with --log-px-samples samples (0: only the final "
             "one; default: %(default)s)")
    add("--log-px-samples", type=int, default=1000,
        help="importance samples K of the --log-px-every estimates (default: %(default)s)")
    add("--log-px-size", type=int, default=1000,
        help="test images of the --log-px-every estimates (default: %(default)s)")
    add("--evaluate-only", action="store_true",
        help="train nothing: evaluate the runs in --out-dir as their checkpoints stand and "
             "write the results and figures of all the settings named")
    add("--max-minutes", type=float, default=None,
        help="wall-clock budget per setting: stop training at the end of the first epoch "
             "after which another would overrun it, then evaluate (default: none)")
    add("--progress", action=argparse.BooleanOptionalAction, default=True,
        help="show a progress bar")


def base_config(args: argparse.Namespace, **settings: Any) -> TrainConfig:
    """A :class:`TrainConfig` from the common flags, updated with ``settings``."""
    values: dict[str, Any] = {
        "data_dir": args.data_dir, "download": False, "train_size": args.train_size,
        "test_size": args.test_size, "hidden_dims": tuple(args.hidden_dims),
        "latent_dim": args.latent_dim, "epochs": args.epochs, "batch_size": args.batch_size,
        "lr": args.lr, "lr_schedule": args.lr_schedule, "device": args.device, "seed": args.seed,
        "test_every": args.test_every, "log_px_every": args.log_px_every,
        "log_px_samples": args.log_px_samples, "log_px_size": args.log_px_size,
        "eval_samples": args.eval_samples, "progress": args.progress,
        "overwrite": args.overwrite, "max_minutes": args.max_minutes,
    }
    values.update(settings)
    return TrainConfig(**values)


def load_data(config: TrainConfig, device: torch.device) -> DataSplits:
    """The dataset of ``config``, cut to its train/test sizes, on ``device``."""
    data = load_dataset(config.dataset, config.data_dir, binarize=config.binarize,
                        download=config.download)
    return data.subset(config.train_size, config.test_size).to(device)


@dataclass
class Run:
    """One trained setting."""

    name: str
    config: TrainConfig
    vae: VAE
    history: list[EpochRecord]
    run_dir: Path

    @property
    def train_seconds(self) -> float:
        """Training time summed over epochs, across resumes (test-ELBO passes excluded)."""
        return sum(record.epoch_seconds for record in self.history)


def _check_resumable(config: TrainConfig, run_dir: Path) -> None:
    saved = TrainConfig.load(run_dir / CONFIG_NAME).to_dict()
    wanted = config.to_dict()
    changed = sorted(name for name in wanted
                     if name not in RESUME_OVERRIDES | {"out_dir", "overwrite", "test_size"}
                     and saved.get(name) != wanted[name])
    if changed:
        details = ", ".join(f"{name}: {saved.get(name)!r} -> {wanted[name]!r}" for name in changed)
        raise ConfigError(f"cannot resume {run_dir}: the settings differ ({details}); use another "
                          f"--out-dir or --overwrite")


def train(name: str, config: TrainConfig, data: DataSplits, out_dir: Path, *,
          resume: bool, evaluate_only: bool = False) -> Run:
    """Train ``config`` in ``out_dir/name``; with ``resume``, continue its checkpoint if any.

    With ``evaluate_only``, train nothing: load the run's checkpoint as it stands (for
    settings trained by separate processes, gathered into one results file).
    """
    run_dir = out_dir / name
    config.out_dir = str(run_dir)
    existing = (run_dir / CHECKPOINT_NAME).is_file()
    if evaluate_only:
        if not existing:
            raise ConfigError(f"--evaluate-only: {run_dir} holds no checkpoint; train it first")
        _check_resumable(config, run_dir)
        vae, saved, _ = load_vae(run_dir, data.train.device)
        history = read_metrics(run_dir / METRICS_NAME)
        print(f"[{name}] evaluating as trained ({len(history)} epochs)", file=sys.stderr)
        return Run(name, saved, vae, history, run_dir)
    if existing and not resume and not config.overwrite:
        raise ConfigError(f"{run_dir} already holds a run; pass --resume to continue it or "
                          f"--overwrite to replace it")
    resume = resume and existing
    if resume:
        _check_resumable(config, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        (run_dir / EVALUATION_NAME).unlink(missing_ok=True)
        (run_dir / SESSIONS_NAME).unlink(missing_ok=True)
    metrics = run_dir / METRICS_NAME
    _record_session(run_dir, len(read_metrics(metrics)) + 1 if resume and metrics.is_file() else 1,
                    data.train.device)
    seed_everything(config.seed)
    vae = build_vae(config, data_dim=data.data_dim, image_shape=data.image_shape).to(data.train.device)
    config.save(run_dir / CONFIG_NAME)
    print(f"[{name}] {'resuming' if resume else 'training'} to epoch {config.epochs} on "
          f"{data.train.shape[0]} images", file=sys.stderr)
    history = fit_from_config(vae, data, config, run_dir=run_dir, resume=resume)
    vae.eval()
    return Run(name, config, vae, history, run_dir)


def _record_session(run_dir: Path, first_epoch: int, device: torch.device) -> None:
    """Append to ``run_dir``'s :data:`SESSIONS_NAME` that this call trains it from
    ``first_epoch`` on (a resumed epoch cut short counts as this call's), with the commit and
    machine, so that a run resumed across machines says which epochs ran where."""
    record = {"first_epoch": first_epoch,
              **{key: value for key, value in provenance(device).items()
                 if key in ("commit", "date", "device", "hardware")}}
    with (run_dir / SESSIONS_NAME).open("a") as handle:
        handle.write(json.dumps(record) + "\n")


def training_sessions(run_dir: Path, epochs: int) -> list[dict[str, Any]]:
    """The calls that trained ``run_dir``, each with ``first_epoch`` and ``last_epoch``
    (the next call's start, or ``epochs``); calls that trained nothing are left out, and a
    run trained before the record existed gives ``[]``."""
    path = run_dir / SESSIONS_NAME
    if not path.is_file():
        return []
    sessions = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for session, following in zip(sessions, [*sessions[1:], None], strict=True):
        session["last_epoch"] = following["first_epoch"] - 1 if following else epochs
    return [session for session in sessions if session["last_epoch"] >= session["first_epoch"]]


def evaluation_chunk_size(vae: VAE, chunk_size: int, batch_size: int = 100,
                          device: torch.device | None = None) -> int:
    """Importance samples per trace, lowered for mixture priors, which score every z against
    all their components: ``chunk * batch * components`` float64 pairs where the components
    are diagonal Normals (one matrix product, see
    :func:`pyrovae.priors.diagonal_normal_components`), ``chunk * batch * components *
    latent_dim`` floats for the others (at most :data:`MIXTURE_ELEMENTS`, five times that on
    a GPU). Decided from the prior ``vae`` builds, so a new mixture prior needs no entry here."""
    with torch.no_grad():
        prior = vae.prior(vae.posterior)
    if not isinstance(prior, torch.distributions.MixtureSameFamily):
        return chunk_size
    components = prior.component_distribution
    num_components = prior.mixture_distribution.logits.shape[-1]
    diagonal = diagonal_normal_components(components) is not None
    per_sample = batch_size * num_components * (2 if diagonal else prior.event_shape[-1])
    budget = MIXTURE_ELEMENTS * (5 if device is not None and device.type == "cuda" else 1)
    return min(chunk_size, max(1, budget // per_sample))


def evaluate(run: Run, data: DataSplits, *, num_samples: int, chunk_size: int = 500,
             seed: int = 0) -> dict[str, Any]:
    """Test ELBO and log p(x) (K = ``num_samples``) of ``run``, cached in its run directory.

    :returns: :func:`pyrovae.cli.evaluate_vae`'s dictionary (nats, with standard errors).
    """
    path = run.run_dir / EVALUATION_NAME
    key = {"epochs_trained": len(run.history), "num_samples": num_samples,
           "num_test_points": int(data.test.shape[0]), "seed": seed}
    if path.is_file():
        cached = json.loads(path.read_text())
        if all(cached.get(name) == value for name, value in key.items()):
            return cached
    seed_everything(seed)
    results = evaluate_vae(run.vae, data.test, num_samples=num_samples,
                           chunk_size=evaluation_chunk_size(run.vae, chunk_size,
                                                            device=data.test.device))
    results.update(key)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"[{run.name}] test ELBO {results['test_elbo']:.2f}, log p(x) (K={num_samples}) "
          f"{results['log_marginal_likelihood']:.2f} ± "
          f"{results['log_marginal_likelihood_standard_error']:.2f} nats", file=sys.stderr)
    return results


def train_and_evaluate(name: str, config: TrainConfig, data: DataSplits,
                       args: argparse.Namespace) -> tuple[Run, dict[str, Any]]:
    """:func:`train` then :func:`evaluate` one setting, as the common flags say (``--out-dir``,
    ``--resume``, ``--evaluate-only``, ``--eval-samples``, ``--eval-chunk-size``, ``--seed``)."""
    run = train(name, config, data, Path(args.out_dir), resume=args.resume,
                evaluate_only=args.evaluate_only)
    return run, evaluate(run, data, num_samples=args.eval_samples,
                         chunk_size=args.eval_chunk_size, seed=args.seed)


def run_summary(run: Run, evaluation: Mapping[str, Any], *, setting: str,
                published: float | None = None, source: str | None = None,
                **extra: Any) -> dict[str, Any]:
    """One entry of ``results.json["runs"]``: what :mod:`make_results_table` reads."""
    return {
        "name": run.name,
        "setting": setting,
        "epochs": len(run.history),
        "train_seconds": run.train_seconds,
        "seconds_per_epoch": run.train_seconds / max(1, len(run.history)),
        "test_log_marginal_likelihood": evaluation["log_marginal_likelihood"],
        "test_log_marginal_likelihood_standard_error":
            evaluation["log_marginal_likelihood_standard_error"],
        "eval_samples": evaluation["num_samples"],
        "num_test_points": evaluation["num_test_points"],
        "test_elbo": evaluation["test_elbo"],
        "test_elbo_standard_error": evaluation["test_elbo_standard_error"],
        "evaluation_seconds": evaluation["evaluation_seconds"],
        "published_log_marginal_likelihood": published,
        "published_source": source,
        "final_train_objective": run.history[-1].train_elbo,
        "training_sessions": training_sessions(run.run_dir, len(run.history)),
        "config": run.config.to_dict(),
        **extra,
    }


def write_results(out_dir: Path, experiment: str, args: argparse.Namespace,
                  runs: list[dict[str, Any]], *, started: float, device: torch.device,
                  figures: Sequence[str], **extra: Any) -> dict[str, Any]:
    """Write ``out_dir/results.json``: provenance, arguments, wall time and one entry per run."""
    results = {
        "experiment": experiment,
        "script": f"experiments/{experiment}.py",
        "arguments": {key: value for key, value in vars(args).items()},
        "seed": args.seed,
        "epochs": args.epochs,
        "wall_seconds": time.perf_counter() - started,
        "units": "nats per data point; log p(x) is the importance-sampled IWAE bound with "
                 "K = eval_samples, a lower bound in expectation",
        **extra,
        "runs": runs,
        "figures": list(figures),
        **provenance(device),
    }
    (out_dir / RESULTS_NAME).write_text(json.dumps(_json_safe(results), indent=2) + "\n")
    print(f"results written to {out_dir / RESULTS_NAME}", file=sys.stderr)
    return results


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    return value


# --- figures --------------------------------------------------------------------------------
def _image_grid(images: torch.Tensor, image_shape: Sequence[int], nrow: int) -> torch.Tensor:
    from torchvision.utils import make_grid

    images = images.reshape(images.shape[0], *image_shape).clamp(0, 1).cpu()
    return make_grid(images, nrow=nrow, padding=2, pad_value=1.0)


def save_image_grid(images: torch.Tensor, path: Path, image_shape: Sequence[int], nrow: int) -> None:
    """Save ``images`` ``(N, D)`` with values in [0, 1] as a PNG grid of ``nrow`` per row."""
    from torchvision.utils import save_image

    save_image(_image_grid(images, image_shape, nrow), str(path))


def save_samples(run: Run, path: Path, image_shape: Sequence[int], *, seed: int = 0,
                 num_samples: int = 64) -> None:
    """E[x|z] for z ~ p(z), as a grid (:func:`pyrovae.cli.save_sample_grid`)."""
    seed_everything(seed)
    save_sample_grid(run.vae, path, image_shape, num_samples)


def save_reconstructions(vae: VAE, x: torch.Tensor, path: Path, image_shape: Sequence[int], *,
                         num_images: int = 10, seed: int = 0) -> None:
    """Test images (top row) above E[x'|z], z ~ q(z|x) (bottom row)."""
    seed_everything(seed)
    x = x[:num_images]
    images = torch.cat([x.cpu(), vae.reconstruct(x).cpu()])
    save_image_grid(images, path, image_shape, nrow=x.shape[0])


def save_run_figures(run: Run, data: DataSplits, out_dir: Path, *, seed: int = 0) -> list[str]:
    """``samples_<name>.png`` and ``reconstructions_<name>.png`` of ``run``; their file names."""
    if data.image_shape is None:
        return []
    names = [f"samples_{run.name}.png", f"reconstructions_{run.name}.png"]
    save_samples(run, out_dir / names[0], data.image_shape, seed=seed)
    save_reconstructions(run.vae, data.test, out_dir / names[1], data.image_shape, seed=seed)
    return names


def plot_image_rows(rows: Mapping[str, torch.Tensor], path: Path, image_shape: Sequence[int],
                    *, title: str) -> None:
    """One labelled row of images per entry of ``rows`` (e.g. reconstructions per setting)."""
    figure, axes = plt.subplots(len(rows), 1, figsize=(12, 1.3 * len(rows) + 0.6), squeeze=False)
    for axis, (label, images) in zip(axes[:, 0], rows.items(), strict=True):
        grid = _image_grid(images, image_shape, nrow=images.shape[0])
        axis.imshow(grid.permute(1, 2, 0).numpy(), cmap="gray", vmin=0, vmax=1)
        axis.set_ylabel(label, rotation=0, ha="right", va="center")
        axis.set_xticks([])
        axis.set_yticks([])
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_elbo_curves(runs: Sequence[Run], path: Path, *, title: str,
                     published: Mapping[str, float] | None = None,
                     final: Mapping[str, float] | None = None) -> None:
    """Train and test ELBO per epoch (from each run's ``metrics.csv``), one colour per run,
    and the test log p(x) at the epochs that estimated it (``--log-px-every``).

    :param published: per run name, a published log p(x), drawn as a dashed line.
    :param final: per run name, our final test log p(x), drawn as a point at the last epoch.
    """
    figure, axis = plt.subplots(figsize=(7.5, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    shown: list[float] = []  # values after the first epoch, which would squash the y axis
    for index, run in enumerate(runs):
        color = colors[index % len(colors)]
        records = read_metrics(run.run_dir / METRICS_NAME)
        epochs = [r.epoch for r in records]
        later = records[1:] if len(records) > 2 else records
        shown += [v for r in later for v in (r.train_elbo, r.test_elbo, r.test_log_px)
                  if math.isfinite(v)]
        shown += [value for table in (published, final) if table and table.get(run.name) is not None
                  for value in [table[run.name]]]
        axis.plot(epochs, [r.train_elbo for r in records], color=color, alpha=0.45, lw=1,
                  label=f"{run.name}: train objective")
        tested = [(r.epoch, r.test_elbo) for r in records if math.isfinite(r.test_elbo)]
        axis.plot(*zip(*tested, strict=True), color=color, marker="." if len(tested) < 30 else None,
                  lw=1.6, label=f"{run.name}: test ELBO")
        curve = [(r.epoch, r.test_log_px) for r in records if math.isfinite(r.test_log_px)]
        if curve:
            axis.plot(*zip(*curve, strict=True), color=color, marker="o", ms=3.5, lw=1.2, ls=":",
                      label=f"{run.name}: test log p(x), K={run.config.log_px_samples}, "
                            f"first {run.config.log_px_size} images")
        if final and run.name in final:
            axis.plot([epochs[-1]], [final[run.name]], color=color, marker="*", ms=11, ls="",
                      label=f"{run.name}: test log p(x), final")
        if published and published.get(run.name) is not None:
            axis.axhline(published[run.name], color=color, ls="--", lw=1,
                         label=f"{run.name}: published log p(x)")
    if shown:
        low, high = min(shown), max(shown)
        margin = 0.05 * (high - low) + 0.5
        axis.set_ylim(low - margin, high + margin)
    axis.set_xlabel("epoch")
    axis.set_ylabel("nats per image")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# --- running a script -----------------------------------------------------------------------
def run_main(body: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser,
             argv: Sequence[str] | None) -> int:
    """Parse ``argv``, run ``body``, and turn library errors into one line and exit status 2.

    SIGINT/SIGTERM during training leave a checkpoint; the exit status is then 128 + signal
    and ``--resume`` continues.
    """
    args = parser.parse_args(argv)
    for name in ("epochs", "eval_samples", "eval_chunk_size", "batch_size", "latent_dim"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    try:
        return body(args)
    except TrainingInterrupted as error:
        print(f"{parser.prog}: {error}; rerun with --resume to continue", file=sys.stderr)
        return 128 + error.signal_number
    except PyrovaeError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2


def device_of(args: argparse.Namespace) -> torch.device:
    return resolve_device(args.device)
