"""Datasets: real MNIST offline, binarizations, user data, and clear errors for missing files."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from pyrovae.data import (
    DATA_DIR_ENV,
    HIDDEN_LABEL,
    IDX_DATASETS,
    MNIST_RAW_FILES,
    OMNIGLOT_TRAIN_DRAWINGS,
    DataSplits,
    load_binarized_mnist,
    load_dataset,
    load_mnist,
)
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
    with pytest.raises(ConfigError, match="known datasets: mnist, binarized_mnist, fashion_mnist"):
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


# --- torchvision's datasets, read from small files written in their real on-disk formats ---


def write_idx(path, array: np.ndarray, *, compress: bool = False) -> None:
    """An IDX file as LeCun's and torchvision's readers expect: big-endian magic
    (0, 0, type 0x08 = ubyte, dims), each size as a big-endian int32, then the bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">i4").tobytes()
    content = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        with gzip.open(f"{path}.gz", "wb") as file:
            file.write(content)
    else:
        path.write_bytes(content)


def write_idx_dataset(raw, names, train, test, *, compress=False):
    for name, array in zip(names, (train, np.zeros(len(train)), test, np.zeros(len(test))),
                           strict=True):
        write_idx(raw / name, array, compress=compress)


def random_images(n, seed):
    return np.random.default_rng(seed).integers(0, 256, size=(n, 28, 28), dtype=np.uint8)


def test_fashion_mnist_reads_the_idx_files_through_torchvision(tmp_path):
    train, test = random_images(6, 0), random_images(4, 1)
    write_idx_dataset(tmp_path / "FashionMNIST" / "raw", IDX_DATASETS["fashion_mnist"].files,
                      train, test)
    data = load_dataset("fashion_mnist", tmp_path, binarize="none", download=False)
    assert data.image_shape == (1, 28, 28) and data.train.shape == (6, 784)
    torch.testing.assert_close(data.train, torch.from_numpy(train).reshape(6, 784).float() / 255)
    torch.testing.assert_close(data.test, torch.from_numpy(test).reshape(4, 784).float() / 255)


def test_kmnist_decompresses_the_published_gz_files(tmp_path):
    raw = tmp_path / "KMNIST" / "raw"
    train, test = random_images(5, 2), random_images(3, 3)
    write_idx_dataset(raw, IDX_DATASETS["kmnist"].files, train, test, compress=True)
    data = load_dataset("kmnist", tmp_path, binarize="static", download=False)
    assert (raw / "train-images-idx3-ubyte").is_file()  # decompressed beside the .gz
    assert data.train.shape == (5, 784) and set(data.train.unique().tolist()) <= {0.0, 1.0}
    assert data.test.shape == (3, 784)


def test_emnist_letters_are_transposed_upright(tmp_path):
    spec = IDX_DATASETS["emnist_letters"]
    assert spec.files[0] == "emnist-letters-train-images-idx3-ubyte"
    train, test = random_images(4, 4), random_images(2, 5)
    write_idx_dataset(tmp_path / "EMNIST" / "raw", spec.files, train, test)
    data = load_dataset("emnist_letters", tmp_path, binarize="none", download=False)
    upright = torch.from_numpy(train).transpose(1, 2).reshape(4, 784).float() / 255
    torch.testing.assert_close(data.train, upright)
    assert not torch.equal(data.train, torch.from_numpy(train).reshape(4, 784).float() / 255)


