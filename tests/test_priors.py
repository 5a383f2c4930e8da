"""Priors: densities that normalize, reduce to a Gaussian at K = 1, and learn."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO

from pyrovae import DataSplits, TrainConfig, build_vae, fit
from pyrovae.priors import (
    PRIORS,
    DiagonalNormalPrior,
    FlowPrior,
    MixtureOfGaussiansPrior,
    StandardNormalPrior,
    VampPrior,
)

DATA_DIM = 6


def grid_integral(log_density, bound: float = 10.0, points: int = 401) -> float:
    """The integral of exp(log_density) over [-bound, bound]^2 by the trapezoid rule."""
    axis = torch.linspace(-bound, bound, points, dtype=torch.float64)
    z = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), dim=-1)  # (points, points, 2)
    density = log_density(z.reshape(-1, 2)).exp().reshape(points, points)
    return torch.trapezoid(torch.trapezoid(density, axis, dim=1), axis).item()


def perturb(module: torch.nn.Module, std: float = 0.5, seed: int = 1) -> None:
    """Random parameters (masks are buffers, so autoregressive structure survives)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator,
                                        dtype=parameter.dtype) * std)


def small_vae(prior: str, guide: str = "diagonal", **values):
    values = {"num_components": 3, **values}
    config = TrainConfig(hidden_dims=(5,), latent_dim=2, prior=prior, guide=guide,
                         likelihood="gaussian", **values)
    return build_vae(config, data_dim=DATA_DIM).double()


@pytest.mark.parametrize("prior, guide", [(name, "diagonal") for name in PRIORS] + [("vamp", "iaf")])
def test_every_prior_density_integrates_to_one_in_two_dimensions(prior, guide):
    vae = small_vae(prior, guide)
    perturb(vae)
    if prior == "diagonal":  # keep the scales positive and moderate
        with torch.no_grad():
            vae.prior.scale = torch.tensor([0.7, 1.6], dtype=torch.float64)
    p = vae.prior(vae.posterior)
    assert p.batch_shape == () and p.event_shape == (2,)
    assert grid_integral(p.log_prob) == pytest.approx(1.0, abs=2e-3)


def test_the_flow_prior_is_not_gaussian_after_perturbation():
    # the normalization test above would pass trivially for N(0, I): make sure it is not
    prior = FlowPrior(2, num_flows=2).double()
    perturb(prior)
    z = torch.randn(50, 2, dtype=torch.float64)
    gaussian = dist.Normal(torch.zeros(2, dtype=torch.float64), 1.0).to_event(1)
    assert (prior().log_prob(z) - gaussian.log_prob(z)).abs().max() > 0.1


def test_a_new_flow_prior_is_the_standard_normal():
    z = torch.randn(20, 3)
    expected = StandardNormalPrior(3)().log_prob(z)
    torch.testing.assert_close(FlowPrior(3, num_flows=2)().log_prob(z), expected)
    torch.testing.assert_close(FlowPrior(3, num_flows=0)().log_prob(z), expected)
    assert FlowPrior(3, num_flows=2)().sample((7,)).shape == (7, 3)


def test_a_mixture_with_one_component_is_a_diagonal_gaussian():
    mixture = MixtureOfGaussiansPrior(3, num_components=1)
    gaussian = DiagonalNormalPrior(3)
    loc, scale = torch.tensor([0.5, -1.0, 2.0]), torch.tensor([0.3, 1.0, 2.5])
    mixture.locs = loc[None]
    mixture.scales = scale[None]
    gaussian.loc, gaussian.scale = loc, scale
    z = torch.randn(10, 3) * 2
    torch.testing.assert_close(mixture().log_prob(z), gaussian().log_prob(z))


def test_the_mixture_density_is_the_weighted_sum_of_its_components():
    prior = MixtureOfGaussiansPrior(2, num_components=3)
    prior.logits = torch.tensor([0.0, 1.0, -2.0])
    prior.scales = torch.tensor([[1.0, 0.5], [2.0, 2.0], [0.1, 0.3]])
    z = torch.randn(10, 2)
    weights = torch.softmax(prior.logits, 0)
    density = sum(
        weights[k] * dist.Normal(prior.locs[k], prior.scales[k]).log_prob(z).sum(-1).exp()
        for k in range(3)
    )
    torch.testing.assert_close(prior().log_prob(z), density.log())


