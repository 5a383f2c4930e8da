"""The same answers on a CUDA device: the training loss is Pyro's, exact log p(x), AIS, training that
resumes bit for bit, and a run trained on the GPU that evaluates on the CPU.

Skipped where CUDA is not available (CI has no GPU); run on a GPU machine with
``python -m pytest tests/test_cuda.py``.  ``PYROVAE_TEST_DEVICE=cpu`` runs the same checks on
the CPU (to try the module itself without a GPU).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from pyro.infer import Trace_ELBO

from pyrovae import TrainConfig, build_vae, elbo, fit, log_marginal_likelihood
from pyrovae.ais import ais_log_marginal_likelihood
from pyrovae.checkpoint import load_vae
from pyrovae.data import DataSplits
from pyrovae.guides import GUIDES
from pyrovae.priors import PRIORS
from pyrovae.train import TrainingLoop
from tests.conftest import SHARED_DATA, requires_mnist
from tests.linear_gaussian import exact_log_marginal, linear_gaussian_vae, sample_data
from tests.test_ais import monte_carlo_error
from tests.test_evaluation import mismatched_vae

CUDA = torch.device(os.environ.get("PYROVAE_TEST_DEVICE", "cuda"))

pytestmark = pytest.mark.skipif(CUDA.type == "cuda" and not torch.cuda.is_available(),
                                reason="needs a CUDA device")


def small_config(prior: str = "normal", guide: str = "diagonal") -> TrainConfig:
    return TrainConfig(hidden_dims=(16,), latent_dim=3, prior=prior, guide=guide, num_components=3)


def small_vae(prior: str = "normal", guide: str = "diagonal", seed: int = 0):
    torch.manual_seed(seed)
    return build_vae(small_config(prior, guide), data_dim=12).to(CUDA)


def binary_data(n: int, seed: int = 1) -> torch.Tensor:
    return torch.bernoulli(torch.full((n, 12), 0.3), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("guide", list(GUIDES))
@pytest.mark.parametrize("prior", list(PRIORS))
def test_the_training_loss_is_pyros_trace_elbo_on_cuda(prior, guide):
    vae, x = small_vae(prior, guide), binary_data(9).to(CUDA)
    vae.prior.init_from_data(x)
    loop = TrainingLoop(vae, DataSplits.from_tensors(x, x).to(CUDA), epochs=1, batch_size=9,
                        lr=1e-3, objective="trace_elbo", num_particles=1, seed=0, test_every=1,
                        run_dir=None, config=None, progress=False, beta=1.0, kl_warmup_epochs=0,
                        checkpoint_every=0, keep_last=0, clip_norm=None, on_divergence="stop",
                        fused=True)
    torch.manual_seed(3)
    ours = loop._loss(x)
    torch.manual_seed(3)
    traced = Trace_ELBO().differentiable_loss(vae.model, vae.guide, x)
    assert ours.device == x.device
    torch.testing.assert_close(ours, traced, rtol=1e-5, atol=1e-4)


def test_exact_log_marginal_on_cuda():
    vae = linear_gaussian_vae()
    x = sample_data(vae, 50)
    expected = exact_log_marginal(vae, x)
    estimate = log_marginal_likelihood(vae.to(CUDA), x.to(CUDA), num_samples=10)
    assert estimate.device.type == "cpu" and estimate.shape == (50,)
    torch.testing.assert_close(estimate, expected, atol=1e-6, rtol=0)


def test_chunked_importance_sampling_converges_on_cuda():
    vae = mismatched_vae()
    x = sample_data(vae, 20)
    exact = exact_log_marginal(vae, x)
    estimate = log_marginal_likelihood(vae.to(CUDA), x.to(CUDA), num_samples=5000,
                                       chunk_size=700, batch_size=7)
    assert abs(float((estimate - exact).mean())) < 0.01
    assert float((elbo(vae, x.to(CUDA)) - exact).mean()) < -0.1  # the guide is off


def test_ais_from_the_prior_is_within_its_reported_error_on_cuda():
    vae = mismatched_vae()
    x = sample_data(vae, 20)
    exact = exact_log_marginal(vae, x)
    result = ais_log_marginal_likelihood(vae.to(CUDA), x.to(CUDA), num_temperatures=200,
                                         num_chains=64, initial="prior")
    difference = float((result.log_marginal_likelihood - exact).mean())
    assert abs(difference) < 3 * monte_carlo_error(result) + 0.02
    assert 0.3 < float(result.acceptance_rate.mean()) < 1.0


def test_training_on_cuda_raises_the_elbo_and_resumes_bit_for_bit(tmp_path):
    grey = torch.rand(400, 12, generator=torch.Generator().manual_seed(0)) * 0.6
    data = DataSplits.from_tensors(grey, grey[:100], binarize="dynamic").to(CUDA)
    reference = small_vae(seed=1)
    history = fit(reference, data, epochs=4, batch_size=32, seed=5, progress=False,
                  run_dir=tmp_path / "a")
    assert all(p.device.type == CUDA.type for p in reference.parameters())
    assert history[-1].test_elbo > history[0].test_elbo
    stopped = small_vae(seed=1)
    fit(stopped, data, epochs=2, batch_size=32, seed=5, progress=False, run_dir=tmp_path / "b")
    resumed = small_vae(seed=7)  # the checkpoint overrides whatever it starts from
    fit(resumed, data, epochs=4, batch_size=32, seed=5, progress=False, run_dir=tmp_path / "b",
        resume=True)
    for (name, value), (_, other) in zip(reference.state_dict().items(),
                                         resumed.state_dict().items(), strict=True):
        assert torch.equal(value, other), name
    on_cpu, _, _ = load_vae(tmp_path / "a", device="cpu", config=small_config())
    for (name, value), (_, other) in zip(reference.state_dict().items(),
                                         on_cpu.state_dict().items(), strict=True):
        assert other.device.type == "cpu" and torch.equal(value.cpu(), other), name


@requires_mnist
def test_cli_trains_on_cuda_and_the_run_evaluates_on_the_cpu(tmp_path):
    run_dir = tmp_path / "run"
    common = [sys.executable, "-m", "pyrovae"]
    subprocess.run([*common, "train", "--device", CUDA.type, "--data-dir", str(SHARED_DATA),
                    "--no-download", "--train-size", "2000", "--test-size", "200",
                    "--epochs", "2", "--eval-samples", "100", "--hidden-dims", "64",
                    "--latent-dim", "8", "--out-dir", str(run_dir), "--no-progress"],
                   check=True, capture_output=True, text=True)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["device"].startswith(CUDA.type), results["device"]
    assert -400 < results["log_marginal_likelihood"] < -100
    output = tmp_path / "cpu.json"
    subprocess.run([*common, "evaluate", str(run_dir), "--device", "cpu", "--num-samples", "100",
                    "--test-size", "200", "--output", str(output)],
                   check=True, capture_output=True, text=True)
    on_cpu = json.loads(output.read_text())
    # the same parameters and test points, other draws: only Monte Carlo noise differs
    difference = abs(on_cpu["log_marginal_likelihood"] - results["log_marginal_likelihood"])
    assert difference < 0.5, difference