def test_missing_torchvision_files_say_where_and_how(tmp_path, monkeypatch):
    from torchvision import datasets

    with pytest.raises(DatasetNotFoundError, match=(
            f"KMNIST not found: looked for train-images-idx3-ubyte.* in {tmp_path / 'KMNIST' / 'raw'};"
            ".*github.com/rois-codh/kmnist.*--no-download")):
        load_dataset("kmnist", tmp_path, download=False)
    with pytest.raises(DatasetNotFoundError, match=f"{tmp_path / 'nowhere'} does not exist"):
        load_dataset("cifar10", tmp_path / "nowhere")

    def offline(self):
        Path(self.raw_folder).mkdir(parents=True, exist_ok=True)  # as torchvision does
        print("Downloading http://x/ ... failed")  # torchvision's own lines go to stdout
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried http://x/, got:\n"
                           "<urlopen error [Errno -3] Temporary failure in name resolution>\n")

    monkeypatch.setattr(datasets.FashionMNIST, "download", offline)
    with pytest.raises(DatasetNotFoundError) as caught:
        load_dataset("fashion_mnist", tmp_path)
    message = str(caught.value)
    assert "\n" not in message and "the download failed (Error downloading" in message
    assert "zalandoresearch/fashion-mnist" in message
    # the failed download leaves no empty folders in the user's data directory
    assert not (tmp_path / "FashionMNIST").exists()


def write_omniglot(root, alphabets_per_set=1, characters=2):
    """The folders of torchvision's Omniglot: omniglot-py/images_{background,evaluation}/
    <alphabet>/<character>/<id>_<drawer>.png, 105x105 1-bit, black strokes on white.  Here
    drawers 16..20 draw an all-black square, the others nothing."""
    from PIL import Image

    count = 0
    for folder in ("images_background", "images_evaluation"):
        for a in range(alphabets_per_set):
            for c in range(characters):
                count += 1
                path = root / "omniglot-py" / folder / f"Alphabet_{folder[7]}{a}" / f"character{c + 1:02d}"
                path.mkdir(parents=True)
                for drawer in range(1, 21):
                    ink = drawer > OMNIGLOT_TRAIN_DRAWINGS
                    Image.new("1", (105, 105), 0 if ink else 1).save(path / f"{count:04d}_{drawer:02d}.png")
    return count


def test_omniglot_is_28x28_with_each_characters_first_15_drawers_for_training(tmp_path):
    characters = write_omniglot(tmp_path)
    data = load_dataset("omniglot", tmp_path, binarize="none", download=False)
    assert data.image_shape == (1, 28, 28)
    assert data.train.shape == (15 * characters, 784) and data.test.shape == (5 * characters, 784)
    assert float(data.train.max()) == 0.0  # white background: no ink
    assert float(data.test.min()) == 1.0  # all-black drawings: ink everywhere


def test_omniglot_shrinks_by_box_averaging_into_ink_fractions(tmp_path):
    from PIL import Image

    write_omniglot(tmp_path, characters=1)
    # one drawing with ink in columns 0..53 of 105: box 14 of 28 (columns 52.5..56.25) is
    # partly inked
    picture = Image.new("1", (105, 105), 1)
    picture.paste(0, (0, 0, 54, 105))
    first = next((tmp_path / "omniglot-py" / "images_background").glob("*/*/*_01.png"))
    picture.save(first)
    train = load_dataset("omniglot", tmp_path, binarize="none", download=False).train
    inked = train[train.sum(1) > 0].reshape(-1, 28, 28)
    assert inked.shape[0] == 1
    assert torch.all(inked[0, :, :14] == 1) and torch.all(inked[0, :, 15:] == 0)
    assert 0 < float(inked[0, 0, 14]) < 1  # the box across the edge is grey


def test_omniglot_missing_folders_name_the_repository(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="omniglot-py.*brendenlake/omniglot"):
        load_dataset("omniglot", tmp_path, download=False)


def write_cifar10(root, sizes=(3, 2, 2, 2, 2), test_size=4):
    """cifar-10-batches-py/: pickled dicts with 'data' (N, 3072) uint8 rows, channel-major,
    and 'labels'; batches.meta with 'label_names'.  Returns the rows and the md5 sums."""
    import hashlib
    import pickle

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = {}
    for name, n in [*((f"data_batch_{i + 1}", n) for i, n in enumerate(sizes)), ("test_batch", test_size)]:
        rows[name] = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        batch = {"batch_label": name, "data": rows[name], "labels": [0] * n}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    md5 = {path.name: hashlib.md5(path.read_bytes()).hexdigest() for path in folder.iterdir()}
    return rows, md5


