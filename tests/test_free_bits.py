"""Free bits (:mod:`pyrovae.free_bits`) and cyclical annealing: the objectives trained are the
documented ones, and what they cannot apply to is refused in one line."""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from pyrovae import TrainConfig, build_vae
from pyrovae.data import DataSplits
from pyrovae.errors import ConfigError
from pyrovae.free_bits import FreeBitsELBO
from pyrovae.objectives import LatentScale, make_objective
from pyrovae.train import fit

DATA_DIM = 6


def small_vae(**values):
    config = TrainConfig(**{"hidden_dims": (8,), "latent_dim": 3, **values})
    return build_vae(config, data_dim=DATA_DIM).double()


def binary_points(n: int = 10) -> torch.Tensor:
    return torch.bernoulli(torch.full((n, DATA_DIM), 0.4, dtype=torch.float64))


def normal_kl(loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """KL(N(loc, scale^2) || N(0, 1)) per dimension, written out."""
    return -torch.log(scale) + (scale**2 + loc**2) / 2 - 0.5


@pytest.mark.parametrize("free_bits", [0.05, 0.15, 3.0])
def test_the_free_bits_loss_is_the_reconstruction_plus_the_floored_mean_kl(free_bits):
    vae, x = small_vae(), binary_points()
    pyro.set_rng_seed(1)
    loss = FreeBitsELBO(free_bits, analytic=True).differentiable_loss(vae.model, vae.guide, x)
    # the same draw of z, scored by hand: -sum_n log p(x_n|z_n) + N sum_d max(lambda, mean_n KL_nd)
    pyro.set_rng_seed(1)
    guide_trace = poutine.trace(vae.guide).get_trace(x)
    z = guide_trace.nodes["z"]["value"]
    posterior = vae.posterior(x)
    loc, scale = posterior.base_dist.loc, posterior.base_dist.scale
    reconstruction = vae.likelihood(vae.decoder(z)).log_prob(x).sum()
    kl = normal_kl(loc, scale)  # (N, d)
    expected = -reconstruction + x.shape[0] * kl.mean(0).clamp(min=free_bits).sum()
    torch.testing.assert_close(loss, expected)
    # some dimensions below the floor and some above, for the middle lambda
    if free_bits == 0.15:
        assert (kl.mean(0) < free_bits).any() and (kl.mean(0) > free_bits).any()


def test_without_a_binding_floor_free_bits_is_the_elbo():
    vae, x = small_vae(), binary_points()
    for analytic, elbo in ((True, TraceMeanField_ELBO()), (False, Trace_ELBO())):
        pyro.set_rng_seed(2)
        ours = FreeBitsELBO(1e-12, analytic=analytic).loss(vae.model, vae.guide, x)
        pyro.set_rng_seed(2)
        assert ours == pytest.approx(elbo.loss(vae.model, vae.guide, x), rel=1e-12)


def test_a_group_below_its_floor_gets_no_gradient_from_the_kl():
    vae, x = small_vae(), binary_points()
    head = vae.guide_family
    encoder_parameters = [p for p in head.parameters()]
    pyro.set_rng_seed(3)
    floored = FreeBitsELBO(1e6, analytic=True).differentiable_loss(vae.model, vae.guide, x)
    ours = torch.autograd.grad(floored, encoder_parameters)
    # with every KL below the floor, only the reconstruction term moves q(z|x)
    pyro.set_rng_seed(3)
    guide_trace = poutine.trace(vae.guide).get_trace(x)
    z = guide_trace.nodes["z"]["value"]
    reconstruction = -vae.likelihood(vae.decoder(z)).log_prob(x).sum()
    expected = torch.autograd.grad(reconstruction, encoder_parameters)
    for mine, theirs in zip(ours, expected, strict=True):
        torch.testing.assert_close(mine, theirs)


def test_free_bits_per_site_and_the_kl_weight_scale_the_floored_term():
    vae, x = small_vae(), binary_points()
    kl = LatentScale(beta=0.25)
    pyro.set_rng_seed(4)
    loss = FreeBitsELBO(2.0, group="site", analytic=True).differentiable_loss(
        kl(vae.model), kl(vae.guide), x)
    pyro.set_rng_seed(4)
    z = poutine.trace(vae.guide).get_trace(x).nodes["z"]["value"]
    posterior = vae.posterior(x)
    site_kl = normal_kl(posterior.base_dist.loc, posterior.base_dist.scale).sum(-1)  # (N,)
    expected = (-vae.likelihood(vae.decoder(z)).log_prob(x).sum()
                + 0.25 * x.shape[0] * site_kl.mean().clamp(min=2.0))
    torch.testing.assert_close(loss, expected)


def test_a_hierarchy_floors_each_layers_dimensions():
    vae = build_vae(TrainConfig(hidden_dims=(8,), latent_dims=(4, 2)), data_dim=DATA_DIM).double()
    x = binary_points()
    pyro.set_rng_seed(5)
    loss = FreeBitsELBO(1e-12).loss(vae.model, vae.guide, x)
    pyro.set_rng_seed(5)
    assert loss == pytest.approx(Trace_ELBO().loss(vae.model, vae.guide, x), rel=1e-12)
    pyro.set_rng_seed(5)
    # a floor far above every KL: the loss is the reconstruction plus N (4 + 2) lambda
    floored = FreeBitsELBO(100.0).loss(vae.model, vae.guide, x)
    pyro.set_rng_seed(5)
    guide_trace = poutine.trace(vae.guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(x)
    reconstruction = model_trace.nodes["x"]["fn"].log_prob(x).sum().item()
    assert floored == pytest.approx(-reconstruction + 10 * 6 * 100.0, rel=1e-12)


@pytest.mark.parametrize("values, message", [
    ({"guide": "fullcov"}, "over the dimensions of 'z'; its q(z|x) does not (a "
                           "MultivariateNormal): use --free-bits-group site"),
    ({"prior": "mog"}, "its p(z) does not (a BroadcastingMixture)"),
])
def test_free_bits_per_dimension_refuses_pairs_that_do_not_factorize(values, message):
    vae, x = small_vae(**values), binary_points()
    with pytest.raises(ConfigError, match=re_escape(message)):
        FreeBitsELBO(0.5).loss(vae.model, vae.guide, x)
    # one floor per site takes them (a Monte Carlo KL)
    assert math.isfinite(FreeBitsELBO(0.5, group="site").loss(vae.model, vae.guide, x))


def re_escape(text: str) -> str:
    import re

    return re.escape(text)


@pytest.mark.parametrize("values, message", [
    ({"objective": "iwae"}, "--free-bits floors the KL term of the ELBO, which the iwae objective "
                            "does not have: use trace_elbo or meanfield_elbo"),
    ({"guide": "iaf"}, "--free-bits per dimension needs q(z|x) and p(z) that factorize over the "
                       "latent dimensions; --guide iaf does not: use --free-bits-group site"),
    ({"prior": "vamp"}, "--prior vamp does not: use --free-bits-group site"),
    ({"model": "semi_supervised"}, "--model semi_supervised sums the label out"),
    ({"free_bits": -1.0}, "free_bits must be >= 0, got -1.0"),
])
def test_the_config_refuses_free_bits_where_it_cannot_apply(values, message):
    with pytest.raises(ConfigError, match=re_escape(message)):
        TrainConfig(**{"free_bits": 0.5, **values})
    with pytest.raises(ConfigError, match="the iwae objective does not have"):
        make_objective("iwae", 2, free_bits=0.5)


def test_the_command_line_refuses_free_bits_with_a_full_covariance_guide(capsys, tmp_path):
    from pyrovae.cli import main

    assert main(["train", "--free-bits", "0.5", "--guide", "fullcov",
                 "--out-dir", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error == ["pyrovae: error: --free-bits per dimension needs q(z|x) and p(z) that "
                     "factorize over the latent dimensions; --guide fullcov does not: use "
                     "--free-bits-group site"]
    assert not (tmp_path / "run").exists()


def test_the_training_loop_trains_the_free_bits_objective_with_a_cyclical_kl_weight():
    torch.manual_seed(0)
    x = torch.bernoulli(torch.full((40, DATA_DIM), 0.3))
    data = DataSplits.from_tensors(x[:30], x[30:])
    vae = build_vae(TrainConfig(hidden_dims=(8,), latent_dim=3), data_dim=DATA_DIM)
    weights, objectives = [], []
    history = fit(vae, data, epochs=6, batch_size=10, progress=False, free_bits=0.5,
                  kl_schedule="cyclical", kl_cycles=2, kl_cycle_ratio=0.5,
                  on_epoch_end=lambda record, loop: (weights.append(loop.kl_scale.beta),
                                                     objectives.append(type(loop.elbo))))
    # cycles of 3 epochs rising over the first 1.5: 1/1.5, 2/1.5 -> 1, 1
    assert weights == pytest.approx([2 / 3, 1.0, 1.0, 2 / 3, 1.0, 1.0])
    assert set(objectives) == {FreeBitsELBO}
    assert all(math.isfinite(record.train_elbo) for record in history)
