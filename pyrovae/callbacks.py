"""Run-time policies of the training loop, one class each, and the base a user's own extends.

:class:`~pyrovae.train.TrainingLoop` takes steps, counts epochs and keeps its position;
everything else a run does is a :class:`Callback` it calls at fixed points: evaluating the
held-out ELBO, log p(x) and the latent usage, early stopping, reducing the learning rate on
a plateau, writing checkpoints and ``metrics.csv``, rolling back a diverged run, keeping a
time budget and stopping on a signal.  :func:`~pyrovae.train.fit` builds these from its
options (:func:`default_callbacks`) and runs a user's callbacks after the evaluation and
policies and before the checkpoint is written.

The hooks, in the order the loop calls them::

    on_fit_start(loop)                    after a fresh start or a resume
      on_epoch_start(loop)                loop.epoch is the epoch under way (from 1)
        on_step_start(loop)               before each gradient step
        on_step_end(loop, loss)           loss: the batch's summed loss, nats; loop.step counted
      on_evaluate(loop, record)           fill in the epoch's held-out numbers
                                          (then the loop judges the held-out ELBO:
                                          loop.evaluated, loop.improved, loop.best_elbo)
      on_epoch_end(loop, record)          record is in loop.history; loop.epoch is the next one
    on_fit_end(loop)
    on_divergence(loop, error) -> bool    True: the callback recovered, the epoch starts again

A callback stops the run after the current epoch by setting ``loop.should_stop``.  One
that must survive a resume keeps its state in :meth:`Callback.state_dict` (plain values,
stored in the checkpoint's position).

Example::

    class PrintTestElbo(Callback):
        def on_epoch_end(self, loop, record):
            print(record.epoch, record.test_elbo)

    fit(vae, data, epochs=5, callbacks=[PrintTestElbo()])
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from typing import TYPE_CHECKING, Any

from pyrovae.activity import ACTIVE_UNIT_THRESHOLD, mutual_information, posterior_mean_variances
from pyrovae.checkpoint import (
    CHECKPOINT_FILES,
    CHECKPOINT_NAME,
    history_path,
    keep_history,
    mark_best,
)
from pyrovae.devices import seeded
from pyrovae.errors import TrainingDivergedError, TrainingInterrupted
from pyrovae.evaluation import elbo, log_marginal_likelihood
from pyrovae.likelihoods import bits_per_dim
from pyrovae.metrics import METRICS_NAME, EpochRecord, write_metrics
from pyrovae.programs import as_data
from pyrovae.rundir import clear_run, remove_temporaries
from pyrovae.schedules import plateau_step

if TYPE_CHECKING:
    from pyrovae.train import TrainingLoop

# the training loop's messages, under the name a user already filters them by
logger = logging.getLogger("pyrovae.train")

#: how many times ``on_divergence="rollback"`` halves the learning rate before giving up
MAX_ROLLBACKS = 5


class Callback:
    """A run-time policy of :class:`~pyrovae.train.TrainingLoop`: override the hooks you need
    (each does nothing by default); see :mod:`pyrovae.callbacks` for when each is called."""

    def on_fit_start(self, loop: TrainingLoop) -> None:
        pass

    def on_epoch_start(self, loop: TrainingLoop) -> None:
        pass

    def on_step_start(self, loop: TrainingLoop) -> None:
        pass

    def on_step_end(self, loop: TrainingLoop, loss: float) -> None:
        pass

    def on_evaluate(self, loop: TrainingLoop, record: EpochRecord) -> None:
        pass

    def on_epoch_end(self, loop: TrainingLoop, record: EpochRecord) -> None:
        pass

    def on_fit_end(self, loop: TrainingLoop) -> None:
        pass

    def on_divergence(self, loop: TrainingLoop, error: TrainingDivergedError) -> bool:
        """Recover from a diverged step or epoch; ``True`` if recovered."""
        return False

    def state_dict(self) -> dict[str, Any]:
        """What a resume needs of this callback: plain values, keys unique across callbacks."""
        return {}

    def load_state_dict(self, position: dict[str, Any]) -> None:
        """Take back :meth:`state_dict`'s values from a checkpoint's position."""


def _due(epoch: int, every: int, epochs: int) -> bool:
    """Whether a policy run every ``every`` epochs (and after the last) runs after ``epoch``."""
    return bool(every) and (epoch % every == 0 or epoch == epochs)


class Evaluation(Callback):
    """The test and validation ELBO (one draw per point) every ``every`` epochs and after
    the last, from a stream seeded by (seed, epoch) on the main process, so the training's
    random stream is untouched and a run extended later draws what an uninterrupted one
    does."""

    def __init__(self, every: int = 1) -> None:
        self.every = every

    def on_evaluate(self, loop: TrainingLoop, record: EpochRecord) -> None:
        if not _due(record.epoch, self.every, loop.options.epochs):
            return
        program, data = loop.program, loop.data

        def evaluate() -> tuple[float, float]:
            program.train(False)
            # a guide with per-point parameters is evaluated on all its points at once
            rows = max(1000, data.train.shape[0]) if loop.whole_data else 1000
            with seeded(loop.options.seed, record.epoch, device=program.device):
                test = elbo(program, data.test_inputs, batch_size=rows).mean().item()
                valid = math.nan if data.valid is None else \
                    elbo(program, data.valid_inputs, batch_size=rows).mean().item()
            program.train()
            return test, valid

        record.test_elbo, record.valid_elbo = loop.strategy.on_main(evaluate)
        loop.strategy.share_rng_state(program.device)


class LogMarginalLikelihood(Callback):
    """The mean importance-sampled log p(x) of the first ``size`` test points with
    ``num_samples`` samples every ``every`` epochs and after the last (seeded, so the
    training's random stream is untouched; the processes share the points)."""

    def __init__(self, every: int, num_samples: int = 1000, size: int = 1000) -> None:
        self.every, self.num_samples, self.size = every, num_samples, size

    def on_evaluate(self, loop: TrainingLoop, record: EpochRecord) -> None:
        if not _due(record.epoch, self.every, loop.options.epochs):
            return
        loop.program.train(False)
        # a guide with a parameter per point is evaluated on all its points at once
        size = None if loop.whole_data else self.size
        rows = {"batch_size": loop.data.train.shape[0]} if loop.whole_data else {}
        points = tuple(argument[:size] for argument in as_data(loop.data.test_inputs))
        log_px = loop.strategy.sharded(log_marginal_likelihood, loop.program, points,
                                       num_samples=self.num_samples, seed=loop.options.seed,
                                       **rows)
        loop.program.train()
        record.test_log_px = log_px.mean().item()


class Activity(Callback):
    """The active latent units, per latent site and in total, and I(x; z) under q on the
    first ``size`` test points every ``every`` epochs and after the last
    (:mod:`pyrovae.activity`), from a stream seeded by (seed, epoch) on the main process."""

    def __init__(self, every: int, size: int = 1000) -> None:
        self.every, self.size = every, size

    def on_evaluate(self, loop: TrainingLoop, record: EpochRecord) -> None:
        if not _due(record.epoch, self.every, loop.options.epochs):
            return
        program = loop.program
        points = tuple(argument[: self.size] for argument in as_data(loop.data.test_inputs))

        def count() -> list[Any]:
            if points[0].shape[0] < 2:
                return [math.nan, math.nan, None]
            program.train(False)
            with seeded(loop.options.seed, record.epoch, 1, device=program.device):
                variances = posterior_mean_variances(program, points)
                information = mutual_information(program, points)
            program.train()
            per_site = {site: int((variance > ACTIVE_UNIT_THRESHOLD).sum())
                        for site, variance in variances.items()}
            return [float(sum(per_site.values())), information, per_site]

        (record.active_units, record.mutual_information,
         record.active_units_per_site) = loop.strategy.on_main(count)


class EpochLog(Callback):
    """Log each epoch's ELBOs (and log p(x), the latent usage where measured), nats."""

    def on_epoch_end(self, loop: TrainingLoop, record: EpochRecord) -> None:
        notes = "" if math.isnan(record.valid_elbo) else \
            f", validation ELBO {record.valid_elbo:.3f}"
        if not math.isnan(record.test_log_px):
            notes += f", test log p(x) {record.test_log_px:.3f} (K={loop.options.log_px_samples})"
            levels = getattr(getattr(loop.vae, "likelihood", None), "num_levels", None)
            if levels is not None:  # a probability over the data's values
                notes += f" = {bits_per_dim(record.test_log_px, loop.data.data_dim):.4f} bits/dim"
        if not math.isnan(record.active_units):
            notes += (f", {record.active_units:.0f} active units, I(x; z) "
                      f"{record.mutual_information:.3f}")
        log = logger.info if loop.strategy.is_main else logger.debug
        log("epoch %d: train ELBO %.3f, test ELBO %.3f%s nats (%.1fs)", record.epoch,
            record.train_elbo, record.test_elbo, notes, record.epoch_seconds)


class EarlyStopping(Callback):
    """Stop once the held-out ELBO (validation, else test) has not improved for ``patience``
    epochs, counted at an evaluated epoch before the last; epochs of the KL warm-up do not
    count, since the ELBO they train is not yet the one evaluated.  ``patience`` 0 counts
    without stopping (a resume may set one)."""

    def __init__(self, patience: int = 0) -> None:
        self.patience = patience
        self.epochs_without_improvement = 0

    def on_fit_start(self, loop: TrainingLoop) -> None:
        if loop.stopped_early:  # a resumed run that had stopped early
            loop.should_stop = True

    def on_epoch_end(self, loop: TrainingLoop, record: EpochRecord) -> None:
        if loop.improved or record.epoch < loop.options.kl_warmup_epochs:
            self.epochs_without_improvement = 0
        else:
            self.epochs_without_improvement += 1
        if self.patience and loop.evaluated and record.epoch < loop.options.epochs and \
                self.epochs_without_improvement >= self.patience:
            record.stopped_early = loop.should_stop = True
            if loop.strategy.is_main:
                logger.info("early stopping after epoch %d: the held-out ELBO has not improved "
                            "for %d epochs (best %.3f nats)", record.epoch,
                            self.epochs_without_improvement, loop.best_elbo)

    def state_dict(self) -> dict[str, Any]:
        return {"epochs_without_improvement": self.epochs_without_improvement}

    def load_state_dict(self, position: dict[str, Any]) -> None:
        self.epochs_without_improvement = position.get("epochs_without_improvement", 0)


class ReduceLROnPlateau(Callback):
    """Multiply the base learning rate by ``factor`` whenever the held-out ELBO has not
    improved for ``patience`` evaluated epochs, never below ``lr_min``
    (:func:`~pyrovae.schedules.plateau_step`); the next epoch starts at the reduced rate."""

    def __init__(self, factor: float, patience: int, lr_min: float = 0.0) -> None:
        self.factor, self.patience, self.lr_min = factor, patience, lr_min
        self.plateau_epochs = 0

    def on_epoch_end(self, loop: TrainingLoop, record: EpochRecord) -> None:
        if not loop.evaluated:
            return
        lr, self.plateau_epochs = plateau_step(loop.lr, self.plateau_epochs, loop.improved,
                                               factor=self.factor, patience=self.patience,
                                               lr_min=self.lr_min)
        if lr != loop.lr and loop.strategy.is_main:
            logger.info("the held-out ELBO has not improved for %d evaluated epochs: learning "
                        "rate %.3g -> %.3g", self.patience, loop.lr, lr)
        loop.lr = lr

    def state_dict(self) -> dict[str, Any]:
        return {"plateau_epochs": self.plateau_epochs}

    def load_state_dict(self, position: dict[str, Any]) -> None:
        self.plateau_epochs = position.get("plateau_epochs", 0)


class Checkpointing(Callback):
    """Write ``checkpoint.pt`` in the loop's run directory at every epoch's end and every
    ``every_steps`` steps, copies of the last ``keep_last`` epochs' in ``checkpoints/``,
    and ``checkpoint_best.pt`` at each improvement of the held-out ELBO.  A fresh run owns
    its folder: an earlier run's checkpoints there are removed first."""

    def __init__(self, every_steps: int = 0, keep_last: int = 0) -> None:
        self.every_steps, self.keep_last = every_steps, keep_last

    def on_fit_start(self, loop: TrainingLoop) -> None:
        run_dir = loop.run_dir
        if run_dir is None or not loop.strategy.is_main:
            return
        if loop.resumed:
            remove_temporaries(run_dir)
            done = loop.epoch - 1
            # a kill between the checkpoint and its history copy left the copy undone
            if self.keep_last and loop.batch == 0 and done > 0 and \
                    not history_path(run_dir, done).exists():
                keep_history(run_dir, done, self.keep_last)
        else:
            run_dir.mkdir(parents=True, exist_ok=True)
            clear_run(run_dir, CHECKPOINT_FILES)

    def on_step_end(self, loop: TrainingLoop, loss: float) -> None:
        if loop.run_dir is not None and self.every_steps and loop.step % self.every_steps == 0:
            loop.save()

    def on_epoch_end(self, loop: TrainingLoop, record: EpochRecord) -> None:
        if loop.run_dir is None:
            return
        loop.save()
        if loop.strategy.is_main:
            if self.keep_last:
                keep_history(loop.run_dir, record.epoch, self.keep_last)
            if loop.improved:
                mark_best(loop.run_dir)


class MetricsFile(Callback):
    """Rewrite ``metrics.csv`` in the loop's run directory with every record at each
    epoch's end (and at the start: the header, or a resumed run's records)."""

    def on_fit_start(self, loop: TrainingLoop) -> None:
        self._write(loop)

    def on_epoch_end(self, loop: TrainingLoop, record: EpochRecord) -> None:
        self._write(loop)

    def _write(self, loop: TrainingLoop) -> None:
        if loop.run_dir is not None and loop.strategy.is_main:
            write_metrics(loop.run_dir / METRICS_NAME, loop.history, loop.activity_sites)


class DivergenceRollback(Callback):
    """On a diverged step, reload the last checkpoint, halve the base learning rate and
    carry on, up to ``max_rollbacks`` times (0: count nothing, let the error stop the run)."""

    def __init__(self, max_rollbacks: int = MAX_ROLLBACKS) -> None:
        self.max_rollbacks = max_rollbacks
        self.rollbacks = 0

    def on_divergence(self, loop: TrainingLoop, error: TrainingDivergedError) -> bool:
        if self.rollbacks >= self.max_rollbacks or loop.run_dir is None:
            return False
        path = loop.run_dir / CHECKPOINT_NAME
        if not loop.strategy.on_main(path.exists):  # the main process holds the checkpoints
            raise TrainingDivergedError("the loss diverged before the first checkpoint; "
                                        "nothing to roll back to; try a lower --lr")
        rollbacks, lr = self.rollbacks + 1, loop.lr / 2
        loop.load(path)
        self.rollbacks, loop.lr = rollbacks, lr
        scheduled = loop.apply_lr()
        logger.warning("loss diverged; rolled back to epoch %d, step %d with lr %.3g "
                       "(rollback %d of %d)", loop.epoch, loop.step, scheduled, rollbacks,
                       self.max_rollbacks)
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"rollbacks": self.rollbacks}

    def load_state_dict(self, position: dict[str, Any]) -> None:
        self.rollbacks = position.get("rollbacks", 0)


