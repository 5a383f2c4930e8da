"""SVI training: the ELBO rises on real MNIST, metrics and checkpoints are written and reload."""

from __future__ import annotations

import math

import pytest
import torch

from pyrovae import TrainConfig, build_vae, elbo, fit, log_marginal_likelihood
from pyrovae.checkpoint import load_vae, read_checkpoint
from pyrovae.data import DataSplits, load_mnist
from pyrovae.errors import ConfigError, InvalidDataError, PyrovaeError
from pyrovae.schedules import scheduled_lr
from pyrovae.train import TrainingDivergedError, read_metrics
from tests.conftest import requires_mnist


@pytest.fixture(scope="module")
def small_mnist(request):
    from tests.conftest import SHARED_DATA

    return load_mnist(SHARED_DATA, binarize="dynamic").subset(train_size=2000, test_size=300)


@requires_mnist
@pytest.mark.parametrize("objective", ["trace_elbo", "meanfield_elbo"])
def test_training_raises_the_test_elbo_on_real_mnist(small_mnist, objective, tmp_path):
    config = TrainConfig(hidden_dims=(128,), latent_dim=10, objective=objective, epochs=3)
    vae = build_vae(config, data_dim=784)
    before = elbo(vae, small_mnist.test).mean().item()
    history = fit(vae, small_mnist, epochs=3, batch_size=50, lr=3e-3, objective=objective,
                  run_dir=tmp_path, config=config, progress=False, validate=True)
    after = history[-1].test_elbo
    assert after > before + 200, (before, after)  # about -545 nats before, -200 after
    assert history[-1].train_elbo > history[0].train_elbo
    assert [record.epoch for record in read_metrics(tmp_path / "metrics.csv")] == [1, 2, 3]


@requires_mnist
def test_checkpoint_reloads_to_the_same_log_marginal(small_mnist, tmp_path):
    config = TrainConfig(hidden_dims=(32,), latent_dim=4)
    vae = build_vae(config, data_dim=784)
    fit(vae, small_mnist.subset(500, 50), epochs=1, batch_size=100, run_dir=tmp_path,
        config=config, progress=False)
    reloaded, reloaded_config, checkpoint = load_vae(tmp_path)
    assert reloaded_config == config and checkpoint["epoch"] == 1
    x = small_mnist.test[:50]
    torch.manual_seed(3)
    expected = log_marginal_likelihood(vae, x, num_samples=20)
    torch.manual_seed(3)
    assert torch.equal(log_marginal_likelihood(reloaded, x, num_samples=20), expected)


def test_same_seed_gives_identical_training():
    x = torch.bernoulli(torch.full((64, 10), 0.4))
    data = DataSplits.from_tensors(x)
    histories = []
    for _ in range(2):
        torch.manual_seed(4)  # the same initial weights
        vae = build_vae(TrainConfig(hidden_dims=(8,), latent_dim=2), data_dim=10)
        histories.append(fit(vae, data, epochs=2, batch_size=16, seed=4, progress=False))
    assert [r.train_elbo for r in histories[0]] == [r.train_elbo for r in histories[1]]
    assert [r.test_elbo for r in histories[0]] == [r.test_elbo for r in histories[1]]


def test_training_refuses_bad_data():
    vae = build_vae(TrainConfig(hidden_dims=(8,), latent_dim=2), data_dim=10)
    grey = DataSplits.from_tensors(torch.rand(20, 10))
    with pytest.raises(InvalidDataError, match="binary"):
        fit(vae, grey, epochs=1, batch_size=5, progress=False)
    binary = DataSplits.from_tensors(torch.bernoulli(torch.rand(20, 10)))
    with pytest.raises(InvalidDataError, match="batch size 50 is larger"):
        fit(vae, binary, epochs=1, batch_size=50, progress=False)


def test_divergence_stops_with_the_step_named():
    config = TrainConfig(hidden_dims=(8,), latent_dim=2, likelihood="gaussian", learn_sigma=True)
    vae = build_vae(config, data_dim=10)
    with torch.no_grad():  # a poisoned weight makes every loss NaN from the first step
        vae.decoder.body[0].weight[0, 0] = math.nan
    data = DataSplits.from_tensors(torch.rand(20, 10))
    with pytest.raises(TrainingDivergedError, match="epoch 1, step 1"):
        fit(vae, data, epochs=1, batch_size=5, progress=False)


