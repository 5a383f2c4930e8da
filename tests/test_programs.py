"""Any Pyro program: training and every estimator run the model and guide they are given.

The closed forms: a two-layer linear-Gaussian hierarchy has a Gaussian marginal, and a
linear-Gaussian model with an enumerated discrete latent has a mixture-of-Gaussians one.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from pyro.nn import pyro_method
from torch import nn

from pyrovae import (
    VAE,
    DataSplits,
    Program,
    ProgramError,
    TrainConfig,
    as_program,
    build_vae,
    elbo,
    fit,
    log_marginal_likelihood,
)
from pyrovae.ais import ais_log_marginal_likelihood
from pyrovae.diagnostics import importance_summary
from pyrovae.priors import StandardNormalPrior
from pyrovae.report import bound_curve
from pyrovae.train import TrainingLoop

DOUBLE = torch.float64


class TwoLayerLinearGaussian:
    """z2 ~ N(0, I), z1 | z2 ~ N(A z2 + a, diag s1^2), x | z1 ~ N(W z1 + b, diag s2^2),
    with the guide q(z1 | x) q(z2 | z1): exact (the true posterior factorises this way)
    or with every scale inflated by ``inflate``."""

    def __init__(self, data_dim: int = 4, z1_dim: int = 3, z2_dim: int = 2, inflate: float = 1.0,
                 seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.A = torch.randn(z1_dim, z2_dim, generator=g, dtype=DOUBLE)
        self.a = torch.randn(z1_dim, generator=g, dtype=DOUBLE)
        self.s1 = 0.5 + torch.rand(z1_dim, generator=g, dtype=DOUBLE)
        self.W = torch.randn(data_dim, z1_dim, generator=g, dtype=DOUBLE)
        self.b = torch.randn(data_dim, generator=g, dtype=DOUBLE)
        self.s2 = 0.5 + torch.rand(data_dim, generator=g, dtype=DOUBLE)
        self.inflate = inflate
        c1 = self.A @ self.A.T + torch.diag(self.s1**2)  # Cov(z1)
        self.c1 = c1
        precision = torch.linalg.inv(c1) + self.W.T @ torch.diag(self.s2**-2) @ self.W
        self.post1_cov = torch.linalg.inv(precision)
        self.post2_cov = torch.linalg.inv(torch.eye(z2_dim, dtype=DOUBLE)
                                          + self.A.T @ torch.diag(self.s1**-2) @ self.A)

    def model(self, x: torch.Tensor) -> None:
        with pyro.plate("points", x.shape[0], dim=-1):
            z2 = pyro.sample("z2", dist.Normal(torch.zeros(self.A.shape[1], dtype=DOUBLE), 1.0)
                             .to_event(1))
            z1 = pyro.sample("z1", dist.Normal(z2 @ self.A.T + self.a, self.s1).to_event(1))
            pyro.sample("x", dist.Normal(z1 @ self.W.T + self.b, self.s2).to_event(1), obs=x)

    def guide(self, x: torch.Tensor) -> None:
        c1_inv = torch.linalg.inv(self.c1)
        with pyro.plate("points", x.shape[0], dim=-1):
            mean1 = (c1_inv @ self.a + (x - self.b) @ torch.diag(self.s2**-2) @ self.W) \
                @ self.post1_cov.T
            z1 = pyro.sample("z1", dist.MultivariateNormal(
                mean1, self.inflate**2 * self.post1_cov))
            mean2 = (z1 - self.a) @ torch.diag(self.s1**-2) @ self.A @ self.post2_cov.T
            pyro.sample("z2", dist.MultivariateNormal(mean2, self.inflate**2 * self.post2_cov))

    def exact_log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        covariance = self.W @ self.c1 @ self.W.T + torch.diag(self.s2**2)
        return dist.MultivariateNormal(self.W @ self.a + self.b, covariance).log_prob(x)

    def sample(self, n: int) -> torch.Tensor:
        with torch.no_grad():
            trace = poutine.trace(poutine.uncondition(self.model)).get_trace(
                torch.zeros(n, self.W.shape[0], dtype=DOUBLE))
        return trace.nodes["x"]["value"]


def test_the_exact_guide_of_a_two_layer_hierarchy_gives_the_exact_marginal():
    hierarchy = TwoLayerLinearGaussian()
    x = hierarchy.sample(30)
    estimate = log_marginal_likelihood((hierarchy.model, hierarchy.guide), x, num_samples=7)
    torch.testing.assert_close(estimate, hierarchy.exact_log_marginal(x), atol=1e-8, rtol=0)


def test_a_two_layer_hierarchy_converges_and_its_bounds_order():
    hierarchy = TwoLayerLinearGaussian(inflate=1.3)
    program = as_program((hierarchy.model, hierarchy.guide))
    x = hierarchy.sample(40)
    exact = hierarchy.exact_log_marginal(x)
    elbo_value = elbo(program, x, num_samples=2000).mean()
    iwae_10 = log_marginal_likelihood(program, x, num_samples=10).mean()
    iwae_large = log_marginal_likelihood(program, x, num_samples=20000, chunk_size=5000)
    assert elbo_value < iwae_10 < iwae_large.mean() <= exact.mean() + 0.01
    assert (iwae_large - exact).mean().abs() < 0.02
    assert exact.mean() - elbo_value > 0.1  # the inflated guide is visibly not exact


def test_ais_and_the_report_run_on_a_two_layer_program():
    hierarchy = TwoLayerLinearGaussian(inflate=1.3)
    program = (hierarchy.model, hierarchy.guide)
    x = hierarchy.sample(12)
    exact = hierarchy.exact_log_marginal(x)
    result = ais_log_marginal_likelihood(program, x, num_temperatures=100, num_chains=16)
    assert result.samples.shape == (16, 12, 5)  # z1 (3) and z2 (2) side by side
    error = (result.log_marginal_likelihood - exact).mean().abs()
    standard_error = result.standard_error.pow(2).mean().sqrt() / math.sqrt(12)
    assert error < max(4 * standard_error, 0.02) and error < 0.1
    summary = importance_summary(program, x, ks=(1, 100))
    # Jensen on the same 100 draws: their mean log weight is below the log of their mean weight
    assert bool((summary.elbo <= summary.iwae[1] + 1e-9).all())
    curve = bound_curve(program, x, ks=(1, 10), ais=False)
    assert [row.estimator for row in curve.rows] == ["ELBO", "IWAE", "IWAE"]


class EnumeratedMixture:
    """y ~ Cat(pi), z ~ N(0, I), x | y, z ~ N(W z + m_y, sigma^2 I), y summed out by
    enumeration; the guide q(z | x) = N(0, c^2 I) never sees y."""

    def __init__(self, seed: int = 0, num_classes: int = 3, data_dim: int = 3, latent_dim: int = 1,
                 sigma: float = 1.0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.pi = torch.softmax(torch.randn(num_classes, generator=g, dtype=DOUBLE), 0)
        self.means = 2 * torch.randn(num_classes, data_dim, generator=g, dtype=DOUBLE)
        self.W = torch.randn(data_dim, latent_dim, generator=g, dtype=DOUBLE)
        self.sigma, self.latent_dim = sigma, latent_dim

    def model(self, x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0]):
            y = pyro.sample("y", dist.Categorical(self.pi), infer={"enumerate": "parallel"})
            z = pyro.sample("z", dist.Normal(torch.zeros(self.latent_dim, dtype=DOUBLE), 1.0)
                            .to_event(1))
            pyro.sample("x", dist.Normal(z @ self.W.T + self.means[y], self.sigma).to_event(1),
                        obs=x)

    def guide(self, x: torch.Tensor) -> None:
        scale = pyro.param("guide_scale", torch.tensor(1.2, dtype=DOUBLE),
                           constraint=dist.constraints.positive)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], self.latent_dim, dtype=DOUBLE),
                                         scale).to_event(1))

    def exact_log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        covariance = self.W @ self.W.T + self.sigma**2 * torch.eye(self.W.shape[0], dtype=DOUBLE)
        components = torch.stack([dist.MultivariateNormal(m, covariance).log_prob(x)
                                  for m in self.means])
        return torch.logsumexp(components + self.pi.log().unsqueeze(-1), 0)

    def sample(self, n: int) -> torch.Tensor:
        y = dist.Categorical(self.pi).sample((n,))
        z = torch.randn(n, self.latent_dim, dtype=DOUBLE)
        return z @ self.W.T + self.means[y] + self.sigma * torch.randn(n, self.W.shape[0],
                                                                       dtype=DOUBLE)


def test_an_enumerated_discrete_latent_is_summed_out_exactly():
    mixture = EnumeratedMixture()
    program = as_program((mixture.model, mixture.guide))
    x = mixture.sample(30)
    assert program.structure(x).enumerated_sites == ("y",)
    exact = mixture.exact_log_marginal(x)
    elbo_value = elbo(program, x, num_samples=2000).mean()
    estimate = log_marginal_likelihood(program, x, num_samples=20000, chunk_size=5000)
    assert elbo_value < estimate.mean() <= exact.mean() + 0.01
    assert (estimate - exact).mean().abs() < 0.02


def test_fit_trains_an_enumerated_program_with_trace_enum_elbo():
    mixture = EnumeratedMixture()
    x = mixture.sample(200)
    data = DataSplits.from_tensors(x.float().double(), x[:50])
    history = fit((mixture.model, mixture.guide), data, epochs=3, batch_size=50, lr=0.05,
                  progress=False)
    assert all(math.isfinite(record.train_elbo) for record in history)
    # the guide's only parameter moved towards the posterior spread of z
    assert pyro.param("guide_scale").item() != pytest.approx(1.2)


def small_vae(**fields) -> VAE:
    return build_vae(TrainConfig(hidden_dims=(8,), latent_dim=3, **fields), data_dim=12)


class HierarchicalVAE(VAE):
    """A subclass that adds a second latent layer z2 above the VAE's z."""

    def __init__(self, base: VAE) -> None:
        super().__init__(base.encoder, base.decoder, base.prior, base.likelihood,
                         base.guide_family, data_dim=base.data_dim)
        self.top = nn.Linear(2, base.latent_dim)
        self.up = nn.Linear(base.latent_dim, 2)

    @pyro_method
    def model(self, x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0], dim=-1):
            z2 = pyro.sample("z2", dist.Normal(torch.zeros(x.shape[0], 2), 1.0).to_event(1))
            z = pyro.sample("z", dist.Normal(self.top(z2), 1.0).to_event(1))
            pyro.sample("x", self.likelihood(self.decoder(z)), obs=x)

    @pyro_method
    def guide(self, x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0], dim=-1):
            z = pyro.sample("z", self.posterior(x))
            pyro.sample("z2", dist.Normal(self.up(z), 0.5).to_event(1))


