"""Runs survive faults: resume after SIGKILL/SIGTERM ends bit-identical to an uninterrupted
run; NaN losses stop or roll back; the last N and the best checkpoints are kept."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from pyrovae import TrainConfig, build_vae, fit
from pyrovae.checkpoint import read_checkpoint
from pyrovae.cli import main
from pyrovae.data import DataSplits
from pyrovae.train import TrainingDivergedError, TrainingLoop, read_metrics
from tests.conftest import SHARED_DATA, requires_mnist


def tiny_data(dynamic: bool = True) -> DataSplits:
    generator = torch.Generator().manual_seed(0)
    grey = torch.rand(120, 10, generator=generator)
    return DataSplits.from_tensors(grey, grey[:30], binarize="dynamic" if dynamic else "static")


def tiny_vae(seed: int = 1):
    torch.manual_seed(seed)
    return build_vae(TrainConfig(hidden_dims=(8,), latent_dim=2), data_dim=10)


def assert_same_parameters(first, second):
    for (name, value), (_, other) in zip(first.items(), second.items(), strict=True):
        assert torch.equal(value, other), name


def test_resume_at_an_epoch_boundary_is_bit_identical(tmp_path):
    data = tiny_data()
    reference = tiny_vae()
    fit(reference, data, epochs=3, batch_size=16, seed=5, progress=False, run_dir=tmp_path / "a")
    stopped = tiny_vae()
    fit(stopped, data, epochs=1, batch_size=16, seed=5, progress=False, run_dir=tmp_path / "b")
    resumed = tiny_vae(seed=99)  # whatever it starts from, the checkpoint overrides it
    history = fit(resumed, data, epochs=3, batch_size=16, seed=5, progress=False,
                  run_dir=tmp_path / "b", resume=True)
    assert_same_parameters(reference.state_dict(), resumed.state_dict())
    assert [r.epoch for r in history] == [1, 2, 3]
    expected = [r.train_elbo for r in read_metrics(tmp_path / "a" / "metrics.csv")]
    assert [r.train_elbo for r in read_metrics(tmp_path / "b" / "metrics.csv")] == expected


class Killed(Exception):
    """Stands for SIGKILL: the process dies between steps, leaving only its last checkpoint."""


#: five epochs of 8 steps under the iwae schedule, checkpointed every 4 steps
IWAE_SCHEDULE = dict(batch_size=16, seed=5, progress=False, checkpoint_every=4, lr_schedule="iwae")


@pytest.fixture(scope="module")
def iwae_schedule_reference(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The parameters after five uninterrupted epochs under the iwae schedule (shared by the
    resume cases), checked to differ from a constant rate's."""
    reference = tiny_vae()
    fit(reference, tiny_data(), epochs=5, run_dir=tmp_path_factory.mktemp("reference"),
        **IWAE_SCHEDULE)
    constant = tiny_vae()
    fit(constant, tiny_data(), epochs=5, **{**IWAE_SCHEDULE, "lr_schedule": "constant"})
    assert not torch.equal(constant.state_dict()["decoder.body.0.weight"],
                           reference.state_dict()["decoder.body.0.weight"])
    return reference.state_dict()


