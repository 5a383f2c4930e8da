"""Programs written the ways Pyro's own examples write them, run through pyrovae unchanged.

Each program here is written for this file in the style of one of Pyro's examples (an
``nn.Module`` that registers its networks with ``pyro.module``, a guide without sample
sites, a module whose model adds a training-only term); the estimators must evaluate what
the program means, and ``fit`` must train what Pyro's ``SVI`` trains.
"""

from __future__ import annotations

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import (
    AutoDiagonalNormal,
    AutoGuideList,
    AutoLowRankMultivariateNormal,
    AutoNormal,
)
from torch import nn

from pyrovae.ais import ais_log_marginal_likelihood
from pyrovae.data import DataSplits
from pyrovae.diagnostics import importance_summary
from pyrovae.evaluation import (
    SequentialSamplingWarning,
    elbo,
    elbo_terms,
    log_marginal_likelihood,
)
from pyrovae.labels import log_marginal_likelihood_over_labels
from pyrovae.objectives import AuxiliaryLoss
from pyrovae.programs import ProgramError, is_sample_site
from pyrovae.train import TrainingLoop, fit
from tests.labelled_gaussian import LinearGaussianLabels


class LabelClassifier(nn.Module):
    """q(y | x) trained as an observation: a model that scores labels, a guide with no sample
    sites (the auxiliary pair of a semi-supervised VAE)."""

    def __init__(self, data_dim: int = 3, num_classes: int = 2) -> None:
        super().__init__()
        self.net = nn.Linear(data_dim, num_classes)

    def model(self, x: torch.Tensor, y: torch.Tensor) -> None:
        pyro.module("classifier", self)
        with pyro.plate("batch", x.shape[0]):
            pyro.sample("y", dist.Categorical(logits=self.net(x)), obs=y)

    def guide(self, x: torch.Tensor, y: torch.Tensor) -> None:
        pass


def test_a_guide_without_sample_sites_works_in_every_estimator():
    classifier = LabelClassifier()
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])
    with torch.no_grad():
        exact = dist.Categorical(logits=classifier.net(x)).log_prob(y)
    data = (x, y)
    torch.testing.assert_close(log_marginal_likelihood(classifier, data, num_samples=4), exact)
    torch.testing.assert_close(elbo(classifier, data, num_samples=3), exact)
    terms = elbo_terms(classifier, data)
    torch.testing.assert_close(terms["reconstruction"], exact)
    torch.testing.assert_close(terms["kl"], torch.zeros(5))
    summary = importance_summary(classifier, data, ks=(1, 5))
    torch.testing.assert_close(summary.iwae[-1].float(), exact)
    ais = ais_log_marginal_likelihood(classifier, data, num_temperatures=3, num_chains=2)
    torch.testing.assert_close(ais.log_marginal_likelihood.float(), exact)