def test_a_time_budget_stops_at_an_epoch_end_and_resume_carries_on(tmp_path, monkeypatch):
    """Each epoch takes one minute on a fake clock: with 2.5 minutes, the run stops after
    epoch 2 (a third would end at minute 3); resuming without a budget reaches epoch 4, bit
    for bit like a run that never stopped."""
    import pyrovae.train as train_module

    clock = {"now": 0.0}
    monkeypatch.setattr(train_module.time, "perf_counter", lambda: clock["now"])
    original = train_module.TrainingLoop._run_epoch

    def one_minute_epoch(self, bar, stop):
        original(self, bar, stop)
        clock["now"] += 60.0

    monkeypatch.setattr(train_module.TrainingLoop, "_run_epoch", one_minute_epoch)
    data = DataSplits.from_tensors(torch.bernoulli(torch.full((64, 10), 0.4)))
    runs = {}
    for name in ("budget", "reference"):
        torch.manual_seed(4)
        runs[name] = build_vae(TrainConfig(hidden_dims=(8,), latent_dim=2), data_dim=10)
    history = fit(runs["budget"], data, epochs=4, batch_size=16, seed=4, progress=False,
                  run_dir=tmp_path, max_minutes=2.5)
    assert [record.epoch for record in history] == [1, 2]
    history = fit(runs["budget"], data, epochs=4, batch_size=16, seed=4, progress=False,
                  run_dir=tmp_path, resume=True)
    assert [record.epoch for record in history] == [1, 2, 3, 4]
    fit(runs["reference"], data, epochs=4, batch_size=16, seed=4, progress=False)
    for (name, value), (_, other) in zip(runs["budget"].state_dict().items(),
                                         runs["reference"].state_dict().items(), strict=True):
        assert torch.equal(value, other), name


def test_a_non_positive_time_budget_is_refused():
    from pyrovae.errors import ConfigError

    with pytest.raises(ConfigError, match="max_minutes must be positive"):
        TrainConfig(max_minutes=0)


def test_fit_refuses_an_unknown_schedule_before_training(tmp_path):
    data = DataSplits.from_tensors(torch.bernoulli(torch.full((32, 10), 0.4)))
    vae = build_vae(TrainConfig(hidden_dims=(8,), latent_dim=2), data_dim=10)
    before = [p.detach().clone() for p in vae.parameters()]
    with pytest.raises(ConfigError, match="unknown lr_schedule 'step'"):
        fit(vae, data, epochs=2, batch_size=16, progress=False, run_dir=tmp_path,
            lr_schedule="step")
    assert all(torch.equal(a, b) for a, b in zip(before, vae.parameters(), strict=True))
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("schedule", ["constant", "iwae"])
def test_training_sets_the_scheduled_rate_every_epoch(tmp_path, schedule):
    """The optimizer state in each epoch's checkpoint holds the rate that epoch ran at."""
    data = DataSplits.from_tensors(torch.bernoulli(torch.full((32, 10), 0.4)))
    vae = build_vae(TrainConfig(hidden_dims=(8,), latent_dim=2), data_dim=10)
    fit(vae, data, epochs=5, batch_size=16, lr=2e-3, progress=False, run_dir=tmp_path,
        keep_last=5, lr_schedule=schedule)
    for epoch in (1, 2, 5):
        optimizer = read_checkpoint(tmp_path / "checkpoints" / f"epoch-{epoch:04d}.pt")["optimizer"]
        rate = scheduled_lr(epoch, lr=2e-3, schedule=schedule)
        assert [group["lr"] for group in optimizer["param_groups"]] == [rate], epoch
    assert rate == (2e-3 if schedule == "constant" else 2e-3 * 10 ** (-2 / 7))