@pytest.mark.parametrize("killed_at_step", [None, 13])
def test_resume_with_the_iwae_schedule_is_bit_identical(tmp_path, killed_at_step,
                                                        iwae_schedule_reference):
    """Five epochs of 8 steps cross the schedule's stages 0, 1 and 2.  Stopped after epoch 1,
    or killed at step 13 (epoch 2) with the last checkpoint at step 12, then resumed."""
    data = tiny_data()
    options = IWAE_SCHEDULE
    stopped = tiny_vae()
    if killed_at_step is None:
        fit(stopped, data, epochs=1, run_dir=tmp_path / "b", **options)
    else:
        steps = {"done": 0}
        original_step = TrainingLoop.train_step

        def train_step(self, *args, **kwargs):
            if steps["done"] == killed_at_step - 1:
                raise Killed
            steps["done"] += 1
            return original_step(self, *args, **kwargs)

        with pytest.MonkeyPatch.context() as patch, pytest.raises(Killed):
            patch.setattr(TrainingLoop, "train_step", train_step)
            fit(stopped, data, epochs=5, run_dir=tmp_path / "b", **options)
        position = read_checkpoint(tmp_path / "b")["progress"]
        assert (position["epoch"], position["batch"], position["step"]) == (2, 4, 12)
    resumed = tiny_vae(seed=99)
    fit(resumed, data, epochs=5, run_dir=tmp_path / "b", resume=True, **options)
    assert_same_parameters(iwae_schedule_reference, resumed.state_dict())


def poison_one_update(patch: pytest.MonkeyPatch) -> None:
    """Make the next Adam update write NaN into the parameters; later updates are healthy."""
    poisoned = {"done": False}
    original_step = torch.optim.Adam.step

    def step(self, *args, **kwargs):
        if not poisoned["done"]:
            poisoned["done"] = True
            for group in self.param_groups:
                for parameter in group["params"]:
                    parameter.data.fill_(math.nan)
            return None
        return original_step(self, *args, **kwargs)

    patch.setattr(torch.optim.Adam, "step", step)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    data = tiny_data(dynamic=False)
    vae = tiny_vae()
    fit(vae, data, epochs=1, batch_size=16, progress=False, run_dir=tmp_path)
    good = read_checkpoint(tmp_path)["model"]
    with pytest.MonkeyPatch.context() as patch, \
            pytest.raises(TrainingDivergedError, match="epoch 2, step 10"):
        poison_one_update(patch)
        fit(vae, data, epochs=2, batch_size=16, progress=False, run_dir=tmp_path, resume=True)
    assert_same_parameters(read_checkpoint(tmp_path)["model"], good)


def test_rollback_lowers_the_learning_rate_and_finishes(tmp_path):
    data = tiny_data(dynamic=False)
    vae = tiny_vae()
    fit(vae, data, epochs=1, batch_size=16, progress=False, run_dir=tmp_path)
    with pytest.MonkeyPatch.context() as patch:
        poison_one_update(patch)
        history = fit(vae, data, epochs=3, batch_size=16, progress=False, run_dir=tmp_path,
                      resume=True, on_divergence="rollback", lr=1e-3)
    position = read_checkpoint(tmp_path)["progress"]
    assert position["rollbacks"] == 1 and position["lr"] == pytest.approx(5e-4)
    assert [r.epoch for r in history] == [1, 2, 3]
    assert all(math.isfinite(r.train_elbo) for r in history)


def test_rollback_halves_the_scheduled_rate(tmp_path):
    """Diverging in epoch 3 (stage 1 of the iwae schedule) rolls back to the end of epoch 2
    and runs on at half the schedule; the halving survives into later epochs and resume."""
    data = tiny_data(dynamic=False)
    vae = tiny_vae()
    options = dict(batch_size=16, progress=False, run_dir=tmp_path, lr=1e-3, lr_schedule="iwae")
    fit(vae, data, epochs=2, **options)
    with pytest.MonkeyPatch.context() as patch:
        poison_one_update(patch)
        fit(vae, data, epochs=4, resume=True, on_divergence="rollback", **options)
    fit(vae, data, epochs=5, resume=True, on_divergence="rollback", **options)
    checkpoint = read_checkpoint(tmp_path)
    assert checkpoint["progress"]["rollbacks"] == 1 and checkpoint["progress"]["lr"] == 5e-4
    assert checkpoint["optimizer"]["param_groups"][0]["lr"] == 5e-4 * 10 ** (-2 / 7)  # epoch 5