def test_every_estimator_runs_the_program_in_eval_mode_and_gives_each_module_its_mode_back():
    # a fresh M2 is in training mode, where its model adds alpha * log q(y | x) as an observed
    # site: an estimator that ran it so would report log p(x, y) + alpha log q(y | x)
    truth = LinearGaussianLabels()
    m2 = truth.semi_supervised_vae(alpha=2.0)
    x, y = truth.sample(6)
    m2.train()
    m2.classifier.eval()  # a submodule keeps its own mode
    log_pxy = log_marginal_likelihood(m2, (x, y), num_samples=50, seed=3)
    assert m2.training and m2.encoder.training and not m2.classifier.training
    torch.testing.assert_close(log_pxy, truth.log_px_given_y(x, y) + torch.log(torch.tensor(1 / 3)),
                               atol=1e-6, rtol=0)
    log_px = log_marginal_likelihood_over_labels(m2, x, 3, num_samples=20, seed=3)
    torch.testing.assert_close(log_px, torch.logsumexp(truth.log_px_and_y(x), 0), atol=1e-6, rtol=0)
    assert m2.training and not m2.classifier.training
    terms = elbo_terms(m2, (x, y), num_samples=2)
    assert m2.training
    # the guide is the exact posterior: every draw's log weight is log p(x, y), no classifier term
    torch.testing.assert_close(terms["reconstruction"] - terms["kl"], log_pxy, atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", [True, False])
def test_the_mode_is_restored_when_an_estimator_fails(mode):
    classifier = LabelClassifier().train(mode)
    with pytest.raises(ValueError):
        log_marginal_likelihood(classifier, (torch.randn(4, 3), torch.zeros(4, dtype=torch.long)),
                                num_samples=0)
    assert classifier.training is mode


# --- an independent estimator and a reference trainer ---------------------------------------
def _per_point(trace: poutine.Trace) -> torch.Tensor:
    """The sample sites' log densities of one unvectorized trace, summed per data point: the
    data plate is the last batch dimension, every other one is summed."""
    total = 0.0
    for site in trace.nodes.values():
        if is_sample_site(site):
            log_prob = site["fn"].log_prob(site["value"])
            if site["mask"] is not None:
                log_prob = log_prob * site["mask"]
            total = total + (log_prob.reshape(-1, log_prob.shape[-1]).sum(0)
                             if log_prob.dim() else log_prob)
    return total


def sequential_log_px(model, guide, args, num_samples: int) -> torch.Tensor:
    """log (1/K) sum_k p(x, z_k) / q(z_k | x) per data point from K separate, unvectorized
    runs of the guide, each replayed through the model: ``(N,)`` nats."""
    weights = []
    with torch.no_grad(), pyro.validation_enabled(False):
        for _ in range(num_samples):
            guide_trace = poutine.trace(guide).get_trace(*args)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args)
            weights.append((_per_point(model_trace) - _per_point(guide_trace)).expand(
                args[0].shape[0]))
    return torch.logsumexp(torch.stack(weights), 0) - math.log(num_samples)


def assert_paired_agreement(estimate: torch.Tensor, reference: torch.Tensor) -> None:
    """The mean paired difference is within 3 standard errors of zero."""
    difference = (estimate.double() - reference.double())
    standard_error = difference.std() / math.sqrt(difference.numel())
    assert difference.mean().abs() < 3 * standard_error + 1e-9, (
        f"{difference.mean():.4f} +- {standard_error:.4f}")


def svi_losses(model, guide, args, steps: int, lr: float, seed: int = 0) -> list[float]:
    """Pyro's own SVI on the whole data: the loss of every step, nats."""
    pyro.set_rng_seed(seed)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": lr}), Trace_ELBO(max_plate_nesting=1))
    return [svi.step(*args) for _ in range(steps)]


# --- Pyro's autoguides and subsampled plates -------------------------------------------------
POINTS, DIM, LATENT = 60, 4, 2


def local_latent_model(decoder: nn.Module, subsample_size: int | None = None):
    """A model with a latent per point in a plate of ``len(x)`` (subsampled where asked) and a
    decoder registered with ``pyro.module``."""
    def model(x):
        pyro.module("decoder", decoder)
        with pyro.plate("data", x.shape[0], subsample_size=subsample_size) as index:
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([LATENT]).to_event(1))
            pyro.sample("x", dist.Normal(decoder(z), 0.5).to_event(1), obs=x[index])

    return model


def local_latent_program(subsample_size: int | None = None):
    """:func:`local_latent_model` and ``AutoNormal`` as its guide, not yet built."""
    torch.manual_seed(0)
    model = local_latent_model(nn.Linear(LATENT, DIM), subsample_size)
    return model, AutoNormal(model)


def local_latent_data() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(POINTS, LATENT, generator=g) @ torch.randn(LATENT, DIM, generator=g) \
        + 0.5 * torch.randn(POINTS, DIM, generator=g)


@pytest.mark.parametrize("subsample_size", [None, 20])
def test_autonormal_is_built_on_the_training_points_and_trains_step_for_step_as_svi(
        subsample_size):
    # before: the guide was first called on one test point, so locs.z was (1, 2) and the
    # subsampled plate crashed ("subsample_size does not match len(subsample), 20 vs 1")
    x = local_latent_data()
    model, guide = local_latent_program(subsample_size)
    history = fit((model, guide), DataSplits.from_tensors(x, x), epochs=8, batch_size=POINTS,
                  lr=0.05, progress=False, fused=False, test_every=100)
    assert guide.locs.z.shape == (POINTS, LATENT)
    pyro.clear_param_store()
    model, guide = local_latent_program(subsample_size)
    with torch.no_grad():
        guide(x)  # built first, as fit builds it: AutoNormal's start draws nothing it keeps
    losses = svi_losses(model, guide, (x,), steps=8, lr=0.05)
    torch.testing.assert_close(torch.tensor([-record.train_elbo * POINTS for record in history]),
                               torch.tensor(losses), rtol=1e-5, atol=1e-3)