@requires_mnist
def test_the_log_px_curve_is_the_seeded_estimate_and_leaves_training_alone(small_mnist, tmp_path):
    data = small_mnist.subset(500, 60)
    config = TrainConfig(hidden_dims=(32,), latent_dim=4)
    runs = {}
    for every in (0, 2):
        torch.manual_seed(5)  # the same initial weights
        vae = build_vae(config, data_dim=784)
        history = fit(vae, data, epochs=3, batch_size=50, seed=7, run_dir=tmp_path / str(every),
                      config=config, progress=False, log_px_every=every, log_px_samples=30,
                      log_px_size=40)
        runs[every] = vae, history
    (plain, plain_history), (curved, history) = runs[0], runs[2]
    # the estimates draw from their own seeded stream: the parameters are bit-identical
    for a, b in zip(plain.parameters(), curved.parameters(), strict=True):
        assert torch.equal(a, b)
    assert all(math.isnan(record.test_log_px) for record in plain_history)
    # epochs 2 and 3 (the last) have one; it is the estimate on the first 40 test points
    assert [math.isnan(record.test_log_px) for record in history] == [True, False, False]
    expected = log_marginal_likelihood(curved, data.test[:40], num_samples=30, seed=7).mean()
    assert history[-1].test_log_px == pytest.approx(expected.item(), abs=1e-5)
    # a lower bound of log p(x) above the 1-sample ELBO, on average over the 40 points
    assert history[-1].test_log_px > elbo(curved, data.test[:40], num_samples=1).mean().item()
    written = read_metrics(tmp_path / "2" / "metrics.csv")
    assert [r.test_log_px for r in written][1:] == pytest.approx([r.test_log_px for r in history][1:])


