"""Annealed importance sampling against the exact marginal of the linear-Gaussian VAE."""

from __future__ import annotations

import pytest
import torch

from pyrovae import importance_log_weights
from pyrovae.ais import ais_log_marginal_likelihood, temperature_schedule
from tests.linear_gaussian import exact_log_marginal, linear_gaussian_vae, sample_data
from tests.test_evaluation import mismatched_vae


def monte_carlo_error(result) -> float:
    return float(result.standard_error.pow(2).sum().sqrt()) / result.standard_error.numel()


def test_from_the_exact_posterior_every_chain_weight_is_exact():
    # every tempered density q^(1-b) p(x,z)^b is then p(z|x) p(x)^b: the weights sum to log p(x)
    vae = linear_gaussian_vae()
    x = sample_data(vae, 6)
    result = ais_log_marginal_likelihood(vae, x, num_temperatures=8, num_chains=3)
    exact = exact_log_marginal(vae, x)
    torch.testing.assert_close(result.log_weights, exact.expand(3, 6), atol=1e-8, rtol=0)
    assert result.log_marginal_likelihood.shape == (6,)
    assert result.samples.shape == (3, 6, 2)


def test_one_temperature_is_importance_sampling_from_the_guide():
    vae = mismatched_vae()
    x = sample_data(vae, 5)
    torch.manual_seed(3)
    result = ais_log_marginal_likelihood(vae, x, num_temperatures=1, num_chains=10)
    torch.manual_seed(3)
    torch.testing.assert_close(result.log_weights, importance_log_weights(vae, x, num_samples=10))


def test_more_temperatures_from_the_prior_get_closer_to_the_exact_value():
    vae = linear_gaussian_vae()
    x = sample_data(vae, 20)
    exact = exact_log_marginal(vae, x)
    gaps = {}
    for num_temperatures in (3, 60):
        result = ais_log_marginal_likelihood(vae, x, num_temperatures=num_temperatures,
                                             num_chains=8, num_leapfrog_steps=3, initial="prior")
        gaps[num_temperatures] = float((result.log_marginal_likelihood - exact).mean())
    # AIS is a stochastic lower bound: both below, the longer anneal much closer
    assert gaps[3] < -0.5
    assert gaps[3] < gaps[60] < 0.1
    assert abs(gaps[60]) < 0.5 * abs(gaps[3])


def test_estimate_from_a_mismatched_guide_is_within_its_reported_error():
    vae = mismatched_vae(inflate=2.5)
    x = sample_data(vae, 30)
    result = ais_log_marginal_likelihood(vae, x, num_temperatures=40, num_chains=16,
                                         num_leapfrog_steps=3)
    difference = float((result.log_marginal_likelihood - exact_log_marginal(vae, x)).mean())
    assert abs(difference) < 3 * monte_carlo_error(result) + 0.02
    assert 0.3 < float(result.acceptance_rate.mean()) < 1.0


def test_final_states_follow_the_posterior():
    vae = linear_gaussian_vae()
    x = sample_data(vae, 10)
    result = ais_log_marginal_likelihood(vae, x, num_temperatures=40, num_chains=32,
                                         num_leapfrog_steps=3, initial="prior")
    posterior = vae.posterior(x)
    error = (result.samples.mean(0) - posterior.mean) / posterior.stddev
    # the mean of 32 posterior draws is off by about 1/sqrt(32) = 0.18 posterior std
    assert float(error.pow(2).mean().sqrt()) < 0.4


def test_step_size_adapts_towards_the_target_acceptance():
    vae = mismatched_vae()
    x = sample_data(vae, 4)
    result = ais_log_marginal_likelihood(vae, x, num_temperatures=100, num_chains=8,
                                         num_leapfrog_steps=2, step_size=2.0)
    assert bool((result.step_size < 2.0).all())
    fixed = ais_log_marginal_likelihood(vae, x, num_temperatures=100, num_chains=8,
                                        num_leapfrog_steps=2, step_size=2.0,
                                        adapt_step_size=False)
    assert float(result.acceptance_rate.mean()) > float(fixed.acceptance_rate.mean())
    torch.testing.assert_close(fixed.step_size, torch.full((4,), 2.0, dtype=torch.float64))


def test_same_seed_gives_identical_estimates_and_batches_do_not_mix_points():
    vae = mismatched_vae()
    x = sample_data(vae, 6)
    runs = []
    for batch_size in (6, 6, 3):
        torch.manual_seed(9)
        runs.append(ais_log_marginal_likelihood(vae, x, num_temperatures=10, num_chains=4,
                                                batch_size=batch_size))
    assert torch.equal(runs[0].log_marginal_likelihood, runs[1].log_marginal_likelihood)
    assert bool(torch.isfinite(runs[2].log_marginal_likelihood).all())


@pytest.mark.parametrize("schedule", ["sigmoid", "linear", "geometric"])
def test_schedules_run_from_zero_to_one_increasing(schedule):
    betas = temperature_schedule(50, schedule)
    assert betas.shape == (51,)
    assert float(betas[0]) == 0.0 and float(betas[-1]) == pytest.approx(1.0)
    assert bool((betas.diff() > 0).all())


@pytest.mark.parametrize("kwargs, message", [
    ({"num_temperatures": 0}, "num_temperatures"),
    ({"num_chains": 0}, "num_chains"),
    ({"step_size": 0.0}, "step_size"),
    ({"initial": "posterior"}, "initial"),
    ({"schedule": "cosine"}, "schedule"),
])
def test_bad_settings_are_refused(kwargs, message):
    vae = linear_gaussian_vae()
    with pytest.raises(ValueError, match=message):
        ais_log_marginal_likelihood(vae, sample_data(vae, 2), **kwargs)
