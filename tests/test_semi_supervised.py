"""Kingma et al. (2014)'s M2: y summed out exactly in log p(x) and, by enumeration, in the
ELBO of unlabelled points; the classification term; training; the command line."""

from __future__ import annotations

import json

import pyro
import pytest
import torch
from pyro.infer import TraceEnum_ELBO

from pyrovae import TrainConfig, build_vae, fit, log_marginal_likelihood
from pyrovae.cli import build_parser, main
from pyrovae.config import apply_label_settings
from pyrovae.data import DataSplits
from pyrovae.errors import ConfigError, InvalidDataError
from pyrovae.labels import (
    InterleavedSplits,
    classification_error,
    interleaving_schedule,
    log_marginal_likelihood_over_labels,
)
from pyrovae.likelihoods import BernoulliLikelihood, GreyLevelBernoulliLikelihood
from pyrovae.models import SemiSupervisedVAE, paper_alpha
from tests.conftest import SHARED_DATA, requires_mnist
from tests.labelled_gaussian import LinearGaussianLabels
from tests.test_conditional import CLI_TINY, labelled_binary_data, write_labelled_npz
from tests.test_experiments import run_script


def test_log_p_x_sums_the_label_out_exactly():
    truth = LinearGaussianLabels()
    m2 = truth.semi_supervised_vae()
    x, _ = truth.sample(20)
    joint = truth.log_px_and_y(x)  # (C, N): log p(x, y) in closed form
    for label in range(3):
        estimate = log_marginal_likelihood(m2, (x, torch.full((20,), label)), num_samples=3)
        torch.testing.assert_close(estimate, joint[label], atol=1e-8, rtol=0)
    summed = log_marginal_likelihood_over_labels(m2, x, 3, num_samples=3)
    torch.testing.assert_close(summed, torch.logsumexp(joint, 0), atol=1e-8, rtol=0)


def test_log_p_x_is_the_logsumexp_of_the_class_conditional_estimates():
    truth = LinearGaussianLabels()
    m2 = truth.semi_supervised_vae()
    m2.guide_family.scale_tril.mul_(1.5)  # wider than the exact posterior: weights vary
    x, _ = truth.sample(15)
    joint = truth.log_px_and_y(x)  # (C, N)
    exact = torch.logsumexp(joint, 0)
    one = log_marginal_likelihood_over_labels(m2, x, 3, num_samples=1, seed=7)
    assert (exact - one).mean() > 0.3  # a lower bound in expectation
    # a batch of 4 points (the last one short) holds each point's 3 classes
    summed = log_marginal_likelihood_over_labels(m2, x, 3, num_samples=4000, batch_size=4,
                                                 seed=7)
    assert (summed - exact).abs().max() < 0.03  # tight as K grows
    # each class's estimate is the shared estimator's log p(x, y = c) of that pair
    per_class = torch.stack([log_marginal_likelihood(m2, (x, torch.full((15,), c)),
                                                     num_samples=4000, seed=c) for c in range(3)])
    assert (per_class - joint).abs().max() < 0.05
    torch.testing.assert_close(summed, torch.logsumexp(per_class, 0), atol=0.05, rtol=0)


def test_the_shared_estimator_reads_unlabelled_points_as_an_ordinary_program():
    # with y = -1 the guide draws y ~ q(y|x), and importance sampling over (y, z) is unbiased
    truth = LinearGaussianLabels()
    m2 = truth.semi_supervised_vae()
    x, _ = truth.sample(10)
    num_samples = 20000
    estimate = log_marginal_likelihood(m2, (x, torch.full((10,), -1)), num_samples=num_samples,
                                       chunk_size=5000)
    joint = truth.log_px_and_y(x).exp()  # p(x, y): the weight of a draw y is p(x, y) / q(y|x)
    exact = joint.sum(0)
    q = torch.softmax(m2.classifier(x), -1).T.detach()
    relative_error = ((joint**2 / q).sum(0) - exact**2).sqrt() / (exact * num_samples**0.5)
    assert bool(((estimate - exact.log()).abs() < 4 * relative_error).all())
    assert bool((relative_error < 0.1).all())  # so that the check above has teeth


