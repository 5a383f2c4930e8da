"""Datasets from the command line: every route's one-line errors and a tiny run on user files."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest

from pyrovae import TrainConfig
from pyrovae.cli import main
from pyrovae.errors import ConfigError

TINY = ["--epochs", "1", "--hidden-dims", "16", "--latent-dim", "2", "--batch-size", "50",
        "--eval-samples", "5", "--no-progress"]


def one_line_error(capsys) -> str:
    error = capsys.readouterr().err
    assert error.count("\n") == 1, error
    return error


def test_a_missing_torchvision_dataset_is_one_line_and_exit_2(tmp_path, capsys):
    code = main(["train", "--dataset", "fashion_mnist", "--data-dir", str(tmp_path),
                 "--no-download", "--out-dir", str(tmp_path / "run"), "--no-progress"])
    error = one_line_error(capsys)
    assert code == 2
    assert "looked for train-images-idx3-ubyte" in error and str(tmp_path / "FashionMNIST") in error


def test_the_config_takes_file_datasets_and_refuses_unknown_ones():
    assert TrainConfig(dataset="npz:some/file.npz", test_fraction=0.2).dataset == "npz:some/file.npz"
    with pytest.raises(ConfigError, match="unknown dataset 'npz:'"):
        TrainConfig(dataset="npz:")
    with pytest.raises(ConfigError, match="test_fraction must be in \\(0, 1\\), got 1.5"):
        TrainConfig(test_fraction=1.5)


def test_train_on_scikit_learns_digits_from_an_npy_file(tmp_path, capsys):
    datasets = pytest.importorskip("sklearn.datasets", reason="scikit-learn not installed (extra: examples)")
    np.save(tmp_path / "digits.npy", datasets.load_digits().images / 16)
    run = tmp_path / "run"
    code = main(["train", "--dataset", f"npy:{tmp_path / 'digits.npy'}", "--train-size", "200",
                 "--test-size", "50", "--out-dir", str(run), *TINY])
    assert code == 0, capsys.readouterr().err
    results = json.loads((run / "results.json").read_text())
    assert results["num_test_points"] == 50 and results["test_elbo"] < 0
    assert (run / "samples.png").is_file()  # 8x8 images, drawn as a grid
    assert json.loads((run / "config.json").read_text())["dataset"] == f"npy:{tmp_path / 'digits.npy'}"


def test_grey_levels_under_a_bernoulli_likelihood_are_one_line_and_exit_2(tmp_path, capsys):
    np.savez(tmp_path / "grey.npz", train=np.full((60, 4, 4), 128, np.uint8))
    code = main(["train", "--dataset", f"npz:{tmp_path / 'grey.npz'}", "--binarize", "none",
                 "--out-dir", str(tmp_path / "run"), *TINY])
    error = one_line_error(capsys)
    assert code == 2 and "Bernoulli likelihood needs binary data" in error and "--binarize" in error


def test_nan_in_a_file_is_one_line_and_exit_2(tmp_path, capsys):
    np.save(tmp_path / "nan.npy", np.full((60, 4), np.nan, np.float32))
    code = main(["train", "--dataset", f"npy:{tmp_path / 'nan.npy'}",
                 "--out-dir", str(tmp_path / "run"), *TINY])
    assert code == 2 and "non-finite values (NaN)" in one_line_error(capsys)


def _readme_command(marker: str) -> list[str]:
    """The flags after ``pyrovae train`` on the README's command line holding ``marker``."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (line,) = [line for line in readme.splitlines() if marker in line]
    words = shlex.split(line, comments=True)
    assert words[:2] == ["pyrovae", "train"], line
    return words[2:]


def test_the_readmes_image_folder_line_trains_on_grey_images(tmp_path, monkeypatch, capsys):
    """The README's ``folder:photos`` flags, run as written on a tiny ImageFolder of grey
    PNGs (only the run's size added): grey levels need a likelihood for them."""
    image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    ramp = np.linspace(0.1, 0.9, 12)
    patterns = {"cats": np.tile(ramp, (12, 1)), "dogs": np.tile(ramp[:, None], (1, 12))}
    for kind, pattern in patterns.items():  # a learnable picture per class, a little noise
        (tmp_path / "photos" / kind).mkdir(parents=True)
        for i in range(30):
            grey = np.clip(pattern + 0.05 * rng.standard_normal((12, 12)), 0, 1)
            image.fromarray((255 * grey).astype(np.uint8), mode="L").save(
                tmp_path / "photos" / kind / f"{i}.png")
    flags = _readme_command("--dataset folder:photos")
    monkeypatch.chdir(tmp_path)  # the README's path is relative to the working directory
    code = main(["train", *flags, "--epochs", "1", "--batch-size", "10", "--latent-dim", "2",
                 "--eval-samples", "2", "--no-progress", "--out-dir", "run"])
    assert code == 0, capsys.readouterr().err
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["dataset"], config["binarize"], config["net"]) == ("folder:photos", "none", "conv")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["num_test_points"] == 6  # the default test fraction, 0.1 of 60 images
    assert np.isfinite(results["test_elbo"])


