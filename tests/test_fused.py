"""The fused ELBO is Pyro's Trace_ELBO / TraceMeanField_ELBO, evaluated without tracing."""

from __future__ import annotations

import pytest
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from pyrovae import TrainConfig, build_vae, fit
from pyrovae.data import DataSplits
from pyrovae.evaluation import importance_log_weights, log_weights
from pyrovae.fused import fused_elbo_loss, fused_log_weights, supports_fused
from pyrovae.guides import GUIDES
from pyrovae.likelihoods import LIKELIHOODS
from pyrovae.objectives import LatentScale
from pyrovae.priors import PRIORS

PYRO_ELBOS = {"trace_elbo": Trace_ELBO, "meanfield_elbo": TraceMeanField_ELBO}


def small_vae(prior: str = "normal", guide: str = "diagonal"):
    torch.manual_seed(0)
    config = TrainConfig(hidden_dims=(8,), latent_dim=3, prior=prior, guide=guide, num_components=3)
    return build_vae(config, data_dim=12)


def data(n: int = 7) -> torch.Tensor:
    return torch.bernoulli(torch.full((n, 12), 0.3, dtype=torch.float32),
                           generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("num_particles", [1, 3])
@pytest.mark.parametrize("objective", list(PYRO_ELBOS))
@pytest.mark.parametrize("guide", list(GUIDES))
@pytest.mark.parametrize("prior", list(PRIORS))
def test_same_value_and_gradient_as_pyro(prior, guide, objective, num_particles):
    vae, x = small_vae(prior, guide), data()
    vae.prior.init_from_data(x)
    elbo = PYRO_ELBOS[objective](num_particles=num_particles,
                                 vectorize_particles=num_particles > 1, max_plate_nesting=1)
    torch.manual_seed(5)
    expected = elbo.differentiable_loss(vae.model, vae.guide, x)
    expected_grads = torch.autograd.grad(expected, list(vae.parameters()), allow_unused=True)
    torch.manual_seed(5)
    fused = fused_elbo_loss(vae, x, num_particles=num_particles,
                            analytic_kl=objective == "meanfield_elbo")
    grads = torch.autograd.grad(fused, list(vae.parameters()), allow_unused=True)
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-4)
    for got, want in zip(grads, expected_grads, strict=True):
        if want is None:
            assert got is None or not bool(got.any())
        else:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("guide", list(GUIDES))
@pytest.mark.parametrize("prior", list(PRIORS))
def test_importance_weights_are_those_of_the_traced_model_and_guide(prior, guide):
    vae, x = small_vae(prior, guide), data()
    vae.prior.init_from_data(x)
    torch.manual_seed(4)
    with torch.no_grad():
        traced = log_weights(vae.model, vae.guide, x, 6)
    torch.manual_seed(4)
    with torch.no_grad():
        fused = fused_log_weights(vae, x, 6)
    assert fused.shape == traced.shape == (6, 7)
    torch.testing.assert_close(fused, traced, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("likelihood", list(LIKELIHOODS))
def test_importance_weights_match_for_every_likelihood(likelihood):
    torch.manual_seed(0)
    config = TrainConfig(hidden_dims=(8,), latent_dim=3, likelihood=likelihood, learn_sigma=True)
    vae = build_vae(config, data_dim=12)
    x = torch.rand(5, 12, generator=torch.Generator().manual_seed(2))
    if likelihood == "bernoulli":
        x = torch.bernoulli(x)
    torch.manual_seed(4)
    with torch.no_grad():
        traced = log_weights(vae.model, vae.guide, x, 3)
    torch.manual_seed(4)
    torch.testing.assert_close(importance_log_weights(vae, x, 3), traced, rtol=1e-5, atol=1e-4)


def test_beta_matches_pyro_with_a_scaled_latent_site():
    vae, x = small_vae(), data()
    scale = LatentScale(beta=0.3)
    torch.manual_seed(2)
    expected = Trace_ELBO().differentiable_loss(scale(vae.model), scale(vae.guide), x)
    torch.manual_seed(2)
    torch.testing.assert_close(fused_elbo_loss(vae, x, beta=0.3), expected, rtol=1e-5, atol=1e-4)


def test_other_objectives_take_the_pyro_path():
    vae, x = small_vae(), data()
    assert supports_fused(vae, "trace_elbo", x)
    assert not supports_fused(vae, "iwae", x)


def test_training_with_and_without_fusion_follows_the_same_path():
    x = data(64)
    split = DataSplits.from_tensors(x)
    results = []
    for fused in (True, False):
        vae = small_vae()
        history = fit(vae, split, epochs=2, batch_size=16, seed=3, progress=False, fused=fused)
        results.append((vae.state_dict(), [record.train_elbo for record in history]))
    (fused_state, fused_elbos), (pyro_state, pyro_elbos) = results
    assert fused_elbos == pytest.approx(pyro_elbos, rel=1e-5)
    for name, value in fused_state.items():
        torch.testing.assert_close(value, pyro_state[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("analytic_kl", [False, True])
@pytest.mark.parametrize("num_particles", [1, 3])
def test_the_standard_vae_shortcut_is_the_general_path(monkeypatch, analytic_kl, num_particles):
    import pyrovae.fused as fused

    vae, x = small_vae(), data()
    assert fused._is_the_standard_vae(vae)  # the default VAE takes the shortcut
    assert not fused._is_the_standard_vae(small_vae(prior="mog"))
    results = []
    for shortcut in (True, False):
        if not shortcut:
            monkeypatch.setattr(fused, "_is_the_standard_vae", lambda vae: False)
        torch.manual_seed(5)
        loss = fused_elbo_loss(vae, x, num_particles=num_particles, beta=0.7,
                               analytic_kl=analytic_kl)
        grads = torch.autograd.grad(loss, list(vae.parameters()), allow_unused=True)
        torch.manual_seed(5)
        with torch.no_grad():
            weights = fused_log_weights(vae, x, 4)
        results.append((loss, grads, weights))
    (loss, grads, weights), (general_loss, general_grads, general_weights) = results
    torch.testing.assert_close(loss, general_loss, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(weights, general_weights, rtol=1e-6, atol=1e-5)
    for got, want in zip(grads, general_grads, strict=True):
        if want is not None:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