def binary_data(n: int = 60) -> DataSplits:
    generator = torch.Generator().manual_seed(3)
    x = torch.bernoulli(torch.full((n, 12), 0.3), generator=generator)
    return DataSplits.from_tensors(x[:40], x[40:])


def test_a_subclass_with_a_second_layer_is_what_fit_optimises():
    vae = HierarchicalVAE(small_vae())
    data = binary_data()
    loop = TrainingLoop(vae, data, epochs=1, batch_size=20, lr=1e-2, objective="trace_elbo",
                        num_particles=1, seed=0, test_every=1, run_dir=None, config=None,
                        progress=False, beta=1.0, kl_warmup_epochs=0, checkpoint_every=0,
                        keep_last=0, clip_norm=None, on_divergence="stop", fused=True)
    x = data.train[:20]
    pyro.set_rng_seed(5)
    ours = loop._loss(x)
    pyro.set_rng_seed(5)
    pyros = Trace_ELBO().differentiable_loss(vae.model, vae.guide, x)
    assert ours.item() == pytest.approx(pyros.item(), rel=1e-6)
    before = {name: p.detach().clone() for name, p in vae.named_parameters()
              if name.startswith(("top", "up"))}
    fit(vae, data, epochs=2, batch_size=20, lr=1e-2, progress=False)
    for name, value in before.items():
        assert not torch.equal(dict(vae.named_parameters())[name], value), name
    # and every estimator evaluates the two-layer program
    x = data.test
    torch.manual_seed(0)
    ours = log_marginal_likelihood(vae, x, num_samples=50)
    assert ours.shape == (20,) and bool(torch.isfinite(ours).all())


