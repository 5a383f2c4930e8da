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
    with pytest.raises(ConfigError, match="known: constant, iwae"):
        scheduled_lr(1, lr=1e-3, schedule="cosine")