def test_fit_estimates_log_px_of_an_autonormal_program_on_all_its_points():
    x = local_latent_data()
    model, guide = local_latent_program()
    history = fit((model, guide), DataSplits.from_tensors(x, x), epochs=1, batch_size=POINTS,
                  progress=False, log_px_every=1, log_px_size=30, log_px_samples=5)
    assert math.isfinite(history[-1].test_log_px)


def test_log_px_of_a_subsampled_autonormal_program_is_every_points_and_agrees_with_a_sampler():
    x = local_latent_data()
    torch.manual_seed(0)
    decoder = nn.Linear(LATENT, DIM)
    model = local_latent_model(decoder, subsample_size=20)
    guide = AutoNormal(model)
    fit((model, guide), DataSplits.from_tensors(x, x), epochs=10, batch_size=POINTS, lr=0.05,
        progress=False, test_every=100)
    estimate = log_marginal_likelihood((model, guide), x, num_samples=50, batch_size=POINTS,
                                       seed=3)
    # the estimator switches subsampling off: the same as the program that never subsamples
    whole = local_latent_model(decoder)
    torch.testing.assert_close(estimate, log_marginal_likelihood(
        (whole, guide), x, num_samples=50, batch_size=POINTS, seed=3))
    assert estimate.shape == (POINTS,)
    # AutoNormal's q(z_n) written out by hand, sampled one whole trace at a time
    locs, scales = guide.locs.z.detach(), guide.scales.z.detach()

    def by_hand(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(locs, scales).to_event(1))

    assert_paired_agreement(estimate, sequential_log_px(whole, by_hand, (x,), 50))


@pytest.mark.parametrize("autoguide", [AutoDiagonalNormal, AutoLowRankMultivariateNormal])
def test_an_autoguide_of_one_joint_vector_is_refused_before_training(autoguide):
    x = local_latent_data()
    model, _ = local_latent_program()
    with pytest.raises(ProgramError, match=f"site '_{autoguide.__name__}_latent' of the guide is "
                       f"outside a plate .* use AutoNormal") as refusal:
        fit((model, autoguide(model)), DataSplits.from_tensors(x, x), epochs=1,
            batch_size=POINTS, progress=False)
    assert "\n" not in str(refusal.value)


def test_a_guide_with_parameters_per_point_is_refused_with_minibatches_or_other_test_points():
    x = local_latent_data()
    model, guide = local_latent_program()
    with pytest.raises(ProgramError, match="parameters for each training point "
                       r"\(AutoNormal.locs.z, AutoNormal.scales.z\): every step must see all 60 "
                       "points in their order, as SVI on the whole data does; set batch_size to 60"):
        fit((model, guide), DataSplits.from_tensors(x, x), epochs=1, batch_size=20,
            progress=False)
    pyro.clear_param_store()
    model, guide = local_latent_program()
    with pytest.raises(ProgramError, match="the test split must be the training points"):
        fit((model, guide), DataSplits.from_tensors(x, x + 1), epochs=1, batch_size=POINTS,
            progress=False)
    pyro.clear_param_store()
    model, guide = local_latent_program()
    with torch.no_grad():
        guide(x)
    with pytest.raises(ProgramError, match=r"the guide keeps parameters for each of 60 points "
                       r"\(AutoNormal.locs.z, AutoNormal.scales.z\) and is called on 30"):
        log_marginal_likelihood((model, guide), x, num_samples=2, batch_size=30)


