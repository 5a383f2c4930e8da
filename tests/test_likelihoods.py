"""Likelihoods: densities that normalize, true means, support checks, learned per-pixel sigma."""

from __future__ import annotations

import json
import math

import mpmath
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
    DiscretizedGaussian,
    DiscretizedGaussianLikelihood,
    DiscretizedLogistic,
    DiscretizedLogisticLikelihood,
    DiscretizedLogisticMixture,
    DiscretizedLogisticMixtureLikelihood,
    GaussianLikelihood,
    PixelGaussianLikelihood,
    bernoulli_log_prob,
    bits_per_dim,
    continuous_bernoulli_log_normalizer,
    continuous_bernoulli_mean,
    discretized_gaussian_log_prob,
    discretized_logistic_log_prob,
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
    vae = build_vae(config, data_dim=5)
    likelihood = vae.likelihood
    outputs = vae.decoder(torch.zeros(3, 2, 2))  # P numbers per value
    assert outputs.shape == (3, 2, 5 * likelihood.params_per_value)
    p = likelihood(outputs)
    assert p.event_shape == (5,) and p.batch_shape == (3, 2)
    assert likelihood.mean(outputs).shape == (3, 2, 5)


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


# --- discretized likelihoods of 8-bit data -------------------------------------------------

LEVELS = torch.arange(256, dtype=torch.float64) / 255
#: (loc, log-scale) pairs: broad, ordinary, tiny scales, locations on a bin's edge, at a
#: value, off the grid's ends
DISCRETE_PARAMETERS = [(loc, log_scale)
                       for loc in (-0.4, 0.0, 76.5 / 255, 0.5001, 200 / 255, 1.0, 1.7)
                       for log_scale in (3.0, 0.0, -2.0, -5.0, -8.0, -12.0, -16.0)]


def discrete_distributions(dtype: torch.dtype):
    locs = torch.tensor([loc for loc, _ in DISCRETE_PARAMETERS], dtype=dtype)
    log_scales = torch.tensor([log_scale for _, log_scale in DISCRETE_PARAMETERS], dtype=dtype)
    mixture = DiscretizedLogisticMixture(
        torch.stack([torch.zeros_like(locs), torch.full_like(locs, -1.0)], -1),
        torch.stack([locs, 1 - locs], -1), torch.stack([log_scales, log_scales + 1], -1))
    return {"logistic": DiscretizedLogistic(locs, log_scales),
            "gaussian": DiscretizedGaussian(locs, log_scales), "mixture": mixture}


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 2e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("name", ["logistic", "gaussian", "mixture"])
def test_each_values_discrete_probabilities_sum_to_one_over_the_256_levels(name, dtype, tolerance):
    p = discrete_distributions(dtype)[name]
    log_prob = p.log_prob(LEVELS.to(dtype)[:, None])  # (256 levels, parameters)
    assert bool(torch.isfinite(log_prob).all())
    totals = log_prob.double().exp().sum(0)
    torch.testing.assert_close(totals, torch.ones_like(totals), atol=tolerance, rtol=0)
    # the mean is the expectation over the levels
    expected = (log_prob.double().exp() * LEVELS[:, None]).sum(0)
    torch.testing.assert_close(p.mean.double(), expected, atol=5 * tolerance, rtol=0)


def reference_log_prob(cdf, value: float, loc: float, log_scale: float,
                       dtype: torch.dtype) -> float:
    """log P(value) to 40 digits: the CDF's difference over the value's bin, the edge bins
    taking the tails; above ``loc`` the difference of the survival functions (the CDF is
    symmetric), so that two numbers near 1 are never subtracted.  The bin's edges are
    (k +- 1/2) / 255 as ``dtype`` holds them: where a tiny scale puts ``loc`` within rounding
    of an edge, the answer depends on that rounding, which no computation in ``dtype`` avoids."""
    mpmath.mp.dps = 40
    scale = mpmath.exp(mpmath.mpf(log_scale))
    k = round(value * 255)
    edges = torch.tensor([(k + 0.5) / 255, (k - 0.5) / 255], dtype=dtype).tolist()
    loc = mpmath.mpf(loc)
    upper = (mpmath.mpf(edges[0]) - loc) / scale
    lower = (mpmath.mpf(edges[1]) - loc) / scale
    centre = mpmath.mpf(k) / 255
    if centre > loc:
        return float(mpmath.log((cdf(-lower) if k else 1) - (cdf(-upper) if k < 255 else 0)))
    return float(mpmath.log((cdf(upper) if k < 255 else 1) - (cdf(lower) if k else 0)))


