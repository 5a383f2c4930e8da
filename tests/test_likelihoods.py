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
    ContinuousBernoulli,
    ContinuousBernoulliLikelihood,
    PixelGaussianLikelihood,
    bernoulli_log_prob,
    continuous_bernoulli_log_normalizer,
    continuous_bernoulli_mean,
    logit_clip_of_probability_clip,
)

LOGITS = torch.tensor([-6.0, -2.0, -0.3, 0.0, 1e-4, 0.7, 3.0, 8.0], dtype=torch.float64)


def unit_interval(points: int = 20001) -> torch.Tensor:
    return torch.linspace(0.0, 1.0, points, dtype=torch.float64)


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 2e-6), (torch.float64, 1e-13)])
def test_the_bernoulli_log_density_equals_torchs_cross_entropy(dtype, atol):
    # logits from -80 to 80 (exp(-|l|) underflows at the ends), binary and grey-level values
    logits = (torch.linspace(-80.0, 80.0, 4001, dtype=dtype) ** 3 / 6400.0).reshape(1, -1)
    logits = logits.expand(3, -1).clone().requires_grad_()
    value = torch.stack([torch.zeros(4001), torch.ones(4001), torch.rand(4001)]).to(dtype)
    ours = bernoulli_log_prob(logits, value)
    torchs = -torch.nn.functional.binary_cross_entropy_with_logits(logits, value, reduction="none")
    assert ((ours - torchs).abs() <= atol * (1 + logits.detach().abs())).all()
    (ours_grad,) = torch.autograd.grad(ours.sum(), logits)
    (torchs_grad,) = torch.autograd.grad(torchs.sum(), logits)
    assert torch.allclose(ours_grad, torchs_grad, atol=atol)
    assert torch.equal(bernoulli_log_prob(torch.tensor([0.0]), torch.tensor([1.0])),
                       torch.tensor([-math.log(2.0)]))


def test_the_bernoulli_log_density_has_exact_gradients_in_logits_and_value():
    logits = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    value = torch.rand(5, dtype=torch.float64, requires_grad=True)  # broadcast over rows
    assert torch.autograd.gradcheck(bernoulli_log_prob, (logits, value))
    assert torch.autograd.gradgradcheck(bernoulli_log_prob, (logits, value))


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


#: |logit| at which the density must integrate to 1: zero, the series near 0, its bound,
#: and the tails, where torch's clamped normaliser integrates to 0.80 (20) and 0.32 (50) in float32
EXTREME_LOGITS = (0.0, 1e-6, 0.01, 0.5, 5.0, 16.0, 20.0, 50.0, 100.0)


def quadrature_nodes(dtype: torch.dtype) -> torch.Tensor:
    """Nodes on [0, 1], dense near both ends where confident densities live, representable in
    ``dtype`` (so the density is scored exactly where the quadrature weighs it): float64."""
    ends = torch.logspace(-9, 0, 20001, dtype=torch.float64)
    grid = torch.cat([torch.linspace(0.0, 1.0, 20001, dtype=torch.float64), ends, 1 - ends])
    return torch.unique(grid.to(dtype)).double()


