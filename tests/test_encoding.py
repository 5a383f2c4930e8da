"""``pyrovae encode`` and ``pyrovae reconstruct`` (:mod:`pyrovae.encoding`)."""

from __future__ import annotations

import numpy as np
import pyro
import pytest
import torch
from PIL import Image
from pyro import poutine

from pyrovae import TrainConfig, build_vae
from pyrovae.cli import main
from pyrovae.encoding import posterior_moments, reconstruction_grid
from pyrovae.runs import load_run_checkpoint

SIDE = 4


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run on an npz of 4x4 binary images with labels, and its data file."""
    folder = tmp_path_factory.mktemp("encode")
    generator = np.random.default_rng(0)
    images = generator.random((70, SIDE, SIDE)) < 0.4
    labels = generator.integers(0, 3, 70)
    np.savez(folder / "digits.npz", train=images[:50], test=images[50:],
             train_labels=labels[:50], test_labels=labels[50:])
    run_dir = folder / "run"
    assert main(["train", "--dataset", f"npz:{folder / 'digits.npz'}", "--binarize", "none",
                 "--hidden-dims", "8", "--latent-dim", "3", "--epochs", "1", "--batch-size", "25",
                 "--eval-samples", "0", "--out-dir", str(run_dir), "--no-progress"]) == 0
    return run_dir, folder, images, labels


def test_encode_writes_every_points_posterior_mean_scale_draws_and_label(trained, capsys):
    run_dir, _, images, labels = trained
    assert main(["encode", str(run_dir), "--num-samples", "3", "--device", "cpu"]) == 0
    assert "written to" in capsys.readouterr().out
    saved = np.load(run_dir / "encoding_test.npz")
    vae, _, _ = load_run_checkpoint(run_dir, torch.device("cpu"))
    x = torch.from_numpy(images[50:].reshape(20, -1).astype(np.float32))
    posterior = vae.encode(x)
    np.testing.assert_allclose(saved["z_loc"], posterior.mean.numpy(), rtol=1e-6)
    np.testing.assert_allclose(saved["z_scale"], posterior.stddev.numpy(), rtol=1e-6)
    assert saved["z_samples"].shape == (3, 20, 3)
    assert str(saved["z_moments"]) == "exact" and str(saved["split"]) == "test"
    np.testing.assert_array_equal(saved["labels"], labels[50:])
    assert int(saved["epoch"]) == 1
    # the training split, into a file of one's choosing; the first file is kept
    assert main(["encode", str(run_dir), "--split", "train", "-o",
                 str(run_dir / "train.npz")]) == 0
    saved = np.load(run_dir / "train.npz")
    assert saved["z_loc"].shape == (50, 3) and "z_samples" not in saved
    np.testing.assert_array_equal(saved["labels"], labels[:50])


def test_posterior_moments_of_a_hierarchy_are_exact_below_and_sampled_above():
    vae = build_vae(TrainConfig(hidden_dims=(8,), latent_dims=(4, 2)), data_dim=6)
    x = torch.bernoulli(torch.full((30, 6), 0.4))
    values = posterior_moments(vae, x, batch_size=7, moment_samples=2000)
    assert str(values["z1_moments"]) == "exact" and str(values["z2_moments"]).startswith(
        "monte_carlo")
    q1 = vae.encode(x)  # q(z1 | x)
    torch.testing.assert_close(values["z1_loc"], q1.mean)
    torch.testing.assert_close(values["z1_scale"], q1.stddev)
    assert values["z2_loc"].shape == (30, 2) and values["z2_scale"].shape == (30, 2)
    # q(z2 | x) = E over z1 of q(z2 | z1): its moments from 2000 draws, against 40000 others
    with torch.no_grad(), pyro.plate("draws", 40000, dim=-2):
        z2 = poutine.trace(vae.guide).get_trace(x).nodes["z2"]["value"]
    tolerance = 5 * values["z2_scale"] / 2000**0.5
    assert bool(((values["z2_loc"] - z2.mean(0)).abs() < tolerance).all())
    assert bool(((values["z2_scale"] - z2.std(0)).abs() < tolerance).all())


def test_the_reconstruction_grid_puts_each_row_of_inputs_above_its_reconstructions():
    vae = build_vae(TrainConfig(hidden_dims=(8,), latent_dim=2), data_dim=SIDE * SIDE)
    x = torch.bernoulli(torch.full((5, SIDE * SIDE), 0.4))
    grid = reconstruction_grid(vae, x, columns=4, decode="mean")
    expected = vae.likelihood.mean(vae.decoder(vae.encode(x).mean))
    assert grid.shape == (16, SIDE * SIDE)
    torch.testing.assert_close(grid[:4], x[:4])
    torch.testing.assert_close(grid[4:8], expected[:4])
    torch.testing.assert_close(grid[8], x[4])
    torch.testing.assert_close(grid[12], expected[4])
    assert not grid[9:12].any() and not grid[13:].any()  # blank fill


def test_reconstruct_writes_the_png_grid(trained, capsys):
    run_dir, _, _, _ = trained
    assert main(["reconstruct", str(run_dir), "-n", "6", "--columns", "3"]) == 0
    assert "6 test images and their reconstructions written to" in capsys.readouterr().out
    with Image.open(run_dir / "reconstructions.png") as image:
        # 2 row pairs of 3 images of 4x4, 2 pixels of padding around each
        assert image.size == (3 * (SIDE + 2) + 2, 4 * (SIDE + 2) + 2)
    assert main(["reconstruct", str(run_dir)]) == 0  # the first grid is kept
    assert (run_dir / "reconstructions-1.png").is_file()


@pytest.mark.parametrize("command", ["encode", "reconstruct"])
def test_a_dataset_of_another_shape_is_one_line_with_status_2(trained, capsys, command, tmp_path):
    run_dir, _, _, _ = trained
    np.savez(tmp_path / "wide.npz", train=np.zeros((10, 5, 5), dtype=bool))
    assert main([command, str(run_dir), "--dataset", f"npz:{tmp_path / 'wide.npz'}"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1
    assert "has 25 values per data point but the model expects 16" in error[0]


def test_encode_refuses_a_model_of_labelled_data_in_one_line(trained, capsys, tmp_path):
    _, folder, _, _ = trained
    run_dir = tmp_path / "conditional"
    assert main(["train", "--model", "conditional", "--dataset", f"npz:{folder / 'digits.npz'}",
                 "--binarize", "none", "--hidden-dims", "8", "--latent-dim", "2", "--epochs", "1",
                 "--batch-size", "25", "--eval-samples", "0", "--out-dir", str(run_dir),
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["encode", str(run_dir)]) == 2
    assert capsys.readouterr().err.strip() == (
        "pyrovae: error: encode takes models of x alone; this run's model is conditional, "
        "whose guide needs the label")


@pytest.mark.parametrize("command, kind", [("encode", "a pyrovae encoding (.npz)"),
                                           ("reconstruct", "a PNG image")])
def test_an_output_that_is_a_users_own_file_is_refused_unless_force(trained, capsys, tmp_path,
                                                                      command, kind):
    run_dir, _, _, _ = trained
    mine = tmp_path / "notes.py"
    mine.write_text("my own work\n")
    assert main([command, str(run_dir), "-o", str(mine)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"pyrovae: error: {mine} exists and is not {kind}; choose another --output, or pass "
        f"--force to replace it")
    assert mine.read_text() == "my own work\n"
    # an earlier output of the command is replaced, and --force replaces anything
    assert main([command, str(run_dir), "-o", str(tmp_path / "out"), "-n", "2"]) == 0
    assert main([command, str(run_dir), "-o", str(tmp_path / "out"), "-n", "2"]) == 0
    assert main([command, str(run_dir), "-o", str(mine), "-n", "2", "--force"]) == 0
    assert mine.read_bytes()[:4] in (b"PK\x03\x04", b"\x89PNG")
    capsys.readouterr()
