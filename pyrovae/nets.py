"""Encoder and decoder bodies: plain ``nn.Module`` networks with no Pyro in them.

An **encoder** maps data ``x`` of shape ``(..., data_dim)`` to features of shape
``(..., feature_dim)``; a guide turns those features into q(z|x).  A **decoder** maps
latents ``z`` of shape ``(..., latent_dim)`` to the parameters of p(x|z), shape
``(..., data_dim)``; a likelihood turns those into a distribution.  Leading
dimensions are arbitrary, so the same network serves a minibatch ``(N, D)`` and a
stack of importance samples ``(K, N, D)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "softplus": nn.Softplus,
    "gelu": nn.GELU,
}


def _activation(name: str) -> type[nn.Module]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        from pyrovae.errors import ConfigError

        raise ConfigError(
            f"unknown activation {name!r}; known activations: {', '.join(sorted(ACTIVATIONS))}"
        ) from None


def mlp(sizes: Sequence[int], activation: str = "tanh", final_activation: bool = False) -> nn.Sequential:
    """A stack of ``Linear`` layers with ``activation`` between them.

    :param sizes: layer widths ``(in, hidden..., out)``; at least two entries.
    :param activation: a key of :data:`ACTIVATIONS`.
    :param final_activation: whether the last layer is followed by the activation too.
    """
    if len(sizes) < 2:
        raise ValueError(f"an MLP needs at least an input and an output size, got {list(sizes)}")
    act = _activation(activation)
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2 or final_activation:
            layers.append(act())
    return nn.Sequential(*layers)


class MLPEncoder(nn.Module):
    """Fully connected encoder body ``x -> h``.

    :param data_dim: size of a flattened data point, e.g. 784 for MNIST.
    :param hidden_dims: widths of the hidden layers; the last one is ``feature_dim``.
        An empty sequence makes the encoder the identity (features are the data).
    :param activation: a key of :data:`ACTIVATIONS`.

    Example::

        encoder = MLPEncoder(784, (200, 200), activation="tanh")
        h = encoder(torch.rand(100, 784))  # (100, 200)
    """

    def __init__(self, data_dim: int, hidden_dims: Sequence[int] = (200, 200),
                 activation: str = "tanh") -> None:
        super().__init__()
        self.data_dim = data_dim
        self.feature_dim = hidden_dims[-1] if hidden_dims else data_dim
        self.body = (
            mlp((data_dim, *hidden_dims), activation, final_activation=True)
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

    Example::

        decoder = MLPDecoder(50, 784, (200, 200))
        logits = decoder(torch.randn(5, 100, 50))  # (5, 100, 784)
    """

    def __init__(self, latent_dim: int, data_dim: int, hidden_dims: Sequence[int] = (200, 200),
                 activation: str = "tanh") -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.data_dim = data_dim
        self.body = mlp((latent_dim, *hidden_dims, data_dim), activation)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """:param z: ``(..., latent_dim)``. :returns: ``(..., data_dim)``."""
        return self.body(z)


def mlp_networks(*, data_dim: int, latent_dim: int, hidden_dims: Sequence[int] = (200, 200),
                 activation: str = "tanh", image_shape: Sequence[int] | None = None,
                 ) -> tuple[MLPEncoder, MLPDecoder]:
    """An MLP encoder and a mirror-image MLP decoder (hidden sizes reversed)."""
    encoder = MLPEncoder(data_dim, hidden_dims, activation)
    decoder = MLPDecoder(latent_dim, data_dim, tuple(reversed(hidden_dims)), activation)
    return encoder, decoder


#: encoder/decoder pairs selectable by name from the CLI and config
NETWORKS = {
    "mlp": mlp_networks,
}
