"""Datasets as in-memory tensors of flattened images, and minibatch iteration.

Every dataset is a :class:`DataSplits`: ``train`` and ``test`` tensors of shape
``(N, data_dim)``, float32 in [0, 1].  Three binarizations:

- ``dynamic``: ``train`` keeps grey levels and every minibatch is resampled as
  x ~ Bernoulli(intensity) each time an image is used (the IWAE paper's setting);
  ``test`` is binarized once with a fixed seed so every run is scored on the same bits;
- ``static``: both splits are binarized once with a fixed seed;
- ``none``: grey levels.

Data sources: ``mnist`` (torchvision; downloads where there is a network, reads the raw
IDX files offline) and ``binarized_mnist`` (the fixed Larochelle & Murray split, from
``binarized_mnist.npz``), plus any user tensor or ``Dataset`` via
:meth:`DataSplits.from_tensors`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from pyrovae.distributed import check_batch_size, shard_of
from pyrovae.errors import ConfigError, DatasetNotFoundError
from pyrovae.validation import check_data

logger = logging.getLogger(__name__)

#: environment variable naming the data folder when ``--data-dir`` is not given
DATA_DIR_ENV = "PYROVAE_DATA"
#: where data is downloaded when neither ``--data-dir`` nor ``$PYROVAE_DATA`` is set
DEFAULT_DATA_DIR = Path.home() / ".cache" / "pyrovae" / "data"
#: seed of the fixed Bernoulli draw for static binarization and dynamic test sets
BINARIZATION_SEED = 0
BINARIZATIONS = ("dynamic", "static", "none")
MNIST_RAW_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
MNIST_IMAGE_SHAPE = (1, 28, 28)


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

    @property
    def data_dim(self) -> int:
        return int(self.train.shape[1])

    @classmethod
    def from_tensors(cls, train: torch.Tensor | Dataset, test: torch.Tensor | Dataset | None = None,
                     *, image_shape: tuple[int, ...] | None = None,
                     binarize: str = "none") -> DataSplits:
        """Wrap user data: tensors ``(N, ...)`` or a ``Dataset`` whose items are images or
        ``(image, label)`` pairs.  Images are flattened; ``test`` defaults to ``train``.
        """
        train_x = _flatten(as_tensor(train), "train data")
        test_x = train_x if test is None else _flatten(as_tensor(test), "test data")
        if test_x.shape[1] != train_x.shape[1]:
            raise ConfigError(
                f"train and test data differ in size per data point: {train_x.shape[1]} "
                f"vs {test_x.shape[1]}"
            )
        return _binarize(cls(train_x, test_x, image_shape), binarize)

    def subset(self, train_size: int | None = None, test_size: int | None = None) -> DataSplits:
        """The first ``train_size`` / ``test_size`` data points (all where ``None``)."""
        for name, size in (("train_size", train_size), ("test_size", test_size)):
            if size is not None and size < 1:
                raise ConfigError(f"{name} must be positive, got {size}")
        return replace(self, train=self.train[:train_size], test=self.test[:test_size])

    def to(self, device: torch.device | str) -> DataSplits:
        """Move the splits to ``device`` (the whole dataset lives there during training)."""
        valid = self.valid.to(device) if self.valid is not None else None
        return replace(self, train=self.train.to(device), test=self.test.to(device), valid=valid)

    def with_validation(self, size: int) -> DataSplits:
        """Hold out the last ``size`` training points as the validation set (0: none).

        For MNIST the last 10,000 training images are the usual validation split.  Under
        dynamic binarization the validation set is binarized once with a fixed seed, like
        the test set.
        """
        if size == 0:
            return replace(self, valid=None)
        if not 0 < size < self.train.shape[0]:
            raise ConfigError(f"validation size must be between 1 and the training set size - 1 "
                              f"({self.train.shape[0] - 1}), got {size}")
        valid = self.train[-size:]
        if self.dynamic_binarization:
            valid = torch.bernoulli(valid, generator=torch.Generator().manual_seed(BINARIZATION_SEED + 1))
        return replace(self, train=self.train[:-size], valid=valid)

    def train_batches(self, batch_size: int, *, shuffle: bool = True,
                      generator: torch.Generator | None = None,
                      start: int = 0, rank: int = 0, world_size: int = 1) -> Iterator[torch.Tensor]:
        """One epoch of training minibatches ``(batch_size, data_dim)``; the last may be smaller.

        With ``world_size > 1`` this yields process ``rank``'s contiguous slice of each
        global batch of ``batch_size`` rows (:func:`~pyrovae.distributed.shard_of`: with
        ``q, r = divmod(rows, world_size)`` the first ``r`` ranks get ``q + 1`` rows, the
        others ``q``).  Every process computes the same order from the same ``generator``
        state, and under dynamic binarization draws the Bernoulli uniforms for the whole
        global batch and keeps its slice, so the slices put together are exactly the
        batches of one process.

        :param generator: CPU generator for the shuffling order.
        :param start: skip the first ``start`` batches of the epoch without drawing anything
            for them (to resume an epoch part-way).
        :param rank: this process's index, ``0 <= rank < world_size``.
        :param world_size: the number of processes sharing each batch.
        """
        n = self.train.shape[0]
        if batch_size > n:
            raise ConfigError(f"batch size {batch_size} is larger than the training set ({n} points)")
        check_batch_size(batch_size, world_size, num_points=n)
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank must be in [0, {world_size}), got {rank}")
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        order = order.to(self.train.device)
        for first in range(start * batch_size, n, batch_size):
            indices = order[first : first + batch_size]
            rows = shard_of(indices.shape[0], rank, world_size).rows
            if not self.dynamic_binarization:
                yield self.train[indices[rows]]
            elif world_size > 1 and self.train.device.type == "cpu" and \
                    self.train.dtype == torch.float32:
                # torch.bernoulli on the CPU draws one float32 uniform u per element, in
                # order, and returns u < p; torch.rand draws the same u several times faster,
                # so only this process's slice needs comparing (tested to match bernoulli)
                uniforms = torch.rand(indices.shape[0], self.train.shape[1])
                probabilities = self.train[indices[rows]]
                yield (uniforms[rows] < probabilities).to(probabilities.dtype)
            else:
                yield torch.bernoulli(self.train[indices])[rows]


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


def _flatten(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dim() < 2:
        raise ConfigError(f"{name} must have a leading data dimension, got shape {tuple(x.shape)}")
    return check_data(x.reshape(x.shape[0], -1).float(), name=name)


def _binarize(data: DataSplits, binarize: str) -> DataSplits:
    if binarize not in BINARIZATIONS:
        raise ConfigError(f"unknown binarization {binarize!r}; choose one of {', '.join(BINARIZATIONS)}")
    if binarize == "none":
        return data
    for name, x in (("train", data.train), ("test", data.test)):
        if float(x.min()) < 0 or float(x.max()) > 1:
            raise ConfigError(f"{name} data must lie in [0, 1] to be binarized as probabilities")
    generator = torch.Generator().manual_seed(BINARIZATION_SEED)
    test = torch.bernoulli(data.test, generator=generator)
    if binarize == "static":
        return replace(data, train=torch.bernoulli(data.train, generator=generator), test=test)
    return replace(data, test=test, dynamic_binarization=True)


def resolve_data_dir(data_dir: str | os.PathLike[str] | None) -> tuple[Path, bool]:
    """The data folder and whether it was chosen by the user (``--data-dir`` or ``$PYROVAE_DATA``)."""
    if data_dir is not None:
        return Path(data_dir).expanduser(), True
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV]).expanduser(), True
    return DEFAULT_DATA_DIR, False


def load_mnist(data_dir: str | os.PathLike[str] | None = None, *, binarize: str = "dynamic",
               download: bool = True) -> DataSplits:
    """MNIST, 60,000 train and 10,000 test images, intensities scaled to [0, 1].

    Reads ``<data_dir>/MNIST/raw/*-ubyte`` with torchvision; where they are missing and
    ``download`` is true, torchvision downloads them into ``data_dir``.

    :param data_dir: folder that holds (or will hold) ``MNIST/raw``; defaults to
        ``$PYROVAE_DATA``, then ``~/.cache/pyrovae/data``.
    :raises DatasetNotFoundError: the files are absent and could not be downloaded.
    """
    from torchvision.datasets import MNIST

    root, chosen = resolve_data_dir(data_dir)
    raw = root / "MNIST" / "raw"
    missing = [name for name in MNIST_RAW_FILES if not (raw / name).exists()]
    if missing:
        if chosen and not root.is_dir():
            raise DatasetNotFoundError(
                f"data directory {root} does not exist; pass --data-dir (or set ${DATA_DIR_ENV}) "
                f"to a folder that holds MNIST/raw/{MNIST_RAW_FILES[0]}"
            )
        if not download:
            raise DatasetNotFoundError(
                f"MNIST not found: looked for {', '.join(missing)} in {raw}; pass --data-dir "
                f"(or set ${DATA_DIR_ENV}) to a folder that holds MNIST/raw, or allow the download"
            )
        logger.info("MNIST not in %s; downloading", raw)
        try:
            MNIST(str(root), train=True, download=True)
        except Exception as error:  # network errors come in many types
            raise DatasetNotFoundError(
                f"MNIST not found in {raw} and the download failed ({error}); pass --data-dir "
                f"(or set ${DATA_DIR_ENV}) to a folder that holds MNIST/raw/{MNIST_RAW_FILES[0]}"
            ) from None
    splits = []
    for train in (True, False):
        images = MNIST(str(root), train=train, download=False).data
        splits.append(images.reshape(images.shape[0], -1).float() / 255.0)
    return _binarize(DataSplits(splits[0], splits[1], MNIST_IMAGE_SHAPE), binarize)


def load_binarized_mnist(data_dir: str | os.PathLike[str] | None = None, *,
                         binarize: str = "static", download: bool = False) -> DataSplits:
    """Statically binarized MNIST (Larochelle & Murray 2011): 50,000 train, 10,000 test.

    Reads ``<data_dir>/binarized_mnist.npz`` with uint8 arrays ``train``, ``valid``, ``test``
    of shape ``(N, 784)``.  The validation split is left out of ``train``; the test split
    is shuffled once with a fixed seed, since the file stores it sorted by class.  The data are
    binary already, so ``binarize`` and ``download`` are accepted for a uniform signature
    and otherwise ignored (there is no canonical download of this file).
    """
    root, _ = resolve_data_dir(data_dir)
    path = root / "binarized_mnist.npz"
    if not path.is_file():
        raise DatasetNotFoundError(
            f"binarized MNIST not found: looked for {path}; pass --data-dir (or set "
            f"${DATA_DIR_ENV}) to a folder that holds binarized_mnist.npz (arrays train, valid, "
            f"test of shape (N, 784))"
        )
    with np.load(path) as arrays:
        train = torch.from_numpy(arrays["train"]).float()
        test = torch.from_numpy(arrays["test"]).float()
    # the file's test split is sorted by digit class (its first 1,000 images are zeros), so a
    # fixed shuffle makes the first N test images (--test-size N) a fair sample of the whole;
    # statistics over the full test set do not change
    test = test[torch.randperm(test.shape[0], generator=torch.Generator().manual_seed(0))]
    return DataSplits(train, test, MNIST_IMAGE_SHAPE)


#: datasets selectable by name from the CLI and config
DATASETS = {
    "mnist": load_mnist,
    "binarized_mnist": load_binarized_mnist,
}


def load_dataset(name: str, data_dir: str | os.PathLike[str] | None = None, *,
                 binarize: str = "dynamic", download: bool = True) -> DataSplits:
    """Load a dataset from :data:`DATASETS` by name."""
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    return DATASETS[name](data_dir, binarize=binarize, download=download)