def test_a_mixed_batch_enumerates_the_unlabelled_labels_and_weights_the_classifier():
    truth = LinearGaussianLabels()
    m2 = truth.semi_supervised_vae(alpha=3.0)
    x, y = truth.sample(12)
    y = y.clone()
    y[5:] = -1  # 5 labelled points, 7 unlabelled
    joint = truth.log_px_and_y(x)  # log p(x, y); the exact guide makes every z draw give it
    log_q = torch.log_softmax(m2.classifier(x), -1).T.detach()  # (C, N)
    labelled = joint[y[:5], torch.arange(5)].sum()
    unlabelled = (log_q.exp() * (joint - log_q))[:, 5:].sum()  # sum_y q(y|x) log p(x,y)/q(y|x)
    elbo = TraceEnum_ELBO(max_plate_nesting=1)
    loss = elbo.differentiable_loss(m2.model, m2.guide, x, y)  # eval mode: the ELBO alone
    torch.testing.assert_close(-loss, labelled + unlabelled, atol=1e-8, rtol=0)
    m2.train()
    loss = elbo.differentiable_loss(m2.model, m2.guide, x, y)
    classified = 3.0 * log_q[y[:5], torch.arange(5)].sum()
    torch.testing.assert_close(-loss, labelled + unlabelled + classified, atol=1e-8, rtol=0)


def small_m2(labelled: int | None = 6):
    config, data = apply_label_settings(
        TrainConfig(model="semi_supervised", hidden_dims=(16,), latent_dim=2, labelled=labelled),
        labelled_binary_data())
    return build_vae(config, data_dim=data.data_dim), data, config


def test_m2_trains_on_batches_of_labelled_and_unlabelled_points():
    m2, data, config = small_m2()
    assert isinstance(m2, SemiSupervisedVAE) and data.num_labelled == 6
    assert config.alpha == pytest.approx(0.1 * 40 / 6) == m2.alpha  # Kingma et al.'s 0.1 N
    history = fit(m2, data, epochs=6, batch_size=10, lr=2e-2, progress=False)
    assert history[-1].train_elbo > history[0].train_elbo + 0.5
    assert not m2.training  # evaluation leaves the classification term out
    x, y = data.test_inputs
    assert 0 <= classification_error(m2, x, y) <= 1


def test_classification_error_counts_the_wrong_argmax():
    truth = LinearGaussianLabels()
    m2 = truth.semi_supervised_vae()
    x, _ = truth.sample(30)
    predicted = m2.classifier(x).argmax(-1)
    labels = predicted.clone()
    labels[:7] = (labels[:7] + 1) % 3
    assert classification_error(m2, x, labels, batch_size=4) == pytest.approx(7 / 30)
    assert paper_alpha(50000, 100) == pytest.approx(50.0)


def test_settings_m2_cannot_take_are_refused():
    with pytest.raises(ConfigError, match="the iwae objective needs reparameterised"):
        TrainConfig(model="semi_supervised", objective="iwae")
    with pytest.raises(ConfigError, match="--alpha is for --model semi_supervised"):
        TrainConfig(alpha=1.0)
    with pytest.raises(ConfigError, match=r"--labelled 41 is larger than the training set \(40"):
        small_m2(labelled=41)


def test_the_command_line_trains_m2_and_reports_log_p_x_and_the_classification_error(
        tmp_path, capsys):
    write_labelled_npz(tmp_path / "digits.npz")
    dataset = f"npz:{tmp_path / 'digits.npz'}"
    run = tmp_path / "run"
    assert main(["train", "--model", "semi_supervised", "--labelled", "6", "--dataset", dataset,
                 "--out-dir", str(run), *CLI_TINY]) == 0
    out = capsys.readouterr().out
    assert "log p(x) (K=30)" in out and "test classification error of q(y|x)" in out
    results = json.loads((run / "results.json").read_text())
    assert 0 <= results["test_classification_error"] <= 1
    assert results["config"]["alpha"] == pytest.approx(0.1 * 40 / 6)
    assert main(["evaluate", str(run), "-k", "10", "--device", "cpu", "--no-progress"]) == 0
    evaluation = json.loads((run / "evaluation.json").read_text())
    assert evaluation["log_marginal_likelihood_of"] == "log p(x)"
    assert evaluation["test_elbo_of"] == "log p(x, y)"
    assert evaluation["log_marginal_likelihood"] < 0
    assert main(["sample", str(run), "--label", "1", "--device", "cpu", "-n", "4",
                 "-o", str(tmp_path / "ones.png")]) == 0
    capsys.readouterr()
    for flags, message in ((["--model", "semi_supervised", "--labelled", "41"],
                            "--labelled 41 is larger than the training set (40 points)"),
                           (["--labelled", "5"], "--labelled is for --model semi_supervised")):
        assert main(["train", *flags, "--dataset", dataset, "--out-dir", str(tmp_path / "bad"),
                     *CLI_TINY]) == 2
        error = capsys.readouterr().err
        assert message in error and error.count("\n") == 1
    assert not (tmp_path / "bad").exists()


# --- the pyro_m2 preset: Pyro's ss_vae_M2.py protocol ------------------------------------

