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
