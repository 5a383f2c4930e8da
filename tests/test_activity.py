"""Active units, KL per dimension and I(x; z) against closed forms of linear-Gaussian models."""

from __future__ import annotations

import math

import pytest
import torch

from pyrovae.activity import (
    active_units,
    kl_per_dimension,
    latent_usage,
    mutual_information,
    posterior_mean_variances,
)
from tests.linear_gaussian import ExactPosteriorGuide, linear_gaussian_vae, sample_data
from tests.test_evaluation import mismatched_guide, mismatched_vae
from tests.test_programs import TwoLayerLinearGaussian

DOUBLE = torch.float64


def vae_ignoring(dims: list[int], latent_dim: int = 4):
    """A linear-Gaussian VAE whose decoder has zero weights from the latent ``dims``, with
    the exact posterior as its guide."""
    vae = linear_gaussian_vae(latent_dim=latent_dim)
    linear = vae.decoder.body[0]
    with torch.no_grad():
        linear.weight[:, dims] = 0.0
    vae.guide_family = ExactPosteriorGuide(linear.weight.detach().clone(),
                                           linear.bias.detach().clone(), 0.5)
    return vae


def data_covariance(vae) -> torch.Tensor:
    weight = vae.decoder.body[0].weight.detach()
    return weight @ weight.T + 0.25 * torch.eye(weight.shape[0], dtype=DOUBLE)


def test_the_dimensions_a_decoder_ignores_are_exactly_the_inactive_ones():
    vae = vae_ignoring([1, 3])
    x = sample_data(vae, 2000)
    variance = posterior_mean_variances(vae, x)["z"]
    # the exact posterior mean has Var_x = 1 - S_dd (S the posterior covariance): 0 where
    # the decoder ignores z_d
    covariance = vae.guide_family.scale_tril @ vae.guide_family.scale_tril.T
    expected = 1 - covariance.diagonal()
    assert bool((expected[[0, 2]] > 0.5).all())
    torch.testing.assert_close(variance[[0, 2]], expected[[0, 2]], rtol=0.1, atol=0)
    assert float(variance[[1, 3]].max()) < 1e-12
    assert active_units(vae, x) == 2


def test_kl_per_dimension_of_a_diagonal_guide_is_the_closed_form_and_zero_where_ignored():
    exact = vae_ignoring([1, 3])
    vae = linear_gaussian_vae(latent_dim=4, guide=mismatched_guide(exact, inflate=1.0))
    with torch.no_grad():
        vae.decoder.body[0].weight.copy_(exact.decoder.body[0].weight)
    x = sample_data(vae, 2000)
    kl = kl_per_dimension(vae, x)["z"]
    # q = N(G (x - b), diag s^2), p = N(0, I): E_x KL_d = (E[m_d^2] + s_d^2 - 1) / 2 - log s_d
    guide = vae.guide_family
    gain = guide.loc_head.weight.detach()
    scale = torch.nn.functional.softplus(guide.scale_head.bias.detach()) + 1e-4
    mean_square = (gain @ data_covariance(vae) @ gain.T).diagonal()
    expected = 0.5 * (mean_square + scale**2 - 1) - scale.log()
    assert kl.note is None and kl.per_dimension.shape == (4,)
    torch.testing.assert_close(kl.per_dimension[[0, 2]], expected[[0, 2]], rtol=0.1, atol=0)
    assert float(kl.per_dimension[[1, 3]].abs().max()) < 1e-6
    assert kl.total == pytest.approx(float(kl.per_dimension.sum()))


def test_a_full_covariance_guide_gets_its_total_kl_and_a_reason_for_no_split():
    # exact posterior N(m(x), S), prior N(0, I), x from the model: E_x KL = -log det(S) / 2
    vae = linear_gaussian_vae()
    x = sample_data(vae, 2000)
    kl = kl_per_dimension(vae, x)["z"]
    assert kl.per_dimension is None and "MultivariateNormal" in kl.note
    covariance = vae.guide_family.scale_tril @ vae.guide_family.scale_tril.T
    assert kl.total == pytest.approx(-0.5 * float(torch.logdet(covariance)), rel=0.05)


@pytest.mark.parametrize("inflate", [1.5, 3.0])
def test_mutual_information_matches_the_linear_gaussian_closed_form(inflate):
    # q(z|x) = N(G x + c, S), x ~ N(b, C): I = log det(G C G^T + S) / 2 - log det(S) / 2
    vae = mismatched_vae(inflate=inflate)
    guide = vae.guide_family
    gain = guide.loc_head.weight.detach()
    covariance = torch.diag((torch.nn.functional.softplus(guide.scale_head.bias.detach())
                             + 1e-4) ** 2)
    exact = 0.5 * float(torch.logdet(gain @ data_covariance(vae) @ gain.T + covariance)
                        - torch.logdet(covariance))
    estimate = mutual_information(vae, sample_data(vae, 600, seed=3), batch_size=200)
    # measured spread over data sets of 600 points: 0.07 nats (exact: 2.36, 1.24)
    assert estimate == pytest.approx(exact, abs=0.2)


def test_mutual_information_never_exceeds_log_n():
    vae = mismatched_vae(inflate=0.01)  # nearly deterministic: I is about 9 nats
    estimate = mutual_information(vae, sample_data(vae, 100))
    assert math.log(100) - 0.05 < estimate <= math.log(100) + 1e-9


def test_a_hierarchy_gets_each_layer_and_its_conditional_means_averaged():
    hierarchy = TwoLayerLinearGaussian()
    x = hierarchy.sample(1500)
    usage = latent_usage((hierarchy.model, hierarchy.guide), x, mutual_information_points=200)
    assert list(usage.variances) == ["z1", "z2"] and usage.latent_dim == 5
    # Var_x(E[z | x]) = Cov(z, x) Cov(x)^-1 Cov(x, z) from the joint Gaussian
    data_cov = hierarchy.W @ hierarchy.c1 @ hierarchy.W.T + torch.diag(hierarchy.s2**2)
    cross = {"z1": hierarchy.c1 @ hierarchy.W.T, "z2": hierarchy.A.T @ hierarchy.W.T}
    for site, cov in cross.items():
        expected = (cov @ torch.linalg.solve(data_cov, cov.T)).diagonal()
        torch.testing.assert_close(usage.variances[site], expected, rtol=0.1, atol=0.01)
    summary = usage.summary()
    assert summary["sites"]["z2"]["kl_per_dimension"] is None
    assert 0 < summary["mutual_information"] <= math.log(200)


def test_summary_sorts_the_kl_and_the_figure_is_written(tmp_path):
    exact = vae_ignoring([0, 2])
    vae = linear_gaussian_vae(latent_dim=4, guide=mismatched_guide(exact, inflate=1.0))
    with torch.no_grad():
        vae.decoder.body[0].weight.copy_(exact.decoder.body[0].weight)
    usage = latent_usage(vae, sample_data(vae, 200), mutual_information_points=100)
    site = usage.summary()["sites"]["z"]
    assert sorted(site["kl_sorted_dimensions"][:2]) == [1, 3]
    assert site["kl_per_dimension_sorted"] == sorted(site["kl_per_dimension"], reverse=True)
    assert usage.summary()["active_units"] == 2
    usage.plot(tmp_path / "kl.png")
    assert (tmp_path / "kl.png").stat().st_size > 0
