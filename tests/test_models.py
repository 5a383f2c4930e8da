"""The VAE as a Pyro model/guide pair: sites, shapes, parameters, user methods."""

from __future__ import annotations

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO

from pyrovae import (
    VAE,
    BernoulliLikelihood,
    DiagonalNormalGuide,
    MLPDecoder,
    MLPEncoder,
    StandardNormalPrior,
)
from pyrovae.errors import ConfigError, InvalidDataError
from pyrovae.sites import DATA_PLATE, LATENT_SITE, OBSERVED_SITE
from tests.linear_gaussian import exact_log_marginal, linear_gaussian_vae, sample_data


def small_vae(data_dim: int = 12, latent_dim: int = 3) -> VAE:
    return VAE(
        encoder=MLPEncoder(data_dim, (8,)),
        decoder=MLPDecoder(latent_dim, data_dim, (8,)),
        prior=StandardNormalPrior(latent_dim),
        likelihood=BernoulliLikelihood(),
        guide=DiagonalNormalGuide(8, latent_dim),
    )


def binary_data(n: int = 6, data_dim: int = 12) -> torch.Tensor:
    return torch.bernoulli(torch.full((n, data_dim), 0.3))


def test_model_and_guide_sites_live_in_the_data_plate():
    vae = small_vae()
    x = binary_data()
    guide_trace = poutine.trace(vae.guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(x)
    z_site = guide_trace.nodes[LATENT_SITE]
    assert z_site["value"].shape == (6, 3)
    assert [frame.name for frame in z_site["cond_indep_stack"]] == [DATA_PLATE]
    x_site = model_trace.nodes[OBSERVED_SITE]
    assert x_site["is_observed"] and torch.equal(x_site["value"], x)
    assert x_site["fn"].event_shape == (12,) and x_site["fn"].batch_shape == (6,)
    assert model_trace.nodes[LATENT_SITE]["fn"].batch_shape == (6,)


def test_pyro_sees_every_network_parameter():
    vae = small_vae()
    x = binary_data()
    with poutine.trace(param_only=True) as param_capture:
        Trace_ELBO().differentiable_loss(vae.model, vae.guide, x)
    seen = {site["value"].unconstrained() for site in param_capture.trace.nodes.values()}
    assert {id(p) for p in vae.parameters()} == {id(p) for p in seen}


def test_two_vaes_in_one_process_keep_their_own_parameters():
    first, second = small_vae(), small_vae()
    before = {name: value.clone() for name, value in second.state_dict().items()}
    svi = SVI(first.model, first.guide, pyro.optim.Adam({"lr": 0.1}), Trace_ELBO())
    x = binary_data()
    svi.step(x)
    svi.step(x)
    for name, value in second.state_dict().items():
        assert torch.equal(value, before[name]), name
    names = list(pyro.get_param_store().keys())
    assert names and all(name.startswith(first._pyro_name + ".") for name in names)
    assert first._pyro_name != second._pyro_name


def test_trace_elbo_of_the_exact_posterior_is_minus_log_marginal():
    vae = linear_gaussian_vae()
    x = sample_data(vae, 10)
    loss = Trace_ELBO().loss(vae.model, vae.guide, x)
    assert loss == pytest.approx(-exact_log_marginal(vae, x).sum().item(), abs=1e-6)


def test_user_methods_have_the_documented_shapes():
    vae = small_vae()
    x = binary_data(5)
    q = vae.encode(x)
    assert q.mean.shape == (5, 3) and q.event_shape == (3,)
    reconstruction = vae.reconstruct(x)
    assert reconstruction.shape == (5, 12)
    assert bool(((reconstruction > 0) & (reconstruction < 1)).all())
    assert vae.sample(7).shape == (7, 12)


def test_user_methods_refuse_bad_data():
    vae = small_vae()
    with pytest.raises(InvalidDataError, match="binary"):
        vae.reconstruct(torch.full((2, 12), 0.5))
    with pytest.raises(InvalidDataError, match="expects 12"):
        vae.encode(torch.zeros(2, 10))
    with pytest.raises(ValueError, match="num_samples"):
        vae.sample(0)


def test_mismatched_latent_dims_are_refused():
    with pytest.raises(ValueError, match="latent_dim"):
        VAE(MLPEncoder(4, (3,)), MLPDecoder(2, 4), StandardNormalPrior(2), BernoulliLikelihood(),
            DiagonalNormalGuide(3, 5))


def test_a_guide_narrower_or_wider_than_the_encoders_features_is_refused():
    for width in (7, 9):
        with pytest.raises(ConfigError, match=f"width {width} but the encoder gives 8: build "
                                              "the guide with feature_dim=8"):
            VAE(MLPEncoder(12, (8,)), MLPDecoder(3, 12, (8,)), StandardNormalPrior(3),
                BernoulliLikelihood(), DiagonalNormalGuide(width, 3))


def test_an_encoder_that_does_not_say_its_width_is_accepted():
    # a plain module has no feature_dim: nothing to check against
    vae = VAE(torch.nn.Linear(12, 8), MLPDecoder(3, 12, (8,)), StandardNormalPrior(3),
              BernoulliLikelihood(), DiagonalNormalGuide(8, 3))
    assert vae.posterior(binary_data()).batch_shape == (6,)