class ParamPrior(StandardNormalPrior):
    """N(m, I) with m a ``pyro.param``: a part that uses the parameter store."""

    def forward(self, posterior=None) -> dist.Distribution:
        loc = pyro.param("prior_shift", torch.zeros(self.latent_dim))
        return dist.Normal(loc, 1.0).to_event(1)


def test_a_pyro_param_inside_a_part_is_trained_by_fit():
    base = small_vae()
    vae = VAE(base.encoder, base.decoder, ParamPrior(3), base.likelihood, base.guide_family)
    fit(vae, binary_data(), epochs=3, batch_size=20, lr=5e-2, progress=False)
    assert pyro.param("prior_shift").abs().max().item() > 1e-3


def test_a_handler_around_the_model_is_honoured_by_fit():
    vae = small_vae()
    data = binary_data()
    scaled = poutine.scale(vae.model, scale=3.0)
    loop = TrainingLoop((scaled, vae.guide), data, epochs=1, batch_size=20, lr=1e-2,
                        objective="trace_elbo", num_particles=1, seed=0, test_every=1,
                        run_dir=None, config=None, progress=False, beta=1.0,
                        kl_warmup_epochs=0, checkpoint_every=0, keep_last=0, clip_norm=None,
                        on_divergence="stop", fused=False)
    assert {id(p) for p in loop.parameters} == {id(p) for p in vae.parameters()}
    x = data.train[:20]
    pyro.set_rng_seed(2)
    ours = loop._loss(x)
    pyro.set_rng_seed(2)
    pyros = Trace_ELBO().differentiable_loss(scaled, vae.guide, x)
    assert ours.item() == pytest.approx(pyros.item(), rel=1e-6)
    pyro.set_rng_seed(2)
    unscaled = Trace_ELBO().differentiable_loss(vae.model, vae.guide, x)
    assert abs(ours.item() - unscaled.item()) > 1.0