class TimeBudget(Callback):
    """Stop at the end of the first epoch after which another as long would overrun
    ``max_minutes`` of wall-clock time from the start of this call; the main process's
    clock decides for all."""

    def __init__(self, max_minutes: float) -> None:
        self.max_minutes = max_minutes
        self.started = self.epoch_started = 0.0

    def on_fit_start(self, loop: TrainingLoop) -> None:
        self.started = time.perf_counter()

    def on_epoch_start(self, loop: TrainingLoop) -> None:
        self.epoch_started = time.perf_counter()

    def on_epoch_end(self, loop: TrainingLoop, record: EpochRecord) -> None:
        if loop.epoch > loop.options.epochs or loop.should_stop:
            return
        now = time.perf_counter()
        out_of_time, = loop.strategy.broadcast(
            [(now - self.started) + (now - self.epoch_started) > 60 * self.max_minutes])
        if out_of_time:
            logger.info("time budget of %g minutes: stopping after epoch %d of %d",
                        self.max_minutes, record.epoch, loop.options.epochs)
            loop.should_stop = True


class StopSignals:
    """Turn SIGINT/SIGTERM into a flag the loop checks between steps (main thread only).

    A signal the loop did not act on (it came after the last check) is not dropped:
    leaving the block raises :class:`~pyrovae.errors.TrainingInterrupted`, unless an
    exception is already on its way.  With ``message``, for work with no steps to stop
    between (a final evaluation), a signal raises at once, with the signal's name and
    ``message``.  With ``escalate``, a second signal raises :class:`KeyboardInterrupt`.
    """

    def __init__(self, escalate: bool = True, message: str | None = None) -> None:
        self.signal_number: int | None = None
        self.escalate = escalate
        self.message = message
        #: set by whoever acted on the signal (raised TrainingInterrupted for it)
        self.handled = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, signal.SIGTERM):
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def _handle(self, number: int, frame: object) -> None:
        if self.message is not None:
            self.signal_number, self.handled = number, True
            raise TrainingInterrupted(f"{signal.Signals(number).name} {self.message}", number)
        if self.signal_number is not None and self.escalate:  # a second signal: stop at once
            raise KeyboardInterrupt
        self.signal_number = number

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)  # type: ignore[arg-type]
        self._previous = {}
        if exc_type is None and self.signal_number is not None and not self.handled:
            self.handled = True
            raise TrainingInterrupted(
                f"{signal.Signals(self.signal_number).name} after the last training step; the "
                f"last checkpoint holds every finished epoch: resume the run to finish it",
                self.signal_number)


