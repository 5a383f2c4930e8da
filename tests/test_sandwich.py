"""Bidirectional Monte Carlo against the exact marginal of linear-Gaussian models."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyrovae import ProgramError
from pyrovae.evaluation import mean_and_standard_error
from pyrovae.sandwich import bidirectional_monte_carlo, simulate
from tests.linear_gaussian import exact_log_marginal, linear_gaussian_vae, sample_data
from tests.test_evaluation import mismatched_vae
from tests.test_programs import TwoLayerLinearGaussian


def test_simulated_pairs_follow_the_model():
    vae = linear_gaussian_vae(sigma=0.5)
    simulation = simulate(vae, torch.zeros(4000, 5, dtype=torch.float64), seed=0)
    (x,), z = simulation.data, simulation.latents
    assert x.shape == (4000, 5) and z.shape == (4000, 2) and simulation.sites == ("z",)
    linear = vae.decoder.body[0]
    residual = x - z @ linear.weight.detach().T - linear.bias.detach()
    # z ~ N(0, I) and x - (W z + b) ~ N(0, 0.5^2 I): each std within 5% of 4000 draws
    torch.testing.assert_close(z.std(0), torch.ones(2, dtype=torch.float64), atol=0.05, rtol=0)
    torch.testing.assert_close(residual.std(0), torch.full((5,), 0.5, dtype=torch.float64),
                               atol=0.025, rtol=0)
    again = simulate(vae, torch.zeros(4000, 5, dtype=torch.float64), seed=0)
    assert torch.equal(again.latents, z)


def test_from_the_exact_posterior_both_bounds_are_exact():
    # every tempered density is p(z|x) p(x)^beta: each forward and reverse weight is p(x)^{+-1}
    vae = linear_gaussian_vae()
    result = bidirectional_monte_carlo(vae, sample_data(vae, 6), num_temperatures=6,
                                       num_chains=3, num_leapfrog_steps=2, seed=0)
    exact = exact_log_marginal(vae, result.simulation.data[0])
    torch.testing.assert_close(result.lower, exact, atol=1e-8, rtol=0)
    torch.testing.assert_close(result.upper, exact, atol=1e-8, rtol=0)
    assert result.reverse_log_weights.shape == (3, 6)


def test_with_one_temperature_the_upper_bound_exceeds_log_px_by_the_reverse_kl():
    # T = 1: upper = log p(x, z) - log q(z|x) at z ~ p(z|x), on average log p(x) + KL(p || q)
    vae = mismatched_vae(inflate=2.5)
    result = bidirectional_monte_carlo(vae, sample_data(vae, 400), 400, num_temperatures=1,
                                       num_chains=2, seed=0)
    x = result.simulation.data[0]
    with torch.no_grad():
        posterior = linear_gaussian_vae().guide_family(x)  # the exact p(z|x)
        guide = vae.encode(x)
        kl = torch.distributions.kl_divergence(posterior, dist.MultivariateNormal(
            guide.mean, scale_tril=torch.diag_embed(guide.stddev)))
    excess = mean_and_standard_error(result.upper - exact_log_marginal(vae, x))
    assert abs(excess.mean - float(kl.mean())) < 3 * excess.standard_error
    assert float(kl.mean()) > 0.5  # the guide is far from the posterior: a real test


def test_the_bounds_bracket_log_px_and_close_as_temperatures_grow():
    vae = mismatched_vae(inflate=2.5)
    template = sample_data(vae, 40)
    gaps = {}
    for num_temperatures in (5, 100):
        result = bidirectional_monte_carlo(vae, template, 40, num_temperatures=num_temperatures,
                                           num_chains=4, num_leapfrog_steps=2, seed=1)
        exact = exact_log_marginal(vae, result.simulation.data[0])
        below = mean_and_standard_error(exact - result.lower)
        above = mean_and_standard_error(result.upper - exact)
        # lower <= exact <= upper, each on average up to three standard errors over points
        assert below.mean > -3 * below.standard_error, (num_temperatures, below)
        assert above.mean > -3 * above.standard_error, (num_temperatures, above)
        gaps[num_temperatures] = result.summary()["gap_mean"]
    # measured: 5 temperatures about 1.1 nats, 100 about 0.2
    assert gaps[5] > 0.5
    assert gaps[100] < 0.4 * gaps[5]


def test_a_two_layer_hierarchy_is_sandwiched():
    hierarchy = TwoLayerLinearGaussian(inflate=1.3)
    program = (hierarchy.model, hierarchy.guide)
    result = bidirectional_monte_carlo(program, hierarchy.sample(60), num_temperatures=10,
                                       num_chains=4, num_leapfrog_steps=2, seed=0)
    assert result.simulation.latents.shape == (60, 5)  # z2 (2) then z1 (3), in program order
    assert result.simulation.sites == ("z2", "z1")
    exact = hierarchy.exact_log_marginal(result.simulation.data[0])
    for difference in (exact - result.lower, result.upper - exact):
        estimate = mean_and_standard_error(difference)
        assert estimate.mean > -3 * estimate.standard_error, estimate
    # measured on 200 points: gap 0.13 nats at T = 30 (0.39 at T = 1); the bracket, not the
    # gap, is what this test is for
    assert 0 < result.summary()["gap_mean"] < 0.5


def test_same_seed_same_bounds():
    vae = mismatched_vae()
    x = sample_data(vae, 5)
    first, second = (bidirectional_monte_carlo(vae, x, num_temperatures=4, num_chains=2, seed=7)
                     for _ in range(2))
    assert torch.equal(first.upper, second.upper) and torch.equal(first.lower, second.lower)


def test_programs_that_cannot_be_simulated_in_one_run_are_refused():
    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(torch.zeros(x.shape[0]), 1.0))

    def reads_x(x):  # the observation's mean depends on x itself
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(x.shape[0]), 1.0))
            pyro.sample("x", dist.Normal(z + x.mean(), 1.0), obs=x)

    def observes_a_constant(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(x.shape[0]), 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)
            pyro.sample("c", dist.Normal(z, 1.0), obs=torch.full((x.shape[0],), 3.0))

    x = torch.randn(6)
    with pytest.raises(ProgramError, match="depends on the data arguments"):
        simulate((reads_x, guide), x, seed=0)
    with pytest.raises(ProgramError, match="'c' observes no data argument"):
        simulate((observes_a_constant, guide), x, seed=0)
    with pytest.raises(ValueError, match="num_points"):
        simulate((reads_x, guide), x, 7)