def test_keeps_the_last_n_and_the_best(tmp_path):
    fit(tiny_vae(), tiny_data(), epochs=4, batch_size=16, progress=False, run_dir=tmp_path,
        keep_last=2)
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == ["epoch-0003.pt", "epoch-0004.pt"]
    best = read_checkpoint(tmp_path / "checkpoint_best.pt")
    records = read_metrics(tmp_path / "metrics.csv")
    best_record = max(records, key=lambda r: r.test_elbo)
    assert best["epoch"] == best_record.epoch
    assert best["progress"]["best_elbo"] == pytest.approx(best_record.test_elbo)


def test_the_best_checkpoint_is_chosen_on_the_validation_set(tmp_path):
    data = tiny_data().with_validation(40)
    assert data.train.shape[0] == 80 and data.valid.shape[0] == 40
    assert set(data.valid.unique().tolist()) <= {0.0, 1.0}  # binarized once, like the test set
    fit(tiny_vae(), data, epochs=4, batch_size=16, progress=False, run_dir=tmp_path)
    records = read_metrics(tmp_path / "metrics.csv")
    assert all(math.isfinite(r.valid_elbo) for r in records)
    best_record = max(records, key=lambda r: r.valid_elbo)
    assert read_checkpoint(tmp_path / "checkpoint_best.pt")["epoch"] == best_record.epoch


TRAIN = ["--train-size", "3000", "--test-size", "50", "--epochs", "3", "--hidden-dims", "64",
         "--latent-dim", "4", "--batch-size", "20", "--eval-samples", "0", "--no-progress",
         "--checkpoint-every", "7", "--seed", "3"]


def pyrovae_train(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "pyrovae", "train", "--data-dir",
                             str(SHARED_DATA), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def interrupted_then_resumed(run_dir, signal_number: int, rng: random.Random) -> str:
    """Start a run, send ``signal_number`` at a random moment after its first checkpoint,
    resume it, and return what the interrupted process printed."""
    for _ in range(5):
        process = pyrovae_train("--out-dir", str(run_dir), "--overwrite", *TRAIN)
        while not (run_dir / "checkpoint.pt").exists() and process.poll() is None:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 1.0))
        process.send_signal(signal_number)
        _, stderr = process.communicate(timeout=120)
        progress = read_checkpoint(run_dir)["progress"]
        # A signal that lands after the last checkpoint but before the process exits
        # interrupts nothing: the run is complete on disk, so try again.
        if process.returncode != 0 and progress["step"] < 3 * 150:
            break
    else:
        pytest.fail("the run finished before every interruption")
    resumed = pyrovae_train("--resume", str(run_dir), "--no-progress")
    _, resume_err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, resume_err
    return stderr


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    process = pyrovae_train("--out-dir", str(run_dir), "--overwrite", *TRAIN)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    return read_checkpoint(run_dir)["model"]


@requires_mnist
def test_sigkill_at_a_random_moment_then_resume_is_bit_identical(tmp_path, uninterrupted):
    interrupted_then_resumed(tmp_path, signal.SIGKILL, random.Random(0))
    assert_same_parameters(read_checkpoint(tmp_path)["model"], uninterrupted)


@requires_mnist
def test_sigterm_writes_a_checkpoint_and_exits_cleanly(tmp_path, uninterrupted):
    stderr = interrupted_then_resumed(tmp_path, signal.SIGTERM, random.Random(1))
    assert "SIGTERM at epoch" in stderr and "--resume" in stderr
    assert "Traceback" not in stderr
    assert_same_parameters(read_checkpoint(tmp_path)["model"], uninterrupted)


@requires_mnist
def test_resume_refuses_flags_that_would_make_another_run(tmp_path, uninterrupted):
    process = pyrovae_train("--out-dir", str(tmp_path), *TRAIN[:-4], "--epochs", "1")
    process.communicate(timeout=300)
    refused = pyrovae_train("--resume", str(tmp_path), "--latent-dim", "8")
    _, stderr = refused.communicate(timeout=120)
    assert refused.returncode == 2
    assert "--latent-dim cannot change when resuming" in stderr


