"""Datasets as in-memory tensors of flattened images, and minibatch iteration.

Every dataset is a :class:`DataSplits`: ``train`` and ``test`` tensors of shape
``(N, data_dim)``, float32 in [0, 1].  Three binarizations:

- ``dynamic``: ``train`` keeps grey levels and every minibatch is resampled as
  x ~ Bernoulli(intensity) each time an image is used (the IWAE paper's setting);
  ``test`` is binarized once with a fixed seed so every run is scored on the same bits;
- ``static``: both splits are binarized once with a fixed seed;
- ``none``: grey levels.

Data sources (:func:`load_dataset`): by name, ``mnist``, ``fashion_mnist``, ``kmnist``,
``emnist_<split>``, ``omniglot`` and ``cifar10`` through their torchvision classes
(downloading where there is a network, reading the files offline) and ``binarized_mnist``
(the fixed Larochelle & Murray split, from ``binarized_mnist.npz``); the user's files as
``npz:PATH``, ``npy:PATH`` and ``folder:PATH`` (an image folder); and any user tensor or
``Dataset`` via :meth:`DataSplits.from_tensors`.

Class labels travel with the images where a model needs them (``load_dataset(...,
labels=True)``, ``from_tensors(..., train_labels=..., test_labels=...)``): integer tensors
``(N,)`` with values 0..C-1, batched with x, so that a program ``model(x, y)`` gets both.
:meth:`DataSplits.with_labelled` hides all but a balanced few for semi-supervised learning.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import logging
import math
import os
import shutil
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch.utils.data import Dataset

from pyrovae.errors import ConfigError, DatasetNotFoundError, InvalidDataError
from pyrovae.validation import check_data

logger = logging.getLogger(__name__)

#: environment variable naming the data folder when ``--data-dir`` is not given
DATA_DIR_ENV = "PYROVAE_DATA"
#: where data is downloaded when neither ``--data-dir`` nor ``$PYROVAE_DATA`` is set
DEFAULT_DATA_DIR = Path.home() / ".cache" / "pyrovae" / "data"
#: seed of the fixed Bernoulli draw for static binarization and dynamic test sets
BINARIZATION_SEED = 0
BINARIZATIONS = ("dynamic", "static", "none")
#: where a run's validation points come from: ``last``, the last ``--valid-size`` training
#: points; ``dataset``, the dataset's own validation split (:data:`OWN_VALIDATION_DATASETS`)
VALIDATION_SPLITS = ("last", "dataset")
MNIST_RAW_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
MNIST_IMAGE_SHAPE = (1, 28, 28)
#: torchvision's EMNIST splits; each is the dataset ``emnist_<split>``
EMNIST_SPLITS = ("byclass", "bymerge", "balanced", "letters", "digits", "mnist")
#: Omniglot: drawings per character (of 20) in the training split
OMNIGLOT_TRAIN_DRAWINGS = 15
#: seed of the fixed shuffles: splitting a file into train and test, ordering Omniglot
SPLIT_SEED = 0
#: the label of a training point whose label is hidden (:meth:`DataSplits.with_labelled`)
HIDDEN_LABEL = -1


def check_labels(labels: object, num_points: int, name: str, *,
                 num_classes: int | None = None, hidden: bool = False) -> torch.Tensor:
    """Validate class labels for ``num_points`` data points and return them as int64.

    :param labels: a tensor or array of shape ``(num_points,)`` with integer values.
    :param name: how they are called in messages (``"train labels"``).
    :param num_classes: C; values must lie in 0..C-1 (any non-negative value where ``None``).
    :param hidden: also allow :data:`HIDDEN_LABEL` (-1), a hidden label.
    :returns: ``(num_points,)`` int64, on the device ``labels`` were on.
    :raises InvalidDataError: wrong shape, a non-integer dtype or a value outside 0..C-1.
    """
    if isinstance(labels, np.ndarray):
        labels = torch.from_numpy(labels)
    if not isinstance(labels, torch.Tensor):
        raise InvalidDataError(f"{name} must be a tensor or array, got {type(labels).__name__}")
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise InvalidDataError(f"{name} must be integers 0..C-1, got dtype {labels.dtype}")
    if tuple(labels.shape) != (num_points,):
        raise InvalidDataError(f"{name} must have shape ({num_points},), one per data point, got "
                               f"{tuple(labels.shape)}")
    labels = labels.long()
    if num_points == 0:
        return labels
    lowest = HIDDEN_LABEL if hidden else 0
    low, high = int(labels.min()), int(labels.max())
    top = f"{num_classes - 1}" if num_classes is not None else "C-1"
    if low < lowest or (num_classes is not None and high >= num_classes):
        bad = low if low < lowest else high
        raise InvalidDataError(f"{name} must lie in 0..{top}, got {bad}")
    return labels


def check_arguments(arguments: Sequence[object], num_points: int | None, name: str, *,
                    first: int = 1) -> tuple[torch.Tensor, ...]:
    """Validate the per-point arguments a program takes after x: tensors (or arrays) with
    ``num_points`` rows (as many as each other where ``None``).

    :param first: the position of the first of them in the program's arguments (1 after x,
        2 after x and labels), for messages.
    :raises InvalidDataError: naming the position of an argument that is not a tensor with
        a value per point (a ``PackedSequence``, a list) or has another number of points.
    """
    checked = []
    for position, argument in enumerate(arguments, start=first):
        if isinstance(argument, np.ndarray):
            argument = torch.from_numpy(argument)
        if not isinstance(argument, torch.Tensor) or argument.dim() == 0:
            raise InvalidDataError(
                f"argument {position} of the {name} is a {type(argument).__name__}, not a tensor "
                f"with a value per data point along dimension 0; pass per-point tensors (pad "
                f"sequences and pass their lengths as a tensor)")
        rows = argument.shape[0]
        if num_points is None:
            num_points = rows
        if rows != num_points:
            raise InvalidDataError(f"argument {position} of the {name} has {rows} points along "
                                   f"dimension 0, x has {num_points}")
        checked.append(argument)
    return tuple(checked)


@dataclass(frozen=True)
class DataSplits:
    """Train and test data as flattened tensors.

    :param train: ``(N_train, data_dim)`` float tensor.
    :param test: ``(N_test, data_dim)`` float tensor.
    :param image_shape: ``(channels, height, width)`` of one image, for pictures and conv
        nets; ``None`` for non-image data.
    :param dynamic_binarization: resample ``train`` batches as Bernoulli(intensity).
    :param valid: ``(N_valid, data_dim)`` held-out training points for model selection, or
        ``None`` (see :meth:`with_validation`).
    :param train_labels: ``(N_train,)`` int64 class labels 0..C-1, or ``None`` (no labels);
        :data:`HIDDEN_LABEL` (-1) marks a hidden one (:meth:`with_labelled`).  With labels,
        :meth:`train_batches` yields ``(x, y)`` pairs.
    :param test_labels: ``(N_test,)`` labels of the test points (with ``train_labels``).
    :param valid_labels: ``(N_valid,)`` labels of the validation points.
    :param num_classes: C, the number of classes (with labels).
    :param train_arguments: further per-point tensors the program takes after x (and the
        labels), each ``(N_train, ...)``: one-hot labels, image-valued targets, masks,
        lengths.  With them, batches and :attr:`test_inputs` are ``(x, *arguments)``.
    :param test_arguments: the same arguments of the test points.
    :param valid_arguments: the same arguments of the validation points.

    Example::

        data = load_dataset("mnist", data_dir="../shared/data", binarize="dynamic")
        for x in data.train_batches(100):
            ...  # x: (100, 784) of 0/1
    """

    train: torch.Tensor
    test: torch.Tensor
    image_shape: tuple[int, ...] | None = None
    dynamic_binarization: bool = False
    valid: torch.Tensor | None = None
    train_labels: torch.Tensor | None = None
    test_labels: torch.Tensor | None = None
    valid_labels: torch.Tensor | None = None
    num_classes: int | None = None
    train_arguments: tuple[torch.Tensor, ...] = ()
    test_arguments: tuple[torch.Tensor, ...] = ()
    valid_arguments: tuple[torch.Tensor, ...] = ()

    def __post_init__(self) -> None:
        first = 2 if self.train_labels is not None else 1
        for name, x, arguments in (("training", self.train, self.train_arguments),
                                   ("test", self.test, self.test_arguments),
                                   ("validation", self.valid, self.valid_arguments)):
            if x is None:
                continue
            check_arguments(arguments, x.shape[0], f"{name} data", first=first)
            if len(arguments) != len(self.train_arguments) or any(
                    a.shape[1:] != b.shape[1:] for a, b in zip(arguments, self.train_arguments,
                                                               strict=False)):
                raise InvalidDataError(
                    f"the {name} data carry arguments of shapes "
                    f"{[tuple(a.shape[1:]) for a in arguments]} per point, the training data "
                    f"{[tuple(a.shape[1:]) for a in self.train_arguments]}")
        if self.train_labels is None:
            if self.test_labels is not None or self.valid_labels is not None:
                raise InvalidDataError("test or validation labels without training labels")
            return
        if not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise InvalidDataError(f"labelled data need num_classes >= 1, got {self.num_classes!r}")
        if self.test_labels is None or (self.valid is not None and self.valid_labels is None):
            raise InvalidDataError("labelled data need labels for the test (and validation) "
                                   "points too")
        for name, x, labels, hidden in (("train", self.train, self.train_labels, True),
                                        ("test", self.test, self.test_labels, False),
                                        ("validation", self.valid, self.valid_labels, False)):
            if labels is not None:
                check_labels(labels, x.shape[0], f"{name} labels", num_classes=self.num_classes,
                             hidden=hidden)

    @property
    def data_dim(self) -> int:
        return int(self.train.shape[1])

    @property
    def has_labels(self) -> bool:
        """Whether the splits carry class labels (batches are then ``(x, y)``)."""
        return self.train_labels is not None

    @property
    def num_labelled(self) -> int:
        """Training points whose label is not hidden (0 without labels)."""
        if self.train_labels is None:
            return 0
        return int((self.train_labels != HIDDEN_LABEL).sum())

    @staticmethod
    def _inputs(x: torch.Tensor, labels: torch.Tensor | None,
                arguments: tuple[torch.Tensor, ...]) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if labels is None and not arguments:
            return x
        return (x, *(() if labels is None else (labels,)), *arguments)

    @property
    def train_inputs(self) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """The program's data arguments on the training split: ``train``, or ``(train,
        train_labels, *train_arguments)`` (labels where there are some)."""
        return self._inputs(self.train, self.train_labels, self.train_arguments)

    @property
    def test_inputs(self) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """The program's data arguments on the test split: ``test``, or ``(test,
        test_labels, *test_arguments)`` (what the estimators take)."""
        return self._inputs(self.test, self.test_labels, self.test_arguments)

    @property
    def valid_inputs(self) -> torch.Tensor | tuple[torch.Tensor, ...] | None:
        """:attr:`test_inputs` of the validation split, ``None`` without one."""
        if self.valid is None:
            return None
        return self._inputs(self.valid, self.valid_labels, self.valid_arguments)

    @classmethod
    def from_tensors(cls, train: torch.Tensor | Dataset, test: torch.Tensor | Dataset | None = None,
                     *, image_shape: tuple[int, ...] | None = None,
                     binarize: str = "none", train_labels: object = None,
                     test_labels: object = None, num_classes: int | None = None) -> DataSplits:
        """Wrap user data: tensors ``(N, ...)`` or a ``Dataset`` whose items are images or
        ``(image, label)`` pairs.  Images are flattened; ``test`` defaults to ``train``.

        ``train`` (and ``test``) may also be a tuple ``(x, *arguments)``: x as above, then
        any tensors with a value per point that the program takes after it (one-hot labels,
        image-valued targets, masks, lengths), kept as they are.

        :param train_labels: class labels of the training points, integers ``(N_train,)`` in
            0..C-1 (tensor or array), for models conditioned on them; ``None``: no labels.
        :param test_labels: labels of the test points, needed with ``train_labels`` when
            ``test`` is given.
        :param num_classes: C; inferred as the largest label + 1 where ``None``.
        :raises InvalidDataError: labels of the wrong shape or dtype, or outside 0..C-1.

        Example::

            data = DataSplits.from_tensors(x_train, x_test, train_labels=y_train,
                                           test_labels=y_test, num_classes=10)
            for x, y in data.train_batches(100):
                ...  # x: (100, D), y: (100,) int64
        """
        if isinstance(train, tuple | list):
            if test is not None and not isinstance(test, tuple | list):
                raise InvalidDataError("the training data are a tuple (x, *arguments); give the "
                                       "test data as one too")
            first = 2 if train_labels is not None else 1
            arguments = {"train_arguments": check_arguments(train[1:], None, "training data",
                                                            first=first)}
            if test is not None:
                arguments["test_arguments"] = check_arguments(test[1:], None, "test data",
                                                              first=first)
                test = test[0]
            else:
                arguments["test_arguments"] = arguments["train_arguments"]
            data = cls.from_tensors(train[0], test, image_shape=image_shape, binarize=binarize,
                                    train_labels=train_labels, test_labels=test_labels,
                                    num_classes=num_classes)
            return replace(data, **arguments)
        train_x = _own_copy(_flatten(as_tensor(train), "train data"), train)
        if test is None:
            logger.warning("no test data given: the test ELBO and log p(x) will be computed on "
                           "the training data")
            test_x = train_x
        else:
            test_x = _own_copy(_flatten(as_tensor(test), "test data"), test)
        if test_x.shape[1] != train_x.shape[1]:
            raise ConfigError(
                f"train and test data differ in size per data point: {train_x.shape[1]} "
                f"vs {test_x.shape[1]}"
            )
        if image_shape is not None:
            image_shape = _check_image_shape(image_shape, train_x.shape[1])
        if train_labels is None:
            if test_labels is not None:
                raise InvalidDataError("test_labels given without train_labels")
            return _binarize(cls(train_x, test_x, image_shape), binarize)
        train_y = check_labels(train_labels, train_x.shape[0], "train labels").clone()
        if test is None:
            if test_labels is not None:
                raise InvalidDataError("test_labels given without test data")
            test_y = train_y
        elif test_labels is None:
            raise InvalidDataError("train_labels need test_labels for the test data")
        else:
            test_y = check_labels(test_labels, test_x.shape[0], "test labels").clone()
        num_classes = _num_classes(num_classes, train_y, test_y)
        return _binarize(cls(train_x, test_x, image_shape, train_labels=train_y,
                             test_labels=test_y, num_classes=num_classes), binarize)

    def subset(self, train_size: int | None = None, test_size: int | None = None) -> DataSplits:
        """The first ``train_size`` / ``test_size`` data points (all where ``None``)."""
        for name, size in (("train_size", train_size), ("test_size", test_size)):
            if size is not None and size < 1:
                raise ConfigError(f"{name} must be positive, got {size}")
        labels = {}
        if self.has_labels:
            labels = {"train_labels": self.train_labels[:train_size],
                      "test_labels": self.test_labels[:test_size]}
        return replace(self, train=self.train[:train_size], test=self.test[:test_size], **labels,
                       train_arguments=tuple(a[:train_size] for a in self.train_arguments),
                       test_arguments=tuple(a[:test_size] for a in self.test_arguments))

    def to(self, device: torch.device | str) -> DataSplits:
        """Move the splits to ``device`` (the whole dataset lives there during training)."""
        def move(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return tensor.to(device) if tensor is not None else None

        return replace(self, train=self.train.to(device), test=self.test.to(device),
                       valid=move(self.valid), train_labels=move(self.train_labels),
                       test_labels=move(self.test_labels), valid_labels=move(self.valid_labels),
                       train_arguments=tuple(a.to(device) for a in self.train_arguments),
                       test_arguments=tuple(a.to(device) for a in self.test_arguments),
                       valid_arguments=tuple(a.to(device) for a in self.valid_arguments))

    def with_validation(self, size: int, *, own: bool = False) -> DataSplits:
        """Hold out the last ``size`` training points as the validation set (0: none), or
        with ``own`` keep the dataset's own validation split, its first ``size`` points
        (all with 0).

        For MNIST the last 10,000 training images are the usual validation split.  Under
        dynamic binarization the validation set is binarized once with a fixed seed, like
        the test set.

        :raises ConfigError: ``size`` not smaller than the training set, or, with ``own``,
            larger than the own split or data without one.
        """
        if own:
            if self.valid is None:
                raise ConfigError("these data have no validation split of their own; hold out "
                                  "training points instead (--valid-split last)")
            if not 0 <= size <= self.valid.shape[0]:
                raise ConfigError(f"validation size must be between 0 (all) and the size of the "
                                  f"data's own validation split ({self.valid.shape[0]}), got {size}")
            if size == 0:
                return self
            labels = {} if self.valid_labels is None else {"valid_labels": self.valid_labels[:size]}
            return replace(self, valid=self.valid[:size], **labels,
                           valid_arguments=tuple(a[:size] for a in self.valid_arguments))
        if size == 0:
            return replace(self, valid=None, valid_labels=None, valid_arguments=())
        if not 0 < size < self.train.shape[0]:
            raise ConfigError(f"validation size must be between 1 and the training set size - 1 "
                              f"({self.train.shape[0] - 1}), got {size}")
        valid = self.train[-size:]
        if self.dynamic_binarization:
            valid = torch.bernoulli(valid, generator=torch.Generator().manual_seed(BINARIZATION_SEED + 1))
        labels = {}
        if self.has_labels:
            if bool((self.train_labels[-size:] == HIDDEN_LABEL).any()):
                raise ConfigError("hold out the validation points before hiding labels")
            labels = {"train_labels": self.train_labels[:-size],
                      "valid_labels": self.train_labels[-size:]}
        return replace(self, train=self.train[:-size], valid=valid, **labels,
                       train_arguments=tuple(a[:-size] for a in self.train_arguments),
                       valid_arguments=tuple(a[-size:] for a in self.train_arguments))

    def with_labelled(self, num_labelled: int, seed: int = 0) -> DataSplits:
        """Keep the labels of ``num_labelled`` training points and hide the others
        (:data:`HIDDEN_LABEL`), for semi-supervised learning.

        The kept points are balanced over the classes: ``num_labelled // C`` of each, and one
        more of ``num_labelled % C`` classes chosen at random; which points of a class, and
        those classes, are a random choice seeded by ``seed`` alone.  Test and validation
        labels are kept (to score a classifier).

        :raises ConfigError: no labels, ``num_labelled`` negative or above the training set
            size, or a class with fewer training points than its share.
        """
        if self.train_labels is None or self.num_classes is None:
            raise ConfigError("--labelled needs labelled data; these splits have no labels")
        n = self.train.shape[0]
        if not isinstance(num_labelled, int) or isinstance(num_labelled, bool) or \
                num_labelled < 0:
            raise ConfigError(f"--labelled must be a count >= 0, got {num_labelled!r}")
        if num_labelled > n:
            raise ConfigError(f"--labelled {num_labelled} is larger than the training set "
                              f"({n} points)")
        labels = self.train_labels.cpu()
        if bool((labels == HIDDEN_LABEL).any()):
            raise ConfigError("some training labels are hidden already")
        generator = torch.Generator().manual_seed(seed)
        share, extra = divmod(num_labelled, self.num_classes)
        counts = torch.full((self.num_classes,), share)
        counts[torch.randperm(self.num_classes, generator=generator)[:extra]] += 1
        kept = []
        for label in range(self.num_classes):
            members = torch.nonzero(labels == label).flatten()
            if members.numel() < int(counts[label]):
                raise ConfigError(f"--labelled {num_labelled} needs {int(counts[label])} "
                                  f"training points of class {label}, and there are "
                                  f"{members.numel()}")
            kept.append(members[torch.randperm(members.numel(), generator=generator)
                                [: int(counts[label])]])
        hidden = torch.full_like(labels, HIDDEN_LABEL)
        kept_indices = torch.cat(kept)
        hidden[kept_indices] = labels[kept_indices]
        return replace(self, train_labels=hidden.to(self.train_labels.device))

    def train_batches(self, batch_size: int, *, shuffle: bool = True,
                      generator: torch.Generator | None = None, start: int = 0,
                      part: Callable[[int], slice] | None = None,
                      ) -> Iterator[torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of training minibatches ``(batch_size, data_dim)``; the last may be smaller.
        With labels (:attr:`has_labels`), each batch is a pair ``(x, y)``, ``y`` of shape
        ``(batch_size,)`` the labels of the same rows.

        :param generator: CPU generator for the shuffling order.
        :param start: skip the first ``start`` batches of the epoch without drawing anything
            for them (to resume an epoch part-way).
        :param part: given a batch's number of rows, the rows of it to yield (default: all).
            The random draws are those of the whole batch whatever the part, so the parts
            of one batch put together are exactly the batch: a multi-process run takes each
            process's slice this way (:func:`pyrovae.distributed.local_batches`).
        """
        n = self.train.shape[0]
        if batch_size > n:
            raise ConfigError(f"batch size {batch_size} is larger than the training set ({n} points)")
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        order = order.to(self.train.device)
        for first in range(start * batch_size, n, batch_size):
            indices = order[first : first + batch_size]
            rows = part(indices.shape[0]) if part is not None else slice(None)
            x = self._train_rows(indices, rows)
            picked = indices[rows]
            yield self._inputs(x, None if self.train_labels is None else
                               self.train_labels[picked],
                               tuple(a[picked.to(a.device)] for a in self.train_arguments))

    def _train_rows(self, indices: torch.Tensor, rows: slice) -> torch.Tensor:
        """The training rows ``indices[rows]``, binarized afresh under dynamic binarization
        with the draws of all of ``indices``."""
        if not self.dynamic_binarization:
            return self.train[indices[rows]]
        if rows != slice(None) and self.train.device.type == "cpu" and \
                self.train.dtype == torch.float32:
            # torch.bernoulli on the CPU draws one float32 uniform u per element, in
            # order, and returns u < p; torch.rand draws the same u several times faster,
            # so only the part's rows need comparing (tested to match bernoulli)
            uniforms = torch.rand(indices.shape[0], self.train.shape[1])
            probabilities = self.train[indices[rows]]
            return (uniforms[rows] < probabilities).to(probabilities.dtype)
        return torch.bernoulli(self.train[indices])[rows]


