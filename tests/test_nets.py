"""Networks: shapes with arbitrary leading dimensions, and the conv pair inside a VAE."""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from torch import nn

from pyrovae import TrainConfig, build_vae, log_marginal_likelihood
from pyrovae.errors import ConfigError
from pyrovae.guides import DiagonalNormalGuide
from pyrovae.layers import ConditionalNormal
from pyrovae.nets import (
    GLOROT_GAINS,
    INIT_SCHEMES,
    NETWORKS,
    ConvDecoder,
    ConvEncoder,
    GatedLinear,
    GatedMLPDecoder,
    MLPDecoder,
    conv_networks,
    he_normal_,
    mlp,
)
from tests.conftest import SHARED_DATA, requires_binarized_mnist, requires_mnist

IMAGE_SHAPE = (1, 28, 28)


def test_the_conv_encoder_accepts_any_leading_dimensions():
    encoder = ConvEncoder(IMAGE_SHAPE, (16,))
    x = torch.rand(3, 5, 784)
    h = encoder(x)
    assert h.shape == (3, 5, 16) and encoder.feature_dim == 16
    # the reshape keeps every image with its own features
    torch.testing.assert_close(h[2, 4], encoder(x[2, 4]))
    torch.testing.assert_close(h.reshape(15, 16), encoder(x.reshape(15, 784)))


@pytest.mark.parametrize("leading", [(), (7,), (4, 3), (2, 3, 2)])
def test_the_conv_decoder_accepts_any_leading_dimensions(leading):
    decoder = ConvDecoder(5, IMAGE_SHAPE, (16,))
    z = torch.randn(*leading, 5)
    out = decoder(z)
    assert out.shape == (*leading, 784)
    flat = z.reshape(-1, 5)
    torch.testing.assert_close(out.reshape(-1, 784), decoder(flat))
    if leading:
        torch.testing.assert_close(out.reshape(-1, 784)[-1], decoder(flat[-1]))


def test_the_conv_decoder_output_is_laid_out_like_the_images():
    # a decoder whose last layer paints one channel-row pattern must flatten row-major
    decoder = ConvDecoder(2, (1, 8, 4), ())
    images = decoder.deconv(decoder.head(torch.zeros(1, 2)).reshape(1, *decoder.grid))
    torch.testing.assert_close(decoder(torch.zeros(2)), images.reshape(32))


def test_the_mlp_decoder_accepts_any_leading_dimensions():
    decoder = MLPDecoder(3, 10, (6,))
    assert decoder(torch.randn(2, 4, 5, 3)).shape == (2, 4, 5, 10)


def test_conv_networks_from_the_registry_mirror_each_other():
    encoder, decoder = NETWORKS["conv"](data_dim=784, latent_dim=4, hidden_dims=(32, 16),
                                        activation="relu", image_shape=IMAGE_SHAPE)
    assert encoder.feature_dim == 16
    assert [layer.out_features for layer in encoder.head if hasattr(layer, "out_features")] == [32, 16]
    assert [layer.out_features for layer in decoder.head
            if hasattr(layer, "out_features")] == [16, 32, 64 * 7 * 7]
    encoder, _ = conv_networks(data_dim=784, latent_dim=4, image_shape=(28, 28))
    assert encoder.image_shape == IMAGE_SHAPE


@pytest.mark.parametrize("image_shape, message", [
    (None, "need image data"),
    ((1, 3, 8), "images of at least 4x4, got 1 channel\\(s\\) of 3x8"),
    ((2, 28, 28), "not \\(channels, height, width\\) of 784"),
])
def test_conv_networks_refuse_data_they_cannot_take(image_shape, message):
    data_dim = 784 if image_shape != (1, 3, 8) else 24
    with pytest.raises(ConfigError, match=message):
        conv_networks(data_dim=data_dim, latent_dim=4, image_shape=image_shape)


# MNIST, CIFAR-10, scikit-learn's digits, odd and non-square sizes, the smallest
SHAPES = [(1, 28, 28), (3, 32, 32), (1, 8, 8), (3, 30, 30), (1, 7, 9), (2, 5, 4), (1, 4, 4)]


