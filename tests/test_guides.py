"""Guide families: correct densities, particle-plate shapes, and exact inference where possible."""

from __future__ import annotations

import math
import re

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO

from pyrovae import elbo, importance_log_weights, log_marginal_likelihood
from pyrovae.errors import ConfigError
from pyrovae.guides import (
    GUIDES,
    MIN_SCALE,
    SCALE_LINKS,
    DiagonalNormalGuide,
    FullCovarianceNormalGuide,
    IAFGuide,
    LowRankNormalGuide,
    clipped_log_variance_scale,
)
from pyrovae.likelihoods import BernoulliLikelihood
from pyrovae.models import VAE
from pyrovae.nets import MLPDecoder, MLPEncoder
from pyrovae.priors import StandardNormalPrior
from pyrovae.sites import DATA_PLATE, LATENT_SITE, PARTICLE_PLATE
from tests.linear_gaussian import exact_log_marginal, linear_gaussian_vae, sample_data

FEATURE_DIM = 4


def make_guide(name: str, latent_dim: int = 2) -> torch.nn.Module:
    if name == "lowrank":
        return LowRankNormalGuide(FEATURE_DIM, latent_dim, rank=1)
    return GUIDES[name](FEATURE_DIM, latent_dim)


def perturb(module: torch.nn.Module, std: float = 0.5, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator,
                                        dtype=parameter.dtype) * std)


def grid_integral(log_density, bound: float = 10.0, points: int = 401) -> float:
    """The integral of exp(log_density) over [-bound, bound]^2 by the trapezoid rule."""
    axis = torch.linspace(-bound, bound, points, dtype=torch.float64)
    z = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), dim=-1)
    density = log_density(z.reshape(-1, 2)).exp().reshape(points, points)
    return torch.trapezoid(torch.trapezoid(density, axis, dim=1), axis).item()


@pytest.mark.parametrize("name", sorted(GUIDES))
def test_every_guide_density_integrates_to_one_in_two_dimensions(name):
    guide = make_guide(name).double()
    perturb(guide)
    q = guide(torch.randn(FEATURE_DIM, dtype=torch.float64))
    assert q.batch_shape == () and q.event_shape == (2,)
    assert grid_integral(q.log_prob) == pytest.approx(1.0, abs=2e-3)


def test_full_covariance_density_is_the_gaussian_formula():
    guide = FullCovarianceNormalGuide(FEATURE_DIM, 3).double()
    perturb(guide)
    h = torch.randn(5, FEATURE_DIM, dtype=torch.float64)
    z_loc, scale_tril = guide.z_loc_scale_tril(h)
    # a Cholesky factor: lower triangular, diagonal softplus(.) + MIN_SCALE, free below
    assert torch.equal(scale_tril, scale_tril.tril())
    diagonal = torch.nn.functional.softplus(guide.diagonal_head(h)) + MIN_SCALE
    torch.testing.assert_close(scale_tril.diagonal(dim1=-2, dim2=-1), diagonal)
    rows, cols = torch.tril_indices(3, 3, offset=-1)
    torch.testing.assert_close(scale_tril[:, rows, cols],
                               guide.off_diagonal_scale * guide.off_diagonal_head(h))
    z = torch.randn(5, 3, dtype=torch.float64)
    covariance = scale_tril @ scale_tril.transpose(-1, -2)
    residual = (z - z_loc).unsqueeze(-1)
    mahalanobis = (residual.transpose(-1, -2) @ torch.linalg.solve(covariance, residual))[..., 0, 0]
    expected = -0.5 * (mahalanobis + torch.logdet(covariance) + 3 * math.log(2 * math.pi))
    torch.testing.assert_close(guide(h).log_prob(z), expected)


def test_low_rank_density_is_that_of_its_covariance():
    guide = LowRankNormalGuide(FEATURE_DIM, 3, rank=2, factor_scale=0.3).double()
    perturb(guide)
    h = torch.randn(5, FEATURE_DIM, dtype=torch.float64)
    q = guide(h)
    factor = 0.3 * guide.factor_head(h).reshape(5, 3, 2)
    scale = torch.nn.functional.softplus(guide.scale_head(h)) + MIN_SCALE
    covariance = factor @ factor.transpose(-1, -2) + torch.diag_embed(scale**2)
    reference = dist.MultivariateNormal(guide.loc_head(h), covariance_matrix=covariance)
    z = torch.randn(5, 3, dtype=torch.float64)
    torch.testing.assert_close(q.log_prob(z), reference.log_prob(z))


