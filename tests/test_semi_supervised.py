"""Kingma et al. (2014)'s M2: y summed out exactly in log p(x) and, by enumeration, in the
ELBO of unlabelled points; the classification term; training; the command line."""

from __future__ import annotations

import json

import pytest
import torch
from pyro.infer import TraceEnum_ELBO

from pyrovae import TrainConfig, build_vae, fit, log_marginal_likelihood
from pyrovae.cli import main
from pyrovae.config import apply_label_settings
from pyrovae.errors import ConfigError
from pyrovae.labels import classification_error, log_marginal_likelihood_over_labels
from pyrovae.models import SemiSupervisedVAE, paper_alpha
from tests.labelled_gaussian import LinearGaussianLabels
from tests.test_conditional import CLI_TINY, labelled_binary_data, write_labelled_npz


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