@pytest.mark.parametrize("image_shape", SHAPES)
def test_the_conv_networks_take_any_image_shape_and_give_it_back(image_shape):
    data_dim = math.prod(image_shape)
    encoder, decoder = conv_networks(data_dim=data_dim, latent_dim=3, hidden_dims=(8,),
                                     image_shape=image_shape)
    x = torch.rand(5, data_dim)
    assert encoder(x).shape == (5, 8)
    grid = decoder.head(torch.zeros(2, 3)).reshape(2, *decoder.grid)
    assert decoder.deconv(grid).shape == (2, *image_shape)  # exactly the image, no crop
    assert decoder(torch.randn(4, 2, 3)).shape == (4, 2, data_dim)


@pytest.mark.parametrize("net", sorted(NETWORKS))
@pytest.mark.parametrize("image_shape", [(1, 8, 8), (3, 32, 32)])
def test_every_network_takes_its_input_size_from_the_data(net, image_shape):
    data_dim = math.prod(image_shape)
    config = TrainConfig(net=net, hidden_dims=(8,), latent_dim=2, likelihood="continuous_bernoulli",
                         binarize="none")
    vae = build_vae(config, data_dim=data_dim, image_shape=image_shape)
    x = torch.rand(3, data_dim)
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())
    assert math.isfinite(svi.step(x))
    assert vae.sample(2).shape == (2, data_dim)


def test_a_conv_vae_trains_on_cifar_shaped_data():
    config = TrainConfig(net="conv", hidden_dims=(16,), latent_dim=4, activation="relu",
                         likelihood="continuous_bernoulli", binarize="none")
    vae = build_vae(config, data_dim=3 * 32 * 32, image_shape=(3, 32, 32))
    # colour images with a fixed mean picture plus noise, in [0, 1]
    mean = torch.rand(1, 3072, generator=torch.Generator().manual_seed(1))
    x = (0.8 * mean + 0.2 * torch.rand(4, 3072)).clamp(0, 1)
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    first = svi.evaluate_loss(x) / 4
    for _ in range(6):
        svi.step(x)
    last = svi.evaluate_loss(x) / 4
    assert math.isfinite(last) and last < first - 30, (first, last)  # about 1 -> -146 nats


def test_a_conv_vae_trains_one_step_and_scores():
    config = TrainConfig(net="conv", hidden_dims=(16,), latent_dim=3, guide="iaf", prior="vamp",
                         num_components=2)
    vae = build_vae(config, data_dim=784, image_shape=IMAGE_SHAPE)
    x = torch.bernoulli(torch.full((4, 784), 0.2))
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())
    assert math.isfinite(svi.step(x))
    log_px = log_marginal_likelihood(vae, x, num_samples=3)
    assert log_px.shape == (4,) and bool(torch.isfinite(log_px).all())


@requires_mnist
def test_a_conv_vae_learns_on_real_mnist():
    from pyrovae.data import load_mnist

    data = load_mnist(SHARED_DATA, binarize="static").subset(train_size=32, test_size=32)
    config = TrainConfig(net="conv", hidden_dims=(32,), latent_dim=4, activation="relu")
    vae = build_vae(config, data_dim=784, image_shape=data.image_shape)
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 3e-3}), Trace_ELBO())
    pyro.set_rng_seed(1)
    first = svi.evaluate_loss(data.train) / 32
    for _ in range(15):
        svi.step(data.train)
    last = svi.evaluate_loss(data.train) / 32
    assert last < first - 150, (first, last)  # about 490 -> 240 nats per image


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_mlp_weights_start_glorot_uniform_with_the_activation_gain(activation):
    network = mlp((784, 200, 50), activation)
    for layer in (network[0], network[2]):
        fan_out, fan_in = layer.weight.shape
        bound = GLOROT_GAINS[activation] * math.sqrt(6 / (fan_in + fan_out))
        # 10,000+ uniform draws: the largest comes within 1% of the bound
        assert 0.99 * bound < layer.weight.abs().max().item() <= bound
        assert torch.all(layer.bias == 0)