def test_an_autoguide_list_of_autonormals_trains_and_evaluates():
    x = local_latent_data()
    torch.manual_seed(0)
    decoder = nn.Linear(LATENT + 1, DIM)

    def model(x):
        pyro.module("decoder", decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([LATENT]).to_event(1))
            w = pyro.sample("w", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(decoder(torch.cat([z, w[..., None]], -1)), 0.5)
                        .to_event(1), obs=x)

    guide = AutoGuideList(model)
    guide.append(AutoNormal(poutine.block(model, expose=["z"])))
    guide.append(AutoNormal(poutine.block(model, hide=["z"])))
    history = fit((model, guide), DataSplits.from_tensors(x, x), epochs=10, batch_size=POINTS,
                  lr=0.05, progress=False, test_every=100)
    assert history[-1].train_elbo > history[0].train_elbo + 1
    estimate = log_marginal_likelihood((model, guide), x, num_samples=30, batch_size=POINTS)
    assert_paired_agreement(estimate, sequential_log_px(model, guide, (x,), 30))


# --- a program that does not broadcast over samples ----------------------------------------
HIDDEN = -1.0


class MaskedCompletion(nn.Module):
    """A conditional VAE that completes the hidden part of a binary vector, in the style of
    Pyro's CVAE example: the visible part ``x`` holds :data:`HIDDEN` where a value is hidden,
    ``y`` is the whole vector, and the model scores only the hidden entries of ``y``, picked
    with a boolean mask and reshaped per point, which assumes one batch dimension."""

    def __init__(self, size: int = 6, latent: int = 2) -> None:
        super().__init__()
        self.latent = latent
        self.prior_net = nn.Linear(size, 2 * latent)
        self.generator = nn.Linear(latent, size)
        self.skip = nn.Linear(size, size)
        self.recognition = nn.Linear(2 * size, 2 * latent)

    def model(self, x: torch.Tensor, y: torch.Tensor) -> None:
        pyro.module("completion", self)
        with pyro.plate("data", x.shape[0]):
            loc, log_scale = self.prior_net(x).chunk(2, -1)
            z = pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))
            logits = self.generator(z) + self.skip(x)
            hidden = x == HIDDEN
            picked = logits[hidden].view(x.shape[0], -1)
            pyro.sample("y", dist.Bernoulli(logits=picked).to_event(1),
                        obs=y[hidden].view(x.shape[0], -1))

    def guide(self, x: torch.Tensor, y: torch.Tensor) -> None:
        pyro.module("completion", self)
        with pyro.plate("data", x.shape[0]):
            loc, log_scale = self.recognition(torch.cat([x, y], -1)).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))


def completion_data(n: int = 40, size: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    y = (torch.rand(n, size, generator=g) < 0.3).float()
    x = y.clone()
    x[:, size // 2:] = HIDDEN
    return x, y


def test_a_program_that_indexes_with_a_boolean_mask_is_sampled_one_trace_at_a_time():
    completion = MaskedCompletion()
    data = completion_data()
    with pytest.raises(IndexError):  # what every vectorized estimate ran into
        with pyro.plate("particles", 3, dim=-2):
            poutine.trace(completion.guide).get_trace(*data)
            completion.model(*data)
    with pytest.warns(SequentialSamplingWarning, match=r"\(IndexError: The shape of the mask .*\); "
                      "drawing them one trace at a time instead, about K times slower"):
        estimate = log_marginal_likelihood(completion, data, num_samples=40, chunk_size=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per program
        again = elbo(completion, data, num_samples=2)
    assert estimate.shape == again.shape == (40,)
    assert_paired_agreement(estimate, sequential_log_px(completion.model, completion.guide,
                                                        data, 40))


# --- an M2 with one-hot labels and an auxiliary classification loss --------------------------
class OneHotM2(nn.Module):
    """Kingma et al.'s M2 written as Pyro's ``ss_vae_M2.py`` writes it: labels one-hot, the
    networks registered with ``pyro.module``, and a second model/guide pair that trains the
    classifier q(y | x) on the labels, scaled by ``aux_scale``."""

    def __init__(self, size: int = 6, classes: int = 3, latent: int = 2,
                 aux_scale: float = 5.0) -> None:
        super().__init__()
        self.classes, self.latent, self.aux_scale = classes, latent, aux_scale
        self.classifier = nn.Linear(size, classes)
        self.encoder = nn.Linear(size + classes, 2 * latent)
        self.decoder = nn.Linear(latent + classes, size)

    def model(self, xs: torch.Tensor, ys: torch.Tensor) -> None:
        pyro.module("m2", self)
        with pyro.plate("data", xs.shape[0]):
            z = pyro.sample("z", dist.Normal(xs.new_zeros(self.latent), 1.0).to_event(1))
            ys = pyro.sample("y", dist.OneHotCategorical(logits=xs.new_zeros(self.classes)),
                             obs=ys)
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(torch.cat([z, ys], -1)))
                        .to_event(1), obs=xs)

    def guide(self, xs: torch.Tensor, ys: torch.Tensor) -> None:
        with pyro.plate("data", xs.shape[0]):
            loc, log_scale = self.encoder(torch.cat([xs, ys], -1)).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))

    def model_classify(self, xs: torch.Tensor, ys: torch.Tensor) -> None:
        pyro.module("m2", self)
        with pyro.plate("data", xs.shape[0]), poutine.scale(scale=self.aux_scale):
            pyro.sample("y_aux", dist.OneHotCategorical(logits=self.classifier(xs)), obs=ys)

    def guide_classify(self, xs: torch.Tensor, ys: torch.Tensor) -> None:
        pass