def test_the_pyro_preset_sets_pyro_s_example_and_keeps_kingma_s_weight_a_flag_away():
    config = TrainConfig.from_preset("pyro_m2", labelled=100)
    expected = {"model": "semi_supervised", "alpha": 46.0, "label_batches": "interleaved",
                "valid_size": 10_000, "valid_split": "last", "binarize": "none",
                "likelihood": "bernoulli_grey", "hidden_dims": (500,), "activation": "softplus",
                "latent_dim": 50, "lr": 4.2e-4, "batch_size": 200, "epochs": 50,
                "objective": "trace_elbo"}
    assert {name: getattr(config, name) for name in expected} == expected
    # --alpha none restores Kingma et al.'s 0.1 N / N_labelled once the data are known
    args = build_parser().parse_args(["train", "--preset", "pyro_m2", "--alpha", "none"])
    assert args.alpha is None
    config, data = apply_label_settings(
        TrainConfig(model="semi_supervised", labelled=6, alpha=None), labelled_binary_data())
    assert config.alpha == pytest.approx(0.1 * 40 / 6)
    with pytest.raises(ConfigError, match="--label-batches interleaved is for --model "
                                          "semi_supervised, not --model conditional"):
        TrainConfig(model="conditional", label_batches="interleaved")


def _digits(n: int = 300, num_classes: int = 10) -> DataSplits:
    g = torch.Generator().manual_seed(0)
    y = torch.randperm(n, generator=g) % num_classes
    return DataSplits.from_tensors(torch.rand(n, 4, generator=g), torch.rand(20, 4, generator=g),
                                   train_labels=y, test_labels=torch.arange(20) % num_classes)


def test_the_split_and_a_class_balanced_labelled_set_drawn_by_the_seed():
    # the first 250 points train, the last 50 validate; 30 labels, 3 per class, among the 250
    data = _digits().with_validation(50)
    assert data.train.shape[0] == 250 and data.valid.shape[0] == 50
    torch.testing.assert_close(data.valid, _digits().train[250:])
    kept = {}
    for seed in (0, 0, 1):
        config, labelled = apply_label_settings(
            TrainConfig.from_preset("pyro_m2", labelled=30, seed=seed), data)
        assert isinstance(labelled, InterleavedSplits) and config.alpha == 46.0
        visible = labelled.train_labels >= 0
        assert torch.bincount(labelled.train_labels[visible], minlength=10).tolist() == [3] * 10
        # the visible labels are the true ones
        assert bool((labelled.train_labels[visible] == data.train_labels[visible]).all())
        kept.setdefault(seed, []).append(torch.nonzero(visible).flatten().tolist())
    assert kept[0][0] == kept[0][1] and kept[0][0] != kept[1][0]


def test_the_auxiliary_weight_reaches_the_loss():
    # with y observed nothing is enumerated and z's draws repeat under one seed: the loss
    # differs between alpha and 0 by exactly alpha * sum_n -log q(y_n | x_n)
    data = labelled_binary_data()
    losses = {}
    for alpha in (0.0, 46.0):
        config, labelled = apply_label_settings(TrainConfig.from_preset(
            "pyro_m2", labelled=6, alpha=alpha, hidden_dims=(16,), latent_dim=2), data)
        torch.manual_seed(5)
        m2 = build_vae(config, data_dim=labelled.data_dim)
        x, y = labelled.train[:8], data.train_labels[:8]
        pyro.set_rng_seed(1)
        elbo = TraceEnum_ELBO(max_plate_nesting=1, strict_enumeration_warning=False)
        losses[alpha] = float(elbo.loss(m2.model, m2.guide, x, y))
        log_q = torch.log_softmax(m2.classifier(x), -1)[torch.arange(8), y].sum().detach()
    assert m2.alpha == 46.0
    assert losses[46.0] - losses[0.0] == pytest.approx(-46.0 * float(log_q), rel=1e-5)


def test_the_interleaving_schedule_is_pyro_s():
    flags = interleaving_schedule(100, 49_900, 100)
    assert len(flags) == 500 and [i for i, f in enumerate(flags) if f] == [1]
    flags = interleaving_schedule(3000, 47_000, 200)
    assert len(flags) == 250 and [i for i, f in enumerate(flags) if f] == list(range(1, 226, 16))
    # short batches of each kind; labelled batches left over close the epoch
    assert interleaving_schedule(5, 5, 2) == [False, True, False, True, False, True]
    assert interleaving_schedule(6, 1, 2) == [False, True, True, True]
    assert interleaving_schedule(0, 3, 2) == [False, False]