@requires_binarized_mnist
def test_a_vampprior_vae_leaves_the_factorised_bernoulli_plateau():
    # With PyTorch's default Linear initialisation (or gain 1 on the last layer) this seed
    # collapsed every code to one point: ELBO -206.5 nats, no active latent dimension.
    from pyrovae.data import load_binarized_mnist
    from pyrovae.train import fit

    torch.set_num_threads(1)
    torch.manual_seed(2)
    data = load_binarized_mnist(SHARED_DATA).subset(train_size=10_000, test_size=500)
    config = TrainConfig(dataset="binarized_mnist", prior="vamp", num_components=50, latent_dim=40)
    vae = build_vae(config, data_dim=784)
    records = fit(vae, data, epochs=9, kl_warmup_epochs=8, seed=2, test_every=9, progress=False)
    codes = vae.encode(data.test).mean  # (500, 40)
    active = int((codes.var(0) > 0.01).sum())
    assert records[-1].train_elbo > -190, records[-1]
    assert active >= 20, active


def test_a_gated_layer_is_the_affine_path_times_the_sigmoid_gate():
    layer = GatedLinear(2, 1)
    with torch.no_grad():
        layer.linear.weight.copy_(torch.tensor([[1.0, -2.0]]))
        layer.linear.bias.fill_(0.5)
        layer.gate.weight.copy_(torch.tensor([[3.0, 1.0]]))
        layer.gate.bias.fill_(-1.0)
    x = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    # row 1: (1 - 4 + 0.5) * sigmoid(3 + 2 - 1) = -2.5 * 0.98201379; row 2: 0.5 * sigmoid(-1)
    expected = torch.tensor([[-2.5 / (1 + math.exp(-4.0))], [0.5 / (1 + math.exp(1.0))]])
    torch.testing.assert_close(layer(x), expected)
    # an activation acts on the ungated path only: tanh(-2.5) * sigmoid(4)
    layer.activation = torch.nn.Tanh()
    assert layer(x)[0, 0].item() == pytest.approx(math.tanh(-2.5) / (1 + math.exp(-4.0)))


def test_gated_networks_from_the_registry_mirror_each_other_and_start_glorot():
    encoder, decoder = NETWORKS["gated_mlp"](data_dim=784, latent_dim=40, hidden_dims=(300, 200))
    assert encoder.feature_dim == 200
    assert [layer.out_features for layer in encoder.body] == [300, 200]
    assert [layer.out_features for layer in decoder.body] == [200, 300, 784]
    assert isinstance(decoder.body[-1], torch.nn.Linear)  # logits out: no gate, no sigmoid
    assert decoder(torch.randn(3, 5, 40)).shape == (3, 5, 784)
    first = encoder.body[0]
    bound = math.sqrt(6 / (784 + 300))
    for weight in (first.linear.weight, first.gate.weight):
        assert 0.99 * bound < weight.abs().max().item() <= bound
    assert torch.all(first.linear.bias == 0) and torch.all(first.gate.bias == 0)
    with pytest.raises(ConfigError, match="at least one hidden width"):
        NETWORKS["gated_mlp"](data_dim=784, latent_dim=40, hidden_dims=())


def _glorot_bound(linear: nn.Linear, gain: float) -> float:
    fan_out, fan_in = linear.weight.shape
    return gain * math.sqrt(6 / (fan_in + fan_out))


def assert_glorot(linear: nn.Linear, gain: float) -> None:
    """Weights uniform within ``gain * sqrt(6 / (n_in + n_out))`` (10,000+ draws come within
    1% of the bound) and zero biases."""
    bound = _glorot_bound(linear, gain)
    assert 0.99 * bound < linear.weight.abs().max().item() <= bound
    assert torch.all(linear.bias == 0)


