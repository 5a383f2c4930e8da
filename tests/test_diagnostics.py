"""ESS and PSIS k-hat of importance weights, on weights whose tail is known."""

from __future__ import annotations

import math

import pytest
import torch

from pyrovae import diagnostics as diagnostics_module
from pyrovae import log_marginal_likelihood
from pyrovae.diagnostics import (
    KHAT_THRESHOLD,
    effective_sample_size,
    importance_summary,
    log_mean_exp_standard_error,
    pareto_k,
    unreliable_fraction,
)
from tests.linear_gaussian import exact_log_marginal, linear_gaussian_vae, sample_data
from tests.test_evaluation import mismatched_vae


def gaussian_log_weights(proposal_scale: float, num_samples: int = 5000,
                         num_points: int = 8) -> torch.Tensor:
    """log N(z; 0, 1) - log N(z; 0, s^2) for z ~ N(0, s^2): ``(K, N)``.

    For s < 1, P(w > t) ~ t^(-1/k) with k = 1 - s^2 exactly: the known answer for k-hat.
    """
    generator = torch.Generator().manual_seed(0)
    z = proposal_scale * torch.randn(num_samples, num_points, generator=generator,
                                     dtype=torch.float64)
    target = torch.distributions.Normal(0.0, 1.0)
    proposal = torch.distributions.Normal(0.0, proposal_scale)
    return target.log_prob(z) - proposal.log_prob(z)


def test_khat_recovers_the_known_tail_index_with_log_weights_as_given():
    # s = 0.3: k = 1 - 0.09 = 0.91. Handing ArviZ -log w instead would fit the light tail.
    khat = pareto_k(gaussian_log_weights(0.3))
    assert 0.75 < float(khat.mean()) < 1.05, khat
    assert bool((pareto_k(-gaussian_log_weights(0.3)) < 0.3).all())


def test_khat_is_small_for_a_proposal_wider_than_the_target():
    # s = 2 > 1: the weights are bounded, the fitted tail has k <= 0
    assert bool((pareto_k(gaussian_log_weights(2.0)) < 0.5).all())


def test_khat_needs_enough_samples_and_marks_constant_weights():
    assert bool(pareto_k(torch.zeros(10, 3)).isnan().all())
    assert bool((pareto_k(torch.full((100, 3), -2.5)) == -math.inf).all())


@pytest.mark.parametrize("log_weight", [-101.3, -7.3])
def test_weights_equal_up_to_float32_rounding_are_reliable(log_weight):
    # log w = log p(x, z) - log q(z|x), each rounded to float32, whose exact difference is
    # the same for every z: MNIST magnitudes, |log w| ~ 100 and ~ 7, log q(z|x) ~ 30 to 110
    generator = torch.Generator().manual_seed(0)
    log_q = 30 + 80 * torch.rand(1000, 64, generator=generator, dtype=torch.float64)
    log_w = (log_q + log_weight).float() - log_q.float()
    spread = log_w.max(0).values - log_w.min(0).values
    assert float(spread.max()) > 5e-6  # a fixed 1e-6 nats would fit a Pareto to these ties
    khat = pareto_k(log_w)
    assert not bool((khat == math.inf).any()) and bool((khat < 0.5).all()), khat
    assert unreliable_fraction(khat) == 0.0


def test_the_constant_threshold_follows_the_dtype():
    # a spread of 1e-3 nats at |log w| = 100 is rounding in float32, a real spread in float64
    log_w = -100 + 1e-3 * torch.rand(500, 4, dtype=torch.float64)
    assert bool((pareto_k(log_w.float()) == -math.inf).all())
    assert bool(pareto_k(log_w).isfinite().all())


def test_heavy_tailed_float32_weights_at_mnist_magnitudes_are_flagged():
    # s = 0.2: k = 0.96; rounding to float32 at |log w| ~ 100 must not hide the tail
    khat = pareto_k(gaussian_log_weights(0.2).float() - 100)
    assert float(khat.min()) > 0.7, khat
    assert unreliable_fraction(khat) == 1.0
    torch.testing.assert_close(khat, pareto_k(gaussian_log_weights(0.2)), atol=1e-3, rtol=0)


@pytest.mark.parametrize("data_dim", [5, 150])
def test_exact_posterior_in_float32_is_reliable(data_dim):
    # |log w| ~ 7 at 5 dimensions and ~ 116 at 150
    vae = linear_gaussian_vae(data_dim=data_dim, dtype=torch.float32)
    x = sample_data(vae, 40)
    summary = importance_summary(vae, x, ks=(1000,), batch_size=20)
    assert float((summary.log_weight_max - summary.log_weight_min).max()) > 1e-6
    assert not bool((summary.pareto_k == math.inf).any())
    assert bool((summary.pareto_k < 0.5).all())
    assert summary.num_unreliable == 0 and summary.unreliable_fraction == 0.0


