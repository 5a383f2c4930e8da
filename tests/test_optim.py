"""Adam's settings and the output-bias start of :mod:`pyrovae.optim`, and the presets."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from pyrovae.cli import main
from pyrovae.config import PRESETS, TrainConfig
from pyrovae.errors import ConfigError
from pyrovae.nets import MLPDecoder
from pyrovae.optim import (
    AdamSettings,
    init_output_bias,
    logit_of_mean,
    make_adam,
    normalize_gradients_,
)
from tests.conftest import SHARED_DATA, requires_binarized_mnist, requires_mnist
from tests.test_data import binarized_mnist_like


def _adam_by_hand(gradients, *, lr, beta1, beta2, eps, v0):
    """The parameter after Adam steps with the bias-corrected moments, the first moment
    started at 0 and the second at ``v0`` (torch's placement of eps)."""
    theta, m, v = 0.0, 0.0, v0
    for t, g in enumerate(gradients, start=1):
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        theta -= lr * (m / (1 - beta1**t)) / (math.sqrt(v / (1 - beta2**t)) + eps)
    return theta


@pytest.mark.parametrize("v0", [0.0, 1.0])
def test_make_adam_follows_the_update_with_the_second_moment_started_at_v0(v0):
    parameter = nn.Parameter(torch.zeros((), dtype=torch.float64))
    settings = AdamSettings(betas=(0.99, 0.999), eps=1e-4, second_moment_init=v0)
    optimizer = make_adam([parameter], lr=1e-3, settings=settings)
    gradients = [0.5, -0.2, 0.3, 0.1, 0.7]
    for gradient in gradients:
        parameter.grad = torch.tensor(gradient, dtype=torch.float64)
        optimizer.step()
    expected = _adam_by_hand(gradients, lr=1e-3, beta1=0.99, beta2=0.999, eps=1e-4, v0=v0)
    assert parameter.item() == pytest.approx(expected, rel=1e-9)
    # v0 = 1 makes the first steps about sqrt(1 / (1 - beta2)) ~ 32 times smaller
    if v0:
        plain = _adam_by_hand(gradients, lr=1e-3, beta1=0.99, beta2=0.999, eps=1e-4, v0=0.0)
        assert abs(parameter.item()) < abs(plain) / 10


def test_the_started_second_moment_survives_a_state_dict_round_trip():
    parameter = nn.Parameter(torch.zeros(3))
    optimizer = make_adam([parameter], lr=1e-3, settings=AdamSettings(second_moment_init=1.0))
    again = make_adam([parameter], lr=1e-3)
    again.load_state_dict(optimizer.state_dict())
    assert torch.equal(again.state[parameter]["exp_avg_sq"], torch.ones(3))


@pytest.mark.parametrize("settings, message", [
    ({"betas": (1.0, 0.999)}, "beta1"), ({"eps": 0.0}, "eps"),
    ({"second_moment_init": -1.0}, "second_moment_init"),
])
def test_bad_adam_settings_are_named(settings, message):
    with pytest.raises(ConfigError, match=message):
        AdamSettings(**settings)


def test_normalized_gradients_have_unit_norm_per_tensor():
    big, small, unused = (torch.zeros(3, 4, requires_grad=True), torch.zeros(5, requires_grad=True),
                          torch.zeros(2, requires_grad=True))
    big.grad, small.grad = torch.full((3, 4), 30.0), torch.tensor([0.0, 1e-3, 0.0, 0.0, 0.0])
    norms = normalize_gradients_([big, small, unused])
    torch.testing.assert_close(norms, torch.tensor([math.sqrt(12 * 900.0), 1e-3]))
    torch.testing.assert_close(big.grad, torch.full((3, 4), 30.0) / (math.sqrt(12 * 900.0) + 1e-7))
    torch.testing.assert_close(small.grad, torch.tensor([0.0, 1e-3 / (1e-3 + 1e-7), 0, 0, 0]))
    assert unused.grad is None


def test_the_training_loop_steps_on_normalized_gradients_when_asked():
    from pyrovae import build_vae
    from pyrovae.data import DataSplits
    from pyrovae.train import FitOptions, TrainingLoop

    x = torch.bernoulli(torch.full((40, 6), 0.3))
    norms = {}
    for normalize in (False, True):
        torch.manual_seed(0)
        vae = build_vae(TrainConfig(hidden_dims=(8,), latent_dim=2), data_dim=6)
        loop = TrainingLoop(vae, DataSplits.from_tensors(x[:30], x[30:]),
                            FitOptions(epochs=1, batch_size=10, progress=False,
                                       adam=AdamSettings(normalize_gradients=normalize)))
        loop.train_step(x[:10])
        norms[normalize] = [p.grad.norm().item() for p in loop.parameters if p.grad is not None]
    assert all(abs(norm - 1.0) < 1e-5 for norm in norms[True])
    assert not all(abs(norm - 1.0) < 1e-2 for norm in norms[False])
    assert TrainConfig(adam_normalize_gradients=True).adam.normalize_gradients
    # a non-finite gradient stops the run (divided by its norm it would be NaN or 0)
    from pyrovae.train import TrainingDivergedError

    first = loop.parameters[0]
    before = first.detach().clone()
    loop.optimizer.zero_grad()
    first.grad = torch.full_like(first, float("inf"))
    with pytest.raises(TrainingDivergedError, match="gradient norm is inf"):
        loop._clip_and_update(epoch=1)
    assert torch.equal(first.detach(), before)  # nothing was updated


def test_the_output_bias_starts_at_the_logit_of_the_mean_pixel():
    x = torch.tensor([[0.0, 1.0, 0.5], [0.0, 1.0, 0.3]])
    bias = logit_of_mean(x)
    assert torch.allclose(bias, torch.tensor([math.log(1e-3 / (1 - 1e-3)),
                                              math.log((1 - 1e-3) / 1e-3), math.log(0.4 / 0.6)]))
    decoder = MLPDecoder(2, 3, (4,))
    init_output_bias(decoder, bias)
    # z-independent part of the output: the decoder at a zero hidden layer gives the bias
    assert torch.allclose(decoder.body[-1].bias, bias)
    with pytest.raises(ConfigError, match="no output bias of shape"):
        init_output_bias(decoder, torch.zeros(5))


def test_a_preset_sets_its_fields_and_flags_beside_it_override(tmp_path):
    config = TrainConfig.from_preset("burda2016", epochs=7)
    assert (config.batch_size, config.adam_beta1, config.adam_eps, config.epochs) == (20, 0.99, 1e-4, 7)
    assert config.preset == "burda2016"
    with pytest.raises(ConfigError, match="unknown preset"):
        TrainConfig.from_preset("nobody2099")
    assert set(PRESETS["burda2016"]) <= {f for f in TrainConfig().to_dict()}


@requires_mnist
def test_the_cli_preset_records_the_resolved_values(tmp_path):
    out = tmp_path / "run"
    code = main(["train", "--preset", "burda2016", "--data-dir", str(SHARED_DATA),
                 "--train-size", "440", "--test-size", "50", "--epochs", "1", "--batch-size",
                 "40", "--eval-samples", "0", "--no-progress", "--out-dir", str(out)])
    assert code == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["preset"] == "burda2016"
    assert (saved["batch_size"], saved["adam_eps"], saved["lr_schedule"]) == (40, 1e-4, "burda2016")
    assert saved["valid_size"] == 400 and saved["output_bias_init"] == "data_mean"


def test_the_tomczak2018_preset_sets_the_vampprior_protocol_and_records_an_override():
    config = TrainConfig.from_preset("tomczak2018", early_stopping_patience=7)
    assert (config.net, config.hidden_dims, config.activation, config.latent_dim) == (
        "gated_mlp", (300, 300), "identity", 40)
    assert (config.prior, config.num_components, config.lr, config.batch_size) == (
        "vamp", 500, 5e-4, 100)
    assert (config.kl_warmup_epochs, config.epochs, config.eval_samples) == (100, 2000, 5000)
    assert (config.dataset, config.valid_size) == ("binarized_mnist", 10_000)
    assert config.early_stopping_patience == 7 and config.preset == "tomczak2018"
    assert TrainConfig.from_preset("tomczak2018").early_stopping_patience == 50
    # the authors' AdamNormGrad and clipped pseudo-inputs, started off the data
    assert config.adam.normalize_gradients and config.pseudo_input_link == "hardtanh"
    assert not config.pseudo_inputs_from_data
    assert set(PRESETS["tomczak2018"]) <= {f for f in TrainConfig().to_dict()}
    # every value the preset names is one TrainConfig accepts as it is
    assert all(getattr(TrainConfig.from_preset("tomczak2018"), name) == value
               for name, value in PRESETS["tomczak2018"].items())


@requires_binarized_mnist
def test_a_tiny_cli_run_of_the_tomczak2018_preset_trains_and_records_it(tmp_path):
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "pyrovae", "train", "--preset", "tomczak2018", "--data-dir",
         str(SHARED_DATA), "--train-size", "300", "--test-size", "50", "--valid-size", "100",
         "--epochs", "3", "--hidden-dims", "16", "--num-components", "10",
         "--kl-warmup-epochs", "1", "--early-stopping-patience", "1", "--eval-samples", "10",
         "--no-progress", "--out-dir", str(out)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    saved = json.loads((out / "config.json").read_text())
    assert saved["preset"] == "tomczak2018"
    assert (saved["net"], saved["activation"], saved["latent_dim"], saved["lr"]) == (
        "gated_mlp", "identity", 40, 5e-4)
    assert (saved["hidden_dims"], saved["early_stopping_patience"], saved["valid_size"]) == (
        [16], 1, 100)
    assert (saved["guide_scale"], saved["init_scheme"]) == ("clipped_log_variance", "he_normal")
    assert saved["bernoulli_logit_clip"] == pytest.approx(11.5129, abs=1e-4)
    results = json.loads((out / "results.json").read_text())
    assert results["evaluated_checkpoint"] == "checkpoint_best.pt"
    assert 1 <= results["evaluated_checkpoint_epoch"] <= results["epochs"] <= 3
    assert results["stopped_early"] == (results["epochs"] < 3)
    # He-normal gives a 16-wide layer's 784 outputs a wide start that 3 tiny epochs do
    # not undo; the bound says the estimate is finite and sane
    assert -700 < results["log_marginal_likelihood"] < 0


def test_a_flag_beside_the_preset_overrides_its_init_gain_and_is_recorded(tmp_path):
    np.savez(tmp_path / "grey.npz",
             train=np.random.default_rng(0).random((500, 10), dtype=np.float32))
    flags = ["train", "--preset", "burda2016", "--dataset", f"npz:{tmp_path / 'grey.npz'}",
             "--hidden-dims", "8", "--latent-dim", "2", "--epochs", "1", "--batch-size", "40",
             "--eval-samples", "0", "--no-progress"]
    assert main([*flags, "--out-dir", str(tmp_path / "preset")]) == 0
    assert json.loads((tmp_path / "preset" / "config.json").read_text())["init_gain"] == 1.0
    assert main([*flags, "--init-gain", "activation", "--out-dir", str(tmp_path / "flag")]) == 0
    saved = json.loads((tmp_path / "flag" / "config.json").read_text())
    assert saved["init_gain"] == "activation" and saved["preset"] == "burda2016"


def test_the_tomczak2018_preset_validates_on_the_files_own_split(tmp_path):
    binarized_mnist_like(tmp_path, train=60, valid=12, test=20)
    config = TrainConfig.from_preset("tomczak2018")
    assert (config.valid_split, config.valid_size) == ("dataset", 10_000)
    assert TrainConfig().valid_split == "last"
    with pytest.raises(ConfigError, match="--valid-split dataset: 'mnist' has no validation"):
        TrainConfig(valid_split="dataset")
    run = tmp_path / "run"
    assert main(["train", "--preset", "tomczak2018", "--data-dir", str(tmp_path),
                 "--valid-size", "0", "--epochs", "1", "--hidden-dims", "8", "--latent-dim", "2",
                 "--num-components", "2", "--kl-warmup-epochs", "0", "--batch-size", "20",
                 "--eval-samples", "0", "--no-progress", "--out-dir", str(run)]) == 0
    saved = json.loads((run / "config.json").read_text())
    assert saved["valid_split"] == "dataset" and saved["preset"] == "tomczak2018"
    metrics = (run / "metrics.csv").read_text().splitlines()
    header, first = metrics[0].split(","), metrics[1].split(",")
    assert float(first[header.index("valid_elbo")]) < 0  # validated on the 12 own images
    # trained on all 60 training images: 3 steps of 20
    assert int(first[header.index("step")]) == 3