def test_metrics_written_before_the_log_px_column_read_it_as_nan(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("epoch,step,train_elbo,test_elbo,epoch_seconds,valid_elbo\n1,10,-200,-201,1.5,\n")
    (record,) = read_metrics(path)
    assert record.test_elbo == -201 and math.isnan(record.test_log_px)


def test_fit_refuses_zero_epochs_and_data_of_another_dtype():
    vae = build_vae(TrainConfig(hidden_dims=(8,), latent_dim=2), data_dim=10)
    data = DataSplits.from_tensors(torch.bernoulli(torch.full((20, 10), 0.3)),
                                   torch.bernoulli(torch.full((5, 10), 0.3)))
    with pytest.raises(PyrovaeError, match="epochs must be a positive integer, got 0"):
        fit(vae, data, epochs=0, progress=False)
    doubles = DataSplits(data.train.double(), data.test.double())
    with pytest.raises(InvalidDataError, match="the data are torch.float64 but the model's "
                                               "parameters are torch.float32"):
        fit(vae, doubles, epochs=1, batch_size=5, progress=False)


def test_extending_a_finished_run_is_bit_identical_with_sparse_test_epochs(tmp_path):
    """The final test ELBO of the short run draws from its own seeded stream, not the
    training stream, so extending the run later changes nothing (--test-every 3)."""
    def tiny():
        torch.manual_seed(0)
        return build_vae(TrainConfig(hidden_dims=(8,), latent_dim=2), data_dim=10)

    generator = torch.Generator().manual_seed(1)
    data = DataSplits.from_tensors(torch.rand(40, 10, generator=generator),
                                   torch.rand(10, 10, generator=generator), binarize="dynamic")
    straight = tiny()
    fit(straight, data, epochs=4, batch_size=10, test_every=3, progress=False,
        run_dir=tmp_path / "straight")
    extended = tiny()
    fit(extended, data, epochs=2, batch_size=10, test_every=3, progress=False,
        run_dir=tmp_path / "extended")
    fit(extended, data, epochs=4, batch_size=10, test_every=3, progress=False,
        run_dir=tmp_path / "extended", resume=True)
    for name, value in straight.state_dict().items():
        assert torch.equal(extended.state_dict()[name], value), name


def test_options_are_one_dataclass_that_keywords_build():
    """fit(..., epochs=2) and fit(..., FitOptions(epochs=2)) train the same run; the config's
    options are FitOptions' fields of the same name; an unknown keyword is refused."""
    from dataclasses import fields

    from pyrovae import FitOptions

    x = torch.bernoulli(torch.full((40, 6), 0.4), generator=torch.Generator().manual_seed(0))
    data = DataSplits.from_tensors(x, x[:10], binarize="none")
    config = TrainConfig(hidden_dims=(4,), latent_dim=2, epochs=2, batch_size=20, lr=3e-3,
                         progress=False)
    histories = []
    for call in ("keywords", "options"):
        torch.manual_seed(1)
        vae = build_vae(config, data_dim=6)
        if call == "keywords":
            histories.append(fit(vae, data, epochs=2, batch_size=20, lr=3e-3, progress=False))
        else:
            histories.append(fit(vae, data, FitOptions.from_config(config)))
    first, second = ([(r.epoch, r.step, r.train_elbo, r.test_elbo) for r in history]
                     for history in histories)
    assert first == second
    options = FitOptions.from_config(config)
    assert all(getattr(options, field.name) == getattr(config, field.name)
               for field in fields(FitOptions))
    assert FitOptions.of(options, {"epochs": 5}) == FitOptions(**{**vars(options), "epochs": 5})
    with pytest.raises(TypeError, match="unknown training option.*epoch_count"):
        fit(build_vae(config, data_dim=6), data, epoch_count=2)
    with pytest.raises(PyrovaeError, match="epochs must be a positive integer"):
        FitOptions(epochs=0)


def test_activity_every_counts_active_units_and_information_into_metrics(tmp_path):
    import csv

    from tests.linear_gaussian import sample_data
    from tests.test_activity import vae_ignoring

    vae = vae_ignoring([1, 3])  # the exact posterior of a decoder that ignores z_1 and z_3
    data = DataSplits.from_tensors(sample_data(vae, 100), sample_data(vae, 300, seed=2),
                                   binarize="none")  # float32, as every DataSplits
    vae = vae.float()
    # lr 0 keeps the decoder ignoring z_1 and z_3 through training
    history = fit(vae, data, epochs=5, batch_size=50, lr=0.0, activity_every=2,
                  log_px_size=200, run_dir=tmp_path, progress=False)
    counted = [record.epoch for record in history if not math.isnan(record.active_units)]
    assert counted == [2, 4, 5]  # every 2 epochs, and after the last
    for record in history:
        if record.epoch in counted:
            assert record.active_units == 2
            assert 0 < record.mutual_information <= math.log(200)
        else:
            assert math.isnan(record.mutual_information)
    with (tmp_path / "metrics.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["epoch", "step", "train_elbo", "test_elbo", "epoch_seconds",
                             "valid_elbo", "test_log_px", "active_units", "mutual_information"]
    assert [row["active_units"] for row in rows] == ["nan", "2", "nan", "2", "2"]
    reread = read_metrics(tmp_path / "metrics.csv")
    assert [r.active_units for r in reread][1::2] == [2.0, 2.0]
    assert reread[1].mutual_information == pytest.approx(history[1].mutual_information)


def test_activity_of_a_hierarchy_has_a_column_per_latent_site(tmp_path):
    config = TrainConfig(latent_dims=(3, 2), hidden_dims=(8,), epochs=1, batch_size=20,
                         activity_every=1, log_px_size=50, progress=False)
    vae = build_vae(config, data_dim=6)
    x = torch.bernoulli(torch.full((60, 6), 0.3), generator=torch.Generator().manual_seed(0))
    history = fit(vae, DataSplits.from_tensors(x, x[:50], binarize="none"),
                  run_dir=tmp_path, config=config, epochs=1, batch_size=20, activity_every=1,
                  log_px_size=50, progress=False)
    per_site = history[0].active_units_per_site
    assert list(per_site) == ["z1", "z2"] and sum(per_site.values()) == history[0].active_units
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[-4:] == ["active_units", "active_units_z1", "active_units_z2",
                           "mutual_information"]
    assert read_metrics(tmp_path / "metrics.csv")[0].active_units_per_site == per_site


def test_activity_every_is_a_config_field_and_a_flag_that_may_change_on_resume():
    import argparse

    from pyrovae.runs import RESUME_OVERRIDES
    from pyrovae.train import FitOptions

    parser = argparse.ArgumentParser()
    TrainConfig.add_arguments(parser)
    config = TrainConfig.from_args(parser.parse_args(["--activity-every", "3"]))
    assert config.activity_every == 3 and FitOptions.from_config(config).activity_every == 3
    assert "activity_every" in RESUME_OVERRIDES
    with pytest.raises(ConfigError, match="activity_every must be >= 0"):
        TrainConfig(activity_every=-1)


def test_counting_activity_leaves_the_training_draws_alone():
    x = torch.bernoulli(torch.full((60, 6), 0.3), generator=torch.Generator().manual_seed(0))
    data = DataSplits.from_tensors(x, x[:30], binarize="none")
    config = TrainConfig(hidden_dims=(8,), latent_dim=2)
    curves = []
    for every in (0, 1):
        torch.manual_seed(2)
        history = fit(build_vae(config, data_dim=6), data, epochs=3, batch_size=20,
                      activity_every=every, progress=False)
        curves.append([(record.train_elbo, record.test_elbo) for record in history])
    assert curves[0] == curves[1]
