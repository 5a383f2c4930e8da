"""The learning-rate schedules of :mod:`pyrovae.schedules`."""

import pytest

from pyrovae.errors import ConfigError
from pyrovae.schedules import scheduled_lr


@pytest.mark.parametrize("epoch, stage", [
    (1, 0), (2, 1), (4, 1), (5, 2), (13, 2), (14, 3), (40, 3), (41, 4), (121, 4), (122, 5),
    (364, 5), (365, 6), (1093, 6), (1094, 7), (3280, 7), (5000, 7),
])
def test_the_iwae_schedule_spends_3_to_the_i_epochs_in_stage_i(epoch, stage):
    assert scheduled_lr(epoch, lr=1e-3, schedule="iwae") == pytest.approx(1e-3 * 10 ** (-stage / 7))
    assert scheduled_lr(epoch, lr=1e-3) == 1e-3  # constant


def test_the_schedule_refuses_epoch_zero_and_unknown_names():
    with pytest.raises(ValueError, match="from 1"):
        scheduled_lr(0, lr=1e-3, schedule="iwae")
    with pytest.raises(ConfigError, match="known: constant, iwae, burda2016, cosine, plateau"):
        scheduled_lr(1, lr=1e-3, schedule="step")


def test_the_burda2016_schedule_has_the_authors_rounded_rates():
    # yburda/iwae: lr = 1e-4 * round(10 ** (1 - (i - 1) / 7), 1) in stage i = 1..8
    rates = [scheduled_lr(epoch, lr=1e-3, schedule="burda2016")
             for epoch in (1, 2, 5, 14, 41, 122, 365, 1094, 3280)]
    assert rates == pytest.approx([1e-3, 7.2e-4, 5.2e-4, 3.7e-4, 2.7e-4, 1.9e-4, 1.4e-4, 1e-4, 1e-4])


def test_cyclical_annealing_rises_over_the_first_ratio_of_each_cycle():
    from pyrovae.schedules import cyclical_kl_weight, scheduled_kl_weight

    # 20 epochs in 4 cycles of 5, rising over the first half (2.5 epochs) of each
    weights = [cyclical_kl_weight(epoch, epochs=20, cycles=4, ratio=0.5, beta=2.0)
               for epoch in range(1, 21)]
    assert weights == pytest.approx([0.8, 1.6, 2.0, 2.0, 2.0] * 4)
    # Fu et al.'s cycle length ceil(T / M): 10 epochs in 3 cycles of 4, the last one cut short
    assert [cyclical_kl_weight(epoch, epochs=10, cycles=3, ratio=1.0) for epoch in range(1, 11)] \
        == pytest.approx([0.25, 0.5, 0.75, 1.0] * 2 + [0.25, 0.5])
    assert [scheduled_kl_weight(epoch, warmup_epochs=4) for epoch in (1, 2, 4, 9)] == \
        pytest.approx([0.25, 0.5, 1.0, 1.0])
    with pytest.raises(ConfigError, match="kl_cycles must be between 1 and the 3 epochs, got 4"):
        cyclical_kl_weight(1, epochs=3, cycles=4)
    with pytest.raises(ConfigError, match=r"kl_cycle_ratio must be in \(0, 1\], got 0"):
        cyclical_kl_weight(1, epochs=3, cycles=1, ratio=0)
    with pytest.raises(ConfigError, match="known: linear, cyclical"):
        scheduled_kl_weight(1, schedule="sigmoid")


def test_the_cyclical_schedule_replaces_the_warm_up():
    from pyrovae.config import TrainConfig

    # a learned prior warms up by default; under the cycles it does not
    assert TrainConfig(prior="vamp", kl_schedule="cyclical").kl_warmup_epochs == 0
    with pytest.raises(ConfigError, match="--kl-warmup-epochs 5 is the linear schedule's"):
        TrainConfig(kl_schedule="cyclical", kl_warmup_epochs=5)
    with pytest.raises(ConfigError, match="kl_cycles must be between 1 and the 10 epochs"):
        TrainConfig(kl_schedule="cyclical", kl_cycles=11)


