"""Importance-sampled log p(x) against the exact marginal of the linear-Gaussian VAE."""

from __future__ import annotations

import math

import pyro
import pytest
import torch

from pyrovae import (
    DataSplits,
    DiagonalNormalGuide,
    TrainConfig,
    build_vae,
    elbo,
    importance_log_weights,
    log_marginal_likelihood,
)
from pyrovae.errors import InvalidDataError
from pyrovae.evaluation import elbo_terms, mean_and_standard_error
from tests.linear_gaussian import exact_log_marginal, linear_gaussian_vae, sample_data


def mismatched_guide(vae, inflate: float = 1.5) -> DiagonalNormalGuide:
    """A diagonal guide with the exact posterior mean but no correlations and ``inflate`` times
    the posterior's marginal standard deviations: wrong, yet with well-behaved weights."""
    exact = vae.guide_family
    data_dim, latent_dim = exact.gain.shape[1], exact.gain.shape[0]
    marginal_std = exact.scale_tril.pow(2).sum(-1).sqrt()
    guide = DiagonalNormalGuide(data_dim, latent_dim).double()
    with torch.no_grad():
        guide.loc_head.weight.copy_(exact.gain)
        guide.loc_head.bias.copy_(-exact.gain @ exact.bias)
        guide.scale_head.weight.zero_()
        # softplus^{-1}(s) = log(expm1(s)), so that scale = inflate * marginal std
        guide.scale_head.bias.copy_(torch.log(torch.expm1(inflate * marginal_std - 1e-4)))
    return guide


def mismatched_vae(inflate: float = 1.5):
    return linear_gaussian_vae(guide=mismatched_guide(linear_gaussian_vae(), inflate))


def test_exact_posterior_guide_gives_exact_log_marginal():
    vae = linear_gaussian_vae()
    x = sample_data(vae, 50)
    estimate = log_marginal_likelihood(vae, x, num_samples=10)
    assert estimate.shape == (50,)
    torch.testing.assert_close(estimate, exact_log_marginal(vae, x), atol=1e-4, rtol=0)


def test_every_importance_weight_is_exact_under_the_exact_posterior():
    vae = linear_gaussian_vae()
    x = sample_data(vae, 7)
    log_w = importance_log_weights(vae, x, num_samples=4)
    assert log_w.shape == (4, 7)
    torch.testing.assert_close(log_w, exact_log_marginal(vae, x).expand(4, 7), atol=1e-8, rtol=0)


def test_mismatched_guide_converges_within_three_standard_errors_at_k_5000():
    vae = mismatched_vae()
    x = sample_data(vae, 20)
    exact = exact_log_marginal(vae, x)
    log_w = importance_log_weights(vae, x, num_samples=5000)
    estimate = torch.logsumexp(log_w, 0) - math.log(5000)
    # delta method: var(log mean w) ~ var(w) / (K mean(w)^2), per point; then the mean
    weights = torch.exp(log_w - log_w.max(0).values)
    point_variance = weights.var(0) / weights.mean(0) ** 2 / 5000
    standard_error = point_variance.sum().sqrt() / len(x)
    assert abs(float((estimate - exact).mean())) < 3 * float(standard_error)
    # the mismatch is real: the ELBO is well below log p(x), so convergence is not trivial
    assert float((log_w.mean(0) - exact).mean()) < -0.1


def test_chunked_estimate_agrees_with_the_exact_value_too():
    vae = mismatched_vae()
    x = sample_data(vae, 20)
    estimate = log_marginal_likelihood(vae, x, num_samples=5000, chunk_size=700, batch_size=7)
    assert abs(float((estimate - exact_log_marginal(vae, x)).mean())) < 0.01


def test_bounds_order_elbo_below_iwae_rising_with_k_below_exact():
    vae = mismatched_vae(inflate=2.5)
    x = sample_data(vae, 400)
    exact = exact_log_marginal(vae, x)
    bounds = {"elbo": elbo(vae, x, num_samples=20)}
    for k in (5, 50, 500):
        bounds[k] = log_marginal_likelihood(vae, x, num_samples=k)

    def difference(upper, lower):
        return mean_and_standard_error(upper - lower)

    # strictly increasing where the gap is large against its paired standard error ...
    for upper, lower in ((5, "elbo"), (50, 5)):
        gap = difference(bounds[upper], bounds[lower])
        assert gap.mean > 3 * gap.standard_error, (upper, lower, gap)
    # ... never decreasing beyond noise, and never above log p(x) beyond noise
    gap = difference(bounds[500], bounds[50])
    assert gap.mean > -3 * gap.standard_error, gap
    gap = difference(exact, bounds[500])
    assert gap.mean > -3 * gap.standard_error, gap