@pytest.mark.parametrize("init_gain, gain", [("activation", 5 / 3), (1.0, 1.0), (0.5, 0.5)])
def test_init_gain_sets_the_glorot_bound_of_every_layer(init_gain, gain):
    network = mlp((784, 200, 50), "tanh", init_gain=init_gain)
    for layer in (network[0], network[2]):
        assert_glorot(layer, gain)
    gated = GatedLinear(784, 300, "tanh", init_gain=init_gain)
    assert_glorot(gated.linear, gain)
    # the gate's gain is the sigmoid's (1) unless a number is given
    assert_glorot(gated.gate, 1.0 if init_gain == "activation" else gain)
    decoder = GatedMLPDecoder(40, 784, (300,), init_gain=init_gain)
    assert_glorot(decoder.body[-1], 1.0 if init_gain == "activation" else gain)


@pytest.mark.parametrize("init_gain", ["activation", 1.0])
def test_the_stochastic_layers_heads_take_init_gain(init_gain):
    layer = ConditionalNormal(784, 100, hidden_dims=(200,), init_gain=init_gain)
    assert_glorot(layer.body[0], 5 / 3 if init_gain == "activation" else 1.0)
    for head in (layer.loc_head, layer.log_scale_head):
        assert_glorot(head, 1.0)
    guide = DiagonalNormalGuide(200, 50, init_gain=None if init_gain == "activation" else 1.0)
    for head in (guide.loc_head, guide.scale_head):
        if init_gain == "activation":  # PyTorch's default Linear start, 1 / sqrt(fan_in)
            assert head.weight.abs().max().item() <= 1 / math.sqrt(200)
        else:
            assert_glorot(head, 1.0)


def test_the_default_init_gain_draws_the_same_weights_as_before():
    # "activation" is today's start, draw for draw: same seed, same weights
    torch.manual_seed(0)
    default = MLPDecoder(50, 784)
    torch.manual_seed(0)
    explicit = mlp((50, 200, 200, 784), "tanh")
    torch.manual_seed(0)
    reference = []
    for n_in, n_out in ((50, 200), (200, 200), (200, 784)):
        linear = nn.Linear(n_in, n_out)
        nn.init.xavier_uniform_(linear.weight, gain=nn.init.calculate_gain("tanh"))
        reference.append(linear.weight)
    for first, second, third in zip(default.body[::2], explicit[::2], reference, strict=True):
        assert torch.equal(first.weight, second.weight) and torch.equal(first.weight, third)


@pytest.mark.parametrize("value", [0.0, -1.0, float("inf"), "tanh", True])
def test_a_bad_init_gain_is_refused(value):
    with pytest.raises(ConfigError, match="init_gain must be 'activation' or a positive number"):
        mlp((4, 3), init_gain=value)
    with pytest.raises(ConfigError, match="init_gain"):
        TrainConfig(init_gain=value)


def assert_he_normal(linear: nn.Linear) -> None:
    """Weights N(0, 2 / fan_in) and nn.Linear's own biases, U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

    With n weights, the sample std is within 5 / sqrt(2 n) of its value (five standard
    errors), and the share within one std of 0 is a normal's 0.683 (a uniform's would be
    0.577) to within 5 sqrt(0.683 * 0.317 / n); the biases' std is the uniform's,
    bound / sqrt(3), to within 25%.
    """
    fan_out, fan_in = linear.weight.shape
    weights, n = linear.weight.detach().flatten(), linear.weight.numel()
    std = math.sqrt(2 / fan_in)
    assert abs(weights.std().item() / std - 1) < 5 / math.sqrt(2 * n), linear
    assert abs(weights.mean().item()) < 5 * std / math.sqrt(n)
    within_one_std = (weights.abs() < std).double().mean().item()
    assert abs(within_one_std - 0.6827) < 5 * math.sqrt(0.6827 * 0.3173 / n)
    bound = 1 / math.sqrt(fan_in)
    assert linear.bias.abs().max().item() <= bound
    assert linear.bias.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.25)


