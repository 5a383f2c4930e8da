"""Priors: densities that normalize, reduce to a Gaussian at K = 1, and learn."""

from __future__ import annotations

import weakref

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.utils.flop_counter
from pyro.infer import SVI, Trace_ELBO

from pyrovae import DataSplits, TrainConfig, build_vae, fit, priors
from pyrovae.errors import ConfigError
from pyrovae.guides import GUIDES
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
    values = {"num_components": 3, "latent_dim": 2, **values}
    config = TrainConfig(hidden_dims=(5,), prior=prior, guide=guide,
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


def linear_posterior(data_dim: int, latent_dim: int):
    """q(z|u) = N(loc, softplus(scale)) from one random linear layer of u ``(..., data_dim)``."""
    encoder = torch.nn.Linear(data_dim, 2 * latent_dim)

    def posterior(u):
        loc, scale = encoder(u).chunk(2, -1)
        return dist.Normal(loc, torch.nn.functional.softplus(scale)).to_event(1)

    return posterior


def test_the_sigmoid_link_keeps_pseudo_inputs_in_the_unit_interval_under_its_logits():
    torch.manual_seed(0)
    prior = VampPrior(2, DATA_DIM, num_components=200, pseudo_inputs_from_data=False,
                      pseudo_input_link="sigmoid")
    logits = prior.pseudo_input_logits.detach()  # logits ~ N(-0.05, 0.01)
    assert abs(logits.mean().item() + 0.05) < 2e-3 and abs(logits.std().item() - 0.01) < 1e-3
    torch.testing.assert_close(prior.inputs(), torch.sigmoid(logits))
    torch.testing.assert_close(prior.inputs(3, 7), torch.sigmoid(logits[3:7]))
    # its own key: a checkpoint of the other link does not load into it
    assert "pseudo_input_logits" in prior.state_dict() and not hasattr(prior, "pseudo_inputs")
    with pytest.raises(RuntimeError, match="pseudo_input"):
        prior.load_state_dict(VampPrior(2, DATA_DIM, num_components=200).state_dict())
    x = torch.bernoulli(torch.full((50, DATA_DIM), 0.5))
    prior.init_pseudo_inputs(x)  # binary points, clamped to [1e-3, 1 - 1e-3] before the logit
    inputs = prior.inputs().detach()
    assert ((inputs - 1e-3).abs() < 1e-6).logical_or((inputs - (1 - 1e-3)).abs() < 1e-6).all()
    # the prior scores z through q(z | sigmoid(logits)): gradients reach the logits
    prior(linear_posterior(DATA_DIM, 2)).log_prob(torch.randn(5, 2)).sum().backward()
    assert prior.pseudo_input_logits.grad is not None
    assert prior.pseudo_input_logits.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="outside \\[0, 1\\]"):
        prior.init_pseudo_inputs(torch.full((50, DATA_DIM), 2.0))
    with pytest.raises(ValueError, match="pseudo_input_link"):
        VampPrior(2, DATA_DIM, pseudo_input_link="tanh")


def test_the_hardtanh_link_clips_pseudo_inputs_to_the_unit_interval_with_no_gradient_outside():
    torch.manual_seed(0)
    prior = VampPrior(2, DATA_DIM, num_components=200, pseudo_inputs_from_data=False,
                      pseudo_input_link="hardtanh")
    values = prior.pseudo_inputs_unclipped.detach()  # ~ N(0.05, 0.01): dark images
    assert abs(values.mean().item() - 0.05) < 2e-3 and abs(values.std().item() - 0.01) < 1e-3
    torch.testing.assert_close(prior.inputs(), values.clamp(0, 1))
    assert "pseudo_inputs_unclipped" in prior.state_dict() and not hasattr(prior, "pseudo_inputs")
    with pytest.raises(RuntimeError, match="pseudo_input"):
        prior.load_state_dict(VampPrior(2, DATA_DIM, num_components=200,
                                        pseudo_input_link="sigmoid").state_dict())
    with torch.no_grad():  # three values outside [0, 1], one inside
        prior.pseudo_inputs_unclipped[0, :4] = torch.tensor([-0.5, 1.5, 0.25, 7.0])
    torch.testing.assert_close(prior.inputs()[0, :4], torch.tensor([0.0, 1.0, 0.25, 1.0]))
    prior(linear_posterior(DATA_DIM, 2)).log_prob(torch.randn(5, 2)).sum().backward()
    grad = prior.pseudo_inputs_unclipped.grad[0, :4]
    assert (grad[[0, 1, 3]] == 0).all() and grad[2] != 0  # the clip passes gradient inside only
    x = torch.bernoulli(torch.full((50, DATA_DIM), 0.5))
    prior.init_pseudo_inputs(x)  # data points are taken as they are
    assert (prior.inputs().detach()[:, None, :] == x[None]).all(-1).any(1).all()
    with pytest.raises(ValueError, match="hardtanh link .* outside \\[0, 1\\]"):
        prior.init_pseudo_inputs(torch.full((50, DATA_DIM), -1.0))


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