def one_hot_data(n: int = 48, size: int = 6, classes: int = 3):
    g = torch.Generator().manual_seed(5)
    labels = torch.randint(classes, (n,), generator=g)
    means = torch.rand(classes, size, generator=g)
    xs = torch.bernoulli(means[labels], generator=g)
    return xs, nn.functional.one_hot(labels, classes).float()


def test_m2_with_one_hot_labels_and_an_auxiliary_loss_trains_step_for_step_as_two_svis():
    xs, ys = one_hot_data()
    torch.manual_seed(0)
    m2 = OneHotM2()
    start = {name: value.clone() for name, value in m2.state_dict().items()}
    # torch.cat([z, ys]) assumes one batch dimension: the test ELBO samples trace by trace
    with pytest.warns(SequentialSamplingWarning, match="Tensors must have same number"):
        history = fit(m2, DataSplits.from_tensors((xs, ys)), epochs=3, batch_size=16, lr=0.02,
                      seed=0, fused=False, progress=False, test_every=100,
                      auxiliary=[AuxiliaryLoss(m2.model_classify, m2.guide_classify)])
    trained = {name: value.clone() for name, value in m2.state_dict().items()}
    # Pyro's way: two SVIs sharing one optimizer, each stepping on every batch in turn,
    # on the batches fit drew (its shuffling generator, seeded by the run's seed)
    pyro.clear_param_store()
    m2.load_state_dict(start)
    m2.zero_grad(set_to_none=True)
    pyro.set_rng_seed(0)
    optimizer = pyro.optim.Adam({"lr": 0.02})
    svis = [SVI(m2.model, m2.guide, optimizer, Trace_ELBO(max_plate_nesting=1)),
            SVI(m2.model_classify, m2.guide_classify, optimizer, Trace_ELBO(max_plate_nesting=1))]
    order = torch.Generator().manual_seed(0)
    train_elbos = []
    for _ in range(3):
        total = 0.0
        for batch in torch.randperm(48, generator=order).split(16):
            total += svis[0].step(xs[batch], ys[batch])
            svis[1].step(xs[batch], ys[batch])
        train_elbos.append(-total / 48)
    torch.testing.assert_close(torch.tensor([record.train_elbo for record in history]),
                               torch.tensor(train_elbos), rtol=1e-5, atol=1e-4)
    for name, value in m2.state_dict().items():
        torch.testing.assert_close(trained[name], value, rtol=1e-4, atol=1e-5)
    # log p(x, y) of the trained program against the sequential sampler
    estimate = log_marginal_likelihood(m2, (xs, ys), num_samples=30)
    assert_paired_agreement(estimate, sequential_log_px(m2.model, m2.guide, (xs, ys), 30))