@pytest.mark.parametrize(("family", "scale_name", "saved_before_it_was_stored"), [
    (LowRankNormalGuide, "factor_scale", 1.0),
    (FullCovarianceNormalGuide, "off_diagonal_scale", 0.1),
])
def test_checkpoints_keep_the_scale_their_weights_were_trained_with(family, scale_name,
                                                                    saved_before_it_was_stored):
    h = torch.randn(5, FEATURE_DIM)
    z = torch.randn(5, 3)
    trained = family(FEATURE_DIM, 3, **{scale_name: 0.37})
    perturb(trained)
    restored = family(FEATURE_DIM, 3)
    restored.load_state_dict(trained.state_dict())
    assert getattr(restored, scale_name).item() == pytest.approx(0.37)
    torch.testing.assert_close(restored(h).log_prob(z), trained(h).log_prob(z))
    # a state dict from before the scale was a buffer (module version 1) gets the scale that
    # code used; the full-covariance guide's had two, so it says which it assumed
    legacy = trained.state_dict()
    del legacy[scale_name]
    legacy._metadata[""]["version"] = 1
    if family is FullCovarianceNormalGuide:
        with pytest.warns(UserWarning, match="loaded with 0.1") as warned:
            restored.load_state_dict(legacy)
        message = str(warned[0].message)
        assert "used 1" in message and not re.search(r"\b[0-9a-f]{7,40}\b", message)
    else:
        restored.load_state_dict(legacy)
    assert getattr(restored, scale_name).item() == pytest.approx(saved_before_it_was_stored)
    # a current state dict that lacks the scale is an error, not a silent default
    incomplete = trained.state_dict()
    del incomplete[scale_name]
    with pytest.raises(RuntimeError, match=f"Missing key.*{scale_name}"):
        restored.load_state_dict(incomplete)


def test_the_iaf_guide_without_flows_is_the_diagonal_guide():
    diagonal = DiagonalNormalGuide(FEATURE_DIM, 3)
    iaf = IAFGuide(FEATURE_DIM, 3, num_flows=0)
    perturb(diagonal)
    iaf.load_state_dict(diagonal.state_dict())
    h = torch.randn(6, FEATURE_DIM)
    z = torch.randn(6, 3)
    torch.testing.assert_close(iaf(h).log_prob(z), diagonal(h).log_prob(z), rtol=0, atol=0)
    pyro.set_rng_seed(4)
    iaf_draws = iaf(h).rsample((2,))
    pyro.set_rng_seed(4)
    assert torch.equal(iaf_draws, diagonal(h).rsample((2,)))


def test_the_iaf_guide_scores_its_own_samples_like_fresh_values():
    guide = IAFGuide(FEATURE_DIM, 3, num_flows=2).double()
    perturb(guide)
    q = guide(torch.randn(6, FEATURE_DIM, dtype=torch.float64))
    z = q.rsample()
    cached = q.log_prob(z)  # the flows cached z's pre-image
    inverted = q.log_prob(z.clone())  # a new tensor: the flows are inverted
    torch.testing.assert_close(cached, inverted)
    # and it is not the base distribution: the flows do something
    assert (cached - q.base_dist.log_prob(z)).abs().max() > 1e-3


def small_vae(guide_name: str) -> VAE:
    return VAE(MLPEncoder(10, (FEATURE_DIM,)), MLPDecoder(3, 10, (5,)), StandardNormalPrior(3),
               BernoulliLikelihood(), make_guide(guide_name, latent_dim=3))