def test_unreliable_fraction_counts_points_above_the_threshold():
    khat = torch.tensor([0.1, 0.8, -math.inf, math.inf, math.nan, KHAT_THRESHOLD, 0.71],
                        dtype=torch.float64)
    # NaN is left out: 3 of the 6 others are above 0.7 (0.7 itself is not)
    assert unreliable_fraction(khat) == 0.5
    assert unreliable_fraction(khat, threshold=1.0) == pytest.approx(1 / 6)
    assert math.isnan(unreliable_fraction(torch.full((3,), math.nan)))
    with pytest.raises(ValueError, match=r"\(N,\)"):
        unreliable_fraction(torch.zeros(2, 3))


def test_effective_sample_size_from_equal_to_one_dominant_weight():
    equal = torch.zeros(50, 2)
    dominant = torch.tensor([[0.0, 0.0]] + [[-100.0, -100.0]] * 49)
    torch.testing.assert_close(effective_sample_size(equal), torch.full((2,), 50.0,
                                                                         dtype=torch.float64))
    torch.testing.assert_close(effective_sample_size(dominant), torch.ones(2, dtype=torch.float64))


def test_delta_method_error_is_zero_for_equal_weights_and_nan_for_one_sample():
    assert bool((log_mean_exp_standard_error(torch.zeros(20, 3)) == 0).all())
    assert bool(log_mean_exp_standard_error(torch.zeros(1, 3)).isnan().all())


def test_exact_posterior_gives_ess_k_and_small_khat():
    vae = linear_gaussian_vae()
    x = sample_data(vae, 10)
    summary = importance_summary(vae, x, ks=(1, 50, 500))
    torch.testing.assert_close(summary.effective_sample_size,
                               torch.full((10,), 500.0, dtype=torch.float64))
    assert bool((summary.pareto_k < 0.5).all())
    assert summary.num_unreliable == 0
    torch.testing.assert_close(summary.iwae, exact_log_marginal(vae, x).expand(3, 10),
                               atol=1e-8, rtol=0)


def test_guide_much_narrower_than_the_posterior_is_flagged():
    # a diagonal guide at 0.3 times the posterior's marginal standard deviations
    vae = mismatched_vae(inflate=0.3)
    x = sample_data(vae, 10)
    summary = importance_summary(vae, x, ks=(5000,))
    assert float(summary.pareto_k.median()) > 0.7
    assert summary.num_unreliable >= 5
    assert bool(summary.unreliable.equal(summary.pareto_k > 0.7))
    assert summary.unreliable_fraction == summary.num_unreliable / 10
    assert float(summary.effective_sample_size.median()) < 0.1 * 5000


def test_guide_wider_than_the_posterior_has_small_khat_and_estimate_within_error():
    vae = mismatched_vae(inflate=1.5)
    x = sample_data(vae, 20)
    summary = importance_summary(vae, x, ks=(50, 5000))
    assert bool((summary.pareto_k < 0.5).all())
    exact = exact_log_marginal(vae, x)
    for row in range(2):
        error = summary.iwae_standard_error[row].pow(2).sum().sqrt() / len(x)
        assert abs(float((summary.iwae[row] - exact).mean())) < 3 * float(error) + 1e-3


def test_summary_at_k_max_is_the_log_marginal_likelihood_for_the_same_seed():
    vae = mismatched_vae()
    x = sample_data(vae, 12)
    torch.manual_seed(4)
    summary = importance_summary(vae, x, ks=(5, 300), batch_size=5, chunk_size=100)
    torch.manual_seed(4)
    reference = log_marginal_likelihood(vae, x, num_samples=300, batch_size=5, chunk_size=100)
    torch.testing.assert_close(summary.log_marginal_likelihood, reference.double())


def test_memory_stays_bounded_by_batch_and_chunk(monkeypatch):
    shapes = []
    original = diagnostics_module.importance_log_weights

    def recording(vae, x, *, num_samples):
        shapes.append((num_samples, x.shape[0]))
        return original(vae, x, num_samples=num_samples)

    monkeypatch.setattr(diagnostics_module, "importance_log_weights", recording)
    vae = mismatched_vae()
    x = sample_data(vae, 25)
    summary = importance_summary(vae, x, ks=(1000,), batch_size=10, chunk_size=300)
    assert summary.pareto_k.shape == (25,)
    assert max(k for k, _ in shapes) <= 300 and max(n for _, n in shapes) <= 10
    assert sum(k * n for k, n in shapes) == 1000 * 25


def test_bad_ks_are_refused():
    vae = linear_gaussian_vae()
    x = sample_data(vae, 2)
    with pytest.raises(ValueError, match="ks"):
        importance_summary(vae, x, ks=(0, 5))
    with pytest.raises(ValueError, match="batch_size"):
        importance_summary(vae, x, ks=(5,), batch_size=0)


def test_the_arviz_1_branch_agrees_on_the_sign_convention(monkeypatch):
    # ArviZ >= 1 (arviz-stats) negates its input; the shim must hand it -log w
    pytest.importorskip("arviz_stats")
    import arviz

    log_weights = gaussian_log_weights(0.3, num_points=4)
    old = pareto_k(log_weights)
    monkeypatch.setattr(arviz, "__version__", "1.0.0")
    new = pareto_k(log_weights)
    torch.testing.assert_close(new, old, atol=0.05, rtol=0)
