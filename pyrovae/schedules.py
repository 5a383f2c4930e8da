"""Learning-rate schedules: the rate of each epoch, by name."""

from __future__ import annotations

from pyrovae.errors import ConfigError

#: learning-rate schedules by name (:func:`scheduled_lr`)
LR_SCHEDULES = ("constant", "iwae", "burda2016")
#: the last stage of the ``"iwae"`` schedule; stages 0..7 last 3^0 + ... + 3^7 = 3280 epochs
IWAE_LAST_STAGE = 7


def scheduled_lr(epoch: int, *, lr: float, schedule: str = "constant") -> float:
    """The learning rate during ``epoch`` under ``schedule``.

    ``"constant"`` keeps ``lr``.  ``"iwae"`` is the schedule of Burda et al. [1], section 5:
    stage ``i = 0, ..., 7`` lasts ``3**i`` epochs at ``lr * 10**(-i / 7)``, so the rate falls
    from ``lr`` to ``lr / 10`` over 3280 epochs (epoch 1 is stage 0, epochs 2-4 stage 1, 5-13
    stage 2, ..., 1094-3280 stage 7); later epochs stay in stage 7.  ``"burda2016"`` is the
    same staging with the factor rounded to one decimal as the authors' code does,
    ``lr * round(10**(1 - i / 7), 1) / 10`` (1.0, 0.72, 0.52, 0.37, 0.27, 0.19, 0.14, 0.1).

    :param epoch: the epoch about to run, counted from 1.
    :param lr: the rate of stage 0 (the paper's 0.001), per Adam step.
    :param schedule: a name in :data:`LR_SCHEDULES`.
    :returns: the learning rate, in the units of ``lr``.
    :raises ConfigError: ``schedule`` is not a name in :data:`LR_SCHEDULES`.

    References:

    1. Y. Burda, R. Grosse, R. Salakhutdinov. *Importance Weighted Autoencoders*. ICLR 2016.
    """
    if epoch < 1:
        raise ValueError(f"epochs count from 1, got {epoch}")
    if schedule not in LR_SCHEDULES:
        raise ConfigError(f"unknown lr_schedule {schedule!r}; known: {', '.join(LR_SCHEDULES)}")
    if schedule == "constant":
        return lr
    stage, last_epoch = 0, 1
    while epoch > last_epoch and stage < IWAE_LAST_STAGE:
        stage += 1
        last_epoch += 3**stage
    if schedule == "burda2016":
        return lr * round(10 ** (1 - stage / 7), 1) / 10
    return lr * 10 ** (-stage / 7)