@pytest.mark.parametrize("name", sorted(GUIDES))
def test_guides_broadcast_over_a_particle_plate(name):
    vae = small_vae(name)
    x = torch.bernoulli(torch.full((7, 10), 0.4))
    with pyro.plate(PARTICLE_PLATE, 5, dim=-2):
        trace = poutine.trace(vae.guide).get_trace(x)
    site = trace.nodes[LATENT_SITE]
    assert site["value"].shape == (5, 7, 3)
    assert site["fn"].log_prob(site["value"]).shape == (5, 7)
    assert {frame.name for frame in site["cond_indep_stack"]} == {DATA_PLATE, PARTICLE_PLATE}
    log_w = importance_log_weights(vae, x, num_samples=5)
    assert log_w.shape == (5, 7) and bool(torch.isfinite(log_w).all())
    # the K-sample estimate is the log-mean-exp of those weights, per data point
    torch.manual_seed(9)
    log_w = importance_log_weights(vae, x, num_samples=6)
    torch.manual_seed(9)
    estimate = log_marginal_likelihood(vae, x, num_samples=6, chunk_size=6)
    assert estimate.shape == (7,)
    torch.testing.assert_close(estimate, torch.logsumexp(log_w, 0) - math.log(6))


def test_the_full_covariance_guide_starts_as_the_diagonal_guide():
    """Its off-diagonal head starts at zero (see the class docstring); training moves it
    (test_svi_closes_the_elbo_gap_with_the_full_covariance_guide_only)."""
    guide = FullCovarianceNormalGuide(200, 50)
    h = torch.tanh(torch.randn(64, 200))
    z_loc, scale_tril = guide.z_loc_scale_tril(h)
    z_scale = scale_tril.diagonal(dim1=-2, dim2=-1)
    assert torch.equal(scale_tril, torch.diag_embed(z_scale))
    z = z_loc + z_scale * torch.randn(64, 50)
    torch.testing.assert_close(guide(h).log_prob(z),
                               torch.distributions.Normal(z_loc, z_scale).log_prob(z).sum(-1))


def exact_full_covariance_guide(vae: VAE) -> FullCovarianceNormalGuide:
    """A full-covariance guide whose heads give the exact posterior of the linear-Gaussian VAE."""
    exact = vae.guide_family
    latent_dim, data_dim = exact.gain.shape
    guide = FullCovarianceNormalGuide(data_dim, latent_dim).double()
    rows, cols = torch.tril_indices(latent_dim, latent_dim, offset=-1)
    with torch.no_grad():
        guide.loc_head.weight.copy_(exact.gain)
        guide.loc_head.bias.copy_(-exact.gain @ exact.bias)
        for head in (guide.diagonal_head, guide.off_diagonal_head):
            head.weight.zero_()
        # softplus^{-1}(s) = log(expm1(s))
        guide.diagonal_head.bias.copy_(torch.log(torch.expm1(exact.scale_tril.diagonal() - MIN_SCALE)))
        guide.off_diagonal_head.bias.copy_(exact.scale_tril[rows, cols] / guide.off_diagonal_scale)
    return guide


def test_the_full_covariance_guide_can_be_the_exact_posterior():
    reference = linear_gaussian_vae(latent_dim=3)
    vae = linear_gaussian_vae(latent_dim=3, guide=exact_full_covariance_guide(reference))
    x = sample_data(vae, 40)
    exact = exact_log_marginal(vae, x)
    torch.testing.assert_close(log_marginal_likelihood(vae, x, num_samples=10), exact,
                               atol=1e-4, rtol=0)
    # every importance weight is p(x): q(z|x) = p(z|x)
    torch.testing.assert_close(importance_log_weights(vae, x, num_samples=3), exact.expand(3, 40),
                               atol=1e-8, rtol=0)


def correlated_linear_gaussian_vae(guide: torch.nn.Module) -> tuple[VAE, float]:
    """A linear-Gaussian VAE whose two latents are strongly correlated a posteriori.

    :returns: the VAE and the smallest KL(q || p(z|x)) any factorized q can reach,
        0.5 (sum_i log Lambda_ii - log det Lambda) for posterior precision Lambda, in nats.
    """
    vae = linear_gaussian_vae(guide=guide.double())
    generator = torch.Generator().manual_seed(3)
    column = torch.randn(5, generator=generator, dtype=torch.float64)
    weight = torch.stack([column, column + 0.1 * torch.randn(5, generator=generator,
                                                             dtype=torch.float64)], 1)
    with torch.no_grad():
        vae.decoder.body[0].weight.copy_(weight)
    sigma = float(vae.likelihood.sigma)
    precision = torch.eye(2, dtype=torch.float64) + weight.T @ weight / sigma**2
    mean_field_gap = 0.5 * (precision.diagonal().log().sum() - torch.logdet(precision))
    return vae, mean_field_gap.item()


