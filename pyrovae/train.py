"""Training a :class:`~pyrovae.models.VAE` with Pyro's SVI.

:func:`fit` runs minibatch SVI with a Pyro ELBO and Adam, reports the running train
ELBO in a progress bar, the test ELBO every few epochs, writes ``metrics.csv`` and a
checkpoint every epoch.  ELBO values are per data point, in nats.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import pyro
import torch
from pyro.infer import SVI
from tqdm.auto import tqdm

from pyrovae.checkpoint import CHECKPOINT_NAME, save_checkpoint
from pyrovae.config import TrainConfig
from pyrovae.data import DataSplits
from pyrovae.errors import InvalidDataError, PyrovaeError
from pyrovae.evaluation import elbo
from pyrovae.models import VAE
from pyrovae.objectives import LatentScale, kl_weight, make_objective
from pyrovae.validation import check_data

logger = logging.getLogger(__name__)

METRICS_NAME = "metrics.csv"
METRIC_COLUMNS = ("epoch", "step", "train_elbo", "test_elbo", "epoch_seconds")


class TrainingDivergedError(PyrovaeError):
    """The loss became NaN or infinite."""


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` is ``cuda`` when CUDA is available, else ``cpu``; other names pass through."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PyrovaeError(f"device {name!r} requested but CUDA is not available here")
    return device


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) through Pyro."""
    pyro.set_rng_seed(seed)


@dataclass
class EpochRecord:
    """One line of ``metrics.csv``; ELBOs per data point in nats (``test_elbo`` may be NaN)."""

    epoch: int
    step: int
    train_elbo: float
    test_elbo: float
    epoch_seconds: float


def check_training_data(vae: VAE, data: DataSplits, batch_size: int | None = None) -> None:
    """Raise :class:`~pyrovae.errors.InvalidDataError` if ``data`` cannot train ``vae``."""
    if data.dynamic_binarization:
        # the stored grey levels are Bernoulli probabilities; batches are draws from them
        check_data(data.train, vae.data_dim, name="training data")
        if float(data.train.min()) < 0 or float(data.train.max()) > 1:
            raise InvalidDataError("dynamic binarization needs training data in [0, 1]")
    else:
        vae.check_data(data.train, name="training data")
    vae.check_data(data.test, name="test data")
    if batch_size is not None and batch_size > data.train.shape[0]:
        raise InvalidDataError(
            f"batch size {batch_size} is larger than the training set ({data.train.shape[0]} points)"
        )


