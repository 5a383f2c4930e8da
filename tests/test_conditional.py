"""The conditional VAE p(x | z, y), q(z | x, y): exact log p(x | y) on a linear-Gaussian
version, training, sampling a chosen class, and the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pyrovae import DataSplits, TrainConfig, build_vae, fit, log_marginal_likelihood
from pyrovae.cli import main
from pyrovae.config import apply_label_settings
from pyrovae.errors import ConfigError
from pyrovae.models import ConditionalVAE
from pyrovae.plotting import save_sample_grid
from tests.labelled_gaussian import LinearGaussianLabels


def test_the_exact_guide_gives_the_exact_log_p_x_given_y():
    truth = LinearGaussianLabels()
    cvae = truth.conditional_vae()
    x, y = truth.sample(25)
    estimate = log_marginal_likelihood(cvae, (x, y), num_samples=3)
    torch.testing.assert_close(estimate, truth.log_px_given_y(x, y), atol=1e-8, rtol=0)
    # the label matters: under other labels the same points are far less likely
    assert (log_marginal_likelihood(cvae, (x, (y + 1) % 3), num_samples=3) - estimate).mean() < -1


def labelled_binary_data(n: int = 60, num_classes: int = 3, seed: int = 3) -> DataSplits:
    """Bernoulli images whose pixel rates depend on the class: a label is worth knowing."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % num_classes
    rates = torch.rand(num_classes, 12, generator=g) * 0.8 + 0.1
    x = torch.bernoulli(rates[y], generator=g)
    return DataSplits.from_tensors(x[:40], x[40:], train_labels=y[:40], test_labels=y[40:])


def small_model(data: DataSplits, **fields):
    config, data = apply_label_settings(TrainConfig(model="conditional", hidden_dims=(16,),
                                                    latent_dim=2, **fields), data)
    return build_vae(config, data_dim=data.data_dim), data


def test_a_conditional_vae_trains_on_batches_of_images_and_labels():
    cvae, data = small_model(labelled_binary_data())
    assert isinstance(cvae, ConditionalVAE) and cvae.num_classes == 3
    history = fit(cvae, data, epochs=6, batch_size=10, lr=2e-2, progress=False)
    assert history[-1].train_elbo > history[0].train_elbo + 0.5
    assert history[-1].test_elbo > history[0].test_elbo
    # log p(x | y) of the test points under their labels beats the worst wrong label
    x, y = data.test_inputs
    right = log_marginal_likelihood(cvae, (x, y), num_samples=50, seed=0).mean()
    wrong = log_marginal_likelihood(cvae, (x, (y + 1) % 3), num_samples=50, seed=0).mean()
    assert right > wrong


def test_sampling_a_label_is_deterministic_under_a_seed():
    cvae, _ = small_model(labelled_binary_data())
    torch.manual_seed(4)
    first = cvae.sample(8, label=2)
    torch.manual_seed(4)
    assert torch.equal(cvae.sample(8, label=2), first) and first.shape == (8, 12)
    torch.manual_seed(4)
    assert not torch.equal(cvae.sample(8, label=1), first)  # same z, another class
    for bad in (3, -1, True):
        with pytest.raises(ConfigError, match=r"label must be a class 0..2"):
            cvae.sample(2, label=bad)


def test_a_label_for_a_model_without_labels_is_refused(tmp_path):
    vae = build_vae(TrainConfig(hidden_dims=(8,), latent_dim=2), data_dim=16)
    with pytest.raises(ConfigError, match="--label needs a model of labelled data") as error:
        save_sample_grid(vae, tmp_path / "s.png", (1, 4, 4), 4, label=1)
    assert "\n" not in str(error.value)


def test_model_options_a_label_model_cannot_take_are_refused():
    for fields, message in (({"net": "conv"}, "--net conv is not available"),
                            ({"prior": "vamp"}, "the vamp prior needs q"),
                            ({"labelled": 5}, "--labelled is for --model semi_supervised")):
        with pytest.raises(ConfigError, match=message):
            TrainConfig(model="conditional", **fields)
    with pytest.raises(ConfigError, match="needs class labels and the data have none"):
        apply_label_settings(TrainConfig(model="conditional"),
                             DataSplits.from_tensors(torch.rand(4, 2), torch.rand(2, 2)))


def write_labelled_npz(path, n: int = 50, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    images = (rng.random((n, 4, 4)) < 0.2 + 0.3 * labels[:, None, None]).astype(np.uint8) * 255
    np.savez(path, train=images[:40], train_labels=labels[:40], test=images[40:],
             test_labels=labels[40:])


CLI_TINY = ["--hidden-dims", "8", "--latent-dim", "2", "--epochs", "2", "--batch-size", "10",
            "--eval-samples", "30", "--no-progress", "--device", "cpu"]


def test_the_command_line_trains_samples_a_class_and_evaluates_log_p_x_given_y(tmp_path, capsys):
    write_labelled_npz(tmp_path / "digits.npz")
    run = tmp_path / "run"
    assert main(["train", "--model", "conditional", "--dataset", f"npz:{tmp_path / 'digits.npz'}",
                 "--out-dir", str(run), *CLI_TINY]) == 0
    assert "log p(x | y) (K=30)" in capsys.readouterr().out
    config = json.loads((run / "config.json").read_text())
    assert config["model"] == "conditional" and config["num_classes"] == 3
    grids = []
    for name in ("a.png", "b.png"):
        assert main(["sample", str(run), "--label", "2", "--seed", "5", "-n", "4", "--device",
                     "cpu", "-o", str(tmp_path / name)]) == 0
        grids.append((tmp_path / name).read_bytes())
    assert grids[0] == grids[1]
    assert main(["evaluate", str(run), "-k", "10", "--device", "cpu", "--no-progress"]) == 0
    evaluation = json.loads((run / "evaluation.json").read_text())
    assert evaluation["log_marginal_likelihood_of"] == "log p(x | y)"
    assert evaluation["num_test_points"] == 10 and evaluation["log_marginal_likelihood"] < 0
    capsys.readouterr()
    assert main(["sample", str(run), "--label", "3", "--device", "cpu",
                 "-o", str(tmp_path / "c.png")]) == 2
    error = capsys.readouterr().err
    assert "label must be a class 0..2, got 3" in error and error.count("\n") == 1