def elbo_gap_after_training(guide: torch.nn.Module, steps: int = 300) -> tuple[float, float]:
    """Fit only the guide by SVI; return (log p(x) - ELBO, the mean-field optimum), nats/point."""
    vae, mean_field_gap = correlated_linear_gaussian_vae(guide)
    x = sample_data(vae, 100)
    objective = Trace_ELBO(num_particles=10, vectorize_particles=True, max_plate_nesting=1)
    optimizer = torch.optim.Adam(vae.guide_family.parameters(), lr=0.05)
    for _ in range(steps):
        optimizer.zero_grad()
        (objective.differentiable_loss(vae.model, vae.guide, x) / len(x)).backward()
        optimizer.step()
    gap = (exact_log_marginal(vae, x) - elbo(vae, x, num_samples=200)).mean().item()
    return gap, mean_field_gap


def test_svi_closes_the_elbo_gap_with_the_full_covariance_guide_only():
    full_gap, mean_field_gap = elbo_gap_after_training(FullCovarianceNormalGuide(5, 2))
    diagonal_gap, _ = elbo_gap_after_training(DiagonalNormalGuide(5, 2))
    assert mean_field_gap > 0.4  # the posterior correlation is strong
    assert abs(full_gap) < 0.02, full_gap
    # rank 1 plus a diagonal covers every 2 x 2 covariance; its small initial factor is not
    # the saddle that a zero factor would be (W W^T has zero gradient at W = 0)
    low_rank_gap, _ = elbo_gap_after_training(LowRankNormalGuide(5, 2, rank=1))
    assert abs(low_rank_gap) < 0.02, low_rank_gap
    # the diagonal guide cannot do better than the mean-field optimum
    assert diagonal_gap > 0.95 * mean_field_gap, (diagonal_gap, mean_field_gap)


def test_bad_ranks_and_flow_counts_are_refused():
    with pytest.raises(ValueError, match="rank must be positive"):
        LowRankNormalGuide(FEATURE_DIM, 3, rank=0)
    with pytest.raises(ValueError, match="factor_scale must be positive"):
        LowRankNormalGuide(FEATURE_DIM, 3, factor_scale=0.0)
    with pytest.raises(ValueError, match="off_diagonal_scale must be positive"):
        FullCovarianceNormalGuide(FEATURE_DIM, 3, off_diagonal_scale=-0.1)
    with pytest.raises(ValueError, match="num_flows must be >= 0"):
        IAFGuide(FEATURE_DIM, 3, num_flows=-1)
    with pytest.raises(ValueError, match="latent_dim >= 2"):
        IAFGuide(FEATURE_DIM, 1, num_flows=1)


def test_the_clipped_log_variance_scale_is_exp_of_half_the_clipped_head():
    raw = torch.tensor([-9.0, -6.5, -3.0, 0.0, 1.5, 2.5, 7.0], dtype=torch.float64,
                       requires_grad=True)
    scale = clipped_log_variance_scale(raw)
    # the log-variance is clipped to [-6, 2]: scales exp(-3), exp(-3), exp(-1.5), 1,
    # exp(0.75), e, e
    expected = torch.tensor([-3.0, -3.0, -1.5, 0.0, 0.75, 1.0, 1.0], dtype=torch.float64).exp()
    torch.testing.assert_close(scale, expected, rtol=1e-15, atol=0)
    (gradient,) = torch.autograd.grad(scale.sum(), raw)
    # d exp(l / 2) / dl = exp(l / 2) / 2 inside the clip, 0 outside it (as Hardtanh's)
    inside = torch.tensor([False, False, True, True, True, False, False])
    torch.testing.assert_close(gradient[inside], expected[inside] / 2, rtol=1e-15, atol=0)
    assert torch.all(gradient[~inside] == 0)