def test_chunking_does_not_change_the_estimate():
    vae = mismatched_vae()
    x = sample_data(vae, 30)
    torch.manual_seed(5)
    whole = log_marginal_likelihood(vae, x, num_samples=64, batch_size=30, chunk_size=64)
    torch.manual_seed(5)
    # same random stream consumed in the same order: one batch, chunks of 64 vs chunk 16
    chunked = log_marginal_likelihood(vae, x, num_samples=64, batch_size=30, chunk_size=16)
    # different chunking draws different samples, so compare within Monte Carlo error
    assert (whole - chunked).abs().max() < 0.2
    # batches over data points: identical draws give identical answers per point
    torch.manual_seed(7)
    one = log_marginal_likelihood(vae, x[:10], num_samples=64, batch_size=10)
    torch.manual_seed(7)
    split = log_marginal_likelihood(vae, x, num_samples=64, batch_size=10)[:10]
    torch.testing.assert_close(one, split)


def test_estimate_is_a_logsumexp_of_the_weights_for_one_chunk():
    vae = mismatched_vae()
    x = sample_data(vae, 8)
    torch.manual_seed(11)
    log_w = importance_log_weights(vae, x, num_samples=100)
    torch.manual_seed(11)
    estimate = log_marginal_likelihood(vae, x, num_samples=100, chunk_size=100)
    torch.testing.assert_close(estimate, torch.logsumexp(log_w, 0) - math.log(100))


def test_same_seed_gives_identical_estimates():
    vae = mismatched_vae()
    x = sample_data(vae, 8)
    torch.manual_seed(2)
    first = log_marginal_likelihood(vae, x, num_samples=300, chunk_size=100)
    torch.manual_seed(2)
    second = log_marginal_likelihood(vae, x, num_samples=300, chunk_size=100)
    assert torch.equal(first, second)


def test_float32_estimate_is_stable_with_5000_samples():
    vae = mismatched_vae().float()
    x = sample_data(vae, 4).float()
    estimate = log_marginal_likelihood(vae, x, num_samples=5000, chunk_size=5000)
    assert bool(torch.isfinite(estimate).all())
    assert (estimate.double() - exact_log_marginal(vae.double(), x.double())).abs().max() < 0.1


def test_mean_and_standard_error():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0])
    estimate = mean_and_standard_error(values)
    assert estimate.mean == pytest.approx(2.5)
    assert estimate.standard_error == pytest.approx(values.std().item() / 2)
    assert estimate.num_points == 4


@pytest.mark.parametrize("bad, message", [
    (torch.full((3, 5), math.nan, dtype=torch.float64), "NaN"),
    (torch.zeros(3, 4, dtype=torch.float64), "expects 5"),
    (torch.zeros(3, 5, 1, dtype=torch.float64), "shape \\(N, data_dim\\)"),
    (torch.zeros(3, 5, dtype=torch.int64), "floating-point"),
])
def test_bad_data_is_refused_with_a_message(bad, message):
    vae = linear_gaussian_vae()
    with pytest.raises(InvalidDataError, match=message):
        log_marginal_likelihood(vae, bad, num_samples=2)


def test_bad_sample_counts_are_refused():
    vae = linear_gaussian_vae()
    x = sample_data(vae, 2)
    with pytest.raises(ValueError, match="num_samples"):
        log_marginal_likelihood(vae, x, num_samples=0)


def test_the_default_chunk_is_a_fixed_number_of_rows_for_the_device():
    from pyrovae.evaluation import CPU_ROWS_PER_TRACE, default_chunk_size

    assert default_chunk_size(100, "cpu") == CPU_ROWS_PER_TRACE // 100
    assert default_chunk_size(100, "cuda") > default_chunk_size(100, "cpu")
    assert default_chunk_size(10**6, "cpu") == 1
    vae = mismatched_vae()
    x = sample_data(vae, 30)
    torch.manual_seed(8)
    automatic = log_marginal_likelihood(vae, x, num_samples=300, batch_size=10)
    torch.manual_seed(8)
    explicit = log_marginal_likelihood(vae, x, num_samples=300, batch_size=10,
                                       chunk_size=CPU_ROWS_PER_TRACE // 10)
    assert torch.equal(automatic, explicit)


def test_elbo_terms_add_up_to_the_elbo():
    data = DataSplits.from_tensors(torch.bernoulli(torch.full((30, 6), 0.5)), binarize="none")
    config = TrainConfig(hidden_dims=(4,), latent_dim=2)
    vae = build_vae(config, data_dim=6)
    pyro.set_rng_seed(1)
    terms = elbo_terms(vae, data.test, num_samples=3, batch_size=7)
    pyro.set_rng_seed(1)
    log_w = importance_log_weights(vae, data.test[:7], num_samples=3)
    assert terms["reconstruction"].shape == terms["kl"].shape == (30,)
    assert (terms["reconstruction"] - terms["kl"])[:7] == pytest.approx(log_w.mean(0), abs=1e-4)
    from pyrovae.programs import ProgramError
    from tests.test_programs import EnumeratedMixture

    mixture = EnumeratedMixture()
    with pytest.raises(ProgramError, match="does not split"):
        elbo_terms((mixture.model, mixture.guide), mixture.sample(4))
