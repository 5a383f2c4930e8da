"""Likelihoods: densities that normalize, true means, support checks, learned per-pixel sigma."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO

from pyrovae import TrainConfig, build_vae
from pyrovae.errors import InvalidDataError
from pyrovae.likelihoods import (
    LIKELIHOODS,
    BernoulliLikelihood,
    ContinuousBernoulliLikelihood,
    PixelGaussianLikelihood,
)

LOGITS = torch.tensor([-6.0, -2.0, -0.3, 0.0, 1e-4, 0.7, 3.0, 8.0], dtype=torch.float64)


def unit_interval(points: int = 20001) -> torch.Tensor:
    return torch.linspace(0.0, 1.0, points, dtype=torch.float64)


def test_the_continuous_bernoulli_is_a_density_on_the_unit_interval():
    x = unit_interval()
    likelihood = ContinuousBernoulliLikelihood()
    # one pixel per logit, every grid value scored against every logit
    log_density = likelihood(LOGITS[:, None, None]).log_prob(x[None, :, None])  # (8, grid)
    density = log_density.exp()
    integrals = torch.trapezoid(density, x, dim=-1)
    torch.testing.assert_close(integrals, torch.ones_like(integrals), atol=1e-6, rtol=0)
    # the mean is E[x], not sigmoid(logit) as a Bernoulli would have it
    means = torch.trapezoid(density * x, x, dim=-1)
    torch.testing.assert_close(likelihood.mean(LOGITS), means, atol=1e-6, rtol=0)
    assert (likelihood.mean(LOGITS[[1, 6]]) - torch.sigmoid(LOGITS[[1, 6]])).abs().min() > 0.05


def test_the_continuous_bernoulli_at_logit_zero_is_uniform():
    likelihood = ContinuousBernoulliLikelihood()
    x = torch.rand(5, 784)
    torch.testing.assert_close(likelihood(torch.zeros(5, 784)).log_prob(x), torch.zeros(5))


@pytest.mark.parametrize("bad", [-0.01, 1.01, 255.0])
def test_the_continuous_bernoulli_refuses_data_outside_the_unit_interval(bad):
    x = torch.rand(3, 6)
    x[1, 2] = bad
    with pytest.raises(InvalidDataError, match=r"\[0, 1\]"):
        ContinuousBernoulliLikelihood().check_support(x)


def test_the_continuous_bernoulli_accepts_grey_levels_and_the_end_points():
    x = torch.rand(3, 6)
    x[0, 0], x[0, 1] = 0.0, 1.0
    ContinuousBernoulliLikelihood().check_support(x)
    with pytest.raises(InvalidDataError, match="binary"):
        BernoulliLikelihood().check_support(x)


def test_a_vae_with_the_continuous_bernoulli_refuses_bad_data():
    vae = build_vae(TrainConfig(hidden_dims=(4,), latent_dim=2, likelihood="continuous_bernoulli"),
                    data_dim=6)
    with pytest.raises(InvalidDataError, match=r"\[0, 1\]"):
        vae.encode(torch.full((2, 6), 2.0))


def test_the_per_pixel_gaussian_is_a_product_of_normals_with_their_own_sigma():
    likelihood = PixelGaussianLikelihood(data_dim=3, sigma=0.5)
    likelihood.sigma = torch.tensor([0.1, 1.0, 3.0])
    params, x = torch.randn(4, 3), torch.randn(4, 3)
    expected = sum(dist.Normal(params[:, d], s).log_prob(x[:, d])
                   for d, s in enumerate((0.1, 1.0, 3.0)))
    torch.testing.assert_close(likelihood(params).log_prob(x), expected)
    assert torch.equal(likelihood.mean(params), params)


def test_the_per_pixel_sigma_learns_each_pixel_separately():
    config = TrainConfig(hidden_dims=(4,), latent_dim=2, likelihood="gaussian_pixel", sigma=1.0)
    vae = build_vae(config, data_dim=3)
    assert vae.likelihood.sigma.shape == (3,)
    # pixel 0 is constant, pixel 2 varies widely: their sigmas must move apart
    x = torch.stack([torch.zeros(64), torch.randn(64) * 0.3, torch.randn(64) * 5.0], dim=1)
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(60):
        svi.step(x)
    sigma = vae.likelihood.sigma.detach()
    assert sigma[0] < 0.5 < 2.0 < sigma[2], sigma


def test_the_per_pixel_sigma_has_a_floor():
    likelihood = PixelGaussianLikelihood(data_dim=2, sigma=1.0, min_sigma=1e-3)
    with torch.no_grad():
        likelihood.sigma_unconstrained.fill_(-1e3)  # far below the floor in unconstrained space
    assert float(likelihood.sigma.detach().min()) >= 1e-3
    log_density = likelihood(torch.zeros(2)).log_prob(torch.zeros(2))
    assert log_density.item() == pytest.approx(2 * (-math.log(1e-3) - 0.5 * math.log(2 * math.pi)),
                                               rel=1e-4)
    with pytest.raises(ValueError, match="min_sigma"):
        PixelGaussianLikelihood(data_dim=2, sigma=1e-4, min_sigma=1e-3)


@pytest.mark.parametrize("name", sorted(LIKELIHOODS))
def test_every_likelihood_has_the_event_shape_of_a_data_point(name):
    config = TrainConfig(hidden_dims=(4,), latent_dim=2, likelihood=name)
    likelihood = build_vae(config, data_dim=5).likelihood
    p = likelihood(torch.zeros(3, 2, 5))
    assert p.event_shape == (5,) and p.batch_shape == (3, 2)
    assert likelihood.mean(torch.zeros(3, 2, 5)).shape == (3, 2, 5)
