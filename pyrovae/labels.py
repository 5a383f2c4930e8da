"""Estimates for programs of labelled data: log p(x) with the label summed out, and the
classification error of q(y | x); and the interleaved minibatches of semi-supervised
training (:class:`InterleavedSplits`).

A program of labelled data takes ``(x, y)``.  For Kingma et al. (2014)'s M2
(:class:`~pyrovae.models.SemiSupervisedVAE`), y is a random variable of the model, and with
y observed the shared estimator gives log p(x, y); log p(x) is then the exact sum over the
C classes,

    log p(x) = logsumexp_y log p(x, y),

each log p(x, y) importance-sampled with q(z | x, y) as
:func:`~pyrovae.evaluation.log_marginal_likelihood` samples it, all C classes of a point in
one trace.  For a conditional VAE, y
is an input and the shared estimator on ``(x, y)`` is log p(x | y) already.

All values are in nats.

References:

1. Kingma, Rezende, Mohamed, Welling (2014). Semi-Supervised Learning with Deep Generative
   Models. NeurIPS.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch

from pyrovae.data import HIDDEN_LABEL, DataSplits
from pyrovae.errors import ConfigError, InvalidDataError
from pyrovae.evaluation import data_batches, log_marginal_likelihood
from pyrovae.programs import as_program, evaluates


@evaluates
def log_marginal_likelihood_over_labels(program: Any, x: torch.Tensor, num_classes: int,
                                        num_samples: int = 5000, *, batch_size: int = 100,
                                        chunk_size: int | None = None,
                                        seed: int | None = None,
                                        batches: Sequence[int] | None = None) -> torch.Tensor:
    """log p(x) = log sum_y p(x, y) for each data point, the label summed over its classes.

    Each point is paired with every class c, and one pass of
    :func:`~pyrovae.evaluation.log_marginal_likelihood` over the ``N * C`` pairs estimates
    every log p(x, y = c) (a lower bound in expectation); their log-sum-exp over c is the
    estimate of log p(x), again a lower bound in expectation.  A trace holds
    ``batch_size`` points with all C classes each, so the classes of a point go through the
    networks together; the pairs are made one batch at a time, so memory is that of one
    trace whatever N is, and C times that of a trace of ``batch_size`` points.

    :param program: a program ``model(x, y)``, ``guide(x, y)`` in which y is a sample site of
        the model (M2); anything :func:`~pyrovae.programs.as_program` takes.
    :param x: the data ``(N, D)``.
    :param num_classes: C; the labels 0..C-1 are summed over.
    :param num_samples: K per class.
    :param batch_size: data points per trace (each with its C classes).
    :param chunk_size: importance samples per trace; ``None``: chosen from the device for
        traces of ``batch_size * C`` rows (:func:`~pyrovae.evaluation.default_chunk_size`).
    :param seed: per-batch seeding, see :func:`~pyrovae.evaluation.log_marginal_likelihood`.
    :param batches: only these batches of ``batch_size`` points (the estimates of their
        points, in order), see :func:`~pyrovae.evaluation.log_marginal_likelihood`.
    :returns: ``(N,)`` estimates of log p(x_n) in nats, on the CPU.
    """
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if not torch.is_tensor(x) or x.dim() < 1:
        raise InvalidDataError("x must be a tensor of data points (N, ...)")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    program = as_program(program)
    estimates = []
    # one batch of points at a time, paired with every class point-major: (x_0, 0), (x_0, 1),
    # ..., (x_0, C-1), (x_1, 0), ...; the pairs of only one batch exist at once, and each
    # batch draws from its (seed, batch index) stream as log_marginal_likelihood's would
    for points, draws in data_batches(x, batch_size, program.device, seed=seed,
                                      batches=batches):
        pairs = points[0].repeat_interleave(num_classes, dim=0)
        labels = torch.arange(num_classes, device=pairs.device).repeat(points[0].shape[0])
        with draws:
            joint = log_marginal_likelihood(program, (pairs, labels), num_samples,
                                            batch_size=pairs.shape[0], chunk_size=chunk_size)
        estimates.append(torch.logsumexp(joint.reshape(-1, num_classes), dim=-1))
    return torch.cat(estimates)


@torch.no_grad()
def classification_error(classifier: Any, x: torch.Tensor, y: torch.Tensor, *,
                         batch_size: int = 1000) -> float:
    """The fraction of points whose most probable class under q(y | x) is not their label.

    :param classifier: a model with ``classify(x) -> (N,)`` labels (M2's argmax q(y|x)).
    :param x: ``(N, D)`` data.
    :param y: ``(N,)`` labels 0..C-1.
    :returns: the error rate in [0, 1].
    """
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise InvalidDataError(f"x and y need the same, positive number of points, got "
                               f"{x.shape[0]} and {y.shape[0]}")
    wrong = sum(int((classifier.classify(xb).cpu() != yb.cpu()).sum())
                for xb, yb in zip(x.split(batch_size), y.split(batch_size), strict=True))
    return wrong / x.shape[0]


def interleaving_schedule(num_labelled: int, num_unlabelled: int, batch_size: int) -> list[bool]:
    """Which minibatches of an epoch hold labelled points: one batch of labelled points
    every ``interval = (num_labelled + num_unlabelled) // num_labelled`` batches, at
    positions 1, 1 + interval, 1 + 2 interval, ..., the others unlabelled.

    Each kind fills ``ceil(count / batch_size)`` batches (its last one may be short), so an
    epoch passes every point once.  With 50,000 training images this is Pyro's
    ``ss_vae_M2.py`` schedule: 100 labels in batches of 100 put the one labelled batch at
    position 1 of 500; 3000 labels in batches of 200 put 15 labelled batches at 1, 17, ...,
    225 of 250.  Where the positions would run past the epoch's end, the remaining labelled
    batches close it.

    :returns: one flag per batch of the epoch, ``True`` for a labelled batch.
    """
    for name, value in (("num_labelled", num_labelled), ("num_unlabelled", num_unlabelled)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    labelled_batches = math.ceil(num_labelled / batch_size)
    unlabelled_batches = math.ceil(num_unlabelled / batch_size)
    total = labelled_batches + unlabelled_batches
    interval = (num_labelled + num_unlabelled) // num_labelled if num_labelled else 0
    schedule, done = [], 0
    for position in range(total):
        left = labelled_batches - done
        due = interval and position >= 1 and (position - 1) % interval == 0
        labelled = left > 0 and (due or total - position <= left)
        schedule.append(bool(labelled))
        done += labelled
    return schedule


@dataclass(frozen=True)
class InterleavedSplits(DataSplits):
    """:class:`~pyrovae.data.DataSplits` whose training batches hold either labelled points
    only or unlabelled points only (:data:`~pyrovae.data.HIDDEN_LABEL`), interleaved as
    :func:`interleaving_schedule` says, each kind in its own shuffled order every epoch.

    This is how Pyro's semi-supervised example feeds M2: the labelled set passes once per
    epoch in batches of its own, spread evenly among the unlabelled ones, rather than a few
    labelled points in each mixed minibatch.  Make one with :func:`interleave_labels`.
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.train_labels is None:
            raise InvalidDataError("interleaved batches need training labels (-1 where hidden)")

    def train_batches(self, batch_size: int, *, shuffle: bool = True,
                      generator: torch.Generator | None = None, start: int = 0,
                      part: Callable[[int], slice] | None = None,
                      ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of ``(x, y)`` batches: labelled ones (``y >= 0``) where
        :func:`interleaving_schedule` puts them, unlabelled ones (``y = -1``) elsewhere.

        Both orders are drawn from ``generator`` at the epoch's start (labelled first), so
        ``start`` skips batches without drawing and a resumed epoch continues the same
        order; ``part`` as :meth:`~pyrovae.data.DataSplits.train_batches`.
        """
        assert self.train_labels is not None
        n = self.train.shape[0]
        if batch_size > n:
            raise ConfigError(f"batch size {batch_size} is larger than the training set ({n} points)")
        hidden = (self.train_labels == HIDDEN_LABEL).cpu()
        labelled = torch.nonzero(~hidden).flatten()
        unlabelled = torch.nonzero(hidden).flatten()
        if shuffle:
            labelled = labelled[torch.randperm(labelled.numel(), generator=generator)]
            unlabelled = unlabelled[torch.randperm(unlabelled.numel(), generator=generator)]
        schedule = interleaving_schedule(labelled.numel(), unlabelled.numel(), batch_size)
        taken = {True: 0, False: 0}
        for position, is_labelled in enumerate(schedule):
            first = taken[is_labelled]
            taken[is_labelled] += batch_size
            if position < start:
                continue
            indices = (labelled if is_labelled else unlabelled)[first : first + batch_size]
            indices = indices.to(self.train.device)
            rows = part(indices.shape[0]) if part is not None else slice(None)
            yield self._train_rows(indices, rows), self.train_labels[indices[rows]]


def interleave_labels(data: DataSplits) -> InterleavedSplits:
    """``data`` with interleaved labelled and unlabelled training batches
    (:class:`InterleavedSplits`); everything else the same tensors."""
    return InterleavedSplits(**{f.name: getattr(data, f.name) for f in fields(DataSplits)})
