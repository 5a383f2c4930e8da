"""Schedules by name: the learning rate of each epoch, and the KL weight of each epoch."""

from __future__ import annotations

import math

from pyrovae.errors import ConfigError

#: learning-rate schedules by name (:func:`scheduled_lr`)
LR_SCHEDULES = ("constant", "iwae", "burda2016", "cosine", "plateau")
#: the last stage of the ``"iwae"`` schedule; stages 0..7 last 3^0 + ... + 3^7 = 3280 epochs
IWAE_LAST_STAGE = 7


def scheduled_lr(epoch: int, *, lr: float, schedule: str = "constant", epochs: int | None = None,
                 lr_min: float = 0.0) -> float:
    """The learning rate during ``epoch`` under ``schedule``.

    ``"constant"`` keeps ``lr``; so does ``"plateau"``, whose reductions on the held-out
    ELBO change ``lr`` itself (:func:`plateau_step`).  ``"cosine"`` anneals from ``lr`` to
    ``lr_min`` over ``epochs`` (Loshchilov & Hutter [2], one cycle without restarts):
    ``lr_min + (lr - lr_min) (1 + cos(pi (epoch - 1) / epochs)) / 2``, ``lr`` in the first
    epoch, later epochs at ``lr_min``.  ``"iwae"`` is the schedule of Burda et al. [1], section 5:
    stage ``i = 0, ..., 7`` lasts ``3**i`` epochs at ``lr * 10**(-i / 7)``, so the rate falls
    from ``lr`` to ``lr / 10`` over 3280 epochs (epoch 1 is stage 0, epochs 2-4 stage 1, 5-13
    stage 2, ..., 1094-3280 stage 7); later epochs stay in stage 7.  ``"burda2016"`` is the
    same staging with the factor rounded to one decimal as the authors' code does,
    ``lr * round(10**(1 - i / 7), 1) / 10`` (1.0, 0.72, 0.52, 0.37, 0.27, 0.19, 0.14, 0.1).

    :param epoch: the epoch about to run, counted from 1.
    :param lr: the rate of stage 0 (the paper's 0.001), per Adam step.
    :param schedule: a name in :data:`LR_SCHEDULES`.
    :param epochs: the run's length (``"cosine"``).
    :param lr_min: the rate ``"cosine"`` ends at.
    :returns: the learning rate, in the units of ``lr``.
    :raises ConfigError: ``schedule`` is not a name in :data:`LR_SCHEDULES`, or ``"cosine"``
        without ``epochs``.

    References:

    1. Y. Burda, R. Grosse, R. Salakhutdinov. *Importance Weighted Autoencoders*. ICLR 2016.
    2. I. Loshchilov, F. Hutter. *SGDR: Stochastic Gradient Descent with Warm Restarts*.
       ICLR 2017.
    """
    if epoch < 1:
        raise ValueError(f"epochs count from 1, got {epoch}")
    if schedule not in LR_SCHEDULES:
        raise ConfigError(f"unknown lr_schedule {schedule!r}; known: {', '.join(LR_SCHEDULES)}")
    if schedule in ("constant", "plateau"):
        return lr
    if schedule == "cosine":
        if epochs is None or epochs < 1:
            raise ConfigError(f"the cosine schedule needs the run's epochs, got {epochs}")
        progress = min(1.0, (epoch - 1) / epochs)
        return lr_min + (lr - lr_min) * (1 + math.cos(math.pi * progress)) / 2
    stage, last_epoch = 0, 1
    while epoch > last_epoch and stage < IWAE_LAST_STAGE:
        stage += 1
        last_epoch += 3**stage
    if schedule == "burda2016":
        return lr * round(10 ** (1 - stage / 7), 1) / 10
    return lr * 10 ** (-stage / 7)


def plateau_step(lr: float, bad_epochs: int, improved: bool, *, factor: float = 0.5,
                 patience: int = 10, lr_min: float = 0.0) -> tuple[float, int]:
    """One evaluated epoch of reduce-on-plateau: the rate and the count of evaluated epochs
    since the held-out ELBO last improved on its best, after this epoch.

    The count resets when the ELBO improves; when it reaches ``patience`` the rate is
    multiplied by ``factor`` (never below ``lr_min``) and the count starts again, so the next
    reduction waits another ``patience`` epochs without improvement.

    :param lr: the rate before this epoch's verdict.
    :param bad_epochs: the count before this epoch.
    :param improved: whether this epoch's held-out ELBO is the best so far.
    :returns: ``(lr, bad_epochs)``.
    """
    if improved:
        return lr, 0
    bad_epochs += 1
    if bad_epochs < patience:
        return lr, bad_epochs
    return max(lr * factor, lr_min), 0