def test_orphan_temporaries_are_removed_on_resume_and_never_counted(tmp_path):
    data = tiny_data()
    fit(tiny_vae(), data, epochs=1, batch_size=16, seed=5, progress=False, run_dir=tmp_path,
        keep_last=2)
    orphans = [tmp_path / "checkpoint.pt.k1ll3d.tmp", tmp_path / "checkpoints" / "epoch-0002.pt.tmp"]
    for path in orphans:
        path.write_bytes(b"partial")
    fit(tiny_vae(), data, epochs=2, batch_size=16, seed=5, progress=False, run_dir=tmp_path,
        keep_last=2, resume=True)
    assert not any(path.exists() for path in orphans)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == \
        ["epoch-0001.pt", "epoch-0002.pt"]


def test_a_finite_divergence_stops_the_run(tmp_path):
    data = tiny_data(dynamic=False)
    original = TrainingLoop._loss
    calls = {"n": 0}

    def exploding(self, *args, **kwargs):
        calls["n"] += 1
        loss = original(self, *args, **kwargs)
        return loss * 1e6 if calls["n"] > 3 else loss  # finite, but a million times larger

    with pytest.MonkeyPatch.context() as patch, \
            pytest.raises(TrainingDivergedError, match="training diverged; no checkpoint was "
                                                       "written"):
        patch.setattr(TrainingLoop, "_loss", exploding)
        fit(tiny_vae(), data, epochs=2, batch_size=16, progress=False, run_dir=tmp_path)


def test_a_signal_during_the_last_evaluation_is_honoured(tmp_path):
    from pyrovae.train import TrainingInterrupted

    data = tiny_data()
    original = TrainingLoop._finish_epoch

    def signalled(self, seconds):
        if self.epoch == 2:  # the last epoch: the signal comes during its test ELBO
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, seconds)

    with pytest.MonkeyPatch.context() as patch, \
            pytest.raises(TrainingInterrupted, match="SIGTERM after the last epoch \\(2\\)"):
        patch.setattr(TrainingLoop, "_finish_epoch", signalled)
        fit(tiny_vae(), data, epochs=2, batch_size=16, progress=False, run_dir=tmp_path)
    assert read_checkpoint(tmp_path)["progress"]["epoch"] == 3  # both epochs are saved


def test_a_run_saved_before_init_gain_existed_resumes_as_it_would_have(tmp_path):
    np.savez(tmp_path / "grey.npz",
             train=np.random.default_rng(0).random((120, 10), dtype=np.float32))
    flags = ["--dataset", f"npz:{tmp_path / 'grey.npz'}", "--hidden-dims", "8",
             "--latent-dim", "2", "--batch-size", "40", "--eval-samples", "0", "--no-progress"]
    assert main(["train", *flags, "--epochs", "2", "--out-dir", str(tmp_path / "a")]) == 0
    old = tmp_path / "old"
    assert main(["train", *flags, "--epochs", "1", "--out-dir", str(old)]) == 0
    # what an earlier pyrovae wrote: no init_gain in config.json or in the checkpoint
    saved = json.loads((old / "config.json").read_text())
    assert saved.pop("init_gain") == "activation"
    (old / "config.json").write_text(json.dumps(saved))
    checkpoint = torch.load(old / "checkpoint.pt", weights_only=False)
    del checkpoint["config"]["init_gain"]
    torch.save(checkpoint, old / "checkpoint.pt")

    assert main(["train", "--resume", str(old), "--epochs", "2"]) == 0
    assert_same_parameters(read_checkpoint(tmp_path / "a" / "checkpoint.pt")["model"],
                           read_checkpoint(old / "checkpoint.pt")["model"])
    assert json.loads((old / "config.json").read_text())["init_gain"] == "activation"