def _num_classes(num_classes: int | None, *labels: torch.Tensor) -> int:
    """``num_classes`` if given (the labels are checked against it where they are named),
    else the largest label + 1."""
    if num_classes is None:
        return 1 + max((int(y.max()) for y in labels if y.numel()), default=0)
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise InvalidDataError(f"num_classes must be a positive integer, got {num_classes!r}")
    return num_classes


def as_tensor(data: torch.Tensor | np.ndarray | Dataset) -> torch.Tensor:
    """Stack a ``Dataset`` (items ``x`` or ``(x, label)``) or convert an array into a float tensor."""
    if isinstance(data, torch.Tensor):
        tensor = data
    elif isinstance(data, np.ndarray):
        tensor = torch.from_numpy(data)
    elif isinstance(data, Dataset):
        items = [data[i] for i in range(len(data))]  # type: ignore[arg-type]
        items = [item[0] if isinstance(item, tuple | list) else item for item in items]
        tensor = torch.stack([torch.as_tensor(np.asarray(item)) for item in items])
    else:
        raise ConfigError(f"expected a tensor, array or Dataset, got {type(data).__name__}")
    if not tensor.is_floating_point():
        tensor = tensor.float()
    return tensor


def _own_copy(x: torch.Tensor, original: object) -> torch.Tensor:
    """``x``, copied if it shares memory with the caller's tensor (whose later in-place
    changes would otherwise change the data)."""
    if isinstance(original, torch.Tensor) and x.data_ptr() == original.data_ptr():
        return x.clone()
    return x