def _header_only_npy(path, shape, dtype="<f4", data=b"\0" * 64):
    """An .npy file whose header promises ``shape`` and whose data is ``data``."""
    with open(path, "wb") as handle:
        np.lib.format.write_array_header_1_0(
            handle, {"descr": dtype, "fortran_order": False, "shape": shape})
        handle.write(data)


@pytest.mark.parametrize("name, make, message", [
    ("empty.npz", lambda path: path.write_bytes(b""),
     "is not a readable .npz of plain arrays (truncated or corrupted: EOFError"),
    ("cut.npz", lambda path: path.write_bytes(_npz_bytes(path)[:300]),
     "is not a readable .npz of plain arrays (truncated or corrupted: BadZipFile: File is not "
     "a zip file)"),
    ("flipped.npz", lambda path: path.write_bytes(_flipped(_npz_bytes(path), 200)),
     "(truncated or corrupted: BadZipFile: Bad CRC-32 for file 'train.npy')"),
    ("huge.npy", lambda path: _header_only_npy(path, (200_000, 784_000)),
     "is shorter than its header says: the header promises an array of shape (200000, "
     "784000) float32 (627,200,000,000 bytes) and 64 bytes follow it"),
    ("huge.npz", lambda path: np.savez(path, train=np.zeros((4, 4), np.float32))
     or _lying_npz(path), "huge.npz: train is shorter than its header says"),
])
def test_a_damaged_or_lying_data_file_is_one_line_and_exit_2(tmp_path, capsys, name, make,
                                                            message):
    path = tmp_path / name
    make(path)
    code = main(["train", "--dataset", f"{path.suffix[1:]}:{path}",
                 "--out-dir", str(tmp_path / "run"), *TINY])
    error = one_line_error(capsys)
    assert code == 2 and message in error, error
    assert not (tmp_path / "run").exists()


def _npz_bytes(path) -> bytes:
    np.savez(path.with_suffix(".tmp.npz"), train=np.linspace(0, 1, 60 * 16, dtype=np.float32)
             .reshape(60, 16))
    return path.with_suffix(".tmp.npz").read_bytes()


def _flipped(data: bytes, index: int) -> bytes:
    damaged = bytearray(data)
    damaged[index] ^= 0x01  # one bit inside train.npy's values
    return bytes(damaged)


def _lying_npz(path) -> None:
    """Replace the archive by one whose train.npy promises 10**12 float32 values."""
    import io
    import zipfile

    member = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        member, {"descr": "<f4", "fortran_order": False, "shape": (10**6, 10**6)})
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("train.npy", member.getvalue() + b"\0" * 64)


@pytest.mark.parametrize("dataset, suggestion", [
    ("mnsit", "(did you mean mnist?)"),
    ("Fashion-MNIST", "(did you mean fashion_mnist?)"),
    ("digits.npy", "(did you mean npy:digits.npy?)"),
    ("data/train.NPZ", "(did you mean npz:data/train.NPZ?)"),
    ("npzz:data.npz", "(did you mean npz:data.npz?)"),
])
def test_an_unknown_dataset_suggests_what_was_meant(dataset, suggestion):
    with pytest.raises(ConfigError, match=re.escape(
            f"unknown dataset '{dataset}' {suggestion}; known datasets: mnist,")):
        TrainConfig(dataset=dataset)


def test_a_folder_given_as_a_dataset_suggests_folder(tmp_path):
    with pytest.raises(ConfigError, match="did you mean folder:"):
        TrainConfig(dataset=str(tmp_path))
    with pytest.raises(ConfigError) as error:
        TrainConfig(dataset="xyzzy")
    assert "did you mean" not in str(error.value)


def test_grey_levels_of_0_to_255_in_floats_are_refused_with_the_range_and_the_fix(tmp_path,
                                                                                  capsys):
    np.save(tmp_path / "levels.npy", np.linspace(0, 255, 60 * 16, dtype=np.float32)
            .reshape(60, 16))
    code = main(["train", "--dataset", f"npy:{tmp_path / 'levels.npy'}",
                 "--out-dir", str(tmp_path / "run"), *TINY])
    error = one_line_error(capsys)
    assert code == 2
    assert ("train data must lie in [0, 1] to be binarized as probabilities, and its values run "
            "from 0 to 255; divide 8-bit grey levels by 255") in error
    np.save(tmp_path / "signed.npy", np.linspace(-1, 1, 60 * 16, dtype=np.float32)
            .reshape(60, 16))
    main(["train", "--dataset", f"npy:{tmp_path / 'signed.npy'}",
          "--out-dir", str(tmp_path / "run"), *TINY])
    assert "values run from -1 to 1; rescale them into [0, 1]" in one_line_error(capsys)