def test_a_conditional_vae_trains_on_image_valued_targets_carried_by_the_data():
    x, y = completion_data()
    torch.manual_seed(0)
    completion = MaskedCompletion()
    data = DataSplits.from_tensors((x, y), (x[:8], y[:8]))
    assert [tuple(a.shape) for a in data.test_inputs] == [(8, 6), (8, 6)]
    with pytest.warns(SequentialSamplingWarning):
        history = fit(completion, data, epochs=4, batch_size=10, lr=0.02, progress=False)
    # the loss fit minimises is Pyro's Trace_ELBO of the program on the batch it is given
    loop = TrainingLoop(completion, data, epochs=1, batch_size=10, progress=False)
    pyro.set_rng_seed(7)
    ours = loop._loss((x[:10], y[:10]))
    pyro.set_rng_seed(7)
    assert ours.item() == pytest.approx(
        Trace_ELBO().differentiable_loss(completion.model, completion.guide, x[:10], y[:10])
        .item(), rel=1e-6)
    assert history[-1].test_elbo > -10 and len(history) == 4


def test_a_data_argument_that_is_not_a_per_point_tensor_is_refused_naming_its_position():
    from torch.nn.utils.rnn import pack_padded_sequence

    from pyrovae.errors import InvalidDataError

    x = torch.rand(5, 4)
    packed = pack_padded_sequence(torch.rand(5, 3, 2), torch.full((5,), 3), batch_first=True)
    with pytest.raises(InvalidDataError, match="^data argument 1 is a PackedSequence, not a "
                       "tensor with a value per data point along dimension 0"):
        log_marginal_likelihood(MaskedCompletion(4), (x, packed), num_samples=2)
    with pytest.raises(InvalidDataError, match="^argument 2 of the training data is a "
                       "PackedSequence"):
        DataSplits.from_tensors((x, x, packed))
    with pytest.raises(InvalidDataError, match="argument 1 of the test data has 3 points"):
        DataSplits.from_tensors((x, x), (x, x[:3]))


# --- a module as Pyro's VAE example writes one, and a sequential model ----------------------
def svi_on_fit_batches(model, guide, args, *, epochs: int, batch_size: int, lr: float,
                       seed: int = 0) -> list[float]:
    """Pyro's SVI on the batches fit draws (its shuffling generator seeded by the run's seed):
    the train ELBO of every epoch, nats per point."""
    pyro.set_rng_seed(seed)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": lr}), Trace_ELBO(max_plate_nesting=1))
    order = torch.Generator().manual_seed(seed)
    n = args[0].shape[0]
    elbos = []
    for _ in range(epochs):
        total = sum(svi.step(*(a[batch] for a in args))
                    for batch in torch.randperm(n, generator=order).split(batch_size))
        elbos.append(-total / n)
    return elbos


class ImageVAE(nn.Module):
    """A VAE in the style of Pyro's ``examples/vae/vae.py``: encoder and decoder modules, the
    decoder registered with ``pyro.module`` in the model and the encoder in the guide, the
    prior's parameters made from ``x.new_zeros`` per point."""

    def __init__(self, size: int = 8, latent: int = 2, hidden: int = 5) -> None:
        super().__init__()
        self.latent = latent
        self.encoder = nn.Sequential(nn.Linear(size, hidden), nn.Softplus(),
                                     nn.Linear(hidden, 2 * latent))
        self.decoder = nn.Sequential(nn.Linear(latent, hidden), nn.Softplus(),
                                     nn.Linear(hidden, size), nn.Sigmoid())

    def model(self, x: torch.Tensor) -> None:
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z_loc = x.new_zeros(torch.Size((x.shape[0], self.latent)))
            z_scale = x.new_ones(torch.Size((x.shape[0], self.latent)))
            z = pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))
            pyro.sample("obs", dist.Bernoulli(self.decoder(z), validate_args=False)
                        .to_event(1), obs=x)

    def guide(self, x: torch.Tensor) -> None:
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            z_loc, z_log_scale = self.encoder(x).chunk(2, -1)
            pyro.sample("latent", dist.Normal(z_loc, z_log_scale.exp()).to_event(1))