def test_cifar10_reads_the_pickled_batches_with_torchvision(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10

    rows, md5 = write_cifar10(tmp_path)
    # torchvision checks every batch against the md5 of the real files; these are small ones
    monkeypatch.setattr(CIFAR10, "train_list", [[name, md5[name]] for name, _ in CIFAR10.train_list])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5["test_batch"]]])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": md5["batches.meta"]})
    data = load_dataset("cifar10", tmp_path, binarize="none", download=False)
    assert data.image_shape == (3, 32, 32) and data.train.shape == (11, 3072)
    train_rows = np.concatenate([rows[f"data_batch_{i}"] for i in range(1, 6)])
    # flattened channel-major, as the file stores each row
    torch.testing.assert_close(data.train, torch.from_numpy(train_rows).float() / 255)
    torch.testing.assert_close(data.test, torch.from_numpy(rows["test_batch"]).float() / 255)


def test_cifar10_files_that_fail_the_checksum_are_refused(tmp_path):
    write_cifar10(tmp_path)
    with pytest.raises(DatasetNotFoundError, match="incomplete or corrupted.*cifar-10-python.tar.gz"):
        load_dataset("cifar10", tmp_path, download=False)


# --- the user's own files ---


def test_npz_with_train_test_and_valid(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, size=(12, 6, 5), dtype=np.uint8)
    path = tmp_path / "mine.npz"
    np.savez(path, train=images[:8], valid=images[8:10], test=images[10:], train_labels=np.arange(8))
    data = load_dataset(f"npz:{path}", binarize="none")
    assert data.image_shape == (1, 6, 5) and data.test.shape == (2, 30)
    # valid comes last in train, so --valid-size 2 holds out exactly it
    assert data.train.shape == (10, 30)
    held_out = data.with_validation(2)
    torch.testing.assert_close(held_out.valid, torch.from_numpy(images[8:10]).reshape(2, 30).float() / 255)


def test_npy_is_split_by_the_test_fraction_with_a_fixed_shuffle(tmp_path):
    path = tmp_path / "points.npy"
    points = np.linspace(0, 1, 40, dtype=np.float32).reshape(20, 2)
    np.save(path, points)
    first = load_dataset(f"npy:{path}", binarize="none", test_fraction=0.25)
    second = load_dataset(f"npy:{path}", binarize="none", test_fraction=0.25)
    assert first.image_shape is None and first.train.shape == (15, 2) and first.test.shape == (5, 2)
    assert torch.equal(first.test, second.test)  # the same split every time
    rows = sorted(map(tuple, torch.cat([first.train, first.test]).tolist()))
    assert rows == sorted(map(tuple, points.tolist()))  # a partition of the rows
    assert first.test.tolist() != points[-5:].tolist()  # not simply the last rows


def test_channels_last_colour_arrays_become_channel_major_images(tmp_path):
    images = np.random.default_rng(1).random((4, 8, 8, 3), dtype=np.float32)
    np.savez(tmp_path / "colour.npz", train=images, test=images[:2])
    data = load_dataset(f"npz:{tmp_path / 'colour.npz'}", binarize="none")
    assert data.image_shape == (3, 8, 8)
    torch.testing.assert_close(data.train[1], torch.from_numpy(images[1]).permute(2, 0, 1).reshape(-1))


