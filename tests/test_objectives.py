"""Objectives: the IWAE bound against the ELBO and Pyro's RenyiELBO; the KL weight."""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, RenyiELBO, Trace_ELBO, TraceMeanField_ELBO
from torch.distributions import kl_divergence

from pyrovae import DataSplits, TrainConfig, build_vae, fit
from pyrovae import train as train_module
from pyrovae.errors import ConfigError
from pyrovae.evaluation import log_weights, mean_and_standard_error
from pyrovae.objectives import (
    ImportanceWeightedELBO,
    LatentScale,
    LoopTrace_ELBO,
    LoopTraceMeanField_ELBO,
    kl_weight,
    make_objective,
)
from pyrovae.sites import LATENT_SITE, OBSERVED_SITE
from tests.linear_gaussian import exact_log_marginal, linear_gaussian_vae, sample_data
from tests.test_evaluation import mismatched_vae


def bernoulli_vae():
    config = TrainConfig(hidden_dims=(8,), latent_dim=3)
    return build_vae(config, data_dim=12), torch.bernoulli(torch.full((10, 12), 0.3))


def test_iwae_with_one_particle_is_the_single_sample_elbo_estimate():
    vae = mismatched_vae()
    x = sample_data(vae, 20)
    pyro.set_rng_seed(1)
    iwae = ImportanceWeightedELBO(num_particles=1).loss(vae.model, vae.guide, x)
    pyro.set_rng_seed(1)
    trace_elbo = Trace_ELBO().loss(vae.model, vae.guide, x)
    assert iwae == pytest.approx(trace_elbo, rel=1e-10)


def test_iwae_with_one_particle_equals_the_elbo_in_expectation():
    vae = mismatched_vae()
    x = sample_data(vae, 20)
    # the exact ELBO: log p(x) - KL(q(z|x) || p(z|x)), with p(z|x) from the exact guide
    draws = 400
    with torch.no_grad():
        exact_posterior = linear_gaussian_vae().posterior(x)
        exact_elbo = exact_log_marginal(vae, x) - kl_divergence(vae.posterior(x), exact_posterior)
        # 400 independent draws per point: the data repeated
        bounds = ImportanceWeightedELBO(num_particles=1).bound(vae.model, vae.guide,
                                                               x.repeat(draws, 1))
    error = mean_and_standard_error(bounds.reshape(draws, 20).mean(1) - exact_elbo.mean())
    assert abs(error.mean) < 3 * error.standard_error, error
    assert float((exact_log_marginal(vae, x) - exact_elbo).mean()) > 0.1  # a real gap


def test_iwae_bound_lies_above_the_elbo_rises_with_k_and_stays_below_log_px():
    vae = mismatched_vae(inflate=2.5)
    x = sample_data(vae, 2000)
    with torch.no_grad():
        bounds = {k: ImportanceWeightedELBO(num_particles=k).bound(vae.model, vae.guide, x)
                  for k in (1, 10, 100)}
    exact = exact_log_marginal(vae, x)
    for upper, lower in ((bounds[10], bounds[1]), (bounds[100], bounds[10])):
        gap = mean_and_standard_error(upper - lower)
        assert gap.mean > 3 * gap.standard_error, gap
    gap = mean_and_standard_error(exact - bounds[100])
    assert gap.mean > -3 * gap.standard_error, gap


def test_iwae_agrees_with_renyi_elbo_at_alpha_zero():
    vae, x = bernoulli_vae()
    parameters = list(vae.parameters())

    def loss_and_grads(objective):
        for parameter in parameters:
            parameter.grad = None
        pyro.set_rng_seed(2)
        loss = objective.loss_and_grads(vae.model, vae.guide, x)
        return loss, [parameter.grad.clone() for parameter in parameters]

    iwae_loss, iwae_grads = loss_and_grads(ImportanceWeightedELBO(num_particles=7))
    renyi_loss, renyi_grads = loss_and_grads(
        RenyiELBO(alpha=0, num_particles=7, vectorize_particles=True, max_plate_nesting=1))
    assert iwae_loss == pytest.approx(renyi_loss, rel=1e-6)
    for ours, theirs in zip(iwae_grads, renyi_grads, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_iwae_trains_with_svi():
    vae, x = bernoulli_vae()
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 0.05}), make_objective("iwae", 5))
    first = sum(svi.step(x) for _ in range(5)) / 5
    for _ in range(40):
        svi.step(x)
    last = sum(svi.step(x) for _ in range(5)) / 5
    assert last < first - 5, (first, last)


def test_make_objective_builds_the_iwae_with_k_particles():
    objective = make_objective("iwae", 5)
    assert isinstance(objective, ImportanceWeightedELBO) and objective.num_particles == 5
    with pytest.raises(ConfigError, match="num_particles"):
        make_objective("iwae", 0)


