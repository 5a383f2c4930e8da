"""TrainConfig: 1:1 with the CLI flags, round-trips through JSON, refuses bad values."""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import fields

import pytest
import torch
from torch import nn

from pyrovae import TrainConfig, build_vae
from pyrovae.errors import ConfigError


def test_every_field_is_a_flag_and_defaults_round_trip():
    parser = argparse.ArgumentParser()
    TrainConfig.add_arguments(parser)
    args = parser.parse_args([])
    assert TrainConfig.from_args(args) == TrainConfig()
    flags = {action.dest for action in parser._actions} - {"help"}
    assert flags == {f.name for f in fields(TrainConfig)}


def test_flags_reach_the_config():
    parser = argparse.ArgumentParser()
    TrainConfig.add_arguments(parser)
    args = parser.parse_args(["--hidden-dims", "32", "16", "--latent-dim", "4", "--no-progress",
                              "--likelihood", "gaussian", "--learn-sigma", "--lr", "0.01"])
    config = TrainConfig.from_args(args)
    assert config.hidden_dims == (32, 16) and config.latent_dim == 4
    assert not config.progress and config.learn_sigma and config.lr == 0.01


def test_json_round_trip(tmp_path):
    config = TrainConfig(hidden_dims=(10, 5), latent_dim=2, prior="diagonal", seed=3)
    config.save(tmp_path / "config.json")
    assert TrainConfig.load(tmp_path / "config.json") == config


@pytest.mark.parametrize("values, message", [
    ({"prior": "nope"}, "unknown prior 'nope'; known: normal"),
    ({"latent_dim": 0}, "latent_dim must be positive"),
    ({"batch_size": -1}, "batch_size must be positive"),
    ({"lr": 0.0}, "lr must be positive"),
    ({"hidden_dims": (10, 0)}, "hidden_dims must be positive"),
    ({"eval_samples": -5}, "eval_samples must be >= 0"),
    ({"lr_schedule": "step"}, "unknown lr_schedule 'step'; known: constant, iwae, burda2016, "
                              "cosine, plateau"),
    ({"log_px_every": -1}, "log_px_every must be >= 0"),
    ({"log_px_samples": 0}, "log_px_samples must be positive"),
    ({"log_px_size": 0}, "log_px_size must be positive"),
])
def test_bad_values_name_the_problem(values, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**values)


def test_unknown_keys_are_named():
    with pytest.raises(ConfigError, match="unknown config keys: colour"):
        TrainConfig.from_dict({"colour": "red"})


def test_build_vae_follows_the_config():
    config = TrainConfig(hidden_dims=(20, 10), latent_dim=3, likelihood="gaussian", sigma=0.3)
    vae = build_vae(config, data_dim=15)
    assert vae.latent_dim == 3 and vae.data_dim == 15
    assert vae.encoder.feature_dim == 10
    assert float(vae.likelihood.sigma) == pytest.approx(0.3)


