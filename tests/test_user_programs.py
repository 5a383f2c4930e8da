"""Programs written the ways Pyro's own examples write them, run through pyrovae unchanged.

Each program here is written for this file in the style of one of Pyro's examples (an
``nn.Module`` that registers its networks with ``pyro.module``, a guide without sample
sites, a module whose model adds a training-only term); the estimators must evaluate what
the program means, and ``fit`` must train what Pyro's ``SVI`` trains.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from pyrovae.ais import ais_log_marginal_likelihood
from pyrovae.diagnostics import importance_summary
from pyrovae.evaluation import elbo, elbo_terms, log_marginal_likelihood
from pyrovae.labels import log_marginal_likelihood_over_labels
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
