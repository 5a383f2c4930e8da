"""Every prior x guide x likelihood in the registries composes, trains one step and scores.

Also: each registry entry builds from a :class:`TrainConfig`, the config fields of the new
families reach the parts, and the CLI trains a non-default combination end to end.
"""

from __future__ import annotations

import itertools
import json
import math

import pyro
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO

from pyrovae import TrainConfig, build_vae, log_marginal_likelihood
from pyrovae.errors import ConfigError
from pyrovae.guides import GUIDES, IAFGuide, LowRankNormalGuide
from pyrovae.likelihoods import LIKELIHOODS, PixelGaussianLikelihood
from pyrovae.objectives import OBJECTIVES, make_objective
from pyrovae.priors import PRIORS, FlowPrior, MixtureOfGaussiansPrior, VampPrior
from tests.conftest import SHARED_DATA, requires_mnist

DATA_DIM = 12
#: the discretized likelihoods differ from the others only in what they score: each meets every
#: prior (with the diagonal guide) and every guide (with the normal prior)
DISCRETIZED = [name for name in LIKELIHOODS if name.startswith("discretized")]
COMBINATIONS = list(itertools.product(PRIORS, GUIDES, [name for name in LIKELIHOODS
                                                       if name not in DISCRETIZED]))
COMBINATIONS += [(prior, guide, likelihood) for likelihood in DISCRETIZED
                 for prior, guide in sorted({*((prior, "diagonal") for prior in PRIORS),
                                             *(("normal", guide) for guide in GUIDES)})]


def small_config(**values) -> TrainConfig:
    defaults = {"hidden_dims": (8,), "latent_dim": 3, "num_components": 3}
    return TrainConfig(**{**defaults, **values})


def data_for(likelihood: str, n: int = 8) -> torch.Tensor:
    grey = torch.rand(n, DATA_DIM)
    if likelihood.startswith("discretized"):
        return torch.round(grey * 255) / 255  # 8-bit values
    return torch.bernoulli(grey) if likelihood == "bernoulli" else grey


def test_the_registries_hold_the_families():
    assert set(PRIORS) == {"normal", "diagonal", "mog", "vamp", "flow"}
    assert set(GUIDES) == {"diagonal", "fullcov", "lowrank", "iaf"}
    assert set(LIKELIHOODS) == {"bernoulli", "bernoulli_grey", "continuous_bernoulli", "gaussian",
                                "gaussian_pixel", "discretized_logistic",
                                "discretized_logistic_mixture", "discretized_gaussian"}
    assert set(OBJECTIVES) == {"trace_elbo", "meanfield_elbo", "iwae", "stl_elbo", "iwae_dreg"}


@pytest.mark.parametrize("prior, guide, likelihood", COMBINATIONS)
def test_one_svi_step_and_log_marginal_for_every_combination(prior, guide, likelihood):
    vae = build_vae(small_config(prior=prior, guide=guide, likelihood=likelihood),
                    data_dim=DATA_DIM)
    x = data_for(likelihood)
    vae.prior.init_from_data(x)
    before = {name: value.detach().clone() for name, value in vae.named_parameters()}
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    loss = svi.step(x)
    assert math.isfinite(loss)
    moved = [name for name, value in vae.named_parameters() if not torch.equal(value, before[name])]
    assert any(name.startswith("guide_family.") for name in moved)
    assert any(name.startswith("decoder.") for name in moved)
    log_px = log_marginal_likelihood(vae, x, num_samples=4)
    assert log_px.shape == (8,)
    assert bool(torch.isfinite(log_px).all())


@pytest.mark.parametrize("prior", sorted(PRIORS))
@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_every_objective_trains_every_prior_with_the_iaf_guide(prior, objective):
    vae = build_vae(small_config(prior=prior, guide="iaf"), data_dim=DATA_DIM)
    x = data_for("bernoulli")
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-2}), make_objective(objective, 3))
    assert math.isfinite(svi.step(x))


@pytest.mark.parametrize("prior, guide", [
    ("mog", "diagonal"), ("vamp", "diagonal"), ("flow", "diagonal"),
    ("normal", "fullcov"), ("normal", "lowrank"), ("normal", "iaf"), ("vamp", "iaf"),
])
def test_meanfield_elbo_falls_back_to_monte_carlo_without_an_analytic_kl(prior, guide):
    vae = build_vae(small_config(prior=prior, guide=guide), data_dim=DATA_DIM)
    x = data_for("bernoulli")
    pyro.set_rng_seed(3)
    meanfield = TraceMeanField_ELBO().loss(vae.model, vae.guide, x)
    pyro.set_rng_seed(3)
    monte_carlo = Trace_ELBO().loss(vae.model, vae.guide, x)
    # no KL is registered for these pairs, so both are the same single-sample estimate
    assert meanfield == pytest.approx(monte_carlo, rel=1e-6)