@pytest.mark.parametrize("arrays, message", [
    ({"train": np.arange(8).reshape(2, 4)}, "dtype int64; give uint8 \\(0..255\\), bool, or floats"),
    ({"train": np.full((3, 4), np.nan, dtype=np.float32)}, "bad.npz contains 12 non-finite values \\(NaN\\)"),
    ({"train": np.zeros((3, 4, 4), np.uint8), "test": np.zeros((3, 5, 5), np.uint8)},
     "test has data points of shape \\(5, 5\\) but train \\(4, 4\\)"),
    ({"train": np.zeros((3, 1, 6, 6), np.uint8)}, "channels go last: x.transpose\\(0, 2, 3, 1\\)"),
    ({"test": np.zeros((3, 4), np.uint8)}, "no array named train \\(found: test\\)"),
])
def test_bad_files_are_one_line_errors(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(InvalidDataError, match=message) as caught:
        load_dataset(f"npz:{tmp_path / 'bad.npz'}", binarize="none")
    assert "\n" not in str(caught.value)


def test_floats_outside_zero_one_cannot_be_binarized(tmp_path):
    np.save(tmp_path / "big.npy", np.full((4, 3), 5.0))
    with pytest.raises(ConfigError, match="must lie in \\[0, 1\\] to be binarized"):
        load_dataset(f"npy:{tmp_path / 'big.npy'}", binarize="dynamic")


def test_missing_files_and_unknown_kinds(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=f"{tmp_path / 'no.npz'} not found.*arrays train"):
        load_dataset(f"npz:{tmp_path / 'no.npz'}")
    with pytest.raises(DatasetNotFoundError, match="is not a folder"):
        load_dataset(f"folder:{tmp_path / 'none'}")
    with pytest.raises(ConfigError, match="known datasets: mnist, .*, or npz:PATH, npy:PATH, folder:PATH"):
        load_dataset("csv:x.csv")


def write_pngs(folder, images, mode):
    from PIL import Image

    folder.mkdir(parents=True)
    for i, image in enumerate(images):
        Image.fromarray(image, mode=None).convert(mode).save(folder / f"{i:03d}.png")


def test_an_image_folder_with_train_and_test_subfolders(tmp_path):
    rng = np.random.default_rng(2)
    grey = rng.integers(0, 256, size=(5, 7, 6), dtype=np.uint8)
    write_pngs(tmp_path / "train" / "cats", grey[:3], "L")
    write_pngs(tmp_path / "train" / "dogs", grey[3:4], "L")
    write_pngs(tmp_path / "test" / "any", grey[4:], "L")
    data = load_dataset(f"folder:{tmp_path}", binarize="none")
    assert data.image_shape == (1, 7, 6) and data.train.shape == (4, 42) and data.test.shape == (1, 42)
    torch.testing.assert_close(data.train, torch.from_numpy(grey[:4]).reshape(4, 42).float() / 255)


def test_an_image_folder_of_colour_images_is_split_by_the_fraction(tmp_path):
    colour = np.random.default_rng(3).integers(0, 256, size=(10, 4, 4, 3), dtype=np.uint8)
    write_pngs(tmp_path / "only", colour, "RGB")
    data = load_dataset(f"folder:{tmp_path}", binarize="static", test_fraction=0.2)
    assert data.image_shape == (3, 4, 4) and data.train.shape == (8, 48) and data.test.shape == (2, 48)


def test_images_of_different_sizes_are_refused(tmp_path):
    from PIL import Image

    (tmp_path / "a").mkdir()
    Image.new("L", (4, 4)).save(tmp_path / "a" / "small.png")
    Image.new("L", (5, 4)).save(tmp_path / "a" / "wide.png")
    with pytest.raises(InvalidDataError, match="differ in size: .*small.png is 4x4 but .*wide.png is 5x4"):
        load_dataset(f"folder:{tmp_path}")


def test_scikit_learns_digits_as_an_npy_file(tmp_path):
    datasets = pytest.importorskip("sklearn.datasets", reason="scikit-learn not installed (extra: examples)")
    images = datasets.load_digits().images / 16  # (1797, 8, 8) float64 grey levels 0..16
    np.save(tmp_path / "digits.npy", images)
    data = load_dataset(f"npy:{tmp_path / 'digits.npy'}", binarize="dynamic")
    assert data.image_shape == (1, 8, 8) and data.test.shape == (180, 64) and data.train.shape == (1617, 64)
    assert data.dynamic_binarization and float(data.train.max()) == 1.0


# --- class labels ---


def indexed_points(n: int = 30) -> torch.Tensor:
    """Points whose first coordinate is their index / 100, to trace rows through batches."""
    x = torch.zeros(n, 4)
    x[:, 0] = torch.arange(n) / 100
    return x


def test_labels_are_batched_with_their_points_in_the_same_shuffle():
    x, y = indexed_points(), torch.arange(30) % 3
    data = DataSplits.from_tensors(x[:24], x[24:], train_labels=y[:24], test_labels=y[24:])
    assert data.num_classes == 3 and data.has_labels
    batches = list(data.train_batches(5, generator=torch.Generator().manual_seed(1)))
    assert [len(b) for b in batches] == [2] * 5  # (x, y) pairs, the last batch of 4
    for xb, yb in batches:
        assert yb.dtype == torch.int64
        torch.testing.assert_close(yb, (xb[:, 0] * 100).round().long() % 3, rtol=0, atol=0)
    seen = torch.cat([(xb[:, 0] * 100).round() for xb, _ in batches])
    assert sorted(seen.tolist()) == list(range(24)) and seen.tolist() != list(range(24))
    xt, yt = data.test_inputs
    assert torch.equal(yt, y[24:]) and torch.equal(xt, x[24:])
    # subsets and validation splits carry the labels of their own points
    held = data.subset(train_size=20).with_validation(4)
    assert torch.equal(held.train_labels, y[:16]) and torch.equal(held.valid_labels, y[16:20])
    assert torch.equal(held.valid_inputs[1], y[16:20])


def test_dynamic_binarization_keeps_the_labels_of_the_rows_it_draws():
    x, y = torch.rand(12, 3), torch.arange(12) % 4
    data = DataSplits.from_tensors(x, x, binarize="dynamic", train_labels=y, test_labels=y)
    xb, yb = next(iter(data.train_batches(12, shuffle=False)))
    assert torch.equal(yb, y) and set(xb.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("labels, message", [
    (torch.zeros(5, dtype=torch.long), r"must have shape \(6,\)"),
    (torch.zeros(6, 1, dtype=torch.long), r"must have shape \(6,\)"),
    (torch.zeros(6), "must be integers 0..C-1, got dtype torch.float32"),
    (torch.tensor([0, 1, 2, -1, 0, 1]), "must lie in 0..C-1, got -1"),
])
def test_bad_labels_are_one_line_errors(labels, message):
    with pytest.raises(InvalidDataError, match=message) as error:
        DataSplits.from_tensors(torch.rand(6, 2), train_labels=labels)
    assert "\n" not in str(error.value)


def test_labels_beyond_the_classes_and_missing_test_labels_are_refused():
    x = torch.rand(6, 2)
    with pytest.raises(InvalidDataError, match=r"labels must lie in 0..2, got 3"):
        DataSplits.from_tensors(x, train_labels=torch.tensor([0, 1, 2, 3, 0, 1]), num_classes=3)
    with pytest.raises(InvalidDataError, match="need test_labels"):
        DataSplits.from_tensors(x, x, train_labels=torch.zeros(6, dtype=torch.long))
    with pytest.raises(InvalidDataError, match=r"test labels must lie in 0..1, got 2"):
        DataSplits.from_tensors(x, x, train_labels=torch.tensor([0, 1] * 3),
                                test_labels=torch.tensor([2, 0] * 3), num_classes=2)


def test_with_labelled_keeps_a_balanced_seeded_choice_and_hides_the_rest():
    x, y = indexed_points(40), torch.arange(40) % 4
    data = DataSplits.from_tensors(x, train_labels=y)
    kept = data.with_labelled(10, seed=3)
    labels = kept.train_labels
    assert kept.num_labelled == 10 and int((labels == HIDDEN_LABEL).sum()) == 30
    counts = torch.bincount(labels[labels >= 0], minlength=4)
    assert sorted(counts.tolist()) == [2, 2, 3, 3]  # 10 // 4 each, two classes one more
    assert bool((labels[labels >= 0] == y[labels >= 0]).all())  # kept labels are the true ones
    assert torch.equal(data.with_labelled(10, seed=3).train_labels, labels)
    assert not torch.equal(data.with_labelled(10, seed=4).train_labels, labels)
    assert torch.equal(kept.test_labels, y)  # the test labels score a classifier
    assert data.with_labelled(0).num_labelled == 0


def test_with_labelled_refuses_what_it_cannot_keep():
    x, y = torch.rand(8, 2), torch.tensor([0, 0, 0, 0, 0, 0, 1, 1])
    data = DataSplits.from_tensors(x, train_labels=y)
    with pytest.raises(ConfigError, match=r"--labelled 9 is larger than the training set \(8 points\)"):
        data.with_labelled(9)
    with pytest.raises(ConfigError, match="needs 3 training points of class 1, and there are 2"):
        data.with_labelled(6)
    with pytest.raises(ConfigError, match="no labels"):
        DataSplits.from_tensors(x).with_labelled(2)


def test_mnist_labels_come_from_the_label_files(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    train, test = random_images(6, 0), random_images(4, 1)
    train_y, test_y = np.array([3, 1, 4, 1, 5, 9]), np.array([2, 6, 5, 3])
    for name, array in zip(MNIST_RAW_FILES, (train, train_y, test, test_y), strict=True):
        write_idx(raw / name, array)
    data = load_dataset("mnist", tmp_path, binarize="none", download=False, labels=True)
    assert data.num_classes == 10
    assert data.train_labels.tolist() == train_y.tolist()
    assert data.test_labels.tolist() == test_y.tolist()
    assert load_dataset("mnist", tmp_path, binarize="none", download=False).train_labels is None
    with pytest.raises(ConfigError, match="'omniglot' has no class labels"):
        load_dataset("omniglot", tmp_path, labels=True)


def test_npz_labels_follow_their_points_through_the_split(tmp_path):
    images = np.arange(10 * 4, dtype=np.float32).reshape(10, 4) / 100
    path = tmp_path / "labelled.npz"
    np.savez(path, train=images, train_labels=np.arange(10) % 5)
    data = load_dataset(f"npz:{path}", binarize="none", test_fraction=0.3, labels=True)
    assert data.num_classes == 5 and data.test.shape == (3, 4)
    for x, y in ((data.train, data.train_labels), (data.test, data.test_labels)):
        index = (x[:, 0] * 100 / 4).round().long()
        assert torch.equal(y, index % 5)
    np.savez(path, train=images, test=images[:2], train_labels=np.arange(10) % 5)
    with pytest.raises(InvalidDataError, match="has no test_labels"):
        load_dataset(f"npz:{path}", binarize="none", labels=True)


def binarized_mnist_like(folder, *, train=30, valid=8, test=10):
    """A small ``binarized_mnist.npz`` in the real file's format: uint8 0/1 arrays
    ``train``, ``valid``, ``test`` of shape (N, 784); the validation images all ones, to
    tell them apart."""
    rng = np.random.default_rng(0)
    np.savez(folder / "binarized_mnist.npz",
             train=(rng.random((train, 784)) < 0.2).astype(np.uint8),
             valid=np.ones((valid, 784), np.uint8),
             test=(rng.random((test, 784)) < 0.2).astype(np.uint8))


def test_binarized_mnists_own_validation_split_leaves_the_training_set_whole(tmp_path):
    binarized_mnist_like(tmp_path)
    plain = load_dataset("binarized_mnist", tmp_path)
    assert plain.valid is None and plain.with_validation(0).valid is None
    data = load_dataset("binarized_mnist", tmp_path, own_validation=True)
    assert data.train.shape == (30, 784) and data.valid.shape == (8, 784)
    assert torch.all(data.valid == 1) and data.valid.dtype == torch.float32
    assert data.with_validation(0, own=True).valid.shape == (8, 784)  # 0: all of it
    cut = data.subset(20, 5).with_validation(3, own=True)
    assert cut.train.shape == (20, 784) and cut.valid.shape == (3, 784)
    # the other way still holds out the last training images
    held_out = plain.with_validation(5)
    assert held_out.train.shape == (25, 784) and torch.equal(held_out.valid, plain.train[-5:])
    with pytest.raises(ConfigError, match="own validation split \\(8\\)"):
        data.with_validation(9, own=True)
    with pytest.raises(ConfigError, match="no validation split of their own"):
        plain.with_validation(3, own=True)
    with pytest.raises(ConfigError, match="'mnist' has no validation split of its own"):
        load_dataset("mnist", tmp_path, own_validation=True)

