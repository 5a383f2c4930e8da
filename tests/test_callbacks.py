"""A user's callbacks: the hooks come in order with the loop's position, a callback can stop
the run, and a callback's state survives a resume."""

from __future__ import annotations

import torch

from pyrovae import TrainConfig, build_vae, fit
from pyrovae.callbacks import Callback
from pyrovae.checkpoint import read_checkpoint
from pyrovae.data import DataSplits
from pyrovae.train import read_metrics


def tiny_data() -> DataSplits:
    generator = torch.Generator().manual_seed(0)
    x = torch.bernoulli(torch.full((40, 6), 0.3), generator=generator)
    return DataSplits.from_tensors(x, x[:10])


def tiny_vae():
    torch.manual_seed(1)
    return build_vae(TrainConfig(hidden_dims=(4,), latent_dim=2), data_dim=6)


class Recorder(Callback):
    """Writes down every hook with the loop's (epoch, step, batch) as it sees them."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def on_fit_start(self, loop):
        self.calls.append(("fit_start", loop.epoch, loop.step))

    def on_epoch_start(self, loop):
        self.calls.append(("epoch_start", loop.epoch, loop.step))

    def on_step_start(self, loop):
        self.calls.append(("step_start", loop.epoch, loop.step))

    def on_step_end(self, loop, loss):
        assert loss > 0  # a summed negative ELBO of binary data, nats
        self.calls.append(("step_end", loop.epoch, loop.step))

    def on_evaluate(self, loop, record):
        self.calls.append(("evaluate", record.epoch, record.step))

    def on_epoch_end(self, loop, record):
        assert loop.history[-1] is record and loop.epoch == record.epoch + 1
        self.calls.append(("epoch_end", record.epoch, record.step))

    def on_fit_end(self, loop):
        self.calls.append(("fit_end", loop.epoch, loop.step))


def test_a_user_callback_gets_the_hooks_in_order_with_the_position():
    recorder = Recorder()
    history = fit(tiny_vae(), tiny_data(), epochs=2, batch_size=20, progress=False,
                  callbacks=[recorder])
    epoch = [("step_start", 1, 0), ("step_end", 1, 1), ("step_start", 1, 1), ("step_end", 1, 2)]
    assert recorder.calls == [
        ("fit_start", 1, 0),
        ("epoch_start", 1, 0), *epoch, ("evaluate", 1, 2), ("epoch_end", 1, 2),
        ("epoch_start", 2, 2), *[(name, 2, step + 2) for name, _, step in epoch],
        ("evaluate", 2, 4), ("epoch_end", 2, 4),
        ("fit_end", 3, 4),
    ]
    assert [(record.epoch, record.step) for record in history] == [(1, 2), (2, 4)]


def test_a_user_callback_sees_the_epoch_evaluated_before_it():
    seen = []

    class Watcher(Callback):
        def on_epoch_end(self, loop, record):
            seen.append((record.epoch, record.test_elbo, loop.best_elbo))

    history = fit(tiny_vae(), tiny_data(), epochs=2, batch_size=20, progress=False,
                  callbacks=[Watcher()])
    assert [(epoch, test) for epoch, test, _ in seen] == \
        [(record.epoch, record.test_elbo) for record in history]
    assert seen[-1][2] == max(record.test_elbo for record in history)


class StopAfter(Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_end(self, loop, record):
        if record.epoch == self.epoch:
            loop.should_stop = True


def test_a_user_callback_stops_the_run_and_the_stopped_epoch_is_saved(tmp_path):
    history = fit(tiny_vae(), tiny_data(), epochs=5, batch_size=20, progress=False,
                  run_dir=tmp_path, callbacks=[StopAfter(2)])
    assert [record.epoch for record in history] == [1, 2]
    assert [record.epoch for record in read_metrics(tmp_path / "metrics.csv")] == [1, 2]
    assert read_checkpoint(tmp_path)["progress"]["epoch"] == 3
    # the run was stopped, not finished: a resume trains the rest
    resumed = fit(tiny_vae(), tiny_data(), epochs=5, batch_size=20, progress=False,
                  run_dir=tmp_path, resume=True)
    assert [record.epoch for record in resumed] == [1, 2, 3, 4, 5]


class StepCounter(Callback):
    """Counts the steps it saw; the count is kept in the checkpoint."""

    def __init__(self) -> None:
        self.count = 0

    def on_step_end(self, loop, loss):
        self.count += 1

    def state_dict(self):
        return {"steps_counted": self.count}

    def load_state_dict(self, position):
        self.count = position.get("steps_counted", 0)


def test_a_user_callbacks_state_survives_a_resume(tmp_path):
    first = StepCounter()
    fit(tiny_vae(), tiny_data(), epochs=1, batch_size=20, progress=False, run_dir=tmp_path,
        callbacks=[first])
    assert first.count == 2
    assert read_checkpoint(tmp_path)["progress"]["steps_counted"] == 2
    resumed = StepCounter()
    fit(tiny_vae(), tiny_data(), epochs=3, batch_size=20, progress=False, run_dir=tmp_path,
        resume=True, callbacks=[resumed])
    assert resumed.count == 6