def test_meanfield_elbo_still_uses_the_analytic_kl_where_there_is_one():
    vae = build_vae(small_config(prior="diagonal"), data_dim=DATA_DIM)
    x = data_for("bernoulli")
    pyro.set_rng_seed(3)
    meanfield = TraceMeanField_ELBO().loss(vae.model, vae.guide, x)
    pyro.set_rng_seed(3)
    monte_carlo = Trace_ELBO().loss(vae.model, vae.guide, x)
    assert meanfield != pytest.approx(monte_carlo, rel=1e-6)


def test_config_fields_reach_the_parts():
    config = small_config(prior="vamp", guide="lowrank", likelihood="gaussian_pixel",
                          num_components=5, rank=3, sigma=0.4, pseudo_inputs_from_data=False)
    vae = build_vae(config, data_dim=DATA_DIM)
    assert isinstance(vae.prior, VampPrior) and vae.prior.pseudo_inputs.shape == (5, DATA_DIM)
    assert not vae.prior.pseudo_inputs_from_data
    assert isinstance(vae.guide_family, LowRankNormalGuide) and vae.guide_family.rank == 3
    assert isinstance(vae.likelihood, PixelGaussianLikelihood)
    torch.testing.assert_close(vae.likelihood.sigma.detach(), torch.full((DATA_DIM,), 0.4))
    vae = build_vae(small_config(prior="mog", guide="iaf", num_components=4, num_flows=3),
                    data_dim=DATA_DIM)
    assert isinstance(vae.prior, MixtureOfGaussiansPrior) and vae.prior.locs.shape == (4, 3)
    assert isinstance(vae.guide_family, IAFGuide) and len(vae.guide_family.flows) == 3
    vae = build_vae(small_config(prior="flow", prior_flows=4), data_dim=DATA_DIM)
    assert isinstance(vae.prior, FlowPrior) and len(vae.prior.flows) == 4


@pytest.mark.parametrize("values, message", [
    ({"num_components": 0}, "num_components must be positive"),
    ({"rank": 0}, "rank must be positive"),
    ({"num_flows": -1}, "num_flows must be >= 0"),
    ({"prior_flows": -1}, "prior_flows must be >= 0"),
    ({"kl_warmup_epochs": -2}, "kl_warmup_epochs must be >= 0"),
    ({"beta": 0.0}, "beta must be positive"),
    ({"guide": "iaf", "latent_dim": 1}, "num_flows > 0 needs latent_dim >= 2"),
    ({"prior": "flow", "latent_dim": 1}, "prior_flows > 0 needs latent_dim >= 2"),
    ({"objective": "renyi"}, "unknown objective 'renyi'; known: trace_elbo, meanfield_elbo, iwae"),
])
def test_bad_values_of_the_new_fields_name_the_problem(values, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**values)


def test_the_iaf_guide_with_one_latent_dimension_and_no_flows_is_allowed():
    vae = build_vae(small_config(guide="iaf", latent_dim=1, num_flows=0), data_dim=DATA_DIM)
    assert len(vae.guide_family.flows) == 0


@requires_mnist
def test_the_cli_trains_and_evaluates_a_vampprior_iaf_vae(tmp_path, capsys):
    from pyrovae.cli import main

    run_dir = tmp_path / "run"
    assert main(["train", "--data-dir", str(SHARED_DATA), "--train-size", "100",
                 "--test-size", "20", "--epochs", "2", "--batch-size", "50",
                 "--hidden-dims", "32", "--latent-dim", "4", "--eval-samples", "5",
                 "--prior", "vamp", "--num-components", "5", "--guide", "iaf",
                 "--objective", "iwae", "--num-particles", "3", "--kl-warmup-epochs", "2",
                 "--no-progress", "--out-dir", str(run_dir)]) == 0
    results = json.loads((run_dir / "results.json").read_text())
    assert math.isfinite(results["log_marginal_likelihood"])
    assert results["config"]["prior"] == "vamp" and results["config"]["kl_warmup_epochs"] == 2
    assert main(["evaluate", str(run_dir), "--num-samples", "5", "--test-size", "10",
                 "--data-dir", str(SHARED_DATA)]) == 0
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    assert math.isfinite(evaluation["log_marginal_likelihood"])
    assert evaluation["num_test_points"] == 10
