"""The hierarchical VAE: conditional Gaussian layers, the two-layer model of Burda et al.
(2016) from a config, and every objective and estimator on it.

The closed form: with linear layers and a Gaussian likelihood the hierarchy
z2 ~ N(0, I), z1 | z2 ~ N(A z2 + a, diag s1^2), x | z1 ~ N(W z1 + b, sigma^2 I) has the
marginal p(x) = N(W a + b, W (A A^T + diag s1^2) W^T + sigma^2 I).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from torch import nn

from pyrovae import (
    DataSplits,
    GaussianLikelihood,
    IAFGuide,
    MLPDecoder,
    MLPEncoder,
    StandardNormalPrior,
    TrainConfig,
    build_vae,
    elbo,
    fit,
    log_marginal_likelihood,
)
from pyrovae.ais import ais_log_marginal_likelihood
from pyrovae.checkpoint import load_vae, save_checkpoint
from pyrovae.cli import main
from pyrovae.config import hierarchical_hidden_dims
from pyrovae.diagnostics import importance_summary
from pyrovae.errors import ConfigError
from pyrovae.guides import MIN_SCALE
from pyrovae.layers import ConditionalNormal
from pyrovae.models import HierarchicalVAE
from pyrovae.priors import VampPrior
from pyrovae.programs import as_program
from pyrovae.report import bound_curve
from pyrovae.sites import layer_site
from pyrovae.train import TrainingLoop

DOUBLE = torch.float64


def _set_linear(layer: ConditionalNormal, weight: torch.Tensor, bias: torch.Tensor,
                scale: torch.Tensor) -> None:
    """Make ``layer`` the linear-Gaussian N(weight h + bias, diag scale^2)."""
    with torch.no_grad():
        layer.loc_head.weight.copy_(weight)
        layer.loc_head.bias.copy_(bias)
        layer.log_scale_head.weight.zero_()
        layer.log_scale_head.bias.copy_((scale - MIN_SCALE).log())


class LinearHierarchy:
    """The two-layer linear-Gaussian model built from pyrovae's hierarchical parts, with a
    diagonal guide whose means are the exact posterior means and whose scales are
    ``inflate`` times the square root of the largest posterior variance (a proposal
    broader than the posterior in every direction, so the importance weights have finite
    variance)."""

    def __init__(self, data_dim: int = 4, z1_dim: int = 3, z2_dim: int = 2, sigma: float = 0.7,
                 inflate: float = 1.2, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        A = torch.randn(z1_dim, z2_dim, generator=g, dtype=DOUBLE)
        a = torch.randn(z1_dim, generator=g, dtype=DOUBLE)
        s1 = 0.5 + torch.rand(z1_dim, generator=g, dtype=DOUBLE)
        W = torch.randn(data_dim, z1_dim, generator=g, dtype=DOUBLE)
        b = torch.randn(data_dim, generator=g, dtype=DOUBLE)
        self.A, self.a, self.s1, self.W, self.b, self.sigma = A, a, s1, W, b, sigma
        self.c1 = A @ A.T + torch.diag(s1**2)  # Cov(z1)
        post1 = torch.linalg.inv(torch.linalg.inv(self.c1) + W.T @ W / sigma**2)
        post2 = torch.linalg.inv(torch.eye(z2_dim, dtype=DOUBLE) + A.T @ torch.diag(s1**-2) @ A)

        q1, q2 = ConditionalNormal(data_dim, z1_dim), ConditionalNormal(z1_dim, z2_dim)
        gain1 = post1 @ W.T / sigma**2
        _set_linear(q1, gain1, post1 @ torch.linalg.inv(self.c1) @ a - gain1 @ b,
                    inflate * torch.linalg.eigvalsh(post1).max().sqrt().expand(z1_dim))
        gain2 = post2 @ A.T @ torch.diag(s1**-2)
        _set_linear(q2, gain2, -gain2 @ a,
                    inflate * torch.linalg.eigvalsh(post2).max().sqrt().expand(z2_dim))
        prior_layer = ConditionalNormal(z2_dim, z1_dim)
        _set_linear(prior_layer, A, a, s1)
        decoder = MLPDecoder(z1_dim, data_dim, hidden_dims=())
        with torch.no_grad():
            decoder.body[0].weight.copy_(W)
            decoder.body[0].bias.copy_(b)
        self.vae = HierarchicalVAE(
            guide_layers=[q1, q2], prior_layers=[prior_layer],
            prior=StandardNormalPrior(z2_dim), decoder=decoder,
            likelihood=GaussianLikelihood(sigma)).to(DOUBLE)

    def exact_log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        covariance = self.W @ self.c1 @ self.W.T + self.sigma**2 * torch.eye(
            self.W.shape[0], dtype=DOUBLE)
        return dist.MultivariateNormal(self.W @ self.a + self.b, covariance).log_prob(x)

    def sample(self, n: int, seed: int = 1) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        z2 = torch.randn(n, self.A.shape[1], generator=g, dtype=DOUBLE)
        z1 = z2 @ self.A.T + self.a + self.s1 * torch.randn(n, self.A.shape[0], generator=g,
                                                            dtype=DOUBLE)
        return z1 @ self.W.T + self.b + self.sigma * torch.randn(n, self.W.shape[0],
                                                                 generator=g, dtype=DOUBLE)


def tiny_config(**fields) -> TrainConfig:
    return TrainConfig(latent_dims=(4, 2), hidden_dims=(8,), **fields)


def random_binary(n: int, data_dim: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    probabilities = torch.rand(data_dim, generator=g) * 0.8 + 0.1
    return torch.bernoulli(probabilities.expand(n, data_dim), generator=g)


# --- the layer part -----------------------------------------------------------------

def test_a_conditional_normal_layer_is_exp_of_a_linear_output():
    layer = ConditionalNormal(5, 3, hidden_dims=(7,))
    h = torch.randn(4, 2, 5)
    q = layer(h)
    assert q.batch_shape == (4, 2) and q.event_shape == (3,)
    features = layer.body(h)
    torch.testing.assert_close(q.base_dist.scale,
                               layer.log_scale_head(features).exp() + MIN_SCALE)
    torch.testing.assert_close(q.base_dist.loc, layer.loc_head(features))
    # heads Glorot-uniform with gain 1 (Burda et al.'s code), zero biases
    bound = math.sqrt(6 / (7 + 3))
    largest = layer.loc_head.weight.detach().abs().max().item()
    assert 0.8 * bound < largest <= bound
    assert layer.log_scale_head.bias.detach().abs().max().item() == 0


# --- closed form ----------------------------------------------------------------------

def test_the_linear_hierarchy_converges_to_its_closed_form_and_its_bounds_order():
    hierarchy = LinearHierarchy()
    x = hierarchy.sample(30)
    exact = hierarchy.exact_log_marginal(x)
    elbo_value = elbo(hierarchy.vae, x, num_samples=2000).mean()
    iwae_10 = log_marginal_likelihood(hierarchy.vae, x, num_samples=10).mean()
    iwae_large = log_marginal_likelihood(hierarchy.vae, x, num_samples=20000, chunk_size=5000)
    assert elbo_value < iwae_10 < iwae_large.mean() <= exact.mean() + 0.01
    assert (iwae_large - exact).mean().abs() < 0.02
    assert exact.mean() - elbo_value > 0.1  # the diagonal guide is visibly not exact


def test_ais_and_the_report_run_on_the_hierarchy():
    hierarchy = LinearHierarchy()
    x = hierarchy.sample(6)
    exact = hierarchy.exact_log_marginal(x)
    result = ais_log_marginal_likelihood(hierarchy.vae, x, num_temperatures=100, num_chains=16)
    assert result.samples.shape == (16, 6, 5)  # z1 (3) and z2 (2) side by side
    error = (result.log_marginal_likelihood - exact).mean().abs()
    standard_error = result.standard_error.pow(2).mean().sqrt() / math.sqrt(6)
    assert error < max(4 * standard_error, 0.02) and error < 0.1
    summary = importance_summary(hierarchy.vae, x, ks=(1, 100))
    assert summary.pareto_k.shape == (6,) and bool(torch.isfinite(summary.pareto_k).all())
    assert bool((summary.elbo <= summary.iwae[1] + 1e-9).all())
    curve = bound_curve(hierarchy.vae, x, ks=(1, 10), ais=False)
    assert [row.estimator for row in curve.rows] == ["ELBO", "IWAE", "IWAE"]


def test_the_analytic_kl_of_meanfield_elbo_is_not_this_hierarchys_elbo():
    """q(z2 | z1) makes z2 a descendant of z1 in the guide and a parent of z1 in the model,
    which TraceMeanField_ELBO's analytic KL assumes away: its expectation is another
    number than the ELBO, so the config refuses the pair."""
    hierarchy = LinearHierarchy()
    x = hierarchy.sample(5)
    options = {"num_particles": 4000, "vectorize_particles": True, "max_plate_nesting": 1}
    with pyro.validation_enabled(False):
        trace = Trace_ELBO(**options).loss(hierarchy.vae.model, hierarchy.vae.guide, x) / 5
        meanfield = TraceMeanField_ELBO(**options).loss(hierarchy.vae.model,
                                                        hierarchy.vae.guide, x) / 5
    assert abs(meanfield - trace) > 1.0  # nats per point; Monte Carlo error is ~0.05
    with pytest.raises(ConfigError, match="meanfield_elbo"):
        tiny_config(objective="meanfield_elbo")
    TrainConfig(latent_dims=(4,), objective="meanfield_elbo")  # one layer: mean field holds


# --- training ----------------------------------------------------------------------------

@pytest.mark.parametrize(("objective", "num_particles", "warmup"),
                         [("trace_elbo", 1, 0), ("iwae", 3, 0), ("trace_elbo", 1, 3)])
def test_a_tiny_hierarchical_vae_trains(objective, num_particles, warmup):
    x = random_binary(200)
    data = DataSplits.from_tensors(x[:160], x[160:])
    vae = build_vae(tiny_config(), data_dim=12)
    before = elbo(vae, data.test, num_samples=50).mean()
    history = fit(vae, data, epochs=4, batch_size=40, lr=2e-2, objective=objective,
                  num_particles=num_particles, kl_warmup_epochs=warmup, progress=False)
    after = elbo(vae, data.test, num_samples=50).mean()
    assert after > before + 1.0, (before, after)  # nats per point
    assert history[-1].train_elbo > history[0].train_elbo


def test_the_training_step_is_pyros_trace_elbo_of_the_program():
    x = random_binary(40)
    data = DataSplits.from_tensors(x, x[:10])
    vae = build_vae(tiny_config(), data_dim=12)
    loop = TrainingLoop(vae, data, epochs=1, batch_size=20, lr=1e-3, objective="trace_elbo",
                        num_particles=1, seed=0, test_every=1, run_dir=None, config=None,
                        progress=False, beta=1.0, kl_warmup_epochs=0, checkpoint_every=0,
                        keep_last=0, clip_norm=None, on_divergence="stop", fused=False)
    batch = x[:20]
    torch.manual_seed(5)
    expected = Trace_ELBO().differentiable_loss(vae.model, vae.guide, batch)
    torch.manual_seed(5)
    assert loop.train_step(batch) == pytest.approx(expected.item(), rel=1e-6)
    names = {name for name, _ in vae.named_parameters()}
    assert len(loop.parameters) == len(names)  # every layer's weights are trained


# --- structure, config, checkpoint --------------------------------------------------------

def test_sites_and_widths_of_three_layers_come_from_the_config():
    vae = build_vae(TrainConfig(latent_dims=(6, 4, 2), hidden_dims=(10, 10)), data_dim=12)
    x = random_binary(5)
    structure = as_program(vae).structure(x)
    assert structure.latent_sites == ("z3", "z2", "z1") and structure.observed_sites == ("x",)
    trace = poutine.trace(vae.guide).get_trace(x)
    assert [trace.nodes[layer_site(i)]["value"].shape for i in (1, 2, 3)] == [
        (5, 6), (5, 4), (5, 2)]
    assert vae.latent_dims == (6, 4, 2) and vae.sample(3).shape == (3, 12)
    assert bool(torch.isfinite(log_marginal_likelihood(vae, x, 7)).all())


def test_the_preset_builds_burda2016s_two_layer_architecture():
    config = TrainConfig.from_preset("burda2016", latent_dims=[100, 50])
    assert config.latent_dims == (100, 50) and config.latent_dim == 50
    assert hierarchical_hidden_dims(config) == [(200, 200), (100, 100)]
    assert config.batch_size == 20 and config.output_bias_init == "data_mean"
    vae = build_vae(config, data_dim=784)
    shapes = {name: tuple(p.shape) for name, p in vae.named_parameters()}
    assert shapes["guide_layers.0.body.0.weight"] == (200, 784)
    assert shapes["guide_layers.0.loc_head.weight"] == (100, 200)
    assert shapes["guide_layers.1.body.0.weight"] == (100, 100)
    assert shapes["guide_layers.1.loc_head.weight"] == (50, 100)
    assert shapes["prior_layers.0.body.0.weight"] == (100, 50)
    assert shapes["prior_layers.0.loc_head.weight"] == (100, 100)
    assert shapes["decoder.body.0.weight"] == (200, 100)
    assert shapes["decoder.body.4.weight"] == (784, 200)
    # x-200-200-(100, 100), 100-100-100-(50, 50), 50-100-100-(100, 100), 100-200-200-784
    assert sum(p.numel() for p in vae.parameters()) == (
        784 * 200 + 200 + 200 * 200 + 200 + 2 * (200 * 100 + 100)
        + 100 * 100 + 100 + 100 * 100 + 100 + 2 * (100 * 50 + 50)
        + 50 * 100 + 100 + 100 * 100 + 100 + 2 * (100 * 100 + 100)
        + 100 * 200 + 200 + 200 * 200 + 200 + 200 * 784 + 784)
    assert TrainConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(("fields", "message"), [
    ({"latent_dims": ()}, "one or more positive"),
    ({"latent_dims": (4, 0)}, "one or more positive"),
    ({"net": "conv"}, "--net conv"),
    ({"guide": "iaf"}, "--guide iaf"),
    ({"prior": "vamp"}, "vamp prior"),
])
def test_settings_a_hierarchy_cannot_take_are_one_line_errors(fields, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**{"latent_dims": (4, 2), **fields})


def test_parts_of_disagreeing_widths_are_refused_by_name():
    layers = dict(guide_layers=[ConditionalNormal(12, 4), ConditionalNormal(4, 2)],
                  prior=StandardNormalPrior(2), decoder=MLPDecoder(4, 12, ()),
                  likelihood=GaussianLikelihood())
    with pytest.raises(ConfigError, match="prior layer 1 gives z1 of width 3, the guide's 4"):
        HierarchicalVAE(prior_layers=[ConditionalNormal(2, 3)], **layers)
    with pytest.raises(ConfigError, match="2 guide layers need 1 conditional prior layers"):
        HierarchicalVAE(prior_layers=[], **layers)
    with pytest.raises(ConfigError, match="gets no posterior"):
        HierarchicalVAE(**{**layers, "prior": VampPrior(2, 12, num_components=3)},
                        prior_layers=[ConditionalNormal(2, 4)])


def test_any_distribution_valued_module_is_a_layer():
    """q(z1 | x) as an encoder followed by an IAF guide family: the parts compose."""
    vae = HierarchicalVAE(
        guide_layers=[nn.Sequential(MLPEncoder(12, (8,)), IAFGuide(8, 4, num_flows=1)),
                      ConditionalNormal(4, 2, (6,))],
        prior_layers=[ConditionalNormal(2, 4, (6,))], prior=StandardNormalPrior(2),
        decoder=MLPDecoder(4, 12, (8,)), likelihood=GaussianLikelihood())
    x = torch.randn(6, 12)
    assert vae.latent_dims == (4, 2)
    bound = elbo(vae, x, num_samples=20).mean()
    assert bound < log_marginal_likelihood(vae, x, 200).mean()


def test_a_checkpoint_rebuilds_the_same_model(tmp_path):
    config = tiny_config()
    vae = build_vae(config, data_dim=12)
    with torch.no_grad():
        for parameter in vae.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    save_checkpoint(tmp_path / "checkpoint.pt", vae, None, epoch=1, config=config)
    loaded, loaded_config, _ = load_vae(tmp_path / "checkpoint.pt")
    assert isinstance(loaded, HierarchicalVAE) and loaded_config.latent_dims == (4, 2)
    x = random_binary(8)
    torch.manual_seed(3)
    expected = log_marginal_likelihood(vae, x, 30)
    torch.manual_seed(3)
    torch.testing.assert_close(log_marginal_likelihood(loaded, x, 30), expected)


# --- the command line ---------------------------------------------------------------------

def run_cli(capsys, *args: str) -> None:
    """``pyrovae ARGS`` in this process (test_cli.py runs the command as a subprocess)."""
    code = main(list(args))
    assert code == 0, capsys.readouterr().err


def test_train_evaluate_and_sample_a_two_layer_run_from_the_command_line(tmp_path, capsys):
    rng = np.random.default_rng(0)
    images = (rng.random((240, 6, 6)) < np.linspace(0.1, 0.9, 36).reshape(6, 6))
    np.savez(tmp_path / "tiny.npz", train=images[:200].astype(np.float32),
             test=images[200:].astype(np.float32))
    run_dir = tmp_path / "run"
    run_cli(capsys, "train", "--dataset", f"npz:{tmp_path / 'tiny.npz'}", "--binarize", "none",
            "--latent-dims", "4", "2", "--hidden-dims", "8", "--epochs", "2", "--batch-size", "50",
            "--eval-samples", "30", "--no-progress", "--out-dir", str(run_dir))
    results = json.loads((run_dir / "results.json").read_text())
    assert results["config"]["latent_dims"] == [4, 2]
    assert results["test_elbo"] < results["log_marginal_likelihood"] < 0
    assert (run_dir / "samples.png").is_file()

    run_cli(capsys, "evaluate", str(run_dir), "-k", "40", "--device", "cpu",
            "-o", str(tmp_path / "eval.json"))
    values = json.loads((tmp_path / "eval.json").read_text())
    assert values["num_samples"] == 40 and values["test_elbo"] < values["log_marginal_likelihood"]

    report_dir = tmp_path / "report"
    report_dir.mkdir()
    run_cli(capsys, "evaluate", str(run_dir), "--report", "--ks", "1,10", "--ais-temperatures",
            "20", "--ais-chains", "2", "--device", "cpu", "-o", str(report_dir))
    report = json.loads((report_dir / "report.json").read_text())
    assert report

    run_cli(capsys, "sample", str(run_dir), "-n", "4", "-o", str(tmp_path / "grid.png"),
            "--device", "cpu")
    from PIL import Image

    with Image.open(tmp_path / "grid.png") as image:  # 2 x 2 grid of 6-pixel images, x14
        assert image.size == (14 * (2 * 6 + 3 * 2), 14 * (2 * 6 + 3 * 2))