def naive_log_density(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """log(eta / tanh(eta / 2)) + eta x - log(1 + e^eta), the textbook form; float64, eta != 0."""
    return torch.log(logits / torch.tanh(logits / 2)) + x * logits - torch.log1p(logits.exp())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("magnitude", EXTREME_LOGITS)
def test_the_continuous_bernoulli_integrates_to_one_at_every_logit(dtype, magnitude):
    x = quadrature_nodes(dtype)
    logits = torch.tensor([magnitude, -magnitude], dtype=dtype)
    cb = ContinuousBernoulli(logits=logits[:, None])
    density = cb.log_prob(x.to(dtype)).double().exp()  # (2, nodes)
    integrals = torch.trapezoid(density, x, dim=-1)
    torch.testing.assert_close(integrals, torch.ones(2, dtype=torch.float64), atol=1e-6, rtol=0)
    means = torch.trapezoid(density * x, x, dim=-1)
    torch.testing.assert_close(cb.mean.double().squeeze(-1), means, atol=1e-6, rtol=0)
    torch.testing.assert_close(ContinuousBernoulliLikelihood().mean(logits).double(), means,
                               atol=1e-6, rtol=0)


def test_the_log_normalizer_matches_torch_where_torch_does_not_clamp():
    # torch's float64 normaliser, computed from lam = sigmoid(eta), is accurate outside its
    # Taylor window (|eta| < 0.004) and well below its clamp: an independent reference
    logits = torch.cat([-torch.logspace(-1, 1, 40, dtype=torch.float64),
                        torch.logspace(-1, 1, 40, dtype=torch.float64)])
    reference = torch.distributions.ContinuousBernoulli(logits=logits)._cont_bern_log_norm()
    torch.testing.assert_close(continuous_bernoulli_log_normalizer(logits), reference,
                               atol=1e-12, rtol=0)
    torch.testing.assert_close(continuous_bernoulli_mean(logits),
                               torch.distributions.ContinuousBernoulli(logits=logits).mean,
                               atol=1e-13, rtol=0)


def test_the_log_normalizer_series_near_zero():
    logits = torch.tensor([0.0, 1e-6, 1e-3, 0.05], dtype=torch.float64)
    series = math.log(2) + logits**2 / 12 - 7 * logits**4 / 1440 + 31 * logits**6 / 90720
    # the first omitted term, 127 eta^8 / 4838400, is 1e-15 at 0.05
    torch.testing.assert_close(continuous_bernoulli_log_normalizer(logits), series,
                               atol=1e-14, rtol=0)
    # float32 holds log 2 to its last bit at zero, and stays monotone in |eta| across the bound
    torch.testing.assert_close(continuous_bernoulli_log_normalizer(torch.zeros(1)),
                               torch.tensor([math.log(2)]), atol=0, rtol=0)
    across = torch.linspace(0.49, 0.51, 201)
    assert bool((continuous_bernoulli_log_normalizer(across).diff() >= 0).all())


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-6), (torch.float64, 1e-9)])
@pytest.mark.parametrize("magnitude", [0.0, 1e-6, 0.01, 0.49, 0.51, 5.0, 16.0, 20.0, 50.0, 100.0])
def test_the_continuous_bernoulli_gradient_matches_finite_differences(dtype, atol, magnitude):
    x = torch.tensor([0.0, 0.3, 0.97, 1.0], dtype=torch.float64)
    for logit in (magnitude, -magnitude):
        step = 1e-4
        at = torch.tensor(logit, dtype=torch.float64)
        expected = (naive_log_density(at + step, x) - naive_log_density(at - step, x)) / (2 * step)
        logits = torch.full((4,), logit, dtype=dtype, requires_grad=True)
        ContinuousBernoulli(logits=logits).log_prob(x.to(dtype)).sum().backward()
        torch.testing.assert_close(logits.grad.double(), expected, atol=atol, rtol=0)


@pytest.mark.parametrize("logit", [-50.0, -3.0, 0.0, 0.2, 3.0, 50.0])
def test_continuous_bernoulli_samples_have_its_moments(logit):
    x = quadrature_nodes(torch.float64)
    cb = ContinuousBernoulli(logits=torch.tensor(logit, dtype=torch.float64))
    density = cb.log_prob(x).exp()
    mean = torch.trapezoid(density * x, x)
    second = torch.trapezoid(density * x**2, x)
    samples = cb.rsample((40000,))
    assert samples.shape == (40000,) and bool(((samples >= 0) & (samples <= 1)).all())
    std = (second - mean**2).sqrt()
    # 5 standard errors of the sample moments
    assert abs(float(samples.mean() - mean)) < 5 * float(std) / 200
    assert abs(float(samples.square().mean() - second)) < 5 * float(std) / 200 * 2
    assert cb.sample((3, 2)).shape == (3, 2)


def test_continuous_bernoulli_samples_are_differentiable_in_the_logits():
    logits = torch.tensor([-30.0, -0.1, 0.0, 2.0, 30.0], requires_grad=True)
    draws = ContinuousBernoulli(logits=logits).rsample((100,))
    draws.sum().backward()
    assert bool(logits.grad.isfinite().all()) and float(logits.grad[3]) > 0