@pytest.mark.parametrize("text, message", [
    ("", "is empty"),
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "must be a JSON object of settings, got list"),
    ('{"latent_dim": "8"}', "config key 'latent_dim' should be int, got '8'"),
    ('{"hidden_dims": [8, "a"]}', "'hidden_dims' should be a list of integers"),
    ('{"progress": 1}', "'progress' should be bool"),
    ('{"train_size": 1.5}', "'train_size' should be int or null"),
    ('{"hidden_dims": [99999999999999999999]}',
     "hidden_dims \\[99999999999999999999\\] is too large \\(at most 2147483647\\)"),
    ('{"sigma": 1e400}', "sigma must be a finite number, got inf"),
    ("[" * 100_000 + "]" * 100_000, "nests lists or objects too deeply to be a config"),
    ('{"hidden_dims": ' + "[" * 100_000 + "]" * 100_000 + "}", "nests lists or objects too"),
])
def test_a_broken_config_file_is_one_line_naming_it(tmp_path, text, message):
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as error:
        TrainConfig.load(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_save_is_atomic_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    TrainConfig(seed=1).save(path)

    def killed(*args):
        raise KeyboardInterrupt  # a kill in the middle of the write

    monkeypatch.setattr("os.fsync", killed)
    with pytest.raises(KeyboardInterrupt):
        TrainConfig(seed=2).save(path)
    monkeypatch.undo()
    assert TrainConfig.load(path).seed == 1
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


@pytest.mark.parametrize("values, message", [
    ({"lr": float("inf")}, "lr must be a finite number"),
    ({"lr": 1e38}, "lr must be at most 1.0"),
    ({"sigma": float("nan")}, "sigma must be a finite number"),
    ({"seed": -1}, "seed must be between 0 and 2\\*\\*32 - 1"),
    ({"seed": 2**32}, "seed must be between"),
    ({"latent_dim": 2**40}, "latent_dim 1099511627776 is too large"),
    ({"hidden_dims": (8, 10**20)}, f"hidden_dims \\[8, {10**20}\\] is too large \\(at most "
                                   f"2147483647\\)"),
    ({"latent_dims": (2**31, 4)}, "latent_dims \\[2147483648, 4\\] is too large"),
    ({"device": "foo"}, "unknown device 'foo'"),
    ({"device": "meta"}, "device 'meta' cannot hold the data"),
])
def test_values_that_would_fail_deep_inside_torch_are_refused(values, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**values)


def test_a_learned_prior_warms_the_kl_up_by_default_and_records_it(tmp_path):
    assert TrainConfig().kl_warmup_epochs == 0
    assert TrainConfig(prior="vamp").kl_warmup_epochs == 10
    assert TrainConfig(prior="flow", epochs=3).kl_warmup_epochs == 3
    assert TrainConfig(prior="mog", kl_warmup_epochs=0).kl_warmup_epochs == 0
    TrainConfig(prior="vamp").save(tmp_path / "config.json")
    assert '"kl_warmup_epochs": 10' in (tmp_path / "config.json").read_text()


def _linears(module):
    return [layer for layer in module.modules() if isinstance(layer, nn.Linear)]


@pytest.mark.parametrize("values", [
    {"net": "mlp"},
    {"net": "gated_mlp", "activation": "identity"},
    {"latent_dims": (16, 8)},
    {"model": "conditional", "num_classes": 3},
    {"model": "semi_supervised", "num_classes": 3, "alpha": 1.0},
], ids=["vae", "gated", "hierarchical", "conditional", "semi_supervised"])
def test_init_gain_reaches_every_linear_layer_a_config_builds(values):
    vae = build_vae(TrainConfig(hidden_dims=(64,), latent_dim=8, init_gain=2.0, **values),
                    data_dim=100)
    linears = _linears(vae)
    assert len(linears) >= 4
    for layer in linears:
        fan_out, fan_in = layer.weight.shape
        bound = 2.0 * math.sqrt(6 / (fan_in + fan_out))
        assert 0.95 * bound < layer.weight.abs().max().item() <= bound, layer
        assert torch.all(layer.bias == 0)


def test_the_burda2016_preset_starts_every_weight_at_gain_one():
    assert TrainConfig().init_gain == "activation"
    config = TrainConfig.from_preset("burda2016")
    assert config.init_gain == 1.0
    for layer in _linears(build_vae(config, data_dim=784)):  # encoder, decoder, guide heads
        fan_out, fan_in = layer.weight.shape
        assert layer.weight.abs().max().item() <= math.sqrt(6 / (fan_in + fan_out))
    assert TrainConfig.from_preset("burda2016", init_gain="activation").init_gain == "activation"


def test_init_gain_is_a_flag_and_round_trips_through_json(tmp_path):
    parser = argparse.ArgumentParser()
    TrainConfig.add_arguments(parser)
    assert TrainConfig.from_args(parser.parse_args(["--init-gain", "1"])).init_gain == 1.0
    assert TrainConfig.from_args(parser.parse_args([])).init_gain == "activation"
    with pytest.raises(SystemExit):
        parser.parse_args(["--init-gain", "-2"])
    config = TrainConfig(init_gain=1)
    config.save(tmp_path / "config.json")
    assert '"init_gain": 1.0' in (tmp_path / "config.json").read_text()
    assert TrainConfig.load(tmp_path / "config.json") == config


def test_the_tomczak2018_preset_starts_and_scales_as_the_authors_code(tmp_path):
    from pyrovae.likelihoods import logit_clip_of_probability_clip

    config = TrainConfig.from_preset("tomczak2018", num_components=5)
    assert (config.init_scheme, config.guide_scale) == ("he_normal", "clipped_log_variance")
    assert config.bernoulli_logit_clip == pytest.approx(11.5129155, abs=1e-7)
    assert config.bernoulli_logit_clip == logit_clip_of_probability_clip(1e-5)
    assert config.output_bias_init == "zero"  # leaves the output bias at nn.Linear's start
    vae = build_vae(config, data_dim=784)
    assert vae.guide_family.scale_link == "clipped_log_variance"
    assert vae.likelihood.logit_clip == config.bernoulli_logit_clip
    linears = _linears(vae)
    assert len(linears) == 11  # 2 x 2 gated layers each way, the decoder output, 2 heads
    for layer in linears:
        fan_out, fan_in = layer.weight.shape
        # 12,000+ draws: the std of N(0, 2 / fan_in) to within 5 standard errors
        assert layer.weight.std().item() == pytest.approx(
            math.sqrt(2 / fan_in), rel=5 / math.sqrt(2 * layer.weight.numel())), layer
        assert 0 < layer.bias.abs().max().item() <= 1 / math.sqrt(fan_in)
    config.save(tmp_path / "config.json")
    assert TrainConfig.load(tmp_path / "config.json") == config


def test_a_config_saved_before_the_scheme_scale_and_clip_existed_loads_with_the_old_start(
        tmp_path):
    # what an earlier pyrovae wrote for the same preset: none of the three keys
    values = TrainConfig.from_preset("tomczak2018").to_dict()
    for name in ("init_scheme", "guide_scale", "bernoulli_logit_clip"):
        del values[name]
    (tmp_path / "config.json").write_text(json.dumps(values))
    config = TrainConfig.load(tmp_path / "config.json")
    assert config.preset == "tomczak2018" and config.net == "gated_mlp"
    assert (config.init_scheme, config.guide_scale, config.bernoulli_logit_clip) == (
        "glorot_uniform", "softplus", None)
    vae = build_vae(config, data_dim=784)
    assert vae.guide_family.scale_link == "softplus" and vae.likelihood.logit_clip is None
    assert torch.all(vae.decoder.body[-1].bias == 0)


def test_the_defaults_build_the_same_model_as_before():
    defaults = TrainConfig()
    assert (defaults.init_scheme, defaults.guide_scale, defaults.bernoulli_logit_clip) == (
        "glorot_uniform", "softplus", None)
    for values in ({}, {"net": "gated_mlp", "activation": "identity", "prior": "vamp",
                        "num_components": 3}):
        torch.manual_seed(0)
        default = build_vae(TrainConfig(hidden_dims=(32,), latent_dim=4, **values), data_dim=50)
        torch.manual_seed(0)
        explicit = build_vae(TrainConfig(hidden_dims=(32,), latent_dim=4, **values,
                                         init_scheme="glorot_uniform", guide_scale="softplus"),
                             data_dim=50)
        for (name, a), b in zip(default.state_dict().items(), explicit.state_dict().values(),
                                strict=True):
            assert torch.equal(a, b), name
        # the networks' biases start at zero; the guide's heads keep PyTorch's start
        assert all(torch.all(layer.bias == 0)
                   for layer in _linears(default.encoder) + _linears(default.decoder))


@pytest.mark.parametrize("values", [
    {"net": "mlp"},
    {"net": "gated_mlp", "activation": "identity"},
    {"guide": "lowrank"},
    {"guide": "fullcov"},
    {"model": "conditional", "num_classes": 3},
    {"model": "semi_supervised", "num_classes": 3, "alpha": 1.0},
], ids=["vae", "gated", "lowrank", "fullcov", "conditional", "semi_supervised"])
def test_he_normal_reaches_every_linear_layer_a_config_builds(values):
    vae = build_vae(TrainConfig(hidden_dims=(256,), latent_dim=8, init_scheme="he_normal",
                                **values), data_dim=300)
    linears = [layer for name, layer in vae.named_modules() if isinstance(layer, nn.Linear)
               and not name.endswith("off_diagonal_head")]  # which starts at zero
    assert len(linears) >= 4
    for layer in linears:
        fan_out, fan_in = layer.weight.shape
        assert layer.weight.std().item() == pytest.approx(
            math.sqrt(2 / fan_in), rel=5 / math.sqrt(2 * layer.weight.numel())), layer
        assert 0 < layer.bias.abs().max().item() <= 1 / math.sqrt(fan_in)


@pytest.mark.parametrize("values, message", [
    ({"init_scheme": "lecun"}, "unknown init_scheme 'lecun'; known: glorot_uniform, he_normal"),
    ({"init_scheme": "he_normal", "init_gain": 1.0},
     "init_gain 1.0 is the gain of the Glorot-uniform start"),
    ({"guide_scale": "exp"}, "unknown guide_scale 'exp'; known: softplus, clipped_log_variance"),
    ({"guide": "fullcov", "guide_scale": "clipped_log_variance"},
     "--guide-scale clipped_log_variance is not available with --guide fullcov; the guides "
     "that take it: diagonal, lowrank, iaf"),
    ({"latent_dims": (8, 4), "init_scheme": "he_normal"},
     "latent_dims: the stochastic layers start Glorot-uniform"),
    ({"latent_dims": (8, 4), "guide_scale": "clipped_log_variance"},
     "latent_dims: the stochastic layers' scales are exp\\(linear\\)"),
    ({"likelihood": "gaussian", "bernoulli_logit_clip": 5.0},
     "--bernoulli-logit-clip is for --likelihood bernoulli, not --likelihood gaussian"),
    ({"bernoulli_logit_clip": 0.0}, "bernoulli_logit_clip must be a positive number, got 0.0"),
    ({"bernoulli_logit_clip": -3.0}, "bernoulli_logit_clip must be a positive number"),
    ({"bernoulli_logit_clip": float("inf")}, "bernoulli_logit_clip must be a positive number"),
])
def test_bad_schemes_scales_and_clips_are_one_line(values, message):
    with pytest.raises(ConfigError, match=message) as error:
        TrainConfig(**values)
    assert "\n" not in str(error.value)


def test_the_scheme_scale_and_clip_are_flags_and_round_trip_through_json(tmp_path):
    parser = argparse.ArgumentParser()
    TrainConfig.add_arguments(parser)
    config = TrainConfig.from_args(parser.parse_args([
        "--init-scheme", "he_normal", "--guide-scale", "clipped_log_variance",
        "--bernoulli-logit-clip", "11.5"]))
    assert (config.init_scheme, config.guide_scale, config.bernoulli_logit_clip) == (
        "he_normal", "clipped_log_variance", 11.5)
    for flags in (["--init-scheme", "lecun"], ["--guide-scale", "exp"],
                  ["--bernoulli-logit-clip", "big"]):
        with pytest.raises(SystemExit):
            parser.parse_args(flags)
    config.save(tmp_path / "config.json")
    assert TrainConfig.load(tmp_path / "config.json") == config
    assert TrainConfig(bernoulli_logit_clip=10).bernoulli_logit_clip == 10.0  # as JSON 10.0
    # a preset's clip is turned off with none, as another likelihood needs
    off = parser.parse_args(["--bernoulli-logit-clip", "none"]).bernoulli_logit_clip
    assert off is None
    assert TrainConfig.from_preset("tomczak2018", likelihood="gaussian",
                                   bernoulli_logit_clip=off).bernoulli_logit_clip is None
