"""Encoder and decoder bodies: plain ``nn.Module`` networks with no Pyro in them.

An **encoder** maps data ``x`` of shape ``(..., data_dim)`` to features of shape
``(..., feature_dim)``; a guide turns those features into q(z|x).  A **decoder** maps
latents ``z`` of shape ``(..., latent_dim)`` to the parameters of p(x|z), shape
``(..., data_dim)``; a likelihood turns those into a distribution.  Leading
dimensions are arbitrary, so the same network serves a minibatch ``(N, D)`` and a
stack of importance samples ``(K, N, D)``.

References:

1. Glorot, Bengio (2010). Understanding the difficulty of training deep feedforward neural
   networks. AISTATS.
2. He, Zhang, Ren, Sun (2015). Delving Deep into Rectifiers: Surpassing Human-Level
   Performance on ImageNet Classification. ICCV.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

# Each hidden-layer activation by name, with the gain of the Glorot initialisation for the
# layers of a network that uses it: PyTorch's ``calculate_gain`` values, with the ReLU one for
# the other rectifier-like activations.
_ACTIVATIONS_AND_GAINS: dict[str, tuple[type[nn.Module], float]] = {
    "tanh": (nn.Tanh, nn.init.calculate_gain("tanh")),
    "relu": (nn.ReLU, nn.init.calculate_gain("relu")),
    "elu": (nn.ELU, nn.init.calculate_gain("relu")),
    "softplus": (nn.Softplus, nn.init.calculate_gain("relu")),
    "gelu": (nn.GELU, nn.init.calculate_gain("relu")),
    # no nonlinearity: an affine MLP, or gated layers whose gate is their only nonlinearity
    "identity": (nn.Identity, 1.0),
}
ACTIVATIONS: dict[str, type[nn.Module]] = {
    name: module for name, (module, _) in _ACTIVATIONS_AND_GAINS.items()}
GLOROT_GAINS: dict[str, float] = {name: gain for name, (_, gain) in _ACTIVATIONS_AND_GAINS.items()}
#: the ``init_gain`` that scales each layer by the gain of the activation after it
#: (:data:`GLOROT_GAINS`); any other value is a number, the gain of every layer
ACTIVATION_GAIN = "activation"
#: Glorot-uniform weights with the gain :func:`glorot_gain` and zero biases (the default)
GLOROT_UNIFORM = "glorot_uniform"
#: He-normal weights, N(0, 2 / fan_in) whatever the activation, and ``nn.Linear``'s own
#: biases (Tomczak & Welling's ``he_init``)
HE_NORMAL = "he_normal"
#: how the ``Linear`` layers of the networks and guide heads start (``init_scheme``)
INIT_SCHEMES = (GLOROT_UNIFORM, HE_NORMAL)


def check_init_gain(init_gain: float | str) -> float | str:
    """``init_gain`` if it is :data:`ACTIVATION_GAIN` or a finite positive number (as a float).

    :raises ~pyrovae.errors.ConfigError: any other value.
    """
    if init_gain == ACTIVATION_GAIN:
        return ACTIVATION_GAIN
    if isinstance(init_gain, int | float) and not isinstance(init_gain, bool) \
            and math.isfinite(init_gain) and init_gain > 0:
        return float(init_gain)
    from pyrovae.errors import ConfigError

    raise ConfigError(f"init_gain must be {ACTIVATION_GAIN!r} or a positive number, got "
                      f"{init_gain!r}")


def check_init_scheme(init_scheme: str, init_gain: float | str | None = ACTIVATION_GAIN) -> str:
    """``init_scheme`` if it is one of :data:`INIT_SCHEMES` and fits ``init_gain``.

    :param init_gain: the Glorot gain asked for beside it (``None``: PyTorch's default
        start, as a guide's heads take it); He-normal has none of its own, so it takes
        only :data:`ACTIVATION_GAIN` or ``None``.
    :raises ~pyrovae.errors.ConfigError: an unknown scheme, or ``he_normal`` with a gain.
    """
    from pyrovae.errors import ConfigError

    if init_scheme not in INIT_SCHEMES:
        raise ConfigError(f"unknown init_scheme {init_scheme!r}; known: {', '.join(INIT_SCHEMES)}")
    if init_scheme == HE_NORMAL and init_gain not in (ACTIVATION_GAIN, None):
        raise ConfigError(f"init_gain {init_gain!r} is the gain of the Glorot-uniform start; "
                          f"init_scheme {HE_NORMAL!r} draws every weight from N(0, 2 / fan_in): "
                          f"leave init_gain at {ACTIVATION_GAIN!r}, or choose init_scheme "
                          f"{GLOROT_UNIFORM!r}")
    return init_scheme


def he_normal_(linear: nn.Linear) -> nn.Linear:
    """Draw the weights of ``linear`` from N(0, 2 / fan_in) (He et al. 2015), in place; its
    bias is left as it is, for a new ``nn.Linear`` U(-1 / sqrt(fan_in), 1 / sqrt(fan_in)).

    :returns: ``linear``.
    """
    with torch.no_grad():
        linear.weight.normal_(0.0, math.sqrt(2.0 / linear.in_features))
    return linear


def start_linear_(linear: nn.Linear, gain: float = 1.0,
                  init_scheme: str = GLOROT_UNIFORM) -> nn.Linear:
    """Restart ``linear`` in place under ``init_scheme``: Glorot-uniform weights with
    ``gain`` and zero biases, or :func:`he_normal_` (which has no gain).

    :returns: ``linear``.
    """
    if init_scheme == HE_NORMAL:
        return he_normal_(linear)
    nn.init.xavier_uniform_(linear.weight, gain=gain)
    nn.init.zeros_(linear.bias)
    return linear


def glorot_gain(activation: str, init_gain: float | str = ACTIVATION_GAIN) -> float:
    """The Glorot gain of a layer followed by ``activation``: its :data:`GLOROT_GAINS` entry
    under ``init_gain="activation"``, else the number ``init_gain``."""
    init_gain = check_init_gain(init_gain)
    if init_gain == ACTIVATION_GAIN:
        _activation(activation)
        return GLOROT_GAINS[activation]
    return float(init_gain)


def glorot_linear(in_features: int, out_features: int, gain: float = 1.0) -> nn.Linear:
    """An ``nn.Linear`` with Glorot-uniform weights, bound ``gain * sqrt(6 / (in + out))``
    (Glorot & Bengio 2010), and zero biases."""
    return start_linear_(nn.Linear(in_features, out_features), gain)


def init_linear(in_features: int, out_features: int, gain: float = 1.0,
                init_scheme: str = GLOROT_UNIFORM) -> nn.Linear:
    """An ``nn.Linear`` started under ``init_scheme`` (:func:`start_linear_`): Glorot-uniform
    with ``gain`` (:func:`glorot_linear`), or He-normal, where ``gain`` is unused."""
    return start_linear_(nn.Linear(in_features, out_features), gain, init_scheme)


def _activation(name: str) -> type[nn.Module]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        from pyrovae.errors import ConfigError

        raise ConfigError(
            f"unknown activation {name!r}; known activations: {', '.join(sorted(ACTIVATIONS))}"
        ) from None


def mlp(sizes: Sequence[int], activation: str = "tanh", final_activation: bool = False, *,
        init_gain: float | str = ACTIVATION_GAIN,
        init_scheme: str = GLOROT_UNIFORM) -> nn.Sequential:
    """A stack of ``Linear`` layers with ``activation`` between them.

    Weights start Glorot-uniform (Glorot & Bengio 2010), every layer scaled by
    :func:`glorot_gain`: by default the activation's gain (5/3 for tanh), the output layer
    included, since smaller starts let a tanh encoder contract every code to one point;
    biases start at zero.  ``init_scheme="he_normal"`` starts every layer with
    :func:`he_normal_` instead.

    :param sizes: layer widths ``(in, hidden..., out)``; at least two entries.
    :param activation: a key of :data:`ACTIVATIONS`.
    :param final_activation: whether the last layer is followed by the activation too.
    :param init_gain: ``"activation"``, or the gain of every layer (1: the IWAE authors' code).
    :param init_scheme: a key of :data:`INIT_SCHEMES`.
    """
    if len(sizes) < 2:
        raise ValueError(f"an MLP needs at least an input and an output size, got {list(sizes)}")
    act = _activation(activation)
    gain = glorot_gain(activation, init_gain)
    check_init_scheme(init_scheme, init_gain)
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(init_linear(n_in, n_out, gain, init_scheme))
        if i < len(sizes) - 2 or final_activation:
            layers.append(act())
    return nn.Sequential(*layers)


class MLPEncoder(nn.Module):
    """Fully connected encoder body ``x -> h``.

    :param data_dim: size of a flattened data point, e.g. 784 for MNIST.
    :param hidden_dims: widths of the hidden layers; the last one is ``feature_dim``.
        An empty sequence makes the encoder the identity (features are the data).
    :param activation: a key of :data:`ACTIVATIONS`.
    :param init_gain: ``"activation"``, or the Glorot gain of every layer (:func:`mlp`).
    :param init_scheme: a key of :data:`INIT_SCHEMES` (:func:`mlp`).

    Example::

        encoder = MLPEncoder(784, (200, 200), activation="tanh")
        h = encoder(torch.rand(100, 784))  # (100, 200)
    """

    def __init__(self, data_dim: int, hidden_dims: Sequence[int] = (200, 200),
                 activation: str = "tanh", *, init_gain: float | str = ACTIVATION_GAIN,
                 init_scheme: str = GLOROT_UNIFORM) -> None:
        super().__init__()
        self.data_dim = data_dim
        self.feature_dim = hidden_dims[-1] if hidden_dims else data_dim
        self.body = (
            mlp((data_dim, *hidden_dims), activation, final_activation=True, init_gain=init_gain,
                init_scheme=init_scheme)
            if hidden_dims
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """:param x: ``(..., data_dim)``. :returns: features ``(..., feature_dim)``."""
        return self.body(x)


class MLPDecoder(nn.Module):
    """Fully connected decoder ``z -> parameters of p(x|z)``.

    :param latent_dim: size of z.
    :param data_dim: size of a flattened data point.
    :param hidden_dims: widths of the hidden layers, from z outwards. An empty sequence
        gives an affine decoder ``W z + b`` (the linear-Gaussian model).
    :param activation: a key of :data:`ACTIVATIONS`.
    :param init_gain: ``"activation"``, or the Glorot gain of every layer (:func:`mlp`).
    :param init_scheme: a key of :data:`INIT_SCHEMES` (:func:`mlp`).

    Example::

        decoder = MLPDecoder(50, 784, (200, 200))
        logits = decoder(torch.randn(5, 100, 50))  # (5, 100, 784)
    """

    def __init__(self, latent_dim: int, data_dim: int, hidden_dims: Sequence[int] = (200, 200),
                 activation: str = "tanh", *, init_gain: float | str = ACTIVATION_GAIN,
                 init_scheme: str = GLOROT_UNIFORM) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.data_dim = data_dim
        self.body = mlp((latent_dim, *hidden_dims, data_dim), activation, init_gain=init_gain,
                        init_scheme=init_scheme)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """:param z: ``(..., latent_dim)``. :returns: ``(..., data_dim)``."""
        return self.body(z)


def mlp_networks(*, data_dim: int, latent_dim: int, hidden_dims: Sequence[int] = (200, 200),
                 activation: str = "tanh", image_shape: Sequence[int] | None = None,
                 init_gain: float | str = ACTIVATION_GAIN,
                 init_scheme: str = GLOROT_UNIFORM) -> tuple[MLPEncoder, MLPDecoder]:
    """An MLP encoder and a mirror-image MLP decoder (hidden sizes reversed)."""
    encoder = MLPEncoder(data_dim, hidden_dims, activation, init_gain=init_gain,
                         init_scheme=init_scheme)
    decoder = MLPDecoder(latent_dim, data_dim, tuple(reversed(hidden_dims)), activation,
                         init_gain=init_gain, init_scheme=init_scheme)
    return encoder, decoder


class GatedLinear(nn.Module):
    """A gated dense layer: ``h = act(W x + b) * sigmoid(V x + c)``.

    The gate ``sigmoid(V x + c)`` in (0, 1) scales each unit of the affine (or activated)
    path; with ``activation="identity"`` it is the layer of Tomczak & Welling's VampPrior
    networks [1].  Both paths start Glorot-uniform, by default ``W`` with the gain of
    ``activation`` and ``V`` with gain 1 (sigmoid), or both with a number ``init_gain``;
    biases start at zero.  ``init_scheme="he_normal"`` starts both with :func:`he_normal_`
    (the authors' code).

    :param in_features: input width.
    :param out_features: output width.
    :param activation: a key of :data:`ACTIVATIONS`, applied to the ``W x + b`` path.
    :param init_gain: ``"activation"``, or the Glorot gain of both paths.
    :param init_scheme: a key of :data:`INIT_SCHEMES`.

    Example::

        layer = GatedLinear(784, 300)
        h = layer(torch.rand(100, 784))  # (100, 300)

    References:

    1. Tomczak, Welling (2018). VAE with a VampPrior. AISTATS.
    2. Dauphin, Fan, Auli, Grangier (2017). Language Modeling with Gated Convolutional
       Networks. ICML.
    """

    def __init__(self, in_features: int, out_features: int, activation: str = "identity", *,
                 init_gain: float | str = ACTIVATION_GAIN,
                 init_scheme: str = GLOROT_UNIFORM) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.linear = nn.Linear(in_features, out_features)
        self.gate = nn.Linear(in_features, out_features)
        self.activation = _activation(activation)()
        gain = glorot_gain(activation, init_gain)
        if check_init_scheme(init_scheme, init_gain) == HE_NORMAL:
            he_normal_(self.linear)
            he_normal_(self.gate)
            return
        gate_gain = nn.init.calculate_gain("sigmoid") if init_gain == ACTIVATION_GAIN else gain
        nn.init.xavier_uniform_(self.linear.weight, gain=gain)
        nn.init.xavier_uniform_(self.gate.weight, gain=gate_gain)
        nn.init.zeros_(self.linear.bias)
        nn.init.zeros_(self.gate.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """:param x: ``(..., in_features)``. :returns: ``(..., out_features)``."""
        return self.activation(self.linear(x)) * torch.sigmoid(self.gate(x))


def gated_mlp(sizes: Sequence[int], activation: str = "identity", *,
              init_gain: float | str = ACTIVATION_GAIN,
              init_scheme: str = GLOROT_UNIFORM) -> nn.Sequential:
    """:class:`GatedLinear` layers of widths ``sizes`` ``(in, hidden..., out)``."""
    if len(sizes) < 2:
        raise ValueError(f"an MLP needs at least an input and an output size, got {list(sizes)}")
    return nn.Sequential(*(GatedLinear(n_in, n_out, activation, init_gain=init_gain,
                                       init_scheme=init_scheme)
                           for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True)))


class GatedMLPEncoder(nn.Module):
    """Encoder body ``x -> h`` of :class:`GatedLinear` layers.

    :param data_dim: size of a flattened data point.
    :param hidden_dims: widths of the gated layers (at least one); the last one is
        ``feature_dim``.
    :param activation: a key of :data:`ACTIVATIONS`, on each layer's ungated path.
    :param init_gain: ``"activation"``, or the Glorot gain of every layer (:class:`GatedLinear`).
    :param init_scheme: a key of :data:`INIT_SCHEMES` (:class:`GatedLinear`).

    Example::

        encoder = GatedMLPEncoder(784, (300, 300))
        h = encoder(torch.rand(100, 784))  # (100, 300)
    """

    def __init__(self, data_dim: int, hidden_dims: Sequence[int] = (300, 300),
                 activation: str = "identity", *,
                 init_gain: float | str = ACTIVATION_GAIN,
                 init_scheme: str = GLOROT_UNIFORM) -> None:
        super().__init__()
        if not hidden_dims:
            raise ValueError("the gated encoder needs at least one hidden width")
        self.data_dim = data_dim
        self.feature_dim = hidden_dims[-1]
        self.body = gated_mlp((data_dim, *hidden_dims), activation, init_gain=init_gain,
                              init_scheme=init_scheme)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """:param x: ``(..., data_dim)``. :returns: features ``(..., feature_dim)``."""
        return self.body(x)


class GatedMLPDecoder(nn.Module):
    """Decoder ``z -> parameters of p(x|z)``: :class:`GatedLinear` layers of widths
    ``hidden_dims``, then a plain ``Linear`` output layer (no output nonlinearity: the
    likelihood applies its own link, e.g. the sigmoid of a Bernoulli).

    :param latent_dim: size of z.
    :param data_dim: size of a flattened data point.
    :param hidden_dims: widths of the gated layers, from z outwards (at least one).
    :param activation: a key of :data:`ACTIVATIONS`, on each layer's ungated path.
    :param init_gain: ``"activation"`` (the output layer: gain 1), or the Glorot gain of
        every layer.
    :param init_scheme: a key of :data:`INIT_SCHEMES`; under ``"he_normal"`` the output
        layer's bias keeps ``nn.Linear``'s start, as in Tomczak & Welling's code.

    Example::

        decoder = GatedMLPDecoder(40, 784, (300, 300))
        logits = decoder(torch.randn(5, 100, 40))  # (5, 100, 784)
    """

    def __init__(self, latent_dim: int, data_dim: int, hidden_dims: Sequence[int] = (300, 300),
                 activation: str = "identity", *,
                 init_gain: float | str = ACTIVATION_GAIN,
                 init_scheme: str = GLOROT_UNIFORM) -> None:
        super().__init__()
        if not hidden_dims:
            raise ValueError("the gated decoder needs at least one hidden width")
        self.latent_dim = latent_dim
        self.data_dim = data_dim
        check_init_scheme(init_scheme, init_gain)
        output = init_linear(hidden_dims[-1], data_dim, glorot_gain("identity", init_gain),
                             init_scheme)
        self.body = nn.Sequential(
            *gated_mlp((latent_dim, *hidden_dims), activation, init_gain=init_gain,
                       init_scheme=init_scheme), output)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """:param z: ``(..., latent_dim)``. :returns: ``(..., data_dim)``."""
        return self.body(z)


def gated_mlp_networks(*, data_dim: int, latent_dim: int, hidden_dims: Sequence[int] = (300, 300),
                       activation: str = "identity", image_shape: Sequence[int] | None = None,
                       init_gain: float | str = ACTIVATION_GAIN,
                       init_scheme: str = GLOROT_UNIFORM,
                       ) -> tuple[GatedMLPEncoder, GatedMLPDecoder]:
    """A gated encoder and its mirror-image gated decoder (hidden sizes reversed)."""
    from pyrovae.errors import ConfigError

    if not hidden_dims:
        raise ConfigError("the gated networks need at least one hidden width (--hidden-dims)")
    encoder = GatedMLPEncoder(data_dim, hidden_dims, activation, init_gain=init_gain,
                              init_scheme=init_scheme)
    decoder = GatedMLPDecoder(latent_dim, data_dim, tuple(reversed(hidden_dims)), activation,
                              init_gain=init_gain, init_scheme=init_scheme)
    return encoder, decoder


def _channels_height_width(image_shape: Sequence[int] | None, data_dim: int) -> tuple[int, int, int]:
    from pyrovae.errors import ConfigError

    if image_shape is None:
        raise ConfigError("the convolutional networks need image data (an image shape)")
    shape = tuple(int(size) for size in image_shape)
    if len(shape) == 2:
        shape = (1, *shape)
    if len(shape) != 3 or shape[0] * shape[1] * shape[2] != data_dim:
        raise ConfigError(
            f"image shape {tuple(image_shape)} is not (channels, height, width) of {data_dim} values")
    if shape[0] < 1 or shape[1] < 4 or shape[2] < 4:
        raise ConfigError(f"the convolutional networks need at least one channel and images of "
                          f"at least 4x4, got {shape[0]} channel(s) of {shape[1]}x{shape[2]}")
    return shape  # type: ignore[return-value]


def _halved(size: int) -> int:
    """The size after one convolution with kernel 4, stride 2 and padding 1: floor(size / 2)."""
    return size // 2


class ResidualBlock(nn.Module):
    """x + conv(act(conv(act(x)))): two 3x3 convolutions (padding 1) of ``channels`` channels
    on a residual path; the output has the input's shape ``(N, channels, H, W)``.  No
    normalisation layer, so that each image's output depends on that image alone (a batch
    of importance samples is not a batch of data).

    :param channels: input and output channels.
    :param activation: a key of :data:`ACTIVATIONS`.

    Example::

        block = ResidualBlock(32)
        block(torch.randn(5, 32, 7, 7)).shape  # (5, 32, 7, 7)

    References:

    1. He, Zhang, Ren, Sun (2016). Identity mappings in deep residual networks. ECCV.
    """

    def __init__(self, channels: int, activation: str = "relu") -> None:
        super().__init__()
        act = _activation(activation)
        self.body = nn.Sequential(act(), nn.Conv2d(channels, channels, 3, padding=1),
                                  act(), nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _blocks(count: int, channels: int, activation: str) -> list[nn.Module]:
    return [ResidualBlock(channels, activation) for _ in range(count)]


class ConvEncoder(nn.Module):
    """Convolutional encoder body ``x -> h`` for flattened images.

    Two stride-2 convolutions (kernel 4, padding 1, 32 and 64 channels), each halving height
    and width, rounding down (28x28 -> 14x14 -> 7x7, 32x32 -> 8x8, 8x8 -> 2x2, 30x30 -> 7x7),
    then fully connected layers of widths ``hidden_dims``. Data stay flattened ``(..., data_dim)``
    everywhere else; the reshape to ``(channels, height, width)`` happens here.

    :param image_shape: ``(channels, height, width)`` or ``(height, width)``; any number of
        channels, height and width at least 4.
    :param hidden_dims: widths of the fully connected layers after the convolutions; the
        last one is ``feature_dim`` (at least one entry).
    :param activation: a key of :data:`ACTIVATIONS`.
    :param channels: output channels of the two convolutions.
    :param init_gain: the fully connected layers' (:func:`mlp`); the convolutions keep
        PyTorch's default initialisation.
    :param init_scheme: the fully connected layers' (:func:`mlp`); not the convolutions'.
    :param residual_blocks: :class:`ResidualBlock` s after each convolution (0: none).

    Example::

        encoder = ConvEncoder((1, 28, 28), (256,))
        h = encoder(torch.rand(100, 784))  # (100, 256)
    """

    def __init__(self, image_shape: Sequence[int], hidden_dims: Sequence[int] = (256,),
                 activation: str = "relu", channels: tuple[int, int] = (32, 64), *,
                 init_gain: float | str = ACTIVATION_GAIN,
                 init_scheme: str = GLOROT_UNIFORM, residual_blocks: int = 0) -> None:
        super().__init__()
        if not hidden_dims:
            raise ValueError("the convolutional encoder needs at least one hidden width")
        self.image_shape = _channels_height_width(image_shape, math.prod(image_shape))
        in_channels, height, width = self.image_shape
        self.data_dim = in_channels * height * width
        self.feature_dim = hidden_dims[-1]
        act = _activation(activation)
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, channels[0], 4, stride=2, padding=1), act(),
            *_blocks(residual_blocks, channels[0], activation),
            nn.Conv2d(channels[0], channels[1], 4, stride=2, padding=1), act(),
            *_blocks(residual_blocks, channels[1], activation),
        )
        conv_dim = channels[1] * _halved(_halved(height)) * _halved(_halved(width))
        self.head = mlp((conv_dim, *hidden_dims), activation, final_activation=True,
                        init_gain=init_gain, init_scheme=init_scheme)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """:param x: ``(..., data_dim)``. :returns: features ``(..., feature_dim)``."""
        leading = x.shape[:-1]
        images = x.reshape(-1, *self.image_shape)
        return self.head(self.conv(images).flatten(1)).reshape(*leading, self.feature_dim)


class ConvDecoder(nn.Module):
    """Transposed-convolutional decoder ``z -> parameters of p(x|z)``, flattened.

    Fully connected layers ``latent_dim -> hidden_dims -> 64 x h x w`` (the encoder's
    convolution output size), then two stride-2 transposed convolutions back to exactly
    ``(channels, height, width)``, an output padding of one where a size was odd; no output
    nonlinearity (the likelihood applies its own link). Accepts any leading dimensions:
    ``(..., latent_dim) -> (..., data_dim)``.

    :param latent_dim: size of z.
    :param image_shape: ``(channels, height, width)`` or ``(height, width)``; any number of
        channels, height and width at least 4.
    :param hidden_dims: widths of the fully connected layers, from z outwards.
    :param activation: a key of :data:`ACTIVATIONS`.
    :param channels: the encoder's convolution channels, traversed in reverse
        (64 -> 32 -> image channels by default).
    :param init_gain: the fully connected layers' (:func:`mlp`); the transposed
        convolutions keep PyTorch's default initialisation.
    :param init_scheme: the fully connected layers' (:func:`mlp`); not the convolutions'.
    :param residual_blocks: :class:`ResidualBlock` s before each transposed convolution
        (0: none).

    Example::

        decoder = ConvDecoder(50, (1, 28, 28), (256,))
        logits = decoder(torch.randn(5, 100, 50))  # (5, 100, 784)
    """

    def __init__(self, latent_dim: int, image_shape: Sequence[int],
                 hidden_dims: Sequence[int] = (256,), activation: str = "relu",
                 channels: tuple[int, int] = (32, 64), *,
                 init_gain: float | str = ACTIVATION_GAIN,
                 init_scheme: str = GLOROT_UNIFORM, residual_blocks: int = 0) -> None:
        super().__init__()
        self.image_shape = _channels_height_width(image_shape, math.prod(image_shape))
        out_channels, height, width = self.image_shape
        self.latent_dim = latent_dim
        self.data_dim = out_channels * height * width
        self.grid = (channels[1], _halved(_halved(height)), _halved(_halved(width)))
        self.head = mlp((latent_dim, *hidden_dims, math.prod(self.grid)), activation,
                        final_activation=True, init_gain=init_gain, init_scheme=init_scheme)
        act = _activation(activation)
        # a transposed convolution (kernel 4, stride 2, padding 1) doubles a size; the output
        # padding adds the 1 that halving an odd size rounded off
        half = (_halved(height), _halved(width))
        self.deconv = nn.Sequential(
            *_blocks(residual_blocks, channels[1], activation),
            nn.ConvTranspose2d(channels[1], channels[0], 4, stride=2, padding=1,
                               output_padding=(half[0] % 2, half[1] % 2)), act(),
            *_blocks(residual_blocks, channels[0], activation),
            nn.ConvTranspose2d(channels[0], out_channels, 4, stride=2, padding=1,
                               output_padding=(height % 2, width % 2)),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """:param z: ``(..., latent_dim)``. :returns: ``(..., data_dim)``."""
        leading = z.shape[:-1]
        grid = self.head(z.reshape(-1, self.latent_dim)).reshape(-1, *self.grid)
        return self.deconv(grid).reshape(*leading, self.data_dim)


def conv_networks(*, data_dim: int, latent_dim: int, hidden_dims: Sequence[int] = (256,),
                  activation: str = "relu", image_shape: Sequence[int] | None = None,
                  init_gain: float | str = ACTIVATION_GAIN,
                  init_scheme: str = GLOROT_UNIFORM) -> tuple[ConvEncoder, ConvDecoder]:
    """A convolutional encoder and its mirror-image decoder for images of ``image_shape``."""
    shape = _channels_height_width(image_shape, data_dim)
    encoder = ConvEncoder(shape, hidden_dims, activation, init_gain=init_gain,
                          init_scheme=init_scheme)
    decoder = ConvDecoder(latent_dim, shape, tuple(reversed(hidden_dims)), activation,
                          init_gain=init_gain, init_scheme=init_scheme)
    return encoder, decoder


#: residual blocks per stage of ``--net resnet``
RESNET_BLOCKS = 2


def residual_conv_networks(*, data_dim: int, latent_dim: int, hidden_dims: Sequence[int] = (256,),
                           activation: str = "relu", image_shape: Sequence[int] | None = None,
                           init_gain: float | str = ACTIVATION_GAIN,
                           init_scheme: str = GLOROT_UNIFORM) -> tuple[ConvEncoder, ConvDecoder]:
    """:func:`conv_networks` with :data:`RESNET_BLOCKS` residual blocks at each resolution
    (after each convolution of the encoder, before each transposed convolution of the
    decoder): a deeper network for colour images at the same resolutions and widths."""
    shape = _channels_height_width(image_shape, data_dim)
    options = {"init_gain": init_gain, "init_scheme": init_scheme,
               "residual_blocks": RESNET_BLOCKS}
    encoder = ConvEncoder(shape, hidden_dims, activation, **options)
    decoder = ConvDecoder(latent_dim, shape, tuple(reversed(hidden_dims)), activation, **options)
    return encoder, decoder


#: encoder/decoder pairs selectable by name from the CLI and config; each takes the keyword
#: arguments ``data_dim``, ``latent_dim``, ``hidden_dims``, ``activation``, ``image_shape``,
#: ``init_gain`` and ``init_scheme``
NETWORKS = {
    "mlp": mlp_networks,
    "gated_mlp": gated_mlp_networks,
    "conv": conv_networks,
    "resnet": residual_conv_networks,
}