CDFS = {"logistic": lambda t: 1 / (1 + mpmath.exp(-t)), "gaussian": mpmath.ncdf}


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 2e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("name", ["logistic", "gaussian"])
def test_the_discrete_log_probabilities_are_accurate_for_tiny_scales_and_far_tails(name, dtype, rtol):
    values = [0.0, 1 / 255, 76 / 255, 77 / 255, 128 / 255, 254 / 255, 1.0]
    rows = [(value, loc, log_scale) for value in values for loc, log_scale in DISCRETE_PARAMETERS]
    value, loc, log_scale = (torch.tensor(column, dtype=dtype) for column in zip(*rows, strict=True))
    ours = {"logistic": discretized_logistic_log_prob,
            "gaussian": discretized_gaussian_log_prob}[name](value, loc, log_scale)
    assert ours.dtype == dtype
    # the parameters as this dtype holds them, scored exactly
    # the discretized Gaussian computes in float64 whatever its parameters' dtype
    edges = torch.float64 if name == "gaussian" else dtype
    reference = torch.tensor([reference_log_prob(CDFS[name], v, float(m), float(s), edges)
                              for v, m, s in zip(value.tolist(), loc.tolist(), log_scale.tolist(),
                                                 strict=True)], dtype=torch.float64)
    # probabilities from 1 down to e^-(10^9): their logs to relative (near 0, absolute) precision
    assert reference.min() < -1e6 and reference.max() > -1e-12
    torch.testing.assert_close(ours.double(), reference, rtol=rtol, atol=rtol)
    # the naive difference of CDFs in float64 underflows to log 0 for many of them
    naive = torch.log(torch.sigmoid((value.double() + 1 / 510 - loc.double()) / log_scale.double().exp())
                      - torch.sigmoid((value.double() - 1 / 510 - loc.double()) / log_scale.double().exp()))
    assert bool(torch.isinf(naive).any())


@pytest.mark.parametrize("name", ["logistic", "gaussian"])
def test_the_discrete_log_probabilities_have_finite_gradients_for_tiny_scales(name):
    p_class = {"logistic": DiscretizedLogistic, "gaussian": DiscretizedGaussian}[name]
    loc = torch.tensor([0.3, 0.5, 0.9, 0.5], requires_grad=True)
    log_scale = torch.tensor([-12.0, -9.0, -6.0, 0.0], requires_grad=True)
    value = torch.tensor([0.0, 128 / 255, 1.0, 128 / 255])
    log_prob = p_class(loc, log_scale).log_prob(value)
    loc_grad, scale_grad = torch.autograd.grad(log_prob.sum(), (loc, log_scale))
    assert bool(torch.isfinite(loc_grad).all()) and bool(torch.isfinite(scale_grad).all())
    # the edge bins pull the location towards the edge: d log F(h) / d loc < 0 at value 0
    assert loc_grad[0] < 0 and loc_grad[2] > 0


@pytest.mark.parametrize("name", ["logistic", "gaussian", "mixture"])
def test_discrete_draws_fall_on_the_levels_with_their_probabilities(name):
    p = discrete_distributions(torch.float64)[name]
    index = 2  # broad: loc -0.4, log-scale -2, mass at 0 and spread over the first levels
    draws = p.sample((20000,))[:, index]
    assert bool(((draws * 255 - (draws * 255).round()).abs() < 1e-9).all())
    counts = torch.bincount((draws * 255).round().long(), minlength=256).double()
    probabilities = p.log_prob(LEVELS[:, None])[:, index].exp()
    assert (counts / 20000 - probabilities).abs().max() < 0.015


