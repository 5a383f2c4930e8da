"""Path-derivative gradients (``stl_elbo``, ``iwae_dreg``) against exact answers.

On the linear-Gaussian VAE (``tests/linear_gaussian.py``) the posterior is known, so a guide
can be set to it exactly: there every log weight equals log p(x) whatever z is drawn, and a
path-derivative gradient of the guide is zero draw by draw.  Away from it, ``iwae_dreg`` and
``iwae`` are unbiased gradients of the same bound, and ``stl_elbo`` and ``trace_elbo`` of the
same ELBO: their averages over many draws agree within Monte Carlo error.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyrovae import DataSplits, FullCovarianceNormalGuide, TrainConfig, build_vae, fit
from pyrovae.config import TrainConfig as ConfigClass
from pyrovae.errors import ConfigError
from pyrovae.guides import MIN_SCALE
from pyrovae.objectives import (
    DoublyReparameterizedIWAE,
    PathDerivativeELBO,
    make_objective,
)
from pyrovae.programs import ProgramError
from tests.linear_gaussian import linear_gaussian_vae, sample_data
from tests.test_evaluation import mismatched_vae


def learnable_exact_vae():
    """The linear-Gaussian VAE with a full-covariance guide whose weights give the exact
    posterior: learnable parameters sitting at the optimum."""
    family = linear_gaussian_vae().guide_family
    latent_dim, data_dim = family.gain.shape
    guide = FullCovarianceNormalGuide(data_dim, latent_dim).double()
    tril = family.scale_tril
    rows, cols = torch.tril_indices(latent_dim, latent_dim, offset=-1)
    with torch.no_grad():
        guide.loc_head.weight.copy_(family.gain)
        guide.loc_head.bias.copy_(-family.gain @ family.bias)
        guide.diagonal_head.weight.zero_()
        # softplus^{-1}(d) = log(expm1(d))
        guide.diagonal_head.bias.copy_(torch.log(torch.expm1(tril.diagonal() - MIN_SCALE)))
        guide.off_diagonal_head.weight.zero_()
        guide.off_diagonal_head.bias.copy_(tril[rows, cols] / guide.off_diagonal_scale)
    return linear_gaussian_vae(guide=guide)


GUIDE_MODULES = ("encoder", "guide_family", "guide_layers")


@pytest.fixture(autouse=True)
def one_thread():
    """Tensors of a few thousand numbers: a second thread costs more than it saves, much more
    on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gradients(vae, objective, x, seed):
    """The loss's gradient in the guide's and in the model's parameters, each flattened."""
    vae.zero_grad(set_to_none=False)
    pyro.set_rng_seed(seed)
    objective.differentiable_loss(vae.model, vae.guide, x).backward()
    encoder, decoder = [], []
    for name, parameter in vae.named_parameters():
        # the guide's networks (one layer: encoder body and heads; hierarchical: guide_layers)
        side = encoder if name.split(".")[0] in GUIDE_MODULES else decoder
        side.append(parameter.grad.flatten().clone())
    return torch.cat(encoder), torch.cat(decoder)


def batch_gradients(vae, objective, x, num_particles, num_batches, seed=100):
    """``(num_batches, P)`` encoder and decoder gradients, batch b drawn under seed + b (the
    same draws for every objective: they all sample the guide in the same plate).

    :param objective: a name in the registry, or an objective.
    """
    if isinstance(objective, str):
        objective = make_objective(objective, num_particles)
    pairs = [gradients(vae, objective, x, seed + b) for b in range(num_batches)]
    return torch.stack([e for e, _ in pairs]), torch.stack([d for _, d in pairs])


class SingleWeightedIWAE(PathDerivativeELBO):
    """IWAE's gradient with the guide's score terms dropped but the weights not squared,
    sum_k w~_k (path of log w_k): biased (Tucker et al. 2019, section 3)."""

    def bound(self, model, guide, *args):
        log_w, _ = self._path_log_weights(model, guide, args)
        return (torch.softmax(log_w.detach(), dim=0) * log_w).sum(0)


def mean_and_error(difference):
    return difference.mean(0), difference.std(0) / math.sqrt(len(difference))


@pytest.mark.parametrize("num_particles", [1, 10])
def test_at_the_exact_posterior_path_gradients_of_the_guide_vanish_for_every_draw(num_particles):
    vae = learnable_exact_vae()
    x = sample_data(vae, 6)
    largest = {}
    for name in ("stl_elbo", "iwae_dreg", "trace_elbo", "iwae"):
        objective = make_objective(name, num_particles)
        # one data point per call, so each gradient is that of its own K draws
        largest[name] = torch.stack([gradients(vae, objective, x[i:i + 1], seed=i)[0].abs().max()
                                     for i in range(len(x))])
    assert float(largest["stl_elbo"].max()) < 1e-11, largest["stl_elbo"]
    assert float(largest["iwae_dreg"].max()) < 1e-11, largest["iwae_dreg"]
    # the score term is there draw by draw, though its mean is zero
    assert float(largest["trace_elbo"].min()) > 1e-2, largest["trace_elbo"]
    assert float(largest["iwae"].min()) > 1e-3, largest["iwae"]