def check_plateau(factor: float, patience: int, lr_min: float) -> None:
    """Raise :class:`ConfigError` for a reduce-on-plateau setting that makes no sense."""
    if not 0 < factor < 1:
        raise ConfigError(f"lr_plateau_factor must be in (0, 1), got {factor}")
    if patience < 1:
        raise ConfigError(f"lr_plateau_patience must be positive, got {patience}")
    if not lr_min >= 0:
        raise ConfigError(f"lr_min must be >= 0, got {lr_min}")


#: KL weight schedules by name (:func:`scheduled_kl_weight`)
KL_SCHEDULES = ("linear", "cyclical")


def cyclical_kl_weight(epoch: int, *, epochs: int, beta: float = 1.0, cycles: int = 4,
                       ratio: float = 0.5) -> float:
    """The KL weight of cyclical annealing (Fu et al. [1]) during ``epoch``.

    The ``epochs`` are cut into ``cycles`` cycles of C = ceil(epochs / cycles) epochs; within
    each, the weight rises linearly over the first ``ratio`` of the cycle and then holds
    ``beta``.  As the linear warm-up, each epoch takes the value at its end: epoch j of a
    cycle (j = 1..C) has ``beta * min(1, j / (ratio * C))``, so the first epoch of every
    cycle has a small positive weight and the last ones the full one.

    :param epoch: the epoch about to run, counted from 1.
    :param epochs: the run's length, over which the cycles are spread.
    :param beta: the weight each cycle rises to.
    :param cycles: M, the number of cycles, 1..``epochs``.
    :param ratio: R, the share of each cycle spent rising, in (0, 1].
    :returns: the weight, in [0, ``beta``].

    References:

    1. H. Fu, C. Li, X. Liu, J. Gao, A. Celikyilmaz, L. Carin. *Cyclical Annealing Schedule:
       A Simple Approach to Mitigating KL Vanishing*. NAACL 2019.
    """
    if epoch < 1:
        raise ValueError(f"epochs count from 1, got {epoch}")
    check_kl_cycles(cycles, ratio, epochs)
    length = math.ceil(epochs / cycles)
    position = (epoch - 1) % length + 1
    return beta * min(1.0, position / (ratio * length))


def check_kl_cycles(cycles: int, ratio: float, epochs: int) -> None:
    """Raise :class:`ConfigError` for cycles that do not fit ``epochs`` or a ratio outside (0, 1]."""
    if not 1 <= cycles <= epochs:
        raise ConfigError(f"kl_cycles must be between 1 and the {epochs} epochs, got {cycles}")
    if not 0 < ratio <= 1:
        raise ConfigError(f"kl_cycle_ratio must be in (0, 1], got {ratio}")


def scheduled_kl_weight(epoch: int, *, beta: float = 1.0, schedule: str = "linear",
                        warmup_epochs: int = 0, epochs: int = 1, cycles: int = 4,
                        ratio: float = 0.5) -> float:
    """The KL weight during ``epoch`` under ``schedule``: ``"linear"``, the warm-up
    ``beta * min(1, epoch / warmup_epochs)`` (:func:`~pyrovae.objectives.kl_weight`);
    ``"cyclical"``, :func:`cyclical_kl_weight` over ``epochs``.

    :raises ConfigError: ``schedule`` is not a name in :data:`KL_SCHEDULES`.
    """
    if schedule == "linear":
        from pyrovae.objectives import kl_weight

        return kl_weight(epoch, beta=beta, warmup_epochs=warmup_epochs)
    if schedule == "cyclical":
        return cyclical_kl_weight(epoch, epochs=epochs, beta=beta, cycles=cycles, ratio=ratio)
    raise ConfigError(f"unknown kl_schedule {schedule!r}; known: {', '.join(KL_SCHEDULES)}")
