"""Colour images: the residual conv networks (``--net resnet``) and the discretized
likelihoods end to end on a small file in CIFAR-10's real on-disk format."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pyrovae import TrainConfig, build_vae
from pyrovae.nets import NETWORKS, ResidualBlock
from tests.test_data import write_cifar10


def test_a_residual_block_adds_its_path_to_its_input():
    block = ResidualBlock(4)
    x = torch.randn(2, 4, 5, 6)
    torch.testing.assert_close(block(x), x + block.body(x))
    with torch.no_grad():
        block.body[-1].weight.zero_()
        block.body[-1].bias.zero_()
    torch.testing.assert_close(block(x), x)  # a zero path is the identity


@pytest.mark.parametrize("image_shape", [(3, 32, 32), (3, 7, 9), (1, 28, 28)])
def test_the_resnet_pair_takes_any_image_shape_and_gives_it_back(image_shape):
    data_dim = math.prod(image_shape)
    encoder, decoder = NETWORKS["resnet"](data_dim=data_dim, latent_dim=3, hidden_dims=(8,),
                                          image_shape=image_shape)
    assert sum(isinstance(m, ResidualBlock) for m in encoder.modules()) == 4
    assert sum(isinstance(m, ResidualBlock) for m in decoder.modules()) == 4
    assert encoder(torch.rand(2, 5, data_dim)).shape == (2, 5, 8)
    assert decoder(torch.randn(4, 2, 3)).shape == (4, 2, data_dim)


def test_a_discretized_mixture_decoder_gives_its_blocks_of_channels():
    config = TrainConfig(net="resnet", hidden_dims=(8,), latent_dim=3, activation="relu",
                         likelihood="discretized_logistic_mixture", logistic_components=2,
                         binarize="none")
    vae = build_vae(config, data_dim=3 * 8 * 8, image_shape=(3, 8, 8))
    # 3 K = 6 numbers per value: the decoder's last layer has 6 x 3 channels
    assert vae.decoder.image_shape == (18, 8, 8)
    assert vae.decoder(torch.randn(5, 3)).shape == (5, 6 * 192)
    x = torch.randint(0, 256, (5, 192)) / 255
    assert vae.likelihood(vae.decoder(torch.randn(5, 3))).log_prob(x).shape == (5,)


@pytest.fixture
def cifar10_files(tmp_path, monkeypatch):
    """Five training batches of 4 images and a test batch of 6, pickled as the real files are
    (torchvision's md5 sums replaced by theirs); the folder holding them."""
    from torchvision.datasets import CIFAR10

    _, md5 = write_cifar10(tmp_path, sizes=(4, 4, 4, 4, 4), test_size=6)
    monkeypatch.setattr(CIFAR10, "train_list", [[name, md5[name]] for name, _ in CIFAR10.train_list])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5["test_batch"]]])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": md5["batches.meta"]})
    return tmp_path


def test_a_resnet_with_a_logistic_mixture_trains_on_cifar10_files(cifar10_files):
    from pyrovae.data import load_dataset
    from pyrovae.runs import evaluate_vae
    from pyrovae.train import fit

    data = load_dataset("cifar10", cifar10_files, binarize="none", download=False)
    assert data.image_shape == (3, 32, 32) and data.train.shape == (20, 3072)
    config = TrainConfig(net="resnet", hidden_dims=(16,), latent_dim=4, activation="relu",
                         likelihood="discretized_logistic_mixture", logistic_components=2,
                         binarize="none")
    vae = build_vae(config, data_dim=3072, image_shape=data.image_shape)
    history = fit(vae, data, epochs=1, batch_size=10, progress=False)
    assert math.isfinite(history[0].train_elbo)
    results = evaluate_vae(vae, data.test, num_samples=2)
    bits = results["log_marginal_likelihood_bits_per_dim"]
    assert bits == pytest.approx(-results["log_marginal_likelihood"] / (3072 * math.log(2)))
    # uniform noise images: about 8 bits per value, an untrained model a little more
    assert 6 < bits < 12


@pytest.mark.slow
def test_the_command_line_trains_a_resnet_with_a_logistic_mixture_on_cifar10_files(
        cifar10_files, capsys):
    from pyrovae.cli import main

    tmp_path = cifar10_files
    run_dir = tmp_path / "run"
    assert main(["train", "--dataset", "cifar10", "--data-dir", str(tmp_path), "--no-download",
                 "--binarize", "none", "--net", "resnet", "--activation", "relu",
                 "--hidden-dims", "16", "--latent-dim", "4", "--likelihood",
                 "discretized_logistic_mixture", "--logistic-components", "2", "--epochs", "1",
                 "--batch-size", "10", "--eval-samples", "4", "--out-dir", str(run_dir),
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    results = json.loads((run_dir / "results.json").read_text())
    bits = results["log_marginal_likelihood_bits_per_dim"]
    assert bits == pytest.approx(-results["log_marginal_likelihood"] / (3072 * math.log(2)))
    # uniform noise images: about 8 bits per value, never more than a little above
    assert 6 < bits < 12 and "bits/dim" in printed
    assert (run_dir / "samples.png").is_file()
    assert main(["reconstruct", str(run_dir), "-n", "4", "--columns", "2"]) == 0
