"""Stochastic layers: a network from an input ``h`` to a distribution over the next latent.

Contract: ``layer(h)`` with ``h`` of shape ``(..., in_dim)`` returns a distribution with
``batch_shape == h.shape[:-1]`` and ``event_shape == (out_dim,)``.  The
:class:`~pyrovae.models.HierarchicalVAE` chains such layers both ways: in the guide
q(z_1 | x), q(z_2 | z_1), ..., and in the model p(z_{L-1} | z_L), ..., p(z_1 | z_2).  Any
module with that contract can take a layer's place, e.g. ``nn.Sequential(MLPEncoder(...),
IAFGuide(...))`` for q(z_1 | x).

References:

1. Burda, Grosse, Salakhutdinov (2016). Importance Weighted Autoencoders. ICLR.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyro.distributions as dist
import torch
from torch import nn

from pyrovae.guides import MIN_SCALE
from pyrovae.nets import ACTIVATION_GAIN, glorot_gain, mlp


class ConditionalNormal(nn.Module):
    """A diagonal Gaussian whose parameters are networks of its input::

        N(loc(f(h)), diag scale(f(h))^2),   scale = exp(linear(f(h))) + MIN_SCALE,

    where f is a tanh (or other) MLP with widths ``hidden_dims`` and ``loc`` an affine head.
    The standard deviation is the exponential of an affine output, as in Burda et al.'s
    code; ``MIN_SCALE`` keeps log densities finite in float32.  The body is pyrovae's
    :func:`~pyrovae.nets.mlp` (Glorot-uniform with the activation's gain by default); the two
    heads are Glorot-uniform with gain 1 by default, as in the authors' code, and zero biases.

    :param in_dim: width of the input ``h`` (the data, or the latent layer below or above).
    :param out_dim: width of the latent the layer gives a distribution over.
    :param hidden_dims: widths of the hidden layers of f; empty: f is the identity, and the
        layer is linear-Gaussian (``loc`` and ``log scale`` affine in ``h``).
    :param activation: a key of :data:`~pyrovae.nets.ACTIVATIONS`.
    :param init_gain: ``"activation"``, or the Glorot gain of every layer, heads included
        (1: the authors' code).

    Example::

        layer = ConditionalNormal(100, 50, hidden_dims=(100, 100))
        q = layer(torch.randn(20, 100))  # batch (20,), event (50,)
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dims: Sequence[int] = (),
                 activation: str = "tanh", *, init_gain: float | str = ACTIVATION_GAIN) -> None:
        super().__init__()
        if in_dim < 1 or out_dim < 1:
            raise ValueError(f"a layer needs positive widths, got in_dim={in_dim}, "
                             f"out_dim={out_dim}")
        self.in_dim, self.out_dim = in_dim, out_dim
        hidden = tuple(hidden_dims)
        self.body = (mlp((in_dim, *hidden), activation, final_activation=True,
                         init_gain=init_gain) if hidden else nn.Identity())
        feature_dim = hidden[-1] if hidden else in_dim
        self.loc_head = nn.Linear(feature_dim, out_dim)
        self.log_scale_head = nn.Linear(feature_dim, out_dim)
        for head in (self.loc_head, self.log_scale_head):
            # no activation follows a head: gain 1 unless a number is given
            nn.init.xavier_uniform_(head.weight, gain=glorot_gain("identity", init_gain))
            nn.init.zeros_(head.bias)

    def loc_scale(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:param h: ``(..., in_dim)``. :returns: ``(loc, scale)``, each ``(..., out_dim)``."""
        features = self.body(h)
        return self.loc_head(features), self.log_scale_head(features).exp() + MIN_SCALE

    def forward(self, h: torch.Tensor) -> dist.Distribution:
        """:param h: ``(..., in_dim)``. :returns: batch ``h.shape[:-1]``, event ``(out_dim,)``."""
        loc, scale = self.loc_scale(h)
        return dist.Normal(loc, scale).to_event(1)


def gaussian_chain(widths: Sequence[int], hidden_dims: Sequence[Sequence[int]],
                   activation: str = "tanh", *,
                   init_gain: float | str = ACTIVATION_GAIN) -> nn.ModuleList:
    """The layers ``widths[i] -> widths[i + 1]``, the i-th with hidden widths
    ``hidden_dims[i]``: ``len(widths) - 1`` :class:`ConditionalNormal` layers."""
    if len(hidden_dims) != len(widths) - 1:
        raise ValueError(f"{len(widths) - 1} layers need as many hidden-width lists, got "
                         f"{len(hidden_dims)}")
    return nn.ModuleList(ConditionalNormal(n_in, n_out, hidden, activation, init_gain=init_gain)
                         for n_in, n_out, hidden in zip(widths[:-1], widths[1:], hidden_dims,
                                                        strict=True))
