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
    with pytest.raises(ConfigError, match="known: constant, iwae, burda2016"):
        scheduled_lr(1, lr=1e-3, schedule="cosine")


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