def test_the_continuous_bernoulli_expands_over_a_plate():
    cb = ContinuousBernoulli(logits=torch.tensor([0.5, -2.0])).expand((3, 2))
    assert cb.batch_shape == (3, 2)
    torch.testing.assert_close(cb.log_prob(torch.full((3, 2), 0.25))[2],
                               ContinuousBernoulli(logits=torch.tensor([0.5, -2.0])).log_prob(
                                   torch.full((2,), 0.25)))


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


#: logits on both sides of Tomczak & Welling's clip, log((1 - 1e-5) / 1e-5) = 11.5129
CLIP_LOGITS = torch.tensor([-40.0, -12.0, -11.0, -3.0, 0.0, 2.5, 11.0, 12.0, 40.0],
                           dtype=torch.float64)


def test_the_logit_clip_is_the_authors_clamp_of_the_probability():
    clip = logit_clip_of_probability_clip(1e-5)
    assert clip == pytest.approx(11.512915464920228, abs=1e-12)
    likelihood = BernoulliLikelihood(logit_clip=clip)
    logits = CLIP_LOGITS.expand(2, -1)
    x = torch.stack([torch.zeros(9), torch.ones(9)]).double()
    # Tomczak & Welling's log_Bernoulli: x log p + (1 - x) log(1 - p), p in [1e-5, 1 - 1e-5]
    # (1 - p) clamped is sigmoid(-l) clamped, which does not cancel at p near 1
    probability = torch.sigmoid(logits).clamp(1e-5, 1 - 1e-5)
    complement = torch.sigmoid(-logits).clamp(1e-5, 1 - 1e-5)
    expected = x * probability.log() + (1 - x) * complement.log()
    ours = likelihood(logits.unsqueeze(-1)).log_prob(x.unsqueeze(-1))  # one pixel each
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-15)
    # a pixel never costs more than -log(1e-5) = 11.51 nats
    assert ours.min().item() == pytest.approx(math.log(1e-5), rel=1e-9)
    torch.testing.assert_close(likelihood.mean(CLIP_LOGITS), torch.sigmoid(CLIP_LOGITS).clamp(
        1e-5, 1 - 1e-5), rtol=1e-12, atol=0)


def test_the_clipped_bernoulli_gets_no_gradient_beyond_the_clip():
    likelihood = BernoulliLikelihood(logit_clip=logit_clip_of_probability_clip(1e-5))
    logits = CLIP_LOGITS.clone().requires_grad_()
    x = torch.tensor([0, 1, 0, 1, 1, 0, 1, 0, 1], dtype=torch.float64)
    (gradient,) = torch.autograd.grad(likelihood(logits).log_prob(x), logits)
    inside = CLIP_LOGITS.abs() < 11.5
    # inside: d/dl [x l - softplus(l)] = x - sigmoid(l); outside: 0
    torch.testing.assert_close(gradient[inside], (x - torch.sigmoid(CLIP_LOGITS))[inside])
    assert torch.all(gradient[~inside] == 0)


def test_the_default_bernoulli_is_unclipped_and_scores_as_before():
    likelihood = BernoulliLikelihood()
    assert likelihood.logit_clip is None
    logits = torch.randn(3, 784) * 20  # many logits beyond any clip
    x = torch.bernoulli(torch.full((3, 784), 0.5))
    assert torch.equal(likelihood(logits).log_prob(x), bernoulli_log_prob(logits, x).sum(-1))
    assert torch.equal(likelihood.mean(logits), torch.sigmoid(logits))
    assert likelihood(torch.tensor([-40.0])).log_prob(torch.ones(1)).item() == pytest.approx(-40.0)


def test_the_logit_clip_comes_from_the_config_and_bad_ones_are_refused():
    clip = logit_clip_of_probability_clip(1e-5)
    vae = build_vae(TrainConfig(bernoulli_logit_clip=clip, hidden_dims=(8,), latent_dim=2),
                    data_dim=10)
    assert vae.likelihood.logit_clip == clip
    assert build_vae(TrainConfig(hidden_dims=(8,), latent_dim=2), data_dim=10) \
        .likelihood.logit_clip is None
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="logit_clip must be a positive number"):
            BernoulliLikelihood(logit_clip=bad)
    for bad in (0.0, 0.5, 1.0):
        with pytest.raises(ValueError, match="epsilon must be in \\(0, 1/2\\)"):
            logit_clip_of_probability_clip(bad)