def _check_image_shape(image_shape: tuple[int, ...], data_dim: int) -> tuple[int, ...]:
    shape = tuple(image_shape)
    if len(shape) != 3 or not all(isinstance(size, int) and size > 0 for size in shape) \
            or math.prod(shape) != data_dim:
        raise ConfigError(f"image_shape must be (channels, height, width) with {data_dim} "
                          f"values in all, e.g. (1, h, w) for grey images; got {shape}")
    return shape


def _flatten(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dim() < 2:
        raise ConfigError(f"{name} must have a leading data dimension, got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ConfigError(f"{name} is empty: shape {tuple(x.shape)}")
    return check_data(x.reshape(x.shape[0], -1).float(), name=name)


def outside_unit_interval(x: torch.Tensor, name: str, purpose: str) -> str | None:
    """``None`` if the values of ``x`` lie in [0, 1], else a message that names ``name``,
    the range found and how to rescale it.

    :param purpose: why [0, 1] is needed, e.g. ``"to be binarized as probabilities"``.
    """
    low, high = float(x.min()), float(x.max())
    if low >= 0 and high <= 1:
        return None
    advice = ("divide 8-bit grey levels by 255 (or save them as uint8, which pyrovae "
              "divides by 255)" if low >= 0 and high <= 255 else "rescale them into [0, 1]")
    return (f"{name} must lie in [0, 1] {purpose}, and its values run from {low:g} to "
            f"{high:g}; {advice}")


def _binarize(data: DataSplits, binarize: str) -> DataSplits:
    if binarize not in BINARIZATIONS:
        raise ConfigError(f"unknown binarization {binarize!r}; choose one of {', '.join(BINARIZATIONS)}")
    if binarize == "none":
        return data
    for name, x in (("train", data.train), ("test", data.test)):
        problem = outside_unit_interval(x, f"{name} data", "to be binarized as probabilities")
        if problem:
            raise ConfigError(problem)
    generator = torch.Generator().manual_seed(BINARIZATION_SEED)
    test = torch.bernoulli(data.test, generator=generator)
    if binarize == "static":
        return replace(data, train=torch.bernoulli(data.train, generator=generator), test=test)
    return replace(data, test=test, dynamic_binarization=True)


def _shuffled(x: torch.Tensor) -> torch.Tensor:
    """The rows of ``x`` in one fixed random order (seed :data:`SPLIT_SEED`)."""
    return x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(SPLIT_SEED))]