def test_the_cosine_schedule_anneals_from_lr_to_lr_min_over_the_epochs():
    rates = [scheduled_lr(epoch, lr=1e-3, schedule="cosine", epochs=4, lr_min=1e-4)
             for epoch in (1, 2, 3, 4, 5, 9)]
    # lr_min + (lr - lr_min) (1 + cos(pi (epoch - 1) / 4)) / 2
    half_range = 0.45e-3
    assert rates == pytest.approx([1e-3, 1e-4 + half_range * (1 + 2**-0.5), 5.5e-4,
                                   1e-4 + half_range * (1 - 2**-0.5), 1e-4, 1e-4])
    with pytest.raises(ConfigError, match="the cosine schedule needs the run's epochs, got None"):
        scheduled_lr(1, lr=1e-3, schedule="cosine")


def test_reduce_on_plateau_waits_patience_evaluated_epochs_between_reductions():
    from pyrovae.schedules import plateau_step

    lr, bad, rates = 1.0, 0, []
    for improved in (True, False, False, False, True, False, False, False, False, False, False):
        lr, bad = plateau_step(lr, bad, improved, factor=0.5, patience=3, lr_min=0.2)
        rates.append(lr)
    # reduced after the 3rd epoch without a new best, the count reset by an improvement and
    # by each reduction; never below lr_min
    assert rates == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 0.2]
    assert scheduled_lr(7, lr=0.25, schedule="plateau") == 0.25


def test_the_training_loop_reduces_the_rate_on_the_held_out_plateau_and_resumes_it(tmp_path):
    import torch

    from pyrovae import TrainConfig, build_vae
    from pyrovae.data import DataSplits
    from pyrovae.schedules import plateau_step
    from pyrovae.train import fit

    torch.manual_seed(0)
    x = torch.bernoulli(torch.full((60, 6), 0.3))
    data = DataSplits.from_tensors(x[:40], x[40:])
    options = {"batch_size": 10, "progress": False, "lr": 0.05, "lr_schedule": "plateau",
               "lr_plateau_patience": 1, "lr_plateau_factor": 0.5, "seed": 3}

    def train(epochs, run_dir, resume=False):
        torch.manual_seed(1)  # the same start each time
        vae = build_vae(TrainConfig(hidden_dims=(8,), latent_dim=2), data_dim=6)
        rates = []
        history = fit(vae, data, epochs=epochs, run_dir=run_dir, resume=resume,
                      on_epoch_end=lambda record, loop: rates.append(
                          loop.optimizer.param_groups[0]["lr"]), **options)
        return history, rates

    history, rates = train(8, tmp_path / "whole")
    # each epoch ran at the rate the held-out ELBOs before it gave
    lr, bad, best, expected = 0.05, 0, -float("inf"), []
    for record in history:
        expected.append(lr)
        lr, bad = plateau_step(lr, bad, record.test_elbo > best, factor=0.5, patience=1)
        best = max(best, record.test_elbo)
    assert rates == pytest.approx(expected) and rates[-1] < 0.05
    # stopped after 4 epochs and resumed: the same rates, the reduced one kept
    _, first = train(4, tmp_path / "split")
    _, second = train(8, tmp_path / "split", resume=True)
    assert first + second == pytest.approx(rates)


@pytest.mark.parametrize("values, message", [
    ({"lr_schedule": "cosine", "lr_min": 1e-2}, "--lr-min 0.01 must be below --lr 0.001"),
    ({"lr_plateau_factor": 1.0}, r"lr_plateau_factor must be in \(0, 1\), got 1.0"),
    ({"lr_plateau_patience": 0}, "lr_plateau_patience must be positive, got 0"),
])
def test_the_config_refuses_schedules_that_make_no_sense(values, message):
    from pyrovae.config import TrainConfig

    with pytest.raises(ConfigError, match=message):
        TrainConfig(**values)
