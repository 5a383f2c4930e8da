"""Datasets: real MNIST offline, binarizations, user data, and clear errors for missing files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from pyrovae.data import DATA_DIR_ENV, DataSplits, load_binarized_mnist, load_dataset, load_mnist
from pyrovae.errors import ConfigError, DatasetNotFoundError, InvalidDataError
from tests.conftest import requires_binarized_mnist, requires_mnist


@requires_mnist
def test_mnist_dynamic_binarization(shared_data):
    data = load_mnist(shared_data, binarize="dynamic")
    assert data.train.shape == (60000, 784) and data.test.shape == (10000, 784)
    assert data.image_shape == (1, 28, 28) and data.dynamic_binarization
    assert float(data.train.mean()) == pytest.approx(0.1307, abs=1e-3)  # grey levels kept
    assert set(data.test.unique().tolist()) == {0.0, 1.0}  # test binarized once
    small = data.subset(train_size=300)
    generator = torch.Generator().manual_seed(0)
    first = torch.cat(list(small.train_batches(100, shuffle=False, generator=generator)))
    second = torch.cat(list(small.train_batches(100, shuffle=False, generator=generator)))
    assert set(first.unique().tolist()) == {0.0, 1.0}
    assert not torch.equal(first, second)  # resampled each time an image is used
    # and the draws are Bernoulli(intensity): the mean pixel matches the grey level mean
    assert float(first.mean()) == pytest.approx(float(small.train.mean()), abs=0.01)


@requires_mnist
def test_mnist_static_binarization_is_fixed(shared_data):
    first = load_mnist(shared_data, binarize="static").subset(200, 50)
    second = load_mnist(shared_data, binarize="static").subset(200, 50)
    assert not first.dynamic_binarization
    assert torch.equal(first.train, second.train) and torch.equal(first.test, second.test)
    batches = list(first.train_batches(200, shuffle=False))
    assert torch.equal(batches[0], first.train)


@requires_mnist
def test_mnist_from_the_environment_variable(shared_data, monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(shared_data))
    data = load_dataset("mnist", binarize="none")
    assert data.train.shape == (60000, 784) and float(data.train.max()) == 1.0


@requires_binarized_mnist
def test_binarized_mnist(shared_data):
    data = load_binarized_mnist(shared_data)
    assert data.train.shape == (50000, 784) and data.test.shape == (10000, 784)
    assert set(data.train[:500].unique().tolist()) == {0.0, 1.0}


@requires_binarized_mnist
def test_the_first_binarized_test_images_are_a_fair_sample(shared_data):
    """The file stores its test split sorted by class; the loader shuffles it once, so that
    --test-size N gives a fair subset: under the factorized Bernoulli of the training pixel
    means, the first 500 test images score like the whole test set (sorted: 41 nats worse)."""
    data = load_binarized_mnist(shared_data)
    p = data.train.mean(0).clamp(1e-6, 1 - 1e-6)

    def log_likelihood(x):
        return (x * p.log() + (1 - x) * (1 - p).log()).sum(-1).mean().item()

    assert abs(log_likelihood(data.test[:500]) - log_likelihood(data.test)) < 5
    raw = np.load(shared_data / "binarized_mnist.npz")["test"]
    assert sorted(map(tuple, data.test.int().tolist())) == sorted(map(tuple, raw.tolist()))  # same images


def test_missing_data_dir_names_where_it_looked(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFoundError, match=f"{missing} does not exist"):
        load_mnist(missing)
    with pytest.raises(DatasetNotFoundError, match="train-images-idx3-ubyte.*--data-dir"):
        load_mnist(tmp_path, download=False)
    with pytest.raises(DatasetNotFoundError, match="binarized_mnist.npz"):
        load_binarized_mnist(tmp_path)


def test_unknown_dataset_lists_the_known_ones():
    with pytest.raises(ConfigError, match="known datasets: mnist, binarized_mnist"):
        load_dataset("cifar")


def test_user_tensors_and_datasets():
    images = torch.rand(20, 1, 4, 4)
    data = DataSplits.from_tensors(TensorDataset(images, torch.zeros(20)), images[:5],
                                   image_shape=(1, 4, 4), binarize="static")
    assert data.train.shape == (20, 16) and data.test.shape == (5, 16)
    assert set(data.train.unique().tolist()) <= {0.0, 1.0}
    from_numpy = DataSplits.from_tensors(np.zeros((3, 2), dtype=np.uint8))
    assert from_numpy.train.dtype == torch.float32 and from_numpy.test.shape == (3, 2)


def test_bad_user_data_is_refused():
    with pytest.raises(InvalidDataError, match="NaN"):
        DataSplits.from_tensors(torch.full((3, 2), float("nan")))
    with pytest.raises(ConfigError, match="must lie in \\[0, 1\\]"):
        DataSplits.from_tensors(torch.full((3, 2), 2.0), binarize="dynamic")
    with pytest.raises(ConfigError, match="differ in size"):
        DataSplits.from_tensors(torch.zeros(3, 2), torch.zeros(3, 5))
    data = DataSplits.from_tensors(torch.zeros(3, 2))
    with pytest.raises(ConfigError, match="batch size 10 is larger than the training set"):
        next(data.train_batches(10))


def test_validation_split_takes_the_last_training_points():
    train = torch.arange(20.0).reshape(10, 2) / 20
    data = DataSplits.from_tensors(train).with_validation(3)
    assert torch.equal(data.valid, train[7:]) and torch.equal(data.train, train[:7])
    assert data.with_validation(0).valid is None
    with pytest.raises(ConfigError, match="validation size must be between 1 and"):
        DataSplits.from_tensors(train).with_validation(10)