def test_a_module_in_the_style_of_pyros_vae_example_trains_as_svi_and_evaluates():
    x = torch.bernoulli(torch.rand(40, 8), generator=torch.Generator().manual_seed(6))
    torch.manual_seed(0)
    vae = ImageVAE()
    start = {name: value.clone() for name, value in vae.state_dict().items()}
    history = fit(vae, DataSplits.from_tensors(x[:30], x[30:]), epochs=3, batch_size=10,
                  lr=0.01, seed=0, fused=False, progress=False, test_every=100)
    trained = {name: value.clone() for name, value in vae.state_dict().items()}
    pyro.clear_param_store()
    vae.load_state_dict(start)
    vae.zero_grad(set_to_none=True)
    elbos = svi_on_fit_batches(vae.model, vae.guide, (x[:30],), epochs=3, batch_size=10,
                               lr=0.01)
    torch.testing.assert_close(torch.tensor([record.train_elbo for record in history]),
                               torch.tensor(elbos), rtol=1e-5, atol=1e-4)
    for name, value in vae.state_dict().items():
        torch.testing.assert_close(trained[name], value, rtol=1e-4, atol=1e-5)
    estimate = log_marginal_likelihood(vae, x, num_samples=30)
    assert_paired_agreement(estimate, sequential_log_px(vae.model, vae.guide, (x,), 30))


STEPS = 4


def markov_chain_program():
    """A latent random walk per sequence, z_t ~ N(a z_{t-1}, 1), x_t ~ N(z_t, 0.5), written
    with ``pyro.markov`` over the time steps, and a guide that filters forward; its
    parameters live in Pyro's parameter store."""
    def model(x):
        decay = pyro.param("decay", torch.tensor(0.5))
        with pyro.plate("sequences", x.shape[0]):
            z = x.new_zeros(x.shape[0])
            for t in pyro.markov(range(STEPS)):
                z = pyro.sample(f"z_{t}", dist.Normal(decay * z, 1.0))
                pyro.sample(f"x_{t}", dist.Normal(z, 0.5), obs=x[:, t])

    def guide(x):
        gain = pyro.param("gain", torch.tensor(0.5))
        carry = pyro.param("carry", torch.tensor(0.1))
        scale = pyro.param("scale", torch.tensor(0.8), constraint=dist.constraints.positive)
        with pyro.plate("sequences", x.shape[0]):
            z = x.new_zeros(x.shape[0])
            for t in pyro.markov(range(STEPS)):
                z = pyro.sample(f"z_{t}", dist.Normal(gain * x[:, t] + carry * z, scale))

    return model, guide


def test_a_sequential_model_with_pyro_markov_trains_as_svi_and_evaluates():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(30, STEPS, generator=g).cumsum(-1)
    model, guide = markov_chain_program()
    history = fit((model, guide), DataSplits.from_tensors(x), epochs=3, batch_size=10,
                  lr=0.05, seed=0, fused=False, progress=False, test_every=100)
    trained = {name: value.detach().clone() for name, value in pyro.get_param_store().items()}
    pyro.clear_param_store()
    elbos = svi_on_fit_batches(model, guide, (x,), epochs=3, batch_size=10, lr=0.05)
    torch.testing.assert_close(torch.tensor([record.train_elbo for record in history]),
                               torch.tensor(elbos), rtol=1e-5, atol=1e-4)
    for name, value in pyro.get_param_store().items():
        torch.testing.assert_close(trained[name], value.detach(), rtol=1e-4, atol=1e-5)
    estimate = log_marginal_likelihood((model, guide), x, num_samples=50)
    assert_paired_agreement(estimate, sequential_log_px(model, guide, (x,), 50))


def test_the_elbo_terms_of_a_program_that_does_not_broadcast_are_drawn_a_trace_at_a_time():
    completion = MaskedCompletion()
    data = completion_data()
    with pytest.warns(SequentialSamplingWarning, match="IndexError"):
        terms = elbo_terms(completion, data, num_samples=3)
    pyro.set_rng_seed(2)
    estimate = elbo(completion, data, num_samples=3)
    pyro.set_rng_seed(2)
    terms = elbo_terms(completion, data, num_samples=3)
    torch.testing.assert_close(terms["reconstruction"] - terms["kl"], estimate)
    assert terms["kl"].shape == (40,)


def test_ais_refuses_a_program_that_does_not_broadcast_in_one_line():
    with pytest.raises(ProgramError, match=r"^AIS runs its chains batched in one trace, and "
                       r"this program does not run so \(IndexError: .*\); "
                       r"log_marginal_likelihood samples it one trace at a time$"):
        ais_log_marginal_likelihood(MaskedCompletion(), completion_data(), num_temperatures=2,
                                    num_chains=2)
