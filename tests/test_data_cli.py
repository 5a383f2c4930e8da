"""Datasets from the command line: every route's one-line errors and a tiny run on user files."""

from __future__ import annotations

from pyrovae.cli import main


def test_a_missing_torchvision_dataset_is_one_line_and_exit_2(tmp_path, capsys):
    code = main(["train", "--dataset", "fashion_mnist", "--data-dir", str(tmp_path),
                 "--no-download", "--out-dir", str(tmp_path / "run"), "--no-progress"])
    error = capsys.readouterr().err
    assert code == 2 and error.count("\n") == 1
    assert "looked for train-images-idx3-ubyte" in error and str(tmp_path / "FashionMNIST") in error