def test_programs_outside_the_contract_are_refused_with_the_site_named():
    def model(x):
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(w, 1.0), obs=x)

    def guide(x):
        pyro.sample("w", dist.Normal(0.0, 1.0))

    with pytest.raises(ProgramError, match="'w' of the guide is outside a plate"):
        log_marginal_likelihood((model, guide), torch.zeros(4), num_samples=2)
    with pytest.raises(ProgramError, match="is not a program"):
        as_program(object())

    def bernoulli_guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("w", dist.Bernoulli(0.5))

    def bernoulli_model(x):
        with pyro.plate("data", x.shape[0]):
            w = pyro.sample("w", dist.Bernoulli(0.5))
            pyro.sample("x", dist.Normal(w, 1.0), obs=x)

    from pyrovae.objectives import ImportanceWeightedELBO

    with pytest.raises(ProgramError, match="'w' cannot be reparameterised"):
        ImportanceWeightedELBO(2).differentiable_loss(bernoulli_model, bernoulli_guide,
                                                      torch.zeros(3))
    # importance sampling itself needs no reparameterisation
    values = log_marginal_likelihood((bernoulli_model, bernoulli_guide), torch.zeros(3),
                                     num_samples=4000)
    exact = torch.logsumexp(torch.stack([dist.Normal(w, 1.0).log_prob(torch.zeros(3))
                                         for w in (0.0, 1.0)]), 0) - math.log(2)
    torch.testing.assert_close(values, exact, atol=0.02, rtol=0)


def test_extra_data_arguments_reach_model_and_guide():
    mixture = EnumeratedMixture()

    def model(x, y):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Categorical(mixture.pi), obs=y)
            z = pyro.sample("z", dist.Normal(torch.zeros(1, dtype=DOUBLE), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ mixture.W.T + mixture.means[y], 1.0).to_event(1),
                        obs=x)

    def guide(x, y):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], 1, dtype=DOUBLE), 1.0)
                        .to_event(1))

    x, y = mixture.sample(20), torch.randint(0, 3, (20,))
    estimate = log_marginal_likelihood(Program(model, guide), (x, y), num_samples=20000,
                                       chunk_size=5000)
    covariance = mixture.W @ mixture.W.T + torch.eye(3, dtype=DOUBLE)
    exact = mixture.pi[y].log() + dist.MultivariateNormal(mixture.means[y], covariance).log_prob(x)
    assert (estimate - exact).mean().abs() < 0.02


def test_meanfield_elbo_is_refused_for_a_program_with_several_latent_sites():
    from pyrovae.errors import ConfigError
    from pyrovae.objectives import make_objective

    hierarchy = TwoLayerLinearGaussian()
    structure = as_program((hierarchy.model, hierarchy.guide)).structure(hierarchy.sample(2))
    with pytest.raises(ConfigError, match="meanfield_elbo needs a program with one latent site"):
        make_objective("meanfield_elbo", structure=structure)
    assert make_objective("trace_elbo", structure=structure) is not None


def test_the_output_bias_starts_at_the_data_mean_for_a_hierarchical_vae():
    vae = build_vae(TrainConfig(latent_dims=(4, 2), hidden_dims=(8,)), data_dim=12)
    data = binary_data()
    fit(vae, data, epochs=1, batch_size=20, lr=1e-12, progress=False,
        output_bias_init="data_mean")
    from pyrovae.optim import _last_linear, logit_of_mean

    torch.testing.assert_close(_last_linear(vae.decoder).bias.detach(),
                               logit_of_mean(data.train), atol=1e-6, rtol=0)