def test_the_mixture_of_one_component_is_the_discretized_logistic():
    loc, log_scale = torch.rand(5, 7), torch.randn(5, 7) - 3
    value = torch.randint(0, 256, (5, 7)) / 255
    single = DiscretizedLogistic(loc, log_scale).log_prob(value)
    mixture = DiscretizedLogisticMixture(torch.zeros(5, 7, 1), loc[..., None],
                                         log_scale[..., None]).log_prob(value)
    torch.testing.assert_close(mixture, single)
    # two components: the weighted sum of the two probabilities
    two = DiscretizedLogisticMixture(torch.tensor([0.0, math.log(3.0)]), torch.tensor([0.2, 0.7]),
                                     torch.tensor([-3.0, -4.0]))
    expected = (0.25 * DiscretizedLogistic(torch.tensor(0.2), torch.tensor(-3.0)).log_prob(value).exp()
                + 0.75 * DiscretizedLogistic(torch.tensor(0.7), torch.tensor(-4.0)).log_prob(value).exp())
    torch.testing.assert_close(two.log_prob(value).exp(), expected)


def test_the_discretized_likelihoods_read_their_decoder_blocks():
    data_dim = 4
    loc, log_scale = torch.rand(data_dim), torch.randn(data_dim) - 2
    value = torch.tensor([0, 10, 128, 255]) / 255
    params = torch.cat([loc, log_scale])  # locations first, then log-scales
    expected = DiscretizedLogistic(loc, log_scale).log_prob(value).sum()
    torch.testing.assert_close(DiscretizedLogisticLikelihood()(params).log_prob(value), expected)
    expected = DiscretizedGaussian(loc, log_scale).log_prob(value).sum()
    torch.testing.assert_close(DiscretizedGaussianLikelihood()(params).log_prob(value), expected)
    mixture = DiscretizedLogisticMixtureLikelihood(num_components=2)
    logits, locs, log_scales = torch.randn(2, data_dim), torch.rand(2, data_dim), -torch.rand(2, data_dim)
    params = torch.cat([logits, locs, log_scales]).reshape(-1)  # (3 blocks x 2 components x D)
    expected = DiscretizedLogisticMixture(logits.T, locs.T, log_scales.T).log_prob(value).sum()
    torch.testing.assert_close(mixture(params).log_prob(value), expected)
    assert mixture.params_per_value == 6 and mixture.num_levels == 256


@pytest.mark.parametrize("likelihood", [DiscretizedLogisticLikelihood(),
                                        DiscretizedGaussianLikelihood(),
                                        DiscretizedLogisticMixtureLikelihood(2)])
def test_the_discretized_likelihoods_refuse_values_off_the_8_bit_grid(likelihood):
    likelihood.check_support(torch.tensor([[0.0, 1 / 255, 1.0]]))
    with pytest.raises(InvalidDataError, match=r"k/255, k = 0..255 \(256 levels\), but 1 values "
                                               r"are not, e.g. 0.5; give 8-bit images"):
        likelihood.check_support(torch.tensor([[0.0, 0.5, 1.0]]))
    with pytest.raises(InvalidDataError, match="but 1 values are not, e.g. 1.2"):
        likelihood.check_support(torch.tensor([[1.2]]))


def test_bits_per_dim_of_a_log_probability():
    # a uniform distribution over 256 levels in each of 3 dimensions: exactly 8 bits each
    assert bits_per_dim(-3 * math.log(256), 3) == pytest.approx(8.0, rel=1e-15)
    assert BernoulliLikelihood.num_levels == 2 and GaussianLikelihood.num_levels is None


def eight_bit_images(path, rows: int = 60, side: int = 4):
    """An npz of ``rows`` 8-bit images of ``side`` x ``side`` (uint8, read as k / 255)."""
    import numpy as np

    generator = np.random.default_rng(0)
    images = generator.integers(0, 256, (rows, side, side), dtype=np.uint8)
    images[:, 0] = 0  # a border that never varies, as MNIST's
    np.savez(path, train=images[:40], test=images[40:])
    return path