def test_he_normal_draws_every_mlp_weight_from_n_0_2_over_fan_in():
    network = mlp((1000, 800, 50), "tanh", init_scheme="he_normal")
    for layer in (network[0], network[2]):  # 800,000 and 40,000 draws
        assert_he_normal(layer)
    # the same draws whatever the activation: He-normal has no gain of its own
    torch.manual_seed(0)
    tanh = mlp((300, 200), "tanh", init_scheme="he_normal")
    torch.manual_seed(0)
    identity = mlp((300, 200), "identity", init_scheme="he_normal")
    assert torch.equal(tanh[0].weight, identity[0].weight)
    assert torch.equal(tanh[0].bias, identity[0].bias)


def test_he_normal_reaches_both_paths_of_a_gated_layer_and_the_decoder_output():
    gated = GatedLinear(784, 300, init_scheme="he_normal")
    assert_he_normal(gated.linear)
    assert_he_normal(gated.gate)
    decoder = GatedMLPDecoder(40, 784, (300, 300), init_scheme="he_normal")
    output = decoder.body[-1]
    # the output layer's bias keeps nn.Linear's start, not zero (Tomczak & Welling's code)
    assert_he_normal(output)
    assert output.bias.abs().min().item() > 0


def test_he_normal_leaves_the_convolutions_at_pytorchs_default():
    torch.manual_seed(0)
    glorot = ConvEncoder(IMAGE_SHAPE, (256,))
    torch.manual_seed(0)
    he = ConvEncoder(IMAGE_SHAPE, (256,), init_scheme="he_normal")
    for before, after in zip(glorot.conv.parameters(), he.conv.parameters(), strict=True):
        assert torch.equal(before, after)
    assert_he_normal(he.head[0])  # 256 x 3136


def test_he_normal_restarts_a_layer_in_place_and_keeps_its_bias():
    layer = nn.Linear(500, 400)
    bias = layer.bias.detach().clone()
    assert he_normal_(layer) is layer
    assert torch.equal(layer.bias, bias)
    assert_he_normal(layer)


def test_every_network_takes_init_scheme_and_the_default_draws_as_before():
    assert INIT_SCHEMES == ("glorot_uniform", "he_normal")
    for net in sorted(NETWORKS):
        options = {"data_dim": 784, "latent_dim": 8, "hidden_dims": (64,),
                   "activation": "identity" if net == "gated_mlp" else "tanh",
                   "image_shape": IMAGE_SHAPE}
        torch.manual_seed(0)
        default = NETWORKS[net](**options)
        torch.manual_seed(0)
        explicit = NETWORKS[net](**options, init_scheme="glorot_uniform")
        for first, second in zip(default, explicit, strict=True):
            for a, b in zip(first.state_dict().values(), second.state_dict().values(),
                            strict=True):
                assert torch.equal(a, b)
        for network in NETWORKS[net](**options, init_scheme="he_normal"):
            for layer in network.modules():
                if isinstance(layer, nn.Linear):
                    assert not torch.all(layer.bias == 0), (net, layer)


def test_the_default_gated_layer_draws_the_same_weights_as_before():
    torch.manual_seed(0)
    layer = GatedLinear(784, 300)
    torch.manual_seed(0)
    linear, gate = nn.Linear(784, 300), nn.Linear(784, 300)
    nn.init.xavier_uniform_(linear.weight, gain=1.0)
    nn.init.xavier_uniform_(gate.weight, gain=1.0)
    assert torch.equal(layer.linear.weight, linear.weight)
    assert torch.equal(layer.gate.weight, gate.weight)
    assert torch.all(layer.linear.bias == 0) and torch.all(layer.gate.bias == 0)


@pytest.mark.parametrize("init_gain", [1.0, 2.0])
def test_he_normal_refuses_a_glorot_gain(init_gain):
    with pytest.raises(ConfigError, match=f"init_gain {init_gain} is the gain of the "
                                          f"Glorot-uniform start; init_scheme 'he_normal'"):
        mlp((4, 3), init_gain=init_gain, init_scheme="he_normal")
    with pytest.raises(ConfigError, match="init_gain"):
        GatedLinear(4, 3, init_gain=init_gain, init_scheme="he_normal")
    with pytest.raises(ConfigError, match="unknown init_scheme 'lecun'; known: glorot_uniform, "
                                          "he_normal"):
        mlp((4, 3), init_scheme="lecun")
