"""Amortized guide families q(z|x): map encoder features h to a distribution over z.

Contract: ``guide_family(h)`` with ``h`` of shape ``(..., feature_dim)`` returns a
distribution with ``batch_shape == h.shape[:-1]`` and ``event_shape == (latent_dim,)``.
The :class:`~pyrovae.models.VAE` samples it at site ``"z"`` inside the data plate.

Guides are also used with extra leading sample dimensions: inside a particle plate
(``dim=-2``) the site ``"z"`` of batch shape ``(N,)`` is expanded to ``(K, N)`` by Pyro, so
every family returns a distribution that supports ``expand`` and scores ``(K, N, latent_dim)``.

A new family is one class here plus one entry in :data:`GUIDES`.

References:

1. Kingma, Salimans, Jozefowicz, Chen, Sutskever, Welling (2016). Improved Variational
   Inference with Inverse Autoregressive Flow. NeurIPS.
2. Rezende, Mohamed, Wierstra (2014). Stochastic Backpropagation and Approximate Inference
   in Deep Generative Models. ICML (low-rank plus diagonal covariance).
3. Tomczak, Welling (2018). VAE with a VampPrior. AISTATS (the clipped log-variance).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pyro.distributions as dist
import torch
from pyro.distributions.transforms import ConditionalAffineAutoregressive
from pyro.nn import ConditionalAutoRegressiveNN
from torch import nn
from torch.nn import functional as F

from pyrovae.nets import GLOROT_UNIFORM, HE_NORMAL, check_init_scheme, he_normal_
from pyrovae.registration import LeanPyroModule

#: lower bound on posterior standard deviations; keeps log q finite in float32
MIN_SCALE = 1e-4
#: the bounds of the clipped log-variance (Tomczak & Welling's ``Hardtanh(-6, 2)``):
#: standard deviations from exp(-3) = 0.050 to exp(1) = 2.7
LOG_VARIANCE_MIN, LOG_VARIANCE_MAX = -6.0, 2.0


def softplus_scale(raw: torch.Tensor) -> torch.Tensor:
    """Standard deviations ``softplus(raw) + MIN_SCALE`` from a scale head's outputs ``raw``
    (any shape)."""
    return F.softplus(raw) + MIN_SCALE


def clipped_log_variance_scale(raw: torch.Tensor) -> torch.Tensor:
    """Standard deviations ``exp(hardtanh(raw, -6, 2) / 2)``: ``raw`` (any shape) is a
    log-variance, clipped as by Tomczak & Welling's ``Hardtanh``, so a head output outside
    [-6, 2] gets no gradient."""
    return torch.exp(0.5 * F.hardtanh(raw, LOG_VARIANCE_MIN, LOG_VARIANCE_MAX))


#: how a guide's scale head gives standard deviations, by name (``scale_link``, the
#: ``--guide-scale`` flag)
SCALE_LINKS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "softplus": softplus_scale,
    "clipped_log_variance": clipped_log_variance_scale,
}


def _check_scale_link(scale_link: str) -> str:
    if scale_link not in SCALE_LINKS:
        raise ValueError(f"unknown scale_link {scale_link!r}; known: {', '.join(SCALE_LINKS)}")
    return scale_link


def restart_heads(heads: list[nn.Linear], init_gain: float | None,
                  init_scheme: str = GLOROT_UNIFORM) -> None:
    """Start ``heads`` Glorot-uniform with gain ``init_gain`` and zero biases; ``None`` keeps
    PyTorch's default ``Linear`` initialisation.  ``init_scheme="he_normal"`` draws their
    weights He-normal instead and keeps ``Linear``'s biases (:func:`~pyrovae.nets.he_normal_`).

    :raises ~pyrovae.errors.ConfigError: an unknown scheme, or ``he_normal`` with a gain.
    """
    if check_init_scheme(init_scheme, init_gain) == HE_NORMAL:
        for head in heads:
            he_normal_(head)
        return
    if init_gain is None:
        return
    for head in heads:
        nn.init.xavier_uniform_(head.weight, gain=init_gain)
        nn.init.zeros_(head.bias)


def head_gain(config: Any) -> float | None:
    """The heads' Glorot gain under ``config.init_gain``: ``None`` (PyTorch's default) for
    ``"activation"``, else the number."""
    init_gain = getattr(config, "init_gain", "activation")
    return None if init_gain == "activation" else float(init_gain)


def head_init(config: Any) -> dict[str, Any]:
    """The ``init_gain`` (:func:`head_gain`) and ``init_scheme`` a family's heads take from
    ``config``; a config without ``init_scheme`` gets the Glorot-uniform one."""
    return {"init_gain": head_gain(config),
            "init_scheme": getattr(config, "init_scheme", GLOROT_UNIFORM)}


class GuideFamily(LeanPyroModule):
    """Base class of amortized variational families."""

    #: the :data:`SCALE_LINKS` the family takes (``--guide-scale``)
    scale_links: tuple[str, ...] = ("softplus",)

    def __init__(self, feature_dim: int, latent_dim: int) -> None:
        super().__init__()
        self.feature_dim = feature_dim
        self.latent_dim = latent_dim

    @classmethod
    def from_config(cls, config: Any, *, feature_dim: int, **context: Any) -> GuideFamily:
        """Build the family from a :class:`~pyrovae.config.TrainConfig`."""
        return cls(feature_dim, config.latent_dim)

    def forward(self, h: torch.Tensor) -> dist.Distribution:
        """:param h: features ``(..., feature_dim)``. :returns: q(z|x), event ``(latent_dim,)``."""
        raise NotImplementedError


def _fill_legacy_scale(state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any],
                       name: str, legacy_value: float) -> bool:
    """Give a state dict saved before the buffer ``name`` existed (module version 1, or no
    version recorded) the value that code used; return whether it did.  A version-2 state
    dict without the buffer is left as it is, for ``load_state_dict`` to report."""
    version = local_metadata.get("version")
    if prefix + name in state_dict or (version is not None and version >= 2):
        return False
    state_dict[prefix + name] = torch.tensor(legacy_value)
    return True


class DiagonalNormalGuide(GuideFamily):
    """q(z|x) = N(z_loc(h), diag z_scale(h)^2) with affine heads on the encoder features.

    ``z_scale = softplus(linear(h)) + MIN_SCALE`` by default; with
    ``scale_link="clipped_log_variance"``, ``z_scale = exp(clip(linear(h), -6, 2) / 2)``,
    the linear head a log-variance (Tomczak & Welling's guide).

    :param init_gain: start the heads Glorot-uniform with this gain and zero biases
        (``None``: PyTorch's default ``Linear`` initialisation).
    :param init_scheme: ``"he_normal"`` starts the heads He-normal (:func:`restart_heads`).
    :param scale_link: a key of :data:`SCALE_LINKS`: how the scale head gives z_scale.

    Example::

        family = DiagonalNormalGuide(feature_dim=200, latent_dim=50)
        q = family(torch.randn(100, 200))  # batch (100,), event (50,)
    """

    scale_links = tuple(SCALE_LINKS)

    def __init__(self, feature_dim: int, latent_dim: int, *,
                 init_gain: float | None = None, init_scheme: str = GLOROT_UNIFORM,
                 scale_link: str = "softplus") -> None:
        super().__init__(feature_dim, latent_dim)
        self.scale_link = _check_scale_link(scale_link)
        self._scale = SCALE_LINKS[scale_link]
        self.loc_head = nn.Linear(feature_dim, latent_dim)
        self.scale_head = nn.Linear(feature_dim, latent_dim)
        restart_heads([self.loc_head, self.scale_head], init_gain, init_scheme)

    @classmethod
    def from_config(cls, config: Any, *, feature_dim: int, **context: Any) -> DiagonalNormalGuide:
        return cls(feature_dim, config.latent_dim, **head_init(config),
                   scale_link=getattr(config, "guide_scale", "softplus"))

    def z_loc_scale(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:returns: ``(z_loc, z_scale)``, each ``(..., latent_dim)``."""
        return self.loc_head(h), self._scale(self.scale_head(h))

    def forward(self, h: torch.Tensor) -> dist.Distribution:
        z_loc, z_scale = self.z_loc_scale(h)
        return dist.Normal(z_loc, z_scale).to_event(1)


class FullCovarianceNormalGuide(GuideFamily):
    """q(z|x) = N(z_loc(h), L(h) L(h)^T) with a Cholesky factor L from affine heads.

    The diagonal of L is ``softplus(linear(h)) + MIN_SCALE`` (positive, so L is a valid
    Cholesky factor); the ``latent_dim * (latent_dim - 1) / 2`` strictly lower entries are
    a free affine function of h. The upper triangle is zero.

    The strictly lower entries are ``off_diagonal_scale`` (default 0.1) times the
    off-diagonal head, which starts at zero, so training starts from the diagonal guide.
    Both guard against Adam, which moves every weight by up to ``lr`` per step however small
    its gradient: the off-diagonal gradients are mostly Monte Carlo noise, so unscaled
    weights random-walk and row i of L grows like sqrt(i) (``experiments/probe_guide_init.py``
    compares scales).  The head still learns from zero: the gradient of the ELBO with respect
    to ``L[i, j]`` is ``L[j, j] E[d^2 f / dz_i dz_j]`` (Stein's lemma), non-zero wherever the
    likelihood couples latents.

    The diagonal of L is no standard deviation (the variance of z_i is the sum of row i of
    L squared), so the family has no ``scale_link`` but softplus.

    :param off_diagonal_scale: the strictly lower entries of L are this times the head's
        outputs.
    :param init_gain: start the mean and diagonal heads Glorot-uniform with this gain and
        zero biases (``None``: PyTorch's default ``Linear`` initialisation).
    :param init_scheme: ``"he_normal"`` starts the mean and diagonal heads He-normal
        (:func:`restart_heads`); the off-diagonal head starts at zero either way.

    Example::

        family = FullCovarianceNormalGuide(feature_dim=200, latent_dim=50)
        q = family(torch.randn(100, 200))  # MultivariateNormal, batch (100,), event (50,)
    """

    #: default of ``off_diagonal_scale``: the strictly lower entries of L are this times the
    #: off-diagonal head's outputs (``experiments/probe_guide_init.py`` measures others)
    OFF_DIAGONAL_SCALE = 0.1
    #: state-dict version: 2 stores ``off_diagonal_scale`` (see :func:`_fill_legacy_scale`)
    _version = 2

    def __init__(self, feature_dim: int, latent_dim: int, *,
                 off_diagonal_scale: float = OFF_DIAGONAL_SCALE,
                 init_gain: float | None = None, init_scheme: str = GLOROT_UNIFORM) -> None:
        super().__init__(feature_dim, latent_dim)
        if not off_diagonal_scale > 0:
            raise ValueError(f"off_diagonal_scale must be positive, got {off_diagonal_scale}")
        # a buffer, so that a checkpoint keeps the meaning of its weights
        self.register_buffer("off_diagonal_scale", torch.tensor(float(off_diagonal_scale)))
        self.loc_head = nn.Linear(feature_dim, latent_dim)
        self.diagonal_head = nn.Linear(feature_dim, latent_dim)
        rows, cols = torch.tril_indices(latent_dim, latent_dim, offset=-1)
        self.register_buffer("tril_rows", rows, persistent=False)
        self.register_buffer("tril_cols", cols, persistent=False)
        self.off_diagonal_head = nn.Linear(feature_dim, rows.numel())
        nn.init.zeros_(self.off_diagonal_head.weight)
        nn.init.zeros_(self.off_diagonal_head.bias)
        restart_heads([self.loc_head, self.diagonal_head], init_gain, init_scheme)

    @classmethod
    def from_config(cls, config: Any, *, feature_dim: int,
                    **context: Any) -> FullCovarianceNormalGuide:
        return cls(feature_dim, config.latent_dim, **head_init(config))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str,
                              local_metadata: dict[str, Any], *args: Any) -> None:
        if _fill_legacy_scale(state_dict, prefix, local_metadata, "off_diagonal_scale", 0.1):
            warnings.warn(
                "a full-covariance guide's state was saved before pyrovae stored its "
                "off_diagonal_scale: loaded with 0.1, the scale of the versions just before "
                "it was stored; checkpoints from versions before the scale existed used 1 "
                "(for one of those, set the buffer off_diagonal_scale to 1 and save it "
                "again)", stacklevel=2)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)

    def z_loc_scale_tril(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean and the Cholesky factor of q(z|x).

        :returns: ``(z_loc, scale_tril)``, shapes ``(..., latent_dim)`` and
            ``(..., latent_dim, latent_dim)``.
        """
        diagonal = F.softplus(self.diagonal_head(h)) + MIN_SCALE
        strictly_lower = h.new_zeros(h.shape[:-1] + (self.latent_dim, self.latent_dim))
        strictly_lower[..., self.tril_rows, self.tril_cols] = (
            self.off_diagonal_scale * self.off_diagonal_head(h))
        return self.loc_head(h), strictly_lower + torch.diag_embed(diagonal)

    def forward(self, h: torch.Tensor) -> dist.Distribution:
        z_loc, scale_tril = self.z_loc_scale_tril(h)
        return dist.MultivariateNormal(z_loc, scale_tril=scale_tril)


class LowRankNormalGuide(GuideFamily):
    """q(z|x) = N(z_loc(h), W(h) W(h)^T + diag d(h)) with a ``rank``-column factor W.

    ``d = z_scale(h)^2`` with the scale of :class:`DiagonalNormalGuide` (``scale_link``:
    ``softplus(linear(h)) + MIN_SCALE`` by default, or ``log d`` a clipped affine function);
    W is ``factor_scale`` (0.1) times a free affine function of h. Costs
    O(latent_dim * rank^2) per density instead of the full covariance's O(latent_dim^3).

    The scale matters for the reason given in :class:`FullCovarianceNormalGuide`: Adam moves
    the factor head's weights by up to ``lr`` per step, mostly on Monte Carlo noise.  Unlike
    the Cholesky entries, W cannot start at zero (W W^T has no gradient there), so the head
    keeps PyTorch's default initialisation and the scale shrinks it.

    :param rank: number of columns of W.
    :param factor_scale: W is this times the factor head's outputs.
    :param init_gain: start the three heads Glorot-uniform with this gain and zero biases
        (``None``: PyTorch's default ``Linear`` initialisation).
    :param init_scheme: ``"he_normal"`` starts the three heads He-normal (:func:`restart_heads`).
    :param scale_link: a key of :data:`SCALE_LINKS`: how the scale head gives sqrt(d).

    Example::

        family = LowRankNormalGuide(feature_dim=200, latent_dim=50, rank=2)
        q = family(torch.randn(100, 200))  # batch (100,), event (50,)

    References:

    1. Rezende, Mohamed, Wierstra (2014). Stochastic Backpropagation and Approximate
       Inference in Deep Generative Models. ICML.
    """

    #: default of ``factor_scale``: W is this times the factor head's outputs
    FACTOR_SCALE = 0.1
    #: state-dict version: 2 stores ``factor_scale`` (see :func:`_fill_legacy_scale`)
    _version = 2

    scale_links = tuple(SCALE_LINKS)

    def __init__(self, feature_dim: int, latent_dim: int, rank: int = 2, *,
                 factor_scale: float = FACTOR_SCALE, init_gain: float | None = None,
                 init_scheme: str = GLOROT_UNIFORM, scale_link: str = "softplus") -> None:
        super().__init__(feature_dim, latent_dim)
        if rank < 1:
            raise ValueError(f"rank must be positive, got {rank}")
        if not factor_scale > 0:
            raise ValueError(f"factor_scale must be positive, got {factor_scale}")
        self.rank = rank
        self.scale_link = _check_scale_link(scale_link)
        self._scale = SCALE_LINKS[scale_link]
        # a buffer, so that a checkpoint keeps the meaning of its weights
        self.register_buffer("factor_scale", torch.tensor(float(factor_scale)))
        self.loc_head = nn.Linear(feature_dim, latent_dim)
        self.scale_head = nn.Linear(feature_dim, latent_dim)
        self.factor_head = nn.Linear(feature_dim, latent_dim * rank)
        restart_heads([self.loc_head, self.scale_head, self.factor_head], init_gain,
                      init_scheme)

    @classmethod
    def from_config(cls, config: Any, *, feature_dim: int, **context: Any) -> LowRankNormalGuide:
        return cls(feature_dim, config.latent_dim, config.rank, **head_init(config),
                   scale_link=getattr(config, "guide_scale", "softplus"))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str,
                              local_metadata: dict[str, Any], *args: Any) -> None:
        # before the scale was stored, W was the head's outputs
        _fill_legacy_scale(state_dict, prefix, local_metadata, "factor_scale", 1.0)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)

    def forward(self, h: torch.Tensor) -> dist.Distribution:
        z_loc = self.loc_head(h)
        cov_factor = (self.factor_scale * self.factor_head(h)).unflatten(
            -1, (self.latent_dim, self.rank))
        cov_diag = self._scale(self.scale_head(h)) ** 2
        return dist.LowRankMultivariateNormal(z_loc, cov_factor, cov_diag)


class IAFGuide(DiagonalNormalGuide):
    """A diagonal Gaussian followed by ``num_flows`` inverse autoregressive flow steps.

        z_0 ~ N(z_loc(h), diag z_scale(h)^2)
        z_t = sigma_t * z_{t-1} + (1 - sigma_t) * m_t,   (m_t, logit sigma_t) = AR_t(z_{t-1}, h)

    Each AR_t is a MADE network on z_{t-1} (autoregressive in z, reversed order in every
    other step) that also sees the encoder features h, as in Kingma et al. (2016); the
    update is their numerically stable gated form. Sampling and scoring one's own samples
    take one parallel pass per step; scoring an arbitrary z (e.g. inside a VampPrior) inverts
    the steps sequentially over the ``latent_dim`` coordinates. The base heads are those of
    :class:`DiagonalNormalGuide`, so ``num_flows=0`` is exactly that guide.

    :param num_flows: number of IAF steps.
    :param hidden_dims: hidden widths of each autoregressive network (default
        ``(3 * latent_dim + 1,)``).
    :param init_gain: the base heads' (:class:`DiagonalNormalGuide`); the autoregressive
        networks keep Pyro's initialisation.
    :param init_scheme: the base heads' (:class:`DiagonalNormalGuide`), not the
        autoregressive networks'.
    :param scale_link: the base's (:class:`DiagonalNormalGuide`).

    Example::

        family = IAFGuide(feature_dim=200, latent_dim=50, num_flows=2)
        q = family(torch.randn(100, 200))  # batch (100,), event (50,)
        z = q.rsample()  # (100, 50); q.log_prob(z) reuses the cached inverse

    References:

    1. Kingma, Salimans, Jozefowicz, Chen, Sutskever, Welling (2016). Improved Variational
       Inference with Inverse Autoregressive Flow. NeurIPS.
    """

    def __init__(self, feature_dim: int, latent_dim: int, num_flows: int = 2,
                 hidden_dims: tuple[int, ...] | None = None, *,
                 init_gain: float | None = None, init_scheme: str = GLOROT_UNIFORM,
                 scale_link: str = "softplus") -> None:
        super().__init__(feature_dim, latent_dim, init_gain=init_gain, init_scheme=init_scheme,
                         scale_link=scale_link)
        if num_flows < 0:
            raise ValueError(f"num_flows must be >= 0, got {num_flows}")
        if num_flows > 0 and latent_dim < 2:
            raise ValueError("the IAF guide needs latent_dim >= 2")
        self.num_flows = num_flows
        hidden = list(hidden_dims) if hidden_dims is not None else [3 * latent_dim + 1]
        forward_order = torch.arange(latent_dim)
        self.flows = nn.ModuleList(
            ConditionalAffineAutoregressive(ConditionalAutoRegressiveNN(
                latent_dim, feature_dim, hidden,
                permutation=forward_order if i % 2 == 0 else forward_order.flip(0)), stable=True)
            for i in range(num_flows)
        )

    @classmethod
    def from_config(cls, config: Any, *, feature_dim: int, **context: Any) -> IAFGuide:
        return cls(feature_dim, config.latent_dim, config.num_flows, **head_init(config),
                   scale_link=getattr(config, "guide_scale", "softplus"))

    def forward(self, h: torch.Tensor) -> dist.Distribution:
        base = super().forward(h)
        if not self.flows:
            return base
        # a fresh conditioned transform per call: its one-entry cache maps each sample to
        # its pre-image, so log q of the guide's own samples needs no inversion
        return dist.TransformedDistribution(base, [flow.condition(h) for flow in self.flows])


#: guide families selectable by name from the CLI and config
GUIDES: dict[str, type[GuideFamily]] = {
    "diagonal": DiagonalNormalGuide,
    "fullcov": FullCovarianceNormalGuide,
    "lowrank": LowRankNormalGuide,
    "iaf": IAFGuide,
}