def fit(vae: VAE, data: DataSplits, *, epochs: int = 10, batch_size: int = 100,
        lr: float = 1e-3, objective: str = "trace_elbo", num_particles: int = 1,
        seed: int = 0, test_every: int = 1, run_dir: str | Path | None = None,
        config: TrainConfig | None = None, progress: bool = True,
        validate: bool = False, beta: float | None = None,
        kl_warmup_epochs: int | None = None) -> list[EpochRecord]:
    """Train ``vae`` on ``data.train`` by SVI; return one record per epoch.

    Before the first step the prior gets :meth:`~pyrovae.priors.Prior.init_from_data` on
    the training data (the VampPrior's pseudo-inputs; a no-op for the other priors).

    :param data: train/test splits on the VAE's device (see :meth:`DataSplits.to`).
    :param objective: a key of :data:`~pyrovae.objectives.OBJECTIVES`.
    :param num_particles: samples of z per data point in the objective.
    :param beta: the KL weight after warm-up (:func:`~pyrovae.objectives.kl_weight`);
        ``None`` takes ``config.beta``, or 1 without a config.
    :param kl_warmup_epochs: epochs of linear KL warm-up; ``None`` takes
        ``config.kl_warmup_epochs``, or 0 (none) without a config.
    :param seed: seeds the shuffling order and all random number generators.
    :param test_every: compute the test ELBO (1 sample per point) every this many epochs
        and after the last.
    :param run_dir: where ``metrics.csv`` and ``checkpoint.pt`` go (nothing is written if
        ``None``).
    :param config: stored in the checkpoint so the model can be rebuilt from it.
    :param validate: Pyro's distribution argument checks; off by default because they cost
        time in the hot loop, and the data are checked once up front instead.
    :returns: the records; ``train_elbo`` there is minus the loss being minimised, i.e. the
        KL-weighted ELBO while beta is not 1, and the IWAE bound for ``objective="iwae"``.
    :raises TrainingDivergedError: the loss became NaN or infinite; the checkpoint of the
        last good epoch is kept.
    """
    check_training_data(vae, data, batch_size)
    if beta is None:
        beta = config.beta if config is not None else 1.0
    if kl_warmup_epochs is None:
        kl_warmup_epochs = config.kl_warmup_epochs if config is not None else 0
    seed_everything(seed)
    vae.prior.init_from_data(data.train)
    generator = torch.Generator().manual_seed(seed)
    optimizer = pyro.optim.Adam({"lr": lr})
    kl_scale = LatentScale(kl_weight(1, beta=beta, warmup_epochs=kl_warmup_epochs))
    svi = SVI(kl_scale(vae.model), kl_scale(vae.guide), optimizer,
              loss=make_objective(objective, num_particles))
    run_path = Path(run_dir) if run_dir is not None else None
    if run_path is not None:
        run_path.mkdir(parents=True, exist_ok=True)
        _start_metrics(run_path / METRICS_NAME)

    steps_per_epoch = math.ceil(data.train.shape[0] / batch_size)
    history: list[EpochRecord] = []
    step = 0
    vae.train()
    with tqdm(total=epochs * steps_per_epoch, disable=not progress, unit="step",
              dynamic_ncols=True) as bar, pyro.validation_enabled(validate):
        for epoch in range(1, epochs + 1):
            kl_scale.beta = kl_weight(epoch, beta=beta, warmup_epochs=kl_warmup_epochs)
            started = time.perf_counter()
            total_loss, seen = 0.0, 0
            for x in data.train_batches(batch_size, generator=generator):
                loss = svi.step(x)
                step += 1
                if not math.isfinite(loss):
                    raise TrainingDivergedError(
                        f"loss is {loss} at epoch {epoch}, step {step}; the last good checkpoint "
                        f"is kept; try a lower learning rate (--lr)"
                    )
                total_loss += loss
                seen += x.shape[0]
                bar.update()
                bar.set_postfix(epoch=epoch, elbo=f"{-total_loss / seen:.2f}", refresh=False)
            seconds = time.perf_counter() - started
            test_elbo = math.nan
            if epoch % test_every == 0 or epoch == epochs:
                vae.eval()
                test_elbo = elbo(vae, data.test).mean().item()
                vae.train()
            record = EpochRecord(epoch, step, -total_loss / seen, test_elbo, seconds)
            history.append(record)
            logger.info("epoch %d: train ELBO %.3f, test ELBO %.3f nats (%.1fs)", epoch,
                        record.train_elbo, record.test_elbo, seconds)
            if run_path is not None:
                _append_metrics(run_path / METRICS_NAME, record)
                save_checkpoint(run_path / CHECKPOINT_NAME, vae, optimizer, epoch, config,
                                data.image_shape)
    vae.eval()
    return history


def _start_metrics(path: Path) -> None:
    with path.open("w", newline="") as handle:
        csv.writer(handle).writerow(METRIC_COLUMNS)


def _append_metrics(path: Path, record: EpochRecord) -> None:
    with path.open("a", newline="") as handle:
        csv.writer(handle).writerow([getattr(record, column) for column in METRIC_COLUMNS])


def read_metrics(path: str | Path) -> list[EpochRecord]:
    """Read ``metrics.csv`` back into records."""
    with Path(path).open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [EpochRecord(int(row["epoch"]), int(row["step"]), float(row["train_elbo"]),
                        float(row["test_elbo"]), float(row["epoch_seconds"])) for row in rows]