def test_iwae_dreg_gradients_average_to_iwae_gradients():
    vae = mismatched_vae(inflate=2.5)
    x = sample_data(vae, 4).repeat(500, 1)  # 500 draws of K per point and call
    dreg = batch_gradients(vae, "iwae_dreg", x, 5, 20)
    iwae = batch_gradients(vae, "iwae", x, 5, 20)
    # the model's gradient is IWAE's, draw by draw
    torch.testing.assert_close(dreg[1], iwae[1], rtol=1e-9, atol=1e-9)
    # the guide's: equal in expectation; same draws, so the difference is what varies
    mean, standard_error = mean_and_error(dreg[0] - iwae[0])
    assert bool((mean.abs() < 4 * standard_error).all()), (mean, standard_error)
    # the test has power: its errors are small beside the gradient, and it sees the bias of
    # the estimator that drops the score terms without squaring the weights
    assert float(standard_error.max()) < 0.1 * float(iwae[0].mean(0).abs().max())
    biased = batch_gradients(vae, SingleWeightedIWAE(5), x, 5, 20)[0]
    mean, standard_error = mean_and_error(biased - iwae[0])
    assert float((mean.abs() / standard_error).max()) > 20


def test_stl_elbo_gradients_average_to_trace_elbo_gradients_in_a_hierarchical_vae():
    # two stochastic layers: the guide draws z1 from x, then z2 from z1, so the path
    # derivative needs d log q(z2 | z1) / d z1, which re-scoring z2's distribution alone loses
    vae = build_vae(TrainConfig(latent_dims=(3, 2), hidden_dims=(6,)), data_dim=8).double()
    x = torch.bernoulli(torch.full((4, 8), 0.4, dtype=torch.float64)).repeat(500, 1)
    stl = batch_gradients(vae, "stl_elbo", x, 1, 20)[0]
    trace = batch_gradients(vae, "trace_elbo", x, 1, 20)[0]
    mean, standard_error = mean_and_error(stl - trace)
    assert bool((mean.abs() < 4.5 * standard_error + 1e-12).all()), (mean, standard_error)
    assert float(standard_error.max()) < 0.2 * float(trace.mean(0).abs().max())


def test_iwae_dreg_gradients_average_to_iwae_gradients_in_a_hierarchical_vae():
    vae = build_vae(TrainConfig(latent_dims=(3, 2), hidden_dims=(6,)), data_dim=8).double()
    x = torch.bernoulli(torch.full((4, 8), 0.4, dtype=torch.float64)).repeat(500, 1)
    dreg = batch_gradients(vae, "iwae_dreg", x, 5, 20)
    iwae = batch_gradients(vae, "iwae", x, 5, 20)
    torch.testing.assert_close(dreg[1], iwae[1], rtol=1e-9, atol=1e-9)
    mean, standard_error = mean_and_error(dreg[0] - iwae[0])
    assert bool((mean.abs() < 4.5 * standard_error + 1e-12).all()), (mean, standard_error)


def test_iwae_dreg_guide_gradient_varies_far_less_than_iwae_at_k_10():
    vae = mismatched_vae()
    draws = 200
    x = sample_data(vae, 1).repeat(draws, 1)  # one data point, 200 draws of K per call
    dreg = batch_gradients(vae, "iwae_dreg", x, 10, 30)[0]
    iwae = batch_gradients(vae, "iwae", x, 10, 30)[0]
    # a call sums `draws` independent gradients: its variance is draws times one draw's
    dreg_variance = dreg.var(0) / draws
    iwae_variance = iwae.var(0) / draws
    ratio = float(dreg_variance.sum() / iwae_variance.sum())
    assert ratio < 0.05, ratio
    assert bool((dreg_variance < iwae_variance).all()), (dreg_variance, iwae_variance)


def test_the_values_are_the_elbo_and_the_iwae_bound():
    vae = mismatched_vae()
    x = sample_data(vae, 6)
    for name, reference in (("stl_elbo", "trace_elbo"), ("iwae_dreg", "iwae")):
        pyro.set_rng_seed(5)
        value = make_objective(name, 4).loss(vae.model, vae.guide, x)
        pyro.set_rng_seed(5)
        expected = make_objective(reference, 4).loss(vae.model, vae.guide, x)
        assert value == pytest.approx(expected, rel=1e-12)


def test_a_guide_site_that_cannot_be_reparameterised_is_refused_by_name():
    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("w", dist.Bernoulli(0.5))

    def model(x):
        with pyro.plate("data", x.shape[0]):
            w = pyro.sample("w", dist.Bernoulli(0.5))
            pyro.sample("x", dist.Normal(w, 1.0), obs=x)

    for objective in (PathDerivativeELBO(2), DoublyReparameterizedIWAE(2)):
        with pytest.raises(ProgramError) as error:
            objective.differentiable_loss(model, guide, torch.zeros(3))
        assert str(error.value) == (f"the {objective.objective_name} objective needs "
                                    f"reparameterised guide sites; 'w' cannot be reparameterised")


@pytest.mark.parametrize("objective", ["stl_elbo", "iwae_dreg"])
def test_fit_and_the_config_take_the_new_objectives(objective):
    config = TrainConfig(hidden_dims=(8,), latent_dim=3, objective=objective, num_particles=3,
                         epochs=2, batch_size=10)
    data = torch.bernoulli(torch.full((40, 12), 0.3))
    vae = build_vae(config, data_dim=12)
    records = fit(vae, DataSplits(data, data[:10]), epochs=2, batch_size=10, config=config,
                  progress=False)
    assert len(records) == 2 and all(math.isfinite(r.train_elbo) for r in records)
    assert ConfigClass.from_dict(config.to_dict()).objective == objective


def test_the_semi_supervised_model_refuses_the_new_objectives():
    for objective in ("stl_elbo", "iwae_dreg"):
        with pytest.raises(ConfigError, match=f"the {objective} objective needs reparameterised"):
            TrainConfig(model="semi_supervised", objective=objective, num_classes=10)