def test_interleaved_batches_hold_one_kind_each_and_pass_every_point_once():
    data = apply_label_settings(TrainConfig.from_preset("pyro_m2", labelled=30),
                                _digits().with_validation(50))[1]
    generator = torch.Generator().manual_seed(2)
    state = generator.get_state()
    batches = list(data.train_batches(10, generator=generator))
    assert [bool((y >= 0).all()) for _, y in batches] == interleaving_schedule(30, 220, 10)
    assert all(bool((y >= 0).all()) or bool((y < 0).all()) for _, y in batches)
    rows = torch.cat([x for x, _ in batches])
    assert rows.shape[0] == 250 and torch.unique(rows, dim=0).shape[0] == 250
    # a resumed epoch continues the same order; a part of each batch is its slice
    generator.set_state(state)
    resumed = list(data.train_batches(10, generator=generator, start=3))
    assert len(resumed) == 22
    for (x, y), (x0, y0) in zip(resumed, batches[3:], strict=True):
        torch.testing.assert_close(x, x0)
        assert torch.equal(y, y0)
    generator.set_state(state)
    halves = list(data.train_batches(10, generator=generator, part=lambda rows: slice(0, 5)))
    torch.testing.assert_close(halves[1][0], batches[1][0][:5])


def test_the_grey_level_bernoulli_scores_grey_levels_and_refuses_values_outside():
    likelihood = GreyLevelBernoulliLikelihood()
    logits, x = torch.tensor([[0.3, -2.0, 1.5]]), torch.tensor([[0.25, 0.0, 1.0]])
    expected = (x * logits - torch.nn.functional.softplus(logits)).sum(-1)
    with pyro.validation_enabled(True):
        torch.testing.assert_close(likelihood(logits).log_prob(x), expected)
    with pytest.raises(InvalidDataError, match="needs data in \\[0, 1\\], but 1 values"):
        likelihood.check_support(torch.tensor([0.5, 1.5]))
    with pytest.raises(InvalidDataError, match="needs binary data"):
        BernoulliLikelihood().check_support(x)


def test_the_command_line_trains_the_pyro_preset(tmp_path, capsys):
    write_labelled_npz(tmp_path / "digits.npz", n=90)
    run = tmp_path / "run"
    assert main(["train", "--model", "semi_supervised", "--preset", "pyro_m2", "--labelled", "6",
                 "--dataset", f"npz:{tmp_path / 'digits.npz'}", "--valid-size", "10",
                 "--out-dir", str(run), *CLI_TINY, "--eval-samples", "0"]) == 0
    capsys.readouterr()
    config = json.loads((run / "config.json").read_text())
    assert config["preset"] == "pyro_m2" and config["label_batches"] == "interleaved"
    assert config["alpha"] == 46.0 and config["valid_size"] == 10
    assert config["likelihood"] == "bernoulli_grey" and config["binarize"] == "none"


@pytest.mark.slow
@requires_mnist
def test_the_preset_experiment_reports_the_test_error_at_the_best_validation_accuracy(tmp_path):
    out = tmp_path / "out"
    run_script("semi_supervised.py", "--preset", "pyro_m2", "--labelled", "20", "--epochs", "2",
               "--data-dir", str(SHARED_DATA), "--out-dir", str(out), "--runs-dir",
               str(tmp_path / "runs"), "--train-size", "400", "--valid-size", "100",
               "--test-size", "50", "--hidden-dims", "16", "--latent-dim", "3")
    row = json.loads((out / "pyro_m2_20_labels_seed0" / "results.json").read_text())
    assert row["labelled"] == 20 and row["epochs"] == 2 and row["seed"] == 0
    curve = row["validation_error_percent_per_epoch"]
    assert len(curve) == 2 and row["best_validation_epoch"] == 1 + curve.index(min(curve))
    best = row["best_validation_epoch"] - 1
    assert row["test_error_percent"] == row["test_error_percent_per_epoch"][best]
    summary = json.loads((out / "results.json").read_text())["summary"]
    assert summary[0]["mean_test_error_percent"] == row["test_error_percent"]
    # the banked checkpoint (no optimizer state) gives the same test error in one command
    banked = out / "pyro_m2_20_labels_seed0" / "checkpoint.pt"
    assert torch.load(banked, weights_only=True)["optimizer"] == {}
    assert main(["evaluate", str(banked), "-k", "1", "--device", "cpu", "--no-progress",
                 "--output", str(tmp_path / "evaluation.json")]) == 0
    evaluation = json.loads((tmp_path / "evaluation.json").read_text())
    assert 100 * evaluation["test_classification_error"] == pytest.approx(
        row["test_error_percent"])


def test_the_pyro_comparison_is_skipped_with_a_reason_without_pyro_s_example(tmp_path):
    result = run_script("compare_pyro_m2.py", "--pyro-examples", str(tmp_path))
    assert result.stdout == (f"skipped: no ss_vae_M2.py in {tmp_path}; fetch Pyro's repository "
                             f"and pass its examples/vae folder (Pyro's example code is not part "
                             f"of pyrovae)\n")
    result = run_script("compare_pyro_m2.py")
    assert result.stdout.startswith("skipped: no --pyro-examples given;")