# Diagonal-Normal mixture components are scored as a matrix product; the reference is
# torch's stock MixtureSameFamily, which scores every component elementwise.
TD = torch.distributions


def elementwise_mixture(mixture: dist.MixtureSameFamily) -> TD.MixtureSameFamily:
    """The same mixture as torch's stock ``MixtureSameFamily`` (``(..., K, D)`` elementwise)."""
    return TD.MixtureSameFamily(mixture.mixture_distribution, mixture.component_distribution)


def assert_same_values_and_gradients(fast, elementwise, z, parameters, *, atol=None, rtol=None,
                                     grad_scale_tol=None):
    """Equal log densities, and equal gradients wrt z and ``parameters``.

    ``grad_scale_tol``: gradients within that fraction of their largest entry (float32,
    where the gradients wrt z and s reach 1e3 and the rounding scales with them).
    """
    z = z.detach().requires_grad_()
    values = fast.log_prob(z), elementwise.log_prob(z)
    assert values[0].shape == values[1].shape
    torch.testing.assert_close(*values, atol=atol, rtol=rtol)
    inputs = [z, *parameters]
    grads = [torch.autograd.grad(value.sum(), inputs, retain_graph=True) for value in values]
    for got, want in zip(*grads, strict=True):
        if grad_scale_tol is None:
            torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
        else:
            torch.testing.assert_close(got, want, rtol=0,
                                       atol=grad_scale_tol * want.abs().max().item())


def random_mog(latent_dim: int, num_components: int, dtype=torch.float64,
               scales=(0.02, 2.0)) -> MixtureOfGaussiansPrior:
    prior = MixtureOfGaussiansPrior(latent_dim, num_components).to(dtype)
    prior.logits = torch.randn(num_components, dtype=dtype)
    prior.scales = torch.empty(num_components, latent_dim, dtype=dtype).uniform_(*scales)
    return prior


@pytest.mark.parametrize("sample_shape", [(), (3,)])
@pytest.mark.parametrize("latent_dim, num_components", [(2, 3), (40, 500)])
def test_the_mog_prior_scores_like_the_elementwise_mixture(latent_dim, num_components,
                                                           sample_shape):
    # float64: the matrix product is exact up to rounding, values and gradients wrt z and
    # the logits, locs and scales (through their unconstrained parameters)
    prior = random_mog(latent_dim, num_components)
    p = prior()
    z = torch.randn(*sample_shape, 5, latent_dim, dtype=torch.float64)
    parameters = list(prior.parameters())
    assert_same_values_and_gradients(p, elementwise_mixture(p), z, parameters)
    # the data plate's broadcast: batch (5,), components (5, K) with stride-0 parameters
    assert_same_values_and_gradients(p.expand((5,)), elementwise_mixture(p).expand((5,)), z,
                                     parameters)


@pytest.mark.parametrize("sample_shape", [(), (3,)])
@pytest.mark.parametrize("latent_dim, num_components", [(2, 3), (40, 500)])
def test_the_diagonal_vampprior_scores_like_the_elementwise_mixture(latent_dim, num_components,
                                                                    sample_shape):
    vae = small_vae("vamp", latent_dim=latent_dim, num_components=num_components)
    perturb(vae)
    p = vae.prior(vae.posterior)
    z = torch.randn(*sample_shape, 5, latent_dim, dtype=torch.float64)
    # the gradients reach the pseudo-inputs, encoder and guide heads through locs and scales
    parameters = [*vae.prior.parameters(), *vae.encoder.parameters(),
                  *vae.guide_family.parameters()]
    assert_same_values_and_gradients(p, elementwise_mixture(p), z, parameters)
    assert_same_values_and_gradients(p.expand((5,)), elementwise_mixture(p).expand((5,)), z,
                                     parameters)


