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
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

# the scripts draw their own figures with pyplot, in files only
matplotlib.use("Agg")

import torch  # noqa: E402

from pyrovae import TrainConfig, plotting, runs  # noqa: E402
from pyrovae.checkpoint import CHECKPOINT_NAME  # noqa: E402
from pyrovae.data import DATA_DIR_ENV, DataSplits  # noqa: E402
from pyrovae.devices import resolve_device, seed_everything  # noqa: E402
from pyrovae.errors import ConfigError, PyrovaeError  # noqa: E402
from pyrovae.models import VAE  # noqa: E402
from pyrovae.priors import diagonal_normal_components  # noqa: E402
from pyrovae.provenance import git_commit, provenance  # noqa: E402
from pyrovae.rundir import json_safe, write_json  # noqa: E402
from pyrovae.runs import RESULTS_NAME, Run  # noqa: E402
from pyrovae.schedules import LR_SCHEDULES  # noqa: E402
from pyrovae.train import TrainingInterrupted  # noqa: E402

logger = logging.getLogger("experiments")

REPOSITORY = Path(__file__).resolve().parents[1]
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
    """The data ``config`` trains on, on ``device`` (:func:`pyrovae.runs.load_run_data`)."""
    return runs.load_run_data(config, device)[1]


#: config fields an experiment may change when it resumes a setting: those of
#: ``pyrovae train --resume``, and the test points (the evaluation's, cached by their number)
RESUME_OVERRIDES = runs.RESUME_OVERRIDES | {"test_size"}


def train(name: str, config: TrainConfig, data: DataSplits, out_dir: Path, *,
          resume: bool, evaluate_only: bool = False) -> Run:
    """Train ``config`` in ``out_dir/name`` (:func:`pyrovae.runs.train_run`); with
    ``resume``, continue its checkpoint if there is one, else start it.

    With ``evaluate_only``, train nothing: load the run's checkpoint as it stands (for
    settings trained by separate processes, gathered into one results file).
    """
    run_dir = out_dir / name
    config.out_dir = str(run_dir)
    existing = (run_dir / CHECKPOINT_NAME).is_file()
    if evaluate_only and not existing:
        raise ConfigError(f"--evaluate-only: {run_dir} holds no checkpoint; train it first")
    if existing and (evaluate_only or resume):
        # the run there must be this setting (refused in one line otherwise)
        runs.resumed_config(run_dir, runs.changes_from(run_dir, config),
                            may_change=RESUME_OVERRIDES)
    if evaluate_only:
        run = runs.load_run(run_dir, data.train.device)
        print(f"[{name}] evaluating as trained ({len(run.history)} epochs)", file=sys.stderr)
        return run
    resume = resume and existing
    print(f"[{name}] {'resuming' if resume else 'training'} to epoch {config.epochs} on "
          f"{data.train.shape[0]} images", file=sys.stderr)
    return runs.train_run(config, data, resume=resume, record_session=True)


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
    """Test ELBO and log p(x) (K = ``num_samples``) of ``run``, cached in its run directory's
    ``evaluation.json`` while the epochs, K, test points and seed are the same.

    :returns: :func:`pyrovae.runs.evaluate_vae`'s dictionary (nats, with standard errors).
    """
    path = run.run_dir / runs.EVALUATION_NAME
    key = {"epochs_trained": len(run.history), "num_samples": num_samples,
           "num_test_points": int(data.test.shape[0]), "seed": seed}
    if path.is_file():
        cached = json.loads(path.read_text())
        if all(cached.get(name) == value for name, value in key.items()):
            return cached
    seed_everything(seed)
    results = runs.evaluate_vae(run.vae, data.test, num_samples=num_samples,
                                chunk_size=evaluation_chunk_size(run.vae, chunk_size,
                                                                 device=data.test.device))
    results.update(key)
    write_json(path, results)
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
        "training_sessions": runs.training_sessions(run.run_dir, len(run.history)),
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
    write_json(out_dir / RESULTS_NAME, json_safe(results))
    print(f"results written to {out_dir / RESULTS_NAME}", file=sys.stderr)
    return results


# --- figures --------------------------------------------------------------------------------
def save_run_figures(run: Run, data: DataSplits, out_dir: Path, *, seed: int = 0) -> list[str]:
    """``samples_<name>.png`` and ``reconstructions_<name>.png`` of ``run``; their file names."""
    if data.image_shape is None:
        return []
    names = [f"samples_{run.name}.png", f"reconstructions_{run.name}.png"]
    seed_everything(seed)
    plotting.save_sample_grid(run.vae, out_dir / names[0], data.image_shape)
    seed_everything(seed)
    plotting.save_reconstructions(run.vae, data.test, out_dir / names[1], data.image_shape)
    return names


def plot_elbo_curves(trained: Sequence[Run], path: Path, *, title: str,
                     published: Mapping[str, float] | None = None,
                     final: Mapping[str, float] | None = None) -> None:
    """:func:`pyrovae.plotting.plot_elbo_curves` of the runs' histories."""
    plotting.plot_elbo_curves(
        {run.name: run.history for run in trained}, path, title=title,
        log_px_labels={run.name: f"K={run.config.log_px_samples}, first "
                                 f"{run.config.log_px_size} images" for run in trained},
        published=published, final=final)


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
    git_commit()  # the commit this script runs, for results.json, however long it runs
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