def _refuse_file(root: Path) -> None:
    if root.exists() and not root.is_dir():
        raise DatasetNotFoundError(f"data directory {root} is a file, not a folder; pass "
                                   f"--data-dir (or set ${DATA_DIR_ENV}) to a folder")


def resolve_data_dir(data_dir: str | os.PathLike[str] | None) -> tuple[Path, bool]:
    """The data folder and whether it was chosen by the user (``--data-dir`` or ``$PYROVAE_DATA``)."""
    if data_dir is not None:
        return Path(data_dir).expanduser(), True
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV]).expanduser(), True
    return DEFAULT_DATA_DIR, False


def load_mnist(data_dir: str | os.PathLike[str] | None = None, *, binarize: str = "dynamic",
               download: bool = True, labels: bool = False) -> DataSplits:
    """MNIST, 60,000 train and 10,000 test images, intensities scaled to [0, 1].

    With ``labels``, the digits 0..9 of the label files come with them (``num_classes=10``).

    Reads ``<data_dir>/MNIST/raw/*-ubyte`` with torchvision; where they are missing and
    ``download`` is true, torchvision downloads them into ``data_dir``.

    :param data_dir: folder that holds (or will hold) ``MNIST/raw``; defaults to
        ``$PYROVAE_DATA``, then ``~/.cache/pyrovae/data``.
    :raises DatasetNotFoundError: the files are absent and could not be downloaded.
    """
    from torchvision.datasets import MNIST

    root, chosen = resolve_data_dir(data_dir)
    _refuse_file(root)
    raw = root / "MNIST" / "raw"
    missing = [name for name in MNIST_RAW_FILES if not (raw / name).exists()]
    if missing:
        _fetch_or_raise(
            "MNIST", root=root, chosen=chosen, where=raw, missing=missing, download=download,
            how=f"pass --data-dir (or set ${DATA_DIR_ENV}) to a folder that holds "
                f"MNIST/raw/{MNIST_RAW_FILES[0]}",
            fetch=lambda: MNIST(str(root), train=True, download=True))
    splits, targets = [], []
    for train in (True, False):
        try:
            dataset = MNIST(str(root), train=train, download=False)
        except Exception as error:  # a damaged IDX file fails in numpy, torch or torchvision
            raise InvalidDataError(
                f"cannot read MNIST from {raw}: the files are damaged ({type(error).__name__}: "
                f"{error}); delete them to download them again") from None
        images = dataset.data
        splits.append(images.reshape(images.shape[0], -1).float() / 255.0)
        targets.append(dataset.targets)
    return _binarize(_with_labels(DataSplits(splits[0], splits[1], MNIST_IMAGE_SHAPE),
                                  targets if labels else None, 10, "MNIST"), binarize)


def _with_labels(data: DataSplits, targets: list[torch.Tensor] | None, num_classes: int,
                 title: str) -> DataSplits:
    """``data`` with the train and test ``targets`` of a dataset as labels (none if ``None``)."""
    if targets is None:
        return data
    train, test = (check_labels(torch.as_tensor(y), x.shape[0], f"{title} {name} labels",
                                num_classes=num_classes)
                   for y, x, name in zip(targets, (data.train, data.test), ("train", "test"),
                                         strict=True))
    return replace(data, train_labels=train, test_labels=test, num_classes=num_classes)


def load_binarized_mnist(data_dir: str | os.PathLike[str] | None = None, *,
                         binarize: str = "static", download: bool = False,
                         valid: bool = False) -> DataSplits:
    """Statically binarized MNIST (Larochelle & Murray 2011): 50,000 train, 10,000 test, and
    with ``valid`` the file's 10,000 validation images.

    Reads ``<data_dir>/binarized_mnist.npz`` with uint8 arrays ``train``, ``valid``, ``test``
    of shape ``(N, 784)``.  The validation split is never part of ``train``; the test split
    is shuffled once with a fixed seed, since the file stores it sorted by class.  The data are
    binary already, so ``binarize`` and ``download`` are accepted for a uniform signature
    and otherwise ignored (there is no canonical download of this file).
    """
    root, _ = resolve_data_dir(data_dir)
    _refuse_file(root)
    path = root / "binarized_mnist.npz"
    if not path.is_file():
        raise DatasetNotFoundError(
            f"binarized MNIST not found: looked for {path}; pass --data-dir (or set "
            f"${DATA_DIR_ENV}) to a folder that holds binarized_mnist.npz (arrays train, valid, "
            f"test of shape (N, 784))"
        )
    try:
        # numpy leaves the file open when the archive is broken: the handle is ours to close
        with open(path, "rb") as handle, np.load(handle) as arrays:
            train = torch.from_numpy(arrays["train"]).float()
            test = torch.from_numpy(arrays["test"]).float()
            held_out = torch.from_numpy(arrays["valid"]).float() if valid else None
    except Exception as error:  # a damaged zip or array fails in zipfile, numpy or torch
        raise InvalidDataError(
            f"cannot read {path}: not an .npz of arrays train, valid, test "
            f"({type(error).__name__}: {error})") from None
    if train.dim() != 2 or test.dim() != 2 or train.shape[0] == 0 or test.shape[0] == 0 \
            or train.shape[1] != test.shape[1]:
        raise InvalidDataError(f"{path}: train and test must be non-empty (N, 784) arrays, got "
                               f"{tuple(train.shape)} and {tuple(test.shape)}")
    if held_out is not None and (held_out.dim() != 2 or held_out.shape[0] == 0
                                 or held_out.shape[1] != train.shape[1]):
        raise InvalidDataError(f"{path}: valid must be a non-empty (N, {train.shape[1]}) array, "
                               f"got {tuple(held_out.shape)}")
    # the file's test split is sorted by digit class (its first 1,000 images are zeros), so a
    # fixed shuffle makes the first N test images (--test-size N) a fair sample of the whole;
    # statistics over the full test set do not change
    test = test[torch.randperm(test.shape[0], generator=torch.Generator().manual_seed(0))]
    return DataSplits(train, test, MNIST_IMAGE_SHAPE, valid=held_out)