@pytest.mark.parametrize("guide", ["diagonal", "iaf"])
def test_a_vampprior_with_one_pseudo_input_is_its_posterior(guide):
    vae = small_vae("vamp", guide, num_components=1)
    perturb(vae)
    z = torch.randn(10, 2, dtype=torch.float64)
    expected = vae.posterior(vae.prior.pseudo_inputs).log_prob(z[:, None, :])[:, 0]
    torch.testing.assert_close(vae.prior(vae.posterior).log_prob(z), expected)


def test_the_vampprior_scores_particle_batches_like_a_loop_over_pseudo_inputs():
    # IAF components cannot broadcast a size-1 component dimension themselves
    vae = small_vae("vamp", "iaf")
    perturb(vae)
    p = vae.prior(vae.posterior)
    z = torch.randn(4, 5, 2, dtype=torch.float64)  # (particles, data points, latent_dim)
    per_component = torch.stack([
        vae.posterior(vae.prior.pseudo_inputs[k]).log_prob(z) for k in range(3)
    ], dim=-1)
    expected = torch.logsumexp(per_component, -1) - torch.log(torch.tensor(3.0))
    torch.testing.assert_close(p.log_prob(z), expected.double())
    torch.testing.assert_close(p.expand((4, 5)).log_prob(z), expected.double())


def test_the_vampprior_needs_the_posterior():
    with pytest.raises(ValueError, match="posterior"):
        VampPrior(2, DATA_DIM)()


def test_pseudo_inputs_start_at_training_points_once():
    prior = VampPrior(2, DATA_DIM, num_components=4)
    x = torch.rand(20, DATA_DIM)
    prior.init_from_data(x)
    assert bool(prior.initialized_from_data)
    matches = (prior.pseudo_inputs.detach()[:, None, :] == x[None]).all(-1)
    assert matches.any(1).all() and len(set(matches.float().argmax(1).tolist())) == 4
    chosen = prior.pseudo_inputs.detach().clone()
    prior.init_from_data(torch.rand(20, DATA_DIM))  # already initialised: no change
    assert torch.equal(prior.pseudo_inputs.detach(), chosen)
    restored = VampPrior(2, DATA_DIM, num_components=4)
    restored.load_state_dict(prior.state_dict())
    restored.init_from_data(torch.rand(20, DATA_DIM))  # a reloaded prior keeps its inputs
    assert torch.equal(restored.pseudo_inputs.detach(), chosen)


def test_pseudo_inputs_can_be_left_alone_or_drawn_with_replacement():
    prior = VampPrior(2, DATA_DIM, num_components=4, pseudo_inputs_from_data=False)
    before = prior.pseudo_inputs.detach().clone()
    prior.init_from_data(torch.rand(20, DATA_DIM))
    assert torch.equal(prior.pseudo_inputs.detach(), before)
    x = torch.rand(2, DATA_DIM)
    prior.init_pseudo_inputs(x)  # K > N: with replacement
    assert (prior.pseudo_inputs.detach()[:, None, :] == x[None]).all(-1).any(1).all()
    with pytest.raises(ValueError, match="shape"):
        prior.init_pseudo_inputs(torch.rand(3, DATA_DIM + 1))


def test_fit_initialises_the_pseudo_inputs_from_the_training_data():
    vae = build_vae(TrainConfig(hidden_dims=(5,), latent_dim=2, prior="vamp", num_components=3,
                                likelihood="gaussian"), data_dim=DATA_DIM)
    train = torch.rand(30, DATA_DIM)
    fit(vae, DataSplits(train, train[:10]), epochs=1, batch_size=10, lr=1e-6, progress=False)
    assert bool(vae.prior.initialized_from_data)
    distance = torch.cdist(vae.prior.pseudo_inputs.detach(), train).min(1).values
    assert distance.max() < 1e-3  # three training points, barely moved by lr=1e-6


@pytest.mark.parametrize("prior, learned", [
    ("mog", ("logits_unconstrained", "locs_unconstrained", "scales_unconstrained")),
    ("vamp", ("pseudo_inputs",)),
    ("flow", ("flows.0.arn.layers.0.weight", "flows.1.arn.layers.1.weight")),
])
def test_prior_parameters_learn(prior, learned):
    # plain parameters for vamp/flow, PyroParam's unconstrained tensors for mog
    vae = small_vae(prior).float()
    x = torch.rand(8, DATA_DIM)
    before = {name: value.detach().clone() for name, value in vae.prior.named_parameters()}
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    svi.step(x)
    svi.step(x)
    after = dict(vae.prior.named_parameters())
    for name in learned:
        assert name in after and not torch.equal(after[name].detach(), before[name]), name