class SignalStop(Callback):
    """Stop on SIGINT/SIGTERM (caught by ``signals``) after the current step, or at the end
    of an epoch whose evaluation the signal came during: write a checkpoint and raise
    :class:`~pyrovae.errors.TrainingInterrupted`.  Several processes stop on the signal
    they agreed on at a step, all at the same one; a process whose launcher is gone stops
    as on SIGTERM."""

    def __init__(self, signals: StopSignals) -> None:
        self.signals = signals

    def on_fit_start(self, loop: TrainingLoop) -> None:
        loop.stop_vote = lambda: self.signals.signal_number

    def on_step_start(self, loop: TrainingLoop) -> None:
        if self.signals.signal_number is None and loop.strategy.launcher_gone():
            logger.warning("the launcher of this process is gone: stopping")
            self.signals.signal_number = signal.SIGTERM

    def on_step_end(self, loop: TrainingLoop, loss: float) -> None:
        number = loop.strategy.stop_signal(self.signals.signal_number, loop.agreed_stop)
        if number is not None:
            self._interrupt(loop, number)

    def on_epoch_end(self, loop: TrainingLoop, record: EpochRecord) -> None:
        # several processes agree on a signal at each step instead
        if not loop.strategy.is_distributed and self.signals.signal_number is not None:
            self._interrupt(loop, self.signals.signal_number)

    def _interrupt(self, loop: TrainingLoop, number: int) -> None:
        name = signal.Signals(number).name
        if loop.run_dir is None:
            raise TrainingInterrupted(f"{name} at epoch {loop.epoch}, step {loop.step}; "
                                      f"no run directory, nothing saved", number)
        loop.save()
        # the launcher stops every process once one exits: none leaves before rank 0 has saved
        loop.strategy.barrier()
        self.signals.handled = True
        if loop.epoch > loop.options.epochs:
            raise TrainingInterrupted(
                f"{name} after the last epoch ({loop.options.epochs}): checkpoint written; "
                f"pyrovae train --resume {loop.run_dir} finishes the run (its final "
                f"evaluation)", number)
        raise TrainingInterrupted(
            f"{name} at epoch {loop.epoch}, step {loop.step}: checkpoint written; continue "
            f"with pyrovae train --resume {loop.run_dir}", number)