def _one_line(error: BaseException) -> str:
    """``error``'s message on one line (torchvision's download errors span several)."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _fetch_or_raise(title: str, *, root: Path, chosen: bool, where: Path, missing: list[str],
                    how: str, download: bool, fetch: Callable[[], object]) -> None:
    """Download a missing dataset with torchvision's ``fetch()``, or raise a one-line
    :class:`DatasetNotFoundError` that names where it looked and how to get the data."""
    if chosen and not root.is_dir():
        raise DatasetNotFoundError(
            f"data directory {root} does not exist; pass --data-dir (or set ${DATA_DIR_ENV}) to "
            f"a folder that holds {where.relative_to(root)}/{missing[0]}"
        )
    if not download:
        raise DatasetNotFoundError(
            f"{title} not found: looked for {', '.join(missing)} in {where}; {how}, or allow the "
            f"download (without --no-download) where there is a network"
        )
    logger.info("%s not in %s; downloading", title, where)
    # the folders the download would create, from the outermost: removed again if it fails
    created = [folder for folder in (where, *where.parents)
               if (folder == root or root in folder.parents) and not folder.exists()][::-1]
    try:
        # torchvision prints each failed mirror; the one-line error below says it all
        with contextlib.redirect_stdout(io.StringIO()):
            fetch()
    except Exception as error:  # network errors come in many types
        if created:
            shutil.rmtree(created[0], ignore_errors=True)
        raise DatasetNotFoundError(
            f"{title} not found in {where} and the download failed ({_one_line(error)}); {how}"
        ) from None


@dataclass(frozen=True)
class IdxDataset:
    """A dataset that torchvision reads from MNIST-format IDX files.

    :param title: the name in messages.
    :param torchvision_class: the class in ``torchvision.datasets``; its files live in
        ``<data_dir>/<torchvision_class>/raw``.
    :param source: where the files can be downloaded by hand.
    :param split: EMNIST's split (``letters``, ``digits``, ...); ``None`` for the others.
    """

    title: str
    torchvision_class: str
    source: str
    split: str | None = None

    @property
    def files(self) -> tuple[str, ...]:
        """The four uncompressed IDX files torchvision reads."""
        prefix = "" if self.split is None else f"emnist-{self.split}-"
        train, test = ("train", "test") if self.split is not None else ("train", "t10k")
        return (f"{prefix}{train}-images-idx3-ubyte", f"{prefix}{train}-labels-idx1-ubyte",
                f"{prefix}{test}-images-idx3-ubyte", f"{prefix}{test}-labels-idx1-ubyte")


IDX_DATASETS = {
    "fashion_mnist": IdxDataset(
        "Fashion-MNIST", "FashionMNIST", "https://github.com/zalandoresearch/fashion-mnist"),
    "kmnist": IdxDataset("KMNIST", "KMNIST", "https://github.com/rois-codh/kmnist"),
    **{f"emnist_{split}": IdxDataset(
        f"EMNIST ({split})", "EMNIST",
        "https://www.nist.gov/itl/products-and-services/emnist-dataset (gzip.zip)", split)
       for split in EMNIST_SPLITS},
}


def load_idx_dataset(name: str, data_dir: str | os.PathLike[str] | None = None, *,
                     binarize: str = "dynamic", download: bool = True,
                     labels: bool = False) -> DataSplits:
    """A 28x28 grey-level dataset of :data:`IDX_DATASETS` through its torchvision class.

    Reads ``<data_dir>/<Class>/raw/*-ubyte`` (``FashionMNIST``, ``KMNIST``, ``EMNIST``);
    ``.gz`` files there, as published, are decompressed first.  Where the files are missing
    and ``download`` is true, torchvision downloads them.  Intensities are scaled to [0, 1].
    EMNIST's files store every image transposed; it is transposed back so that samples
    read upright.

    :param name: a key of :data:`IDX_DATASETS`, e.g. ``"fashion_mnist"``, ``"emnist_letters"``.
    :param labels: attach the class labels of the label files, counted from 0 (EMNIST
        letters' 1..26 become 0..25).
    :returns: 60,000 / 10,000 images for Fashion-MNIST and KMNIST; EMNIST's split sizes
        (letters: 124,800 / 20,800), each ``(N, 784)`` with image shape ``(1, 28, 28)``.
    :raises DatasetNotFoundError: the files are absent and could not be downloaded.
    """
    from torchvision import datasets

    spec = IDX_DATASETS[name]
    cls = getattr(datasets, spec.torchvision_class)
    options = {} if spec.split is None else {"split": spec.split}
    root, chosen = resolve_data_dir(data_dir)
    raw = root / spec.torchvision_class / "raw"
    for file in spec.files:
        if not (raw / file).exists() and (raw / f"{file}.gz").is_file():
            # the published .gz files, put there by hand: decompress them as torchvision's
            # own download does
            from torchvision.datasets.utils import extract_archive

            extract_archive(str(raw / f"{file}.gz"), str(raw))
    missing = [file for file in spec.files if not (raw / file).is_file()]
    if missing:
        _fetch_or_raise(
            spec.title, root=root, chosen=chosen, where=raw, missing=missing, download=download,
            how=f"put the files (or their .gz) from {spec.source} there and pass --data-dir",
            fetch=lambda: cls(str(root), train=True, download=True, **options))
    splits, targets = [], []
    for train in (True, False):
        dataset = cls(str(root), train=train, download=False, **options)
        images = dataset.data
        if spec.split is not None:
            images = images.transpose(1, 2)
        splits.append(images.reshape(images.shape[0], -1).float() / 255.0)
        targets.append(torch.as_tensor(dataset.targets))
    num_classes = len(cls.classes) if spec.split is None else len(cls.classes_split_dict[spec.split])
    if spec.split == "letters":  # torchvision's letters count from 1, class 0 is "N/A"
        targets, num_classes = [y - 1 for y in targets], num_classes - 1
    data = _with_labels(DataSplits(splits[0], splits[1], MNIST_IMAGE_SHAPE),
                        targets if labels else None, num_classes, spec.title)
    return _binarize(data, binarize)


def _omniglot_class() -> type:
    """torchvision's ``Omniglot`` that also accepts the extracted folders without their zip."""
    from torchvision.datasets import Omniglot

    class ExtractedOmniglot(Omniglot):
        # torchvision checks the md5 of images_background.zip before reading the folders
        # next to it; the unzipped folders alone (as Lake et al.'s repository has them) are
        # the same data
        def _check_integrity(self) -> bool:
            return os.path.isdir(os.path.join(self.root, self._get_target_folder())) or \
                super()._check_integrity()

    return ExtractedOmniglot


def load_omniglot(data_dir: str | os.PathLike[str] | None = None, *, binarize: str = "dynamic",
                  download: bool = True, train_drawings: int = OMNIGLOT_TRAIN_DRAWINGS,
                  ) -> DataSplits:
    """Omniglot at 28x28, split by drawer: 24,345 train and 8,115 test images.

    Reads ``<data_dir>/omniglot-py/images_background`` and ``images_evaluation`` (the
    alphabet/character/PNG folders of torchvision's ``Omniglot``, 105x105; downloaded there
    when missing and ``download`` is true) and pools both: 1,623 characters of 50 alphabets,
    20 drawings each.  Every character's first ``train_drawings`` drawings (by file name,
    i.e. by drawer) are training images and the rest test images, so both splits hold every
    character, as in the 28x28 Omniglot of Lake et al. (2015) that Burda et al. (2016) used
    (24,345 train / 8,070 test; its image assignment is not recoverable from the 105x105
    files, so this split has the same training size and 45 more test images).  Each image is
    shrunk to 28x28 by averaging 3.75x3.75-pixel boxes and inverted, so a pixel is the
    fraction of ink in its box: strokes 1, background 0, grey at the edges.

    :param train_drawings: drawings per character in the training split (of 20).
    :returns: ``(N, 784)`` splits with image shape ``(1, 28, 28)``.

    References:

    1. B. M. Lake, R. Salakhutdinov, J. B. Tenenbaum, *Human-level concept learning through
       probabilistic program induction*, Science 350, 2015.
    2. Y. Burda, R. Grosse, R. Salakhutdinov, *Importance Weighted Autoencoders*, ICLR 2016.
    """
    from PIL import Image

    cls = _omniglot_class()
    root, chosen = resolve_data_dir(data_dir)
    home = root / "omniglot-py"
    folders = ("images_background", "images_evaluation")
    for background, folder in zip((True, False), folders, strict=True):
        if not (home / folder).is_dir():
            _fetch_or_raise(
                "Omniglot", root=root, chosen=chosen, where=home, missing=[folder],
                download=download,
                how="unzip images_background.zip and images_evaluation.zip from "
                    "https://github.com/brendenlake/omniglot (python/) there and pass --data-dir",
                fetch=lambda background=background: cls(str(root), background=background,
                                                        download=True))

    def shrink(image: Image.Image) -> np.ndarray:
        return np.asarray(image.resize((28, 28), Image.Resampling.BOX), dtype=np.uint8)

    train, test = [], []
    for background in (True, False):
        dataset = cls(str(root), background=background, download=False, transform=shrink)
        # torchvision lists each character's PNGs (named <character>_<drawer>.png) in
        # _flat_character_images as (file name, character index); sort them by drawer
        drawings: dict[int, list[str]] = {}
        for name, character in dataset._flat_character_images:
            drawings.setdefault(character, []).append(name)
        training = {(name, character) for character, names in drawings.items()
                    for name in sorted(names)[:train_drawings]}
        for index, key in enumerate(dataset._flat_character_images):
            (train if tuple(key) in training else test).append(dataset[index][0])
    if not train or not test:
        raise InvalidDataError(f"Omniglot in {home} gave {len(train)} training and {len(test)} "
                               f"test images; each character needs more than {train_drawings} "
                               f"drawings")
    splits = [1.0 - torch.from_numpy(np.stack(images)).reshape(len(images), -1).float() / 255.0
              for images in (train, test)]
    # the folders list images character by character; one fixed shuffle makes the first N
    # images (--train-size, --test-size) a sample of every alphabet
    splits = [_shuffled(x) for x in splits]
    return _binarize(DataSplits(splits[0], splits[1], MNIST_IMAGE_SHAPE), binarize)


def load_cifar10(data_dir: str | os.PathLike[str] | None = None, *, binarize: str = "none",
                 download: bool = True, labels: bool = False) -> DataSplits:
    """CIFAR-10: 50,000 train and 10,000 test colour images, 32x32, intensities in [0, 1].

    Reads the pickled batches in ``<data_dir>/cifar-10-batches-py`` with torchvision's
    ``CIFAR10`` (which checks their md5 sums); where they are missing and ``download`` is
    true, torchvision downloads and unpacks ``cifar-10-python.tar.gz`` into ``data_dir``.
    Grey levels suit ``--binarize none`` with a Gaussian or continuous Bernoulli likelihood.

    :returns: ``(N, 3072)`` splits, channel-major (all red, then green, then blue pixels),
        with image shape ``(3, 32, 32)``.
    """
    from torchvision.datasets import CIFAR10

    root, chosen = resolve_data_dir(data_dir)
    where = root / CIFAR10.base_folder
    files = [name for name, _ in CIFAR10.train_list + CIFAR10.test_list] + [CIFAR10.meta["filename"]]
    missing = [name for name in files if not (where / name).is_file()]
    if missing:
        _fetch_or_raise(
            "CIFAR-10", root=root, chosen=chosen, where=where, missing=missing, download=download,
            how=f"unpack {CIFAR10.url} into {root} and pass --data-dir",
            fetch=lambda: CIFAR10(str(root), train=True, download=True))
    splits, targets = [], []
    for train in (True, False):
        try:
            dataset = CIFAR10(str(root), train=train, download=False)
            images = dataset.data  # (N, 32, 32, 3) uint8
            targets.append(torch.as_tensor(dataset.targets))
        except RuntimeError as error:  # a batch fails its md5 sum
            raise DatasetNotFoundError(
                f"CIFAR-10 in {where} is incomplete or corrupted ({_one_line(error)}); unpack "
                f"{CIFAR10.url} there again"
            ) from None
        images = torch.from_numpy(images).permute(0, 3, 1, 2)
        splits.append(images.reshape(images.shape[0], -1).float() / 255.0)
    data = _with_labels(DataSplits(splits[0], splits[1], (3, 32, 32)),
                        targets if labels else None, 10, "CIFAR-10")
    return _binarize(data, binarize)


#: datasets selectable by name from the CLI and config
DATASETS: dict[str, Callable[..., DataSplits]] = {
    "mnist": load_mnist,
    "binarized_mnist": load_binarized_mnist,
    **{name: partial(load_idx_dataset, name) for name in IDX_DATASETS},
    "omniglot": load_omniglot,
    "cifar10": load_cifar10,
}
#: the datasets of :data:`DATASETS` that come with class labels (``labels=True``)
LABELLED_DATASETS = frozenset({"mnist", *IDX_DATASETS, "cifar10"})
#: the datasets of :data:`DATASETS` with a validation split of their own (``valid=True``)
OWN_VALIDATION_DATASETS = frozenset({"binarized_mnist"})


# --- the user's own files: --dataset npz:PATH, npy:PATH, folder:PATH ---


def _split_order(num_points: int, test_fraction: float, source: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of a fixed random split (seed :data:`SPLIT_SEED`): the first
    ``round(test_fraction * N)`` (at least 1) points of one random order are the test set,
    the rest the training set; ``(train indices, test indices)``."""
    if not 0 < test_fraction < 1:
        raise ConfigError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if num_points < 2:
        raise InvalidDataError(f"{source} has {num_points} data point(s); a train/test split needs 2")
    order = torch.randperm(num_points, generator=torch.Generator().manual_seed(SPLIT_SEED))
    num_test = min(num_points - 1, max(1, round(test_fraction * num_points)))
    return order[num_test:], order[:num_test]



def images_from_array(x: np.ndarray, name: str) -> tuple[torch.Tensor, tuple[int, ...] | None]:
    """Flatten an array of data points into a float32 tensor in the stated value range.

    - shape ``(N, D)``: vectors (no image shape); ``(N, H, W)``: grey images;
      ``(N, H, W, C)`` with 1 to 4 channels, last: images of shape ``(C, H, W)``.
    - dtype ``uint8``: grey levels 0..255, divided by 255; ``bool``: 0/1; float: kept as
      they are (in [0, 1] for Bernoulli-type likelihoods and for binarization). Other
      integer types have no stated range and are refused.

    :param name: how the array is called in error messages.
    :returns: ``(N, D)`` float32 and the image shape ``(C, H, W)`` or ``None``.
    :raises InvalidDataError: a dtype, shape or value that cannot be data.
    """
    if x.dtype == np.uint8:
        tensor = torch.from_numpy(x).float() / 255.0
    elif x.dtype == np.bool_:
        tensor = torch.from_numpy(x).float()
    elif np.issubdtype(x.dtype, np.floating):
        tensor = torch.from_numpy(x.astype(np.float32, copy=False))
    else:
        raise InvalidDataError(
            f"{name} has dtype {x.dtype}; give uint8 (0..255), bool, or floats (in [0, 1] for "
            f"Bernoulli-type likelihoods)")
    if x.ndim == 2:
        image_shape = None
    elif x.ndim == 3:
        image_shape = (1, *x.shape[1:])
    elif x.ndim == 4 and 1 <= x.shape[3] <= 4:
        tensor = tensor.permute(0, 3, 1, 2)
        image_shape = (x.shape[3], *x.shape[1:3])
    else:
        hint = "; channels go last: x.transpose(0, 2, 3, 1)" if x.ndim == 4 else ""
        raise InvalidDataError(
            f"{name} has shape {x.shape}; expected (N, D), (N, H, W) or (N, H, W, C) with 1-4 "
            f"channels{hint}")
    if x.shape[0] == 0:
        raise InvalidDataError(f"{name} is empty: shape {x.shape}")
    return _flatten(tensor.contiguous(), name), image_shape


def _splits_from_arrays(arrays: dict[str, np.ndarray], source: str, *, binarize: str,
                        test_fraction: float,
                        labels: dict[str, np.ndarray] | None = None) -> DataSplits:
    """:class:`DataSplits` from arrays ``train`` and optional ``test`` and ``valid``; a lone
    ``train`` (an npy file, a folder) is called ``source`` in messages and split.  ``labels``
    holds the class labels of the same keys, split and appended alike."""
    tensors, shapes = {}, {}
    for key in ("train", "valid", "test"):
        if key not in arrays:
            continue
        if arrays[key].shape[1:] != arrays["train"].shape[1:]:
            raise InvalidDataError(
                f"{source}: {key} has data points of shape {arrays[key].shape[1:]} but train "
                f"{arrays['train'].shape[1:]}")
        name = source if len(arrays) == 1 else f"{source}: {key}"
        tensors[key], shapes[key] = images_from_array(arrays[key], name)
    targets = {key: check_labels(y, len(tensors[key]), f"{source}: {key}_labels")
               for key, y in (labels or {}).items()}
    if "test" not in tensors:
        train_rows, test_rows = _split_order(len(tensors["train"]), test_fraction, source)
        for split in (tensors, targets):
            if "train" in split:
                split["train"], split["test"] = split["train"][train_rows], split["train"][test_rows]
    train, train_y = tensors["train"], targets.get("train")
    if "valid" in tensors:
        # the last training points, so that --valid-size len(valid) holds exactly them out
        logger.info("%s: valid (%d points) appended after train; --valid-size %d holds it out",
                    source, len(tensors["valid"]), len(tensors["valid"]))
        train = torch.cat([train, tensors["valid"]])
        if train_y is not None:
            train_y = torch.cat([train_y, targets["valid"]])
    if labels is None:
        return _binarize(DataSplits(train, tensors["test"], shapes["train"]), binarize)
    num_classes = _num_classes(None, train_y, targets["test"])
    return _binarize(DataSplits(train, tensors["test"], shapes["train"], train_labels=train_y,
                                test_labels=targets["test"], num_classes=num_classes), binarize)


def _existing_file(path: str, kind: str, what: str) -> Path:
    file = Path(path).expanduser()
    if not file.is_file():
        raise DatasetNotFoundError(f"{file} not found (--dataset {kind}:{path}); give the path of {what}")
    return file


def _damage(error: BaseException) -> str:
    """What a damaged file's reading ``error`` says, on one line, with its type where the
    message alone says little (``BadZipFile: Bad CRC-32 for file 'train.npy'``)."""
    if isinstance(error, EOFError | zipfile.BadZipFile | zlib.error):
        kind = "zlib.error" if isinstance(error, zlib.error) else type(error).__name__
        return f"truncated or corrupted: {kind}: {_one_line(error)}"
    return _one_line(error)


def _check_npy_size(stream: BinaryIO, size: int, name: str) -> None:
    """Compare the array an ``.npy`` header promises with the ``size`` bytes of the file
    or archive member it opens (``stream`` at its start), before numpy allocates the
    array: a damaged or truncated file would otherwise ask for any amount of memory.

    :raises InvalidDataError: the data are shorter than the header says.
    """
    version = np.lib.format.read_magic(stream)
    read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                   (2, 0): np.lib.format.read_array_header_2_0,
                   (3, 0): np.lib.format.read_array_header_2_0}.get(version)
    if read_header is None:
        return  # a version numpy itself will name in its error
    shape, _, dtype = read_header(stream)
    if dtype.hasobject:
        return  # refused by allow_pickle=False
    needed = math.prod(shape) * dtype.itemsize
    available = size - stream.tell()
    if needed > available:
        raise InvalidDataError(
            f"{name} is shorter than its header says: the header promises an array of shape "
            f"{tuple(shape)} {dtype} ({needed:,} bytes) and {available:,} bytes follow it "
            f"(truncated, or the header is damaged)")


def _check_npz_member(archive: zipfile.ZipFile, key: str, name: str) -> None:
    """:func:`_check_npy_size` for the array ``key`` of an ``.npz`` archive."""
    info = archive.getinfo(f"{key}.npy" if f"{key}.npy" in archive.namelist() else key)
    with archive.open(info) as member:
        _check_npy_size(member, info.file_size, name)


def load_npz(path: str | os.PathLike[str], *, binarize: str = "none",
             test_fraction: float = 0.1, labels: bool = False) -> DataSplits:
    """Arrays from an ``.npz`` file: ``train``, and optionally ``test`` and ``valid``.

    Each array holds data points as :func:`images_from_array` takes them (``(N, D)``,
    ``(N, H, W)`` or ``(N, H, W, C)``; uint8 0..255, bool or floats in the range the
    likelihood needs).  Without ``test``, a fixed random ``test_fraction`` of ``train`` is
    the test set.  ``valid`` is appended after ``train``, so that ``--valid-size
    len(valid)`` holds it out for model selection.  With ``labels``, the integer arrays
    ``train_labels`` (and ``test_labels``, ``valid_labels`` beside ``test``, ``valid``) are
    the class labels 0..C-1, C the largest + 1; otherwise they, and any other arrays, are
    ignored.  The file is read with ``allow_pickle=False``.
    """
    file = _existing_file(str(path), "npz", "an .npz file with arrays train [, test, valid]")
    try:
        # numpy leaves the file open when the archive is broken: the handle is ours to close
        with open(file, "rb") as handle, np.load(handle, allow_pickle=False) as archive:
            wanted = [key for key in archive.files if key in ("train", "test", "valid")]
            wanted += [f"{key}_labels" for key in wanted if f"{key}_labels" in archive.files]
            for key in wanted:
                _check_npz_member(archive.zip, key, f"{file}: {key}")
            arrays = {key: archive[key] for key in archive.files if key in ("train", "test", "valid")}
            targets = {key: archive[f"{key}_labels"] for key in arrays
                       if f"{key}_labels" in archive.files}
            found = archive.files
    except InvalidDataError:
        raise
    except Exception as error:  # a damaged archive fails in zipfile, zlib or numpy's parser
        raise InvalidDataError(
            f"{file} is not a readable .npz of plain arrays ({_damage(error)})") from None
    if "train" not in arrays:
        raise InvalidDataError(f"{file} has no array named train (found: {', '.join(found) or 'none'}); "
                               f"save it with numpy.savez(path, train=..., test=...)")
    if not labels:
        return _splits_from_arrays(arrays, str(file), binarize=binarize,
                                   test_fraction=test_fraction)
    missing = [f"{key}_labels" for key in arrays if key not in targets]
    if missing:
        raise InvalidDataError(f"{file} has no {', '.join(missing)} for the labels this model "
                               f"needs; save them with numpy.savez(path, train=..., "
                               f"train_labels=..., test=..., test_labels=...)")
    return _splits_from_arrays(arrays, str(file), binarize=binarize, test_fraction=test_fraction,
                               labels=targets)


def load_npy(path: str | os.PathLike[str], *, binarize: str = "none",
             test_fraction: float = 0.1) -> DataSplits:
    """One array from an ``.npy`` file, split into train and test.

    The array is as :func:`images_from_array` takes it; a fixed random ``test_fraction`` of
    its rows (seed :data:`SPLIT_SEED`, at least one row) is the test set.
    """
    file = _existing_file(str(path), "npy", "an .npy file with one array (N, ...)")
    try:
        with open(file, "rb") as handle:
            _check_npy_size(handle, file.stat().st_size, str(file))
            handle.seek(0)
            array = np.load(handle, allow_pickle=False)
    except InvalidDataError:
        raise
    except Exception as error:  # a damaged header fails in numpy's parser, short data in numpy
        raise InvalidDataError(f"{file} is not a readable .npy array ({_damage(error)})") from None
    return _splits_from_arrays({"train": array}, str(file), binarize=binarize, test_fraction=test_fraction)


def _image_folder_array(folder: Path) -> np.ndarray:
    """Every image of a ``torchvision.datasets.ImageFolder`` (class subfolders) as one uint8
    array ``(N, H, W)`` if all are grey, else ``(N, H, W, 3)``."""
    from PIL import Image
    from torchvision.datasets import ImageFolder

    try:
        dataset = ImageFolder(str(folder))  # lists <class>/<image> files; we read them below
    except (FileNotFoundError, OSError) as error:
        raise DatasetNotFoundError(
            f"no images in {folder} ({_one_line(error)}); an image folder holds one subfolder "
            f"per class (any name) with the image files") from None
    images = []
    for path, _ in dataset.samples:
        with Image.open(path) as image:
            image.load()
            images.append(image.copy())
    grey = all(image.mode in ("1", "L", "LA") for image in images)
    arrays = [np.asarray(image.convert("L" if grey else "RGB")) for image in images]
    for (path, _), array in zip(dataset.samples, arrays, strict=True):
        if array.shape != arrays[0].shape:
            raise InvalidDataError(
                f"images in {folder} differ in size: {dataset.samples[0][0]} is "
                f"{arrays[0].shape[1]}x{arrays[0].shape[0]} but {path} is "
                f"{array.shape[1]}x{array.shape[0]}; resize them to one size first")
    return np.stack(arrays)


def load_image_folder(path: str | os.PathLike[str], *, binarize: str = "none",
                      test_fraction: float = 0.1) -> DataSplits:
    """Images in a folder, read with ``torchvision.datasets.ImageFolder``.

    ``PATH/train/<class>/*.png`` and ``PATH/test/<class>/*.png`` are the two splits where
    both ``train`` and ``test`` exist; otherwise ``PATH/<class>/*.png`` is split by a fixed
    random ``test_fraction``.  Any format PIL reads; all images of one size; grey images
    (modes 1, L) give one channel, any colour image makes all RGB; 8-bit levels are scaled
    to [0, 1].  Class folders only group files: labels are not used.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise DatasetNotFoundError(
            f"{folder} is not a folder (--dataset folder:{path}); give a folder with one "
            f"subfolder per class, or train/ and test/ folders of them")
    if (folder / "train").is_dir() and (folder / "test").is_dir():
        train, test = _image_folder_array(folder / "train"), _image_folder_array(folder / "test")
        if train.ndim != test.ndim:  # one split grey, the other colour
            train, test = (np.repeat(x[..., None], 3, -1) if x.ndim == 3 else x for x in (train, test))
        arrays = {"train": train, "test": test}
    else:
        arrays = {"train": _image_folder_array(folder)}
    return _splits_from_arrays(arrays, str(folder), binarize=binarize, test_fraction=test_fraction)


#: ``--dataset KIND:PATH``: the user's own files
FILE_DATASETS = {
    "npz": load_npz,
    "npy": load_npy,
    "folder": load_image_folder,
}


def check_dataset_name(name: str) -> None:
    """Raise :class:`ConfigError` unless ``name`` is in :data:`DATASETS` or ``KIND:PATH``."""
    kind, colon, path = name.partition(":")
    if name in DATASETS or (colon and kind in FILE_DATASETS and path):
        return
    suggestion = _dataset_suggestion(name)
    raise ConfigError(f"unknown dataset {name!r}"
                      + (f" (did you mean {suggestion}?)" if suggestion else "")
                      + f"; known datasets: {', '.join(DATASETS)}, or "
                      f"{', '.join(f'{kind}:PATH' for kind in FILE_DATASETS)}")


def _dataset_suggestion(name: str) -> str | None:
    """The ``--dataset`` value a mistyped ``name`` most likely meant: ``npy:``/``npz:``/
    ``folder:`` before a bare path to such a file or folder, or the closest name."""
    kind, colon, path = name.partition(":")
    if colon and path:  # a mistyped kind: npzz:data.npz
        close = difflib.get_close_matches(kind.lower(), FILE_DATASETS, n=1)
        if close:
            return f"{close[0]}:{path}"
    suffix = Path(name).suffix.lower()
    if suffix in (".npy", ".npz"):
        return f"{suffix[1:]}:{name}"
    if name and Path(name).expanduser().is_dir():
        return f"folder:{name}"
    close = difflib.get_close_matches(name.lower(), DATASETS, n=1, cutoff=0.6)
    return close[0] if close else None


def load_dataset(name: str, data_dir: str | os.PathLike[str] | None = None, *,
                 binarize: str = "dynamic", download: bool = True,
                 test_fraction: float = 0.1, labels: bool = False,
                 own_validation: bool = False) -> DataSplits:
    """Load a dataset by name: a key of :data:`DATASETS` (read from ``data_dir``), or
    ``KIND:PATH`` with ``KIND`` in :data:`FILE_DATASETS` (``npz``, ``npy``, ``folder``;
    ``PATH`` relative to the working directory).

    :param test_fraction: for files without a test split, the share of points held out as
        the test set (a fixed random choice).
    :param labels: attach the class labels (:data:`LABELLED_DATASETS`, ``npz:PATH`` with
        ``train_labels``/``test_labels`` arrays), for models conditioned on them.
    :param own_validation: attach the dataset's own validation split as ``valid``
        (:data:`OWN_VALIDATION_DATASETS`; an npz file's ``valid`` array is appended after
        ``train`` instead, for ``--valid-size`` to hold out).
    :raises ConfigError: ``labels`` for a dataset without labels, ``own_validation`` for one
        without a validation split.
    """
    check_dataset_name(name)
    kind, colon, path = name.partition(":")
    if labels and name not in LABELLED_DATASETS and kind != "npz":
        raise ConfigError(f"dataset {name!r} has no class labels; a model conditioned on labels "
                          f"needs one of {', '.join(sorted(LABELLED_DATASETS))} or npz:PATH with "
                          f"train_labels and test_labels arrays")
    if own_validation and name not in OWN_VALIDATION_DATASETS:
        raise ConfigError(f"dataset {name!r} has no validation split of its own (those that do: "
                          f"{', '.join(sorted(OWN_VALIDATION_DATASETS))}); hold out the last "
                          f"training points instead (--valid-split last --valid-size N)")
    options: dict[str, bool] = {"labels": True} if labels else {}
    if own_validation:
        options["valid"] = True
    if name not in DATASETS:
        return FILE_DATASETS[kind](path, binarize=binarize, test_fraction=test_fraction, **options)
    return DATASETS[name](data_dir, binarize=binarize, download=download, **options)