def test_the_diagonal_mixture_is_accurate_in_float32():
    # Realistic values, z half near the components: the expansion cancels ~1e4 per
    # coordinate there, which float32 alone would get wrong by ~2e-3 nats.  Measured: 1.2e-5
    # nats off the float64 density, as the float32 elementwise path (1.4e-5); gradients
    # within ~3e-6 of their largest entry of each other, so the tolerances leave ~5x.
    prior64 = random_mog(40, 500)
    near = prior64.locs[:200] + prior64.scales[:200] * torch.randn(200, 40, dtype=torch.float64)
    z = torch.cat([torch.randn(200, 40, dtype=torch.float64), near]).detach()
    exact = prior64().log_prob(z)
    prior = prior64.float()
    p = prior()
    assert (p.log_prob(z.float()).double() - exact).abs().max() < 1e-4
    assert_same_values_and_gradients(p, elementwise_mixture(p), z.float(),
                                     list(prior.parameters()), atol=1e-4, rtol=0,
                                     grad_scale_tol=2e-5)


def score_without_the_matrix_product(monkeypatch, p, z):
    def forbidden(*args):
        raise AssertionError("the matrix product scored non-diagonal components")
    monkeypatch.setattr(priors, "_diagonal_normal_log_densities", forbidden)
    return p.log_prob(z)


@pytest.mark.parametrize("guide", list(GUIDES))
def test_only_diagonal_normal_components_take_the_matrix_product(guide, monkeypatch):
    vae = small_vae("vamp", guide)
    perturb(vae)
    p = vae.prior(vae.posterior)
    z = torch.randn(4, 5, 2, dtype=torch.float64)
    diagonal = priors.diagonal_normal_components(p.component_distribution) is not None
    assert diagonal == (guide == "diagonal")
    if not diagonal:  # still scored (their values are checked by the tests above)
        assert score_without_the_matrix_product(monkeypatch, p, z).shape == (4, 5)


def test_genuinely_batched_components_are_scored_elementwise(monkeypatch):
    # components that differ across a batch dimension are not a (K, D) matrix
    locs, scales = torch.randn(5, 3, 2), torch.rand(5, 3, 2) + 0.1
    p = priors._BroadcastingMixture(dist.Categorical(logits=torch.zeros(5, 3)),
                                    dist.Normal(locs, scales).to_event(1))
    z = torch.randn(4, 5, 2)
    expected = elementwise_mixture(p).log_prob(z)
    torch.testing.assert_close(score_without_the_matrix_product(monkeypatch, p, z), expected)


# VampPriors whose components are not diagonal Normals are scored a chunk of components at
# a time, each chunk's graph recomputed in the backward pass.