@pytest.mark.parametrize("name, levels", [("discretized_logistic", 256),
                                          ("discretized_logistic_mixture", 256),
                                          ("discretized_gaussian", 256), ("bernoulli", 2),
                                          ("gaussian", None), ("bernoulli_grey", None)])
def test_evaluation_reports_bits_per_dim_beside_nats_for_discrete_likelihoods(name, levels):
    from pyrovae.runs import evaluate_vae, log_px_line

    vae = build_vae(TrainConfig(hidden_dims=(8,), latent_dim=2, likelihood=name,
                                logistic_components=3), data_dim=16)
    x = torch.randint(0, 256, (10, 16)) / 255
    if name == "bernoulli":
        x = x.round()
    results = evaluate_vae(vae, x, num_samples=5)
    if levels is None:
        assert "log_marginal_likelihood_bits_per_dim" not in results
        assert "bits/dim" not in log_px_line(results)
        return
    assert results["bits_per_dim_levels"] == levels
    for key in ("test_elbo", "log_marginal_likelihood"):
        assert results[f"{key}_bits_per_dim"] == pytest.approx(
            -results[key] / (16 * math.log(2)), rel=1e-12)
        assert results[f"{key}_bits_per_dim_standard_error"] == pytest.approx(
            results[f"{key}_standard_error"] / (16 * math.log(2)), rel=1e-12)
    line = log_px_line(results)
    assert f"nats ({results['log_marginal_likelihood_bits_per_dim']:.4f} ± " in line
    # a probability of each of 256 levels costs at most 8 bits under a sensible model; the
    # untrained one is no better than uniform, but a probability never exceeds 1
    assert results["log_marginal_likelihood_bits_per_dim"] > 0


def test_the_command_line_trains_a_discretized_logistic_on_8_bit_images(tmp_path, capsys):
    from pyrovae.cli import main

    data = eight_bit_images(tmp_path / "bytes.npz")
    run_dir = tmp_path / "run"
    assert main(["train", "--dataset", f"npz:{data}", "--binarize", "none",
                 "--likelihood", "discretized_logistic", "--hidden-dims", "16", "--latent-dim",
                 "2", "--epochs", "2", "--batch-size", "20", "--eval-samples", "10",
                 "--out-dir", str(run_dir), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    results = json.loads((run_dir / "results.json").read_text())
    bits = results["log_marginal_likelihood_bits_per_dim"]
    assert bits == pytest.approx(-results["log_marginal_likelihood"] / (16 * math.log(2)))
    assert f"({bits:.4f} ± " in printed and "bits/dim) over 20 test points" in printed
    # grey levels off the 8-bit grid are refused in one line, exit status 2
    import numpy as np

    np.savez(tmp_path / "halves.npz", train=np.full((10, 4), 0.5 / 255, dtype=np.float32))
    assert main(["train", "--dataset", f"npz:{tmp_path / 'halves.npz'}", "--binarize", "none",
                 "--likelihood", "discretized_gaussian", "--out-dir", str(tmp_path / "bad"),
                 "--no-progress", "--batch-size", "5"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "values k/255, k = 0..255" in error[0]


def test_the_epoch_log_gives_the_test_log_px_in_bits_per_dim_too(caplog):
    import logging

    from pyrovae.data import DataSplits
    from pyrovae.train import fit

    x = torch.randint(0, 256, (20, 16)) / 255
    vae = build_vae(TrainConfig(hidden_dims=(8,), latent_dim=2,
                                likelihood="discretized_logistic"), data_dim=16)
    with caplog.at_level(logging.INFO, logger="pyrovae.train"):
        history = fit(vae, DataSplits.from_tensors(x[:10], x[10:]), epochs=1, batch_size=5,
                      progress=False, log_px_every=1, log_px_samples=3)
    bits = bits_per_dim(history[0].test_log_px, 16)
    assert f"(K=3) = {bits:.4f} bits/dim" in caplog.text