def test_the_diagonal_guide_takes_its_scale_from_a_clipped_log_variance_head():
    guide = DiagonalNormalGuide(FEATURE_DIM, 3, scale_link="clipped_log_variance").double()
    perturb(guide, std=3.0)  # head outputs of several units, some beyond the clip
    h = torch.randn(50, FEATURE_DIM, dtype=torch.float64)
    log_variance = guide.scale_head(h)
    assert (log_variance < -6).any() and (log_variance > 2).any()
    q = guide(h)
    torch.testing.assert_close(q.base_dist.scale, (log_variance.clamp(-6, 2) / 2).exp())
    torch.testing.assert_close(q.base_dist.loc, guide.loc_head(h))
    # no gradient reaches the head through a clipped unit: only the unclipped ones count
    (bias_gradient,) = torch.autograd.grad(q.base_dist.scale.sum(), guide.scale_head.bias)
    inside = (log_variance > -6) & (log_variance < 2)
    expected = torch.where(inside, (log_variance / 2).exp() / 2, 0.0).sum(0)
    torch.testing.assert_close(bias_gradient, expected)


def test_the_default_scale_is_softplus_plus_min_scale_as_before():
    guide = DiagonalNormalGuide(FEATURE_DIM, 3)
    assert guide.scale_link == "softplus"
    perturb(guide)
    h = torch.randn(6, FEATURE_DIM)
    expected = torch.nn.functional.softplus(guide.scale_head(h)) + MIN_SCALE
    assert torch.equal(guide(h).base_dist.scale, expected)


def test_the_low_rank_and_iaf_guides_take_the_clipped_log_variance_too():
    h = torch.randn(6, FEATURE_DIM, dtype=torch.float64)
    low_rank = LowRankNormalGuide(FEATURE_DIM, 3, rank=1,
                                  scale_link="clipped_log_variance").double()
    perturb(low_rank, std=3.0)
    # the diagonal part of the covariance is the variance exp(clip(head, -6, 2))
    torch.testing.assert_close(low_rank(h).cov_diag, low_rank.scale_head(h).clamp(-6, 2).exp())
    diagonal = DiagonalNormalGuide(FEATURE_DIM, 3, scale_link="clipped_log_variance").double()
    iaf = IAFGuide(FEATURE_DIM, 3, num_flows=0, scale_link="clipped_log_variance").double()
    perturb(diagonal, std=3.0)
    iaf.load_state_dict(diagonal.state_dict())
    z = torch.randn(6, 3, dtype=torch.float64)
    torch.testing.assert_close(iaf(h).log_prob(z), diagonal(h).log_prob(z), rtol=0, atol=0)
    assert set(SCALE_LINKS) == {"softplus", "clipped_log_variance"}
    assert FullCovarianceNormalGuide.scale_links == ("softplus",)
    with pytest.raises(ValueError, match="unknown scale_link 'exp'; known: softplus, "
                                         "clipped_log_variance"):
        DiagonalNormalGuide(FEATURE_DIM, 3, scale_link="exp")


@pytest.mark.parametrize("name", sorted(GUIDES))
def test_he_normal_starts_every_guide_head_with_pytorchs_default_biases(name):
    feature_dim, latent_dim = 2000, 40
    family = GUIDES[name]
    options = {"rank": 2} if name == "lowrank" else {}
    guide = family(feature_dim, latent_dim, init_scheme="he_normal", **options)
    heads = [module for module_name, module in guide.named_children()
             if module_name.endswith("_head")]
    restarted = [head for head in heads if head is not getattr(guide, "off_diagonal_head", None)]
    assert len(restarted) == (3 if name == "lowrank" else 2)
    for head in restarted:
        # 80,000+ draws of N(0, 2 / 2000): the sample std is within 1% (the relative standard
        # error is 0.25%)
        std = math.sqrt(2 / feature_dim)
        assert head.weight.std().item() == pytest.approx(std, rel=0.01)
        # nn.Linear's bias, U(-1/sqrt(fan_in), 1/sqrt(fan_in)): std bound / sqrt(3)
        bound = 1 / math.sqrt(feature_dim)
        assert head.bias.abs().max().item() <= bound
        assert head.bias.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.25)
    if name == "fullcov":  # the full-covariance guide starts as the diagonal one either way
        assert torch.all(guide.off_diagonal_head.weight == 0)
    with pytest.raises(ConfigError, match="init_gain 1.0 is the gain of the Glorot-uniform"):
        family(feature_dim, latent_dim, init_scheme="he_normal", init_gain=1.0, **options)