def retained_graph_bytes(function) -> tuple[torch.Tensor, int]:
    """``function()`` and the bytes of storage its autograd graph keeps for backward."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = function()
    return result, sum(storages.values())


@pytest.mark.parametrize("guide", ["iaf", "fullcov", "lowrank"])
def test_the_chunked_vampprior_scores_like_all_components_at_once(guide):
    whole = small_vae("vamp", guide, num_components=7)
    perturb(whole)
    chunked = small_vae("vamp", guide, num_components=7)
    chunked.load_state_dict(whole.state_dict())
    chunked.prior.chunk_bytes = 1  # one component per chunk
    z = torch.randn(3, 5, 2, dtype=torch.float64)  # (particles, data points, latent_dim)
    p_whole, p_chunked = whole.prior(whole.posterior), chunked.prior(chunked.posterior)
    assert p_chunked.chunk_size((3, 5)) == 1 and p_whole.chunk_size((3, 5)) == 7
    for expand in (False, True):  # the data plate's broadcast to batch (5,)
        a = p_whole.expand((5,)) if expand else p_whole
        b = p_chunked.expand((5,)) if expand else p_chunked
        assert_same_values_and_gradients(a, b, z, [])
    # gradients reach the pseudo-inputs, encoder and guide through every chunk
    grads = [torch.autograd.grad(p.log_prob(z).sum(), [
        *vae.prior.parameters(), *vae.encoder.parameters(), *vae.guide_family.parameters()])
        for vae, p in ((whole, p_whole), (chunked, p_chunked))]
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want)
    with torch.no_grad():
        torch.testing.assert_close(p_chunked.log_prob(z), p_whole.log_prob(z))


def test_the_chunked_vampprior_keeps_a_graph_independent_of_the_number_of_components():
    retained = {}
    for num_components in (8, 64):
        vae = small_vae("vamp", "iaf", num_components=num_components, latent_dim=4)
        perturb(vae)
        p = vae.prior(vae.posterior)
        chunk = p.chunk_size((20,))
        vae.prior.chunk_bytes = int(p.log_prob_cost((20,)).unchunked_bytes / num_components * 4)
        p = vae.prior(vae.posterior)
        assert p.chunk_size((20,)) == 4 and chunk == num_components
        z = torch.randn(20, 4, dtype=torch.float64, requires_grad=True)
        log_prob, retained[num_components] = retained_graph_bytes(lambda p=p, z=z: p.log_prob(z))
        log_prob.sum().backward()
        assert bool(z.grad.isfinite().all())
    unchunked = p.log_prob_cost((20,)).unchunked_bytes
    # 56 more components keep only their 20 x 56 densities (float64), not 56 graphs
    assert retained[64] - retained[8] < 20 * 56 * 8 * 8, retained
    assert retained[64] < unchunked / 10, (retained, unchunked)


def test_the_vampprior_cost_estimate_matches_what_scoring_all_components_costs():
    vae = small_vae("vamp", "iaf", num_components=6, latent_dim=4)
    perturb(vae)
    p = vae.prior(vae.posterior)
    z = torch.randn(10, 4, dtype=torch.float64, requires_grad=True)
    cost = p.log_prob_cost((10,))
    assert (cost.family, cost.num_components, cost.num_values) == ("2-step flow", 6, 10)
    counter = torch.utils.flop_counter.FlopCounterMode(display=False)
    elementwise = p.component_distribution.log_prob  # the stock path: every pair at once
    with counter:
        _, kept = retained_graph_bytes(lambda: elementwise(z[:, None, :].expand(10, 6, 4)))
    assert cost.flops == pytest.approx(counter.get_total_flops(), rel=0.05)
    assert cost.unchunked_bytes == pytest.approx(kept, rel=0.3)
    assert "6 2-step flow mixture components for 10 z" in cost.describe()
    diagonal = small_vae("vamp", "diagonal", num_components=6, latent_dim=4)
    assert diagonal.prior.log_prob_cost(diagonal.posterior, (10,)).family == "diagonal-Normal"


def test_a_vampprior_that_cannot_fit_in_memory_is_refused_in_one_line():
    vae = small_vae("vamp", "iaf", num_components=500, latent_dim=4)
    cost = vae.prior.check_fits(vae.posterior, (100,), available_bytes=10**12)
    assert cost.peak_bytes < 10**12 and cost.chunk_size <= 500
    # where only the default chunks do not fit, the chunks shrink to half the memory
    tight = int(cost.minimum_bytes * 3)
    assert vae.prior.check_fits(vae.posterior, (100,), available_bytes=tight).peak_bytes <= tight
    assert vae.prior.chunk_bytes == tight // 2
    with pytest.raises(ConfigError) as refused:
        vae.prior.check_fits(vae.posterior, (100_000,), available_bytes=10**8)
    message = str(refused.value)
    assert "\n" not in message
    assert "500 pseudo-inputs" in message and "2-step flow" in message and "GB" in message
    assert "one component at a time" in message


def test_each_chunk_of_flow_components_is_freed_before_the_next_is_built():
    # the IAF's conditioned transforms keep their cached tensors in reference cycles; left
    # to the garbage collector, every chunk's graph recomputed in the backward pass stayed
    # alive through the backward pass
    vae = small_vae("vamp", "iaf", num_components=6, latent_dim=4)
    vae.prior.chunk_bytes = 1
    earlier, alive_at_build = [], []
    posterior = vae.posterior

    def recording_posterior(pseudo_inputs):
        alive_at_build.append(sum(ref() is not None for ref in earlier))
        q = posterior(pseudo_inputs)
        if pseudo_inputs.shape[0] == 1:  # a chunk, not the whole mixture
            earlier.extend(weakref.ref(t) for t in q.transforms)
        return q

    z = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    p = vae.prior(recording_posterior)
    assert p.chunk_size((5,)) == 1
    p.log_prob(z).sum().backward()
    # the whole mixture, the cost probe, 6 chunks forward and 6 recomputed backward
    assert len(alive_at_build) == 1 + 1 + 6 + 6, alive_at_build
    assert max(alive_at_build) <= 2, alive_at_build  # at most the two transforms of one chunk