def separate_terms(vae, x):
    """log p(x|z), log p(z) and log q(z|x) of one draw, each ``(N,)``, and the guide's q."""
    guide_trace = poutine.trace(vae.guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(x)
    log_lik, log_prior, log_q = (
        trace.nodes[site]["fn"].log_prob(trace.nodes[site]["value"])
        for trace, site in ((model_trace, OBSERVED_SITE), (model_trace, LATENT_SITE),
                            (guide_trace, LATENT_SITE))
    )
    return log_lik, log_prior, log_q, guide_trace.nodes[LATENT_SITE]["fn"], \
        model_trace.nodes[LATENT_SITE]["fn"]


@pytest.mark.parametrize("beta", [0.25, 1.0, 3.0])
def test_the_latent_scale_weights_only_the_kl_term(beta):
    vae = mismatched_vae()
    x = sample_data(vae, 15)
    scale = LatentScale(beta)
    pyro.set_rng_seed(4)
    loss = Trace_ELBO().loss(scale(vae.model), scale(vae.guide), x)
    pyro.set_rng_seed(4)
    log_lik, log_prior, log_q, q, p = separate_terms(vae, x)
    expected = -(log_lik + beta * (log_prior - log_q)).sum().item()
    assert loss == pytest.approx(expected, rel=1e-10)
    # the analytic path of TraceMeanField_ELBO weights the closed-form KL the same way
    pyro.set_rng_seed(4)
    loss = TraceMeanField_ELBO().loss(scale(vae.model), scale(vae.guide), x)
    expected = -(log_lik - beta * kl_divergence(q, p)).sum().item()
    assert loss == pytest.approx(expected, rel=1e-10)


def test_the_iwae_bound_honours_the_latent_scale_and_log_px_ignores_it():
    vae = mismatched_vae()
    x = sample_data(vae, 15)
    scale = LatentScale(0.5)
    pyro.set_rng_seed(6)
    scaled = log_weights((scale(vae.model), scale(vae.guide)), x, num_samples=1, scaled=True)[0]
    pyro.set_rng_seed(6)
    unscaled = log_weights((scale(vae.model), scale(vae.guide)), x, num_samples=1)[0]
    pyro.set_rng_seed(6)
    log_lik, log_prior, log_q, _, _ = separate_terms(vae, x)
    torch.testing.assert_close(scaled, log_lik + 0.5 * (log_prior - log_q))
    torch.testing.assert_close(unscaled, log_lik + log_prior - log_q)


def test_the_kl_weight_rises_linearly_then_stays_at_beta():
    weights = [kl_weight(epoch, warmup_epochs=4) for epoch in range(1, 7)]
    assert weights == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])
    assert kl_weight(2, beta=4.0, warmup_epochs=4) == pytest.approx(2.0)
    assert kl_weight(1, beta=0.5) == 0.5
    with pytest.raises(ValueError, match="count from 1"):
        kl_weight(0, warmup_epochs=3)


def test_fit_follows_the_warm_up_schedule_of_its_config(monkeypatch):
    used = []

    scheduled = train_module.TrainingLoop.kl_weight

    def recording_kl_weight(loop, epoch):
        used.append(scheduled(loop, epoch))
        return used[-1]

    monkeypatch.setattr(train_module.TrainingLoop, "kl_weight", recording_kl_weight)
    config = TrainConfig(hidden_dims=(6,), latent_dim=2, likelihood="gaussian", beta=2.0,
                         kl_warmup_epochs=2, epochs=3)
    vae = build_vae(config, data_dim=5)
    data = DataSplits(torch.randn(20, 5), torch.randn(5, 5))
    history = fit(vae, data, epochs=3, batch_size=10, config=config, progress=False)
    assert used == pytest.approx([1.0, 1.0, 2.0, 2.0])  # the initial value, then per epoch
    assert all(math.isfinite(record.train_elbo) for record in history)
    used.clear()
    fit(vae, data, epochs=1, batch_size=10, beta=0.5, kl_warmup_epochs=0, config=config,
        progress=False)  # explicit arguments win over the config
    assert used == pytest.approx([0.5, 0.5])


def _score_function_program(discrete: bool = True):
    """A reparameterised Gaussian latent, and with ``discrete`` a Bernoulli one that Pyro
    scores by REINFORCE."""
    loc = torch.nn.Parameter(torch.tensor([0.3, -0.2]))
    logit = torch.nn.Parameter(torch.tensor(0.4))

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", pyro.distributions.Normal(torch.zeros(2), 1.0).to_event(1))
            b = pyro.sample("b", pyro.distributions.Bernoulli(0.5)) if discrete else 0.0
            pyro.sample("x", pyro.distributions.Normal(z.sum(-1) + b, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", pyro.distributions.Normal(loc, 1.0).to_event(1))
            if discrete:
                pyro.sample("b", pyro.distributions.Bernoulli(logits=logit))

    return model, guide, [loc, logit] if discrete else [loc]


@pytest.mark.parametrize("ours, pyros, num_particles", [
    (LoopTrace_ELBO, Trace_ELBO, 1), (LoopTrace_ELBO, Trace_ELBO, 3),
    (LoopTraceMeanField_ELBO, TraceMeanField_ELBO, 1)])
def test_the_loop_objectives_give_pyros_loss_and_gradient(ours, pyros, num_particles):
    x = torch.randn(7)
    # TraceMeanField_ELBO takes reparameterised sites only
    discrete = pyros is not TraceMeanField_ELBO
    model, guide, params = _score_function_program(discrete)
    values, grads = [], []
    for objective in (ours, pyros):
        pyro.set_rng_seed(3)
        elbo = objective(num_particles=num_particles, vectorize_particles=num_particles > 1,
                         max_plate_nesting=1)
        loss = elbo.differentiable_loss(model, guide, x)
        values.append(loss.item())
        grads.append(torch.autograd.grad(loss, params))
    assert values[0] == values[1]
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)
    if discrete:  # the score-function term reaches the discrete site's logit
        assert grads[0][1].abs() > 0


def test_the_named_objectives_are_the_loop_variants():
    assert isinstance(make_objective("trace_elbo"), LoopTrace_ELBO)
    assert isinstance(make_objective("meanfield_elbo"), LoopTraceMeanField_ELBO)