class EpochFunction(Callback):
    """A plain function ``function(record, loop)`` called on the main process at each
    epoch's end (:func:`~pyrovae.train.fit`'s ``on_epoch_end``)."""

    def __init__(self, function: Any) -> None:
        self.function = function

    def on_epoch_end(self, loop: TrainingLoop, record: EpochRecord) -> None:
        if loop.strategy.is_main:
            self.function(record, loop)


def policy_callbacks(options: Any) -> list[Callback]:
    """The evaluation and policies :class:`~pyrovae.train.FitOptions` ask for, in the order
    they run: before a user's callbacks."""
    callbacks: list[Callback] = [Evaluation(options.test_every)]
    if options.log_px_every:
        callbacks.append(LogMarginalLikelihood(options.log_px_every, options.log_px_samples,
                                               options.log_px_size))
    if options.activity_every:
        callbacks.append(Activity(options.activity_every, options.log_px_size))
    callbacks += [EpochLog(), EarlyStopping(options.early_stopping_patience)]
    if options.lr_schedule == "plateau":
        callbacks.append(ReduceLROnPlateau(options.lr_plateau_factor,
                                           options.lr_plateau_patience, options.lr_min))
    return callbacks


def run_callbacks(options: Any, signals: StopSignals | None) -> list[Callback]:
    """What writes and guards the run, after a user's callbacks: the checkpoints, the
    metrics file, divergence rollback, a stop signal and the time budget, in that order."""
    callbacks: list[Callback] = [
        Checkpointing(options.checkpoint_every, options.keep_last), MetricsFile(),
        DivergenceRollback(MAX_ROLLBACKS if options.on_divergence == "rollback" else 0)]
    if signals is not None:
        callbacks.append(SignalStop(signals))
    if options.max_minutes is not None:
        callbacks.append(TimeBudget(options.max_minutes))
    return callbacks
