"""Early stopping: the run ends at the right epoch on a scripted held-out ELBO, the KL
warm-up is not counted, a resume keeps the count, and the CLI evaluates the best checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

import pyrovae.callbacks
from pyrovae import TrainConfig, build_vae, fit
from pyrovae.checkpoint import BEST_CHECKPOINT_NAME, read_checkpoint
from pyrovae.cli import main
from pyrovae.data import DataSplits
from pyrovae.errors import ConfigError

#: the held-out ELBO of epochs 1, 2, ...: best at epoch 3, never beaten after it
SCRIPT = [-90.0, -89.0, -88.0, -88.5, -88.1, -89.5, -88.2, -88.3, -88.4, -88.6]


def _tiny() -> tuple[torch.nn.Module, DataSplits, TrainConfig]:
    x = torch.bernoulli(torch.full((40, 6), 0.3), generator=torch.Generator().manual_seed(1))
    data = DataSplits.from_tensors(x[:32], x[32:])
    config = TrainConfig(hidden_dims=(4,), latent_dim=2, epochs=10)
    return build_vae(config, data_dim=6), data, config


@pytest.fixture
def scripted_elbo(monkeypatch):
    """Make the loop's held-out ELBO of the n-th evaluation SCRIPT[start + n]."""
    calls: list[int] = []
    start = [0]

    def fake_elbo(program, x, batch_size=1000):
        calls.append(1)
        return torch.full((x.shape[0],), SCRIPT[start[0] + len(calls) - 1])

    monkeypatch.setattr(pyrovae.callbacks, "elbo", fake_elbo)
    return start, calls


def _fit(vae, data, tmp_path, **options):
    return fit(vae, data, epochs=options.pop("epochs", 10), batch_size=16, run_dir=tmp_path,
               progress=False, **options)


def test_the_run_stops_once_the_held_out_elbo_has_not_improved_for_patience_epochs(
        scripted_elbo, tmp_path):
    vae, data, _ = _tiny()
    history = _fit(vae, data, tmp_path, early_stopping_patience=3)
    # best at epoch 3; epochs 4, 5 and 6 do not beat it
    assert [record.epoch for record in history] == [1, 2, 3, 4, 5, 6]
    assert [record.stopped_early for record in history] == [False] * 5 + [True]
    assert read_checkpoint(tmp_path / BEST_CHECKPOINT_NAME)["epoch"] == 3
    assert read_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 6


def test_without_patience_every_epoch_runs(scripted_elbo, tmp_path):
    vae, data, _ = _tiny()
    history = _fit(vae, data, tmp_path, epochs=8)
    assert len(history) == 8 and not any(record.stopped_early for record in history)


def test_epochs_of_the_kl_warm_up_do_not_count(monkeypatch, tmp_path):
    falling = [-80.0, -81.0, -82.0, -83.0, -84.0, -85.0, -86.0, -87.0]
    calls: list[int] = []

    def fake_elbo(program, x, batch_size=1000):
        calls.append(1)
        return torch.full((x.shape[0],), falling[len(calls) - 1])

    monkeypatch.setattr(pyrovae.callbacks, "elbo", fake_elbo)
    vae, data, _ = _tiny()
    # epochs 2 and 3 are in the warm-up (weight 2/4, 3/4); 4 and 5 count: stop after 5, not 3
    history = _fit(vae, data, tmp_path, epochs=8, early_stopping_patience=2, kl_warmup_epochs=4)
    assert len(history) == 5 and history[-1].stopped_early


def test_a_resumed_run_keeps_the_count_and_a_stopped_run_stays_stopped(scripted_elbo, tmp_path):
    start, calls = scripted_elbo
    vae, data, _ = _tiny()
    torch.manual_seed(5)
    reference = _tiny()[0]
    # uninterrupted: stops after epoch 6
    uninterrupted = _fit(reference, data, tmp_path / "whole", early_stopping_patience=3)
    assert len(uninterrupted) == 6
    # 4 epochs (one without improvement), then resumed: 2 more reach the patience of 3; a
    # count lost on resume would go on to epoch 7
    start[0], calls[:] = 0, []
    torch.manual_seed(5)
    vae = _tiny()[0]
    first = _fit(vae, data, tmp_path / "split", epochs=4, early_stopping_patience=3)
    assert len(first) == 4 and not first[-1].stopped_early
    start[0], calls[:] = 4, []
    resumed = _fit(vae, data, tmp_path / "split", early_stopping_patience=3, resume=True)
    assert [record.epoch for record in resumed] == [1, 2, 3, 4, 5, 6] and resumed[-1].stopped_early
    for mine, theirs in zip(vae.state_dict().values(), reference.state_dict().values(), strict=True):
        assert torch.equal(mine, theirs)
    # resuming a run that stopped early trains nothing more
    again = _fit(vae, data, tmp_path / "split", early_stopping_patience=3, resume=True)
    assert len(again) == 6
    assert read_checkpoint(tmp_path / "split" / "checkpoint.pt")["epoch"] == 6


def test_patience_must_not_be_negative():
    with pytest.raises(ConfigError, match="early_stopping_patience must be >= 0"):
        TrainConfig(early_stopping_patience=-1)


def test_the_cli_evaluates_the_best_checkpoint_after_an_early_stop(scripted_elbo, tmp_path):
    x = torch.bernoulli(torch.full((40, 6), 0.3), generator=torch.Generator().manual_seed(1))
    path = tmp_path / "data.npz"
    import numpy as np

    np.savez(path, train=x[:32].numpy().astype(np.uint8), test=x[32:].numpy().astype(np.uint8))
    out = tmp_path / "run"
    code = main(["train", "--dataset", f"npz:{path}", "--hidden-dims", "4", "--latent-dim", "2",
                 "--epochs", "10", "--batch-size", "16", "--early-stopping-patience", "3",
                 "--eval-samples", "5", "--no-progress", "--out-dir", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["epochs"] == 6 and results["stopped_early"] is True
    assert results["evaluated_checkpoint"] == BEST_CHECKPOINT_NAME
    assert results["evaluated_checkpoint_epoch"] == 3
