"""Priors p(z): each is a ``PyroModule`` whose ``forward`` returns a distribution over z.

Contract: ``prior(posterior)`` returns a distribution with ``batch_shape == ()`` and
``event_shape == (latent_dim,)``; the model's data plate broadcasts it over data points.
``posterior`` is the VAE's amortized q(z|x) as a function ``x -> Distribution``; most
priors ignore it, priors built from the encoder (:class:`VampPrior`) use it.
:meth:`Prior.init_from_data` is called once by :func:`~pyrovae.train.fit` before the first
step, for priors that start from data; the others ignore it.

A new prior is one class here plus one entry in :data:`PRIORS`.

References:

1. Tomczak, Welling (2018). VAE with a VampPrior. AISTATS.
2. Papamakarios, Pavlakou, Murray (2017). Masked Autoregressive Flow for Density
   Estimation. NeurIPS.
3. Chen, Kingma, Salimans, Duan, Dhariwal, Schulman, Sutskever, Abbeel (2017).
   Variational Lossy Autoencoder. ICLR.
"""

from __future__ import annotations

import gc
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyro.distributions as dist
import torch
import torch.utils.checkpoint
from pyro.distributions import constraints
from pyro.distributions.transforms import AffineAutoregressive
from pyro.nn import AutoRegressiveNN, PyroParam
from torch import nn
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from pyrovae.errors import ConfigError
from pyrovae.registration import LeanPyroModule

Posterior = Callable[[torch.Tensor], dist.Distribution]
#: ``(start, stop) -> `` the mixture components ``start:stop``, batch shape ``(stop - start,)``
ComponentChunks = Callable[[int, int], dist.Distribution]

#: bytes of autograd graph one chunk of elementwise-scored mixture components may keep
LOG_PROB_CHUNK_BYTES = 2**28


class Prior(LeanPyroModule):
    """Base class of priors over a ``latent_dim``-dimensional z."""

    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        if latent_dim < 1:
            raise ValueError(f"latent_dim must be positive, got {latent_dim}")
        self.latent_dim = latent_dim

    @classmethod
    def from_config(cls, config: Any, **context: Any) -> Prior:
        """Build the prior from a :class:`~pyrovae.config.TrainConfig`."""
        return cls(config.latent_dim)

    def forward(self, posterior: Posterior | None = None) -> dist.Distribution:
        """:returns: p(z), ``batch_shape == ()``, ``event_shape == (latent_dim,)``."""
        raise NotImplementedError

    def init_from_data(self, x: torch.Tensor) -> None:
        """Data-dependent initialisation before training, from data ``(N, data_dim)``.

        Does nothing by default; must leave an already initialised prior unchanged, so that
        a reloaded model that trains on keeps what it learned.
        """


class StandardNormalPrior(Prior):
    """p(z) = N(0, I).

    Example::

        prior = StandardNormalPrior(latent_dim=50)
        prior().log_prob(torch.zeros(50))  # -50/2 log(2 pi) nats
    """

    def __init__(self, latent_dim: int) -> None:
        super().__init__(latent_dim)
        # buffers, so that .to(device) moves them and state_dict round-trips
        self.register_buffer("loc", torch.zeros(latent_dim))
        self.register_buffer("scale", torch.ones(latent_dim))

    def forward(self, posterior: Posterior | None = None) -> dist.Distribution:
        return dist.Normal(self.loc, self.scale).to_event(1)


class DiagonalNormalPrior(Prior):
    """p(z) = N(m, diag s^2) with learnable m and s, initialised at N(0, I).

    Example::

        prior = DiagonalNormalPrior(latent_dim=50)
    """

    def __init__(self, latent_dim: int) -> None:
        super().__init__(latent_dim)
        self.loc = PyroParam(torch.zeros(latent_dim), event_dim=1)
        self.scale = PyroParam(torch.ones(latent_dim), constraint=constraints.positive, event_dim=1)

    def forward(self, posterior: Posterior | None = None) -> dist.Distribution:
        return dist.Normal(self.loc, self.scale).to_event(1)


def diagonal_normal_components(components: dist.Distribution
                               ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(loc, scale)``, each ``(K, latent_dim)``, of diagonal-Normal mixture components.

    The components qualify when they are ``Normal(loc, scale).to_event(1)`` with batch shape
    ``(K,)``, or that broadcast over leading batch dimensions (the data plate's ``expand``
    gives batch ``(N, K)`` with stride-0 parameters); ``None`` for every other family (full
    or low-rank covariance, flows) and for genuinely batched components.
    """
    if not (isinstance(components, torch.distributions.Independent)
            and components.reinterpreted_batch_ndims == 1
            and type(components.base_dist) in (torch.distributions.Normal, dist.Normal)):
        return None
    loc, scale = components.base_dist.loc, components.base_dist.scale
    for _ in range(len(components.batch_shape) - 1):
        if not all(t.shape[0] == 1 or t.stride(0) == 0 for t in (loc, scale)):
            return None
        loc, scale = loc[0], scale[0]
    return loc, scale


def _diagonal_normal_log_densities(value: torch.Tensor, loc: torch.Tensor,
                                   scale: torch.Tensor) -> torch.Tensor:
    """log N(z; m_k, diag s_k^2) for every component k, as one matrix product.

    sum_d (z_d - m_kd)^2 / s_kd^2 = z^2 . (1/s_k^2) - 2 z . (m_k/s_k^2) + sum_d m_kd^2/s_kd^2,

    so all K densities are ``[z^2, z, 1] @ [-1/(2 s^2), m/s^2, c]^T`` with a per-component
    constant c: one GEMM, and O(K) memory per z, where the elementwise path builds
    ``(..., K, latent_dim)`` intermediates.

    The expansion subtracts large terms (z^2/s^2 ~ 1e4 per coordinate at s = 0.02) for the
    nearby components that dominate the mixture, which float32 gets wrong by ~1e-3 nats: the
    product and its constants are formed in float64 and the result cast back
    (``tests/test_priors.py`` checks the float32 accuracy).

    :param value: z, ``(..., latent_dim)``.
    :param loc: m, ``(K, latent_dim)``.
    :param scale: s, ``(K, latent_dim)``, positive.
    :returns: ``(..., K)`` log densities in nats, differentiable in z, m and s.
    """
    dtype = torch.promote_types(value.dtype, loc.dtype)
    z, m, s = value.double(), loc.double(), scale.double()
    precision = s.reciprocal().square()
    constant = (-0.5 * (m.square() * precision).sum(-1) - s.log().sum(-1)
                - 0.5 * m.shape[-1] * math.log(2 * math.pi))
    features = torch.cat([z.square(), z, torch.ones_like(z[..., :1])], dim=-1)
    coefficients = torch.cat([-0.5 * precision, m * precision, constant[:, None]], dim=-1)
    return (features @ coefficients.T).to(dtype)


def available_memory_bytes(device: torch.device | str = "cpu") -> int | None:
    """Memory free for new tensors on ``device``: the GPU's free memory, or the host's
    ``MemAvailable``; ``None`` where it cannot be read."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _component_family(components: dist.Distribution) -> str:
    """A name for the family of mixture components, for messages."""
    if diagonal_normal_components(components) is not None:
        return "diagonal-Normal"
    base = components
    while isinstance(base, torch.distributions.Independent):
        base = base.base_dist
    if isinstance(base, torch.distributions.TransformedDistribution):
        return f"{len(base.transforms)}-step flow"
    if isinstance(base, torch.distributions.LowRankMultivariateNormal):
        return "low-rank Normal"
    if isinstance(base, torch.distributions.MultivariateNormal):
        return "full-covariance Normal"
    return type(base).__name__


def _gigabytes(num_bytes: float) -> str:
    return f"{num_bytes / 1e9:.2g} GB"


@dataclass(frozen=True)
class LogProbCost:
    """What one ``log_prob`` of a mixture prior costs for a batch of z.

    :ivar family: the components' family, e.g. ``"2-step flow"``.
    :ivar num_components: K.
    :ivar num_values: z scored (the product of the batch shape).
    :ivar chunk_size: components scored at once.
    :ivar flops: floating-point operations of the matrix products of one forward pass; a
        training step adds its backward pass (about twice that) and, where the components
        are chunked, one more forward pass that rebuilds each chunk's graph.
    :ivar peak_bytes: memory of the scoring, with its autograd graph when ``requires_grad``
        (one chunk's graph at a time, plus the ``num_values x K`` densities).
    :ivar unchunked_bytes: what scoring all K components at once would keep.
    :ivar minimum_bytes: the least memory it can be done in, one component at a time.
    """

    family: str
    num_components: int
    num_values: int
    chunk_size: int
    flops: float
    peak_bytes: float
    unchunked_bytes: float
    minimum_bytes: float

    def describe(self) -> str:
        """One line: the combination, its memory and its arithmetic."""
        return (f"log p(z) under {self.num_components} {self.family} mixture components "
                f"for {self.num_values} z: about {_gigabytes(self.peak_bytes)} in chunks of "
                f"{self.chunk_size} components ({_gigabytes(self.unchunked_bytes)} at once) "
                f"and {self.flops / 1e9:.3g} GFLOP per forward pass")


def _measure_component_cost(components: dist.Distribution) -> tuple[float, float]:
    """``(bytes, flops)`` per (z, component) pair of scoring one z against one component.

    Scores 2 and 6 values against the first component with autograd on, counting the
    storage that autograd saves for backward and the flops of the matrix products; the
    difference over 4 pairs cancels what does not grow with the pairs (the weights).

    :param components: one component, batch shape ``(1,)``.
    """
    event_shape = components.event_shape
    tensors = _distribution_tensors(components)
    dtype = tensors[0].dtype if tensors else torch.get_default_dtype()
    device = tensors[0].device if tensors else torch.device("cpu")
    measured = []
    for num_values in (2, 6):
        storages: dict[int, int] = {}

        def pack(tensor: torch.Tensor, storages: dict[int, int] = storages) -> torch.Tensor:
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
            return tensor

        value = torch.zeros((num_values, 1, *event_shape), dtype=dtype, device=device,
                            requires_grad=True)
        counter = FlopCounterMode(display=False)
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                counter:
            components.log_prob(value.expand(num_values, 1, *event_shape))
        measured.append((sum(storages.values()), counter.get_total_flops()))
    (bytes_2, flops_2), (bytes_6, flops_6) = measured
    return max(bytes_6 - bytes_2, 0) / 4, max(flops_6 - flops_2, 0) / 4


def _distribution_tensors(distribution: Any) -> list[torch.Tensor]:
    """The floating-point tensors among a distribution's attributes (and its base's)."""
    found = []
    while distribution is not None:
        found += [v for v in vars(distribution).values()
                  if isinstance(v, torch.Tensor) and v.is_floating_point()]
        distribution = getattr(distribution, "base_dist", None)
    return found


class _BroadcastingMixture(dist.MixtureSameFamily):
    """``MixtureSameFamily`` with a ``log_prob`` for components that cannot broadcast, a
    fast one for diagonal-Normal components, and bounded memory for the others.

    Diagonal-Normal components (the mixture-of-Gaussians prior, the VampPrior with the
    diagonal guide) are scored by :func:`_diagonal_normal_log_densities`, a matrix product.
    Every other family is scored elementwise: the value ``(..., 1, latent_dim)`` is expanded
    against the components (conditional flows, such as the IAF guide as a VampPrior
    component, cannot broadcast a size-1 dimension against their ``(K, context_dim)``
    context).  Given ``component_chunks``, components whose graph exceeds ``chunk_bytes`` are
    scored a chunk at a time with a running logsumexp, each chunk under activation
    checkpointing when autograd is on (its graph is rebuilt in the backward pass, one more
    forward pass of arithmetic), so memory holds one chunk's graph (at most ``chunk_bytes``,
    or one component's) instead of K of them: scoring a flow inverts it one coordinate at a
    time, and its graph for every z against every component does not fit in memory at
    VampPrior sizes.  All paths give the stock shape, ``broadcast(value batch shape,
    batch_shape)``.

    :param component_chunks: ``(start, stop) ->`` components ``start:stop`` (batch shape
        ``(stop - start,)``), the same distributions as ``component_distribution``.
    :param chunk_bytes: the autograd graph one chunk may keep.
    :param cost_cache: a dict that keeps the measured per-pair cost between calls.
    """

    def __init__(self, mixture_distribution: dist.Categorical,
                 component_distribution: dist.Distribution, *,
                 component_chunks: ComponentChunks | None = None,
                 chunk_bytes: int = LOG_PROB_CHUNK_BYTES,
                 cost_cache: dict[Any, tuple[float, float]] | None = None,
                 validate_args: bool | None = None) -> None:
        self._component_chunks = component_chunks
        self._chunk_bytes = chunk_bytes
        self._cost_cache = cost_cache if cost_cache is not None else {}
        super().__init__(mixture_distribution, component_distribution, validate_args)

    def expand(self, batch_shape: torch.Size, _instance: Any = None) -> _BroadcastingMixture:
        new = self._get_checked_instance(_BroadcastingMixture, _instance)
        new._component_chunks = self._component_chunks
        new._chunk_bytes = self._chunk_bytes
        new._cost_cache = self._cost_cache
        return super().expand(batch_shape, _instance=new)

    def _pair_cost(self) -> tuple[float, float]:
        """``(bytes, flops)`` of one (z, component) pair, measured once per family and dtype."""
        components = self.component_distribution
        reference = _distribution_tensors(components)
        key = (_component_family(components), tuple(components.event_shape),
               tuple((t.dtype, t.device.type) for t in reference[:1]))
        if key not in self._cost_cache:
            self._cost_cache[key] = _measure_component_cost(self._component_chunks(0, 1))
        return self._cost_cache[key]

    def _values_per_component(self, value_batch_shape: tuple[int, ...]) -> int:
        return math.prod(torch.broadcast_shapes(tuple(value_batch_shape), self.batch_shape))

    def chunk_size(self, value_batch_shape: tuple[int, ...]) -> int:
        """Components scored at once for z of batch shape ``value_batch_shape``."""
        if self._component_chunks is None:
            return self._num_component
        pair_bytes, _ = self._pair_cost()
        per_component = self._values_per_component(value_batch_shape) * max(pair_bytes, 1.0)
        return int(min(self._num_component, max(1, self._chunk_bytes // per_component)))

    def log_prob_cost(self, value_batch_shape: tuple[int, ...], *,
                      requires_grad: bool = True) -> LogProbCost:
        """The cost of ``log_prob`` on z of batch shape ``value_batch_shape``.

        :param value_batch_shape: e.g. ``(batch_size,)`` or ``(num_particles, batch_size)``.
        :param requires_grad: whether the autograd graph is kept (training) or not.
        :returns: a :class:`LogProbCost`.
        """
        num_values = self._values_per_component(value_batch_shape)
        pairs = num_values * self._num_component
        itemsize = torch.finfo(self.mixture_distribution.logits.dtype).bits // 8
        # the densities, their weighted copies and the running logsumexp
        densities = 3 * pairs * itemsize
        diagonal = diagonal_normal_components(self.component_distribution)
        if diagonal is not None:
            latent_dim = diagonal[0].shape[-1]
            # float64 features and products: (values, 2 L + 1) and (values, K)
            unchunked = 8 * (num_values * (2 * latent_dim + 1) + 2 * pairs) + densities
            return LogProbCost(_component_family(self.component_distribution),
                               self._num_component, num_values, self._num_component,
                               2.0 * pairs * (2 * latent_dim + 1), unchunked, unchunked,
                               unchunked)
        if self._component_chunks is None:
            raise ValueError("the cost of this mixture's log_prob is known only for "
                             "diagonal-Normal components or chunked components")
        pair_bytes, pair_flops = self._pair_cost()
        chunk = self.chunk_size(value_batch_shape)
        # without a graph the chunk's intermediates are transient: a fraction of its graph
        component_bytes = num_values * pair_bytes * (1.0 if requires_grad else 0.25)
        return LogProbCost(_component_family(self.component_distribution),
                           self._num_component, num_values, chunk, pair_flops * pairs,
                           chunk * component_bytes + densities, pairs * pair_bytes + densities,
                           component_bytes + densities)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        log_weights = torch.log_softmax(self.mixture_distribution.logits, dim=-1)
        diagonal = diagonal_normal_components(self.component_distribution)
        if diagonal is not None:
            # (..., K) from value (..., latent_dim); broadcasts against the log weights'
            # batch below to the same shape as the elementwise path
            log_prob = _diagonal_normal_log_densities(value, *diagonal)
            return torch.logsumexp(log_prob + log_weights, dim=-1)
        value = self._pad(value)  # (..., 1, latent_dim)
        event_shape = self.event_shape
        value_batch = value.shape[: value.dim() - len(event_shape)]
        if self._component_chunks is None:
            batch_shape = torch.broadcast_shapes(value_batch,
                                                 self.component_distribution.batch_shape)
            log_prob = self.component_distribution.log_prob(
                value.expand(batch_shape + event_shape))
            return torch.logsumexp(log_prob + log_weights, dim=-1)
        leading = torch.broadcast_shapes(value_batch[:-1], self.batch_shape)

        def chunk_log_prob(value: torch.Tensor, start: int, stop: int) -> torch.Tensor:
            # Pyro's autoregressive transforms sit in reference cycles (they keep bound
            # methods of themselves) with the tensors they cache: collecting the young
            # generations frees the previous chunk's (in the backward pass, its recomputed
            # graph), which would otherwise live until the next full collection
            gc.collect(1)
            components = self._component_chunks(start, stop)
            log_prob = components.log_prob(value.expand(leading + (stop - start,) + event_shape))
            return torch.logsumexp(log_prob + log_weights[..., start:stop], dim=-1)

        chunk = self.chunk_size(tuple(value_batch[:-1]))
        # all components in one chunk fit the budget: no recomputation needed
        checkpoint = torch.is_grad_enabled() and chunk < self._num_component
        total = None
        for start in range(0, self._num_component, chunk):
            stop = min(start + chunk, self._num_component)
            if checkpoint:
                # keep only the chunk's inputs; backward recomputes its graph
                part = torch.utils.checkpoint.checkpoint(chunk_log_prob, value, start, stop,
                                                         use_reentrant=False,
                                                         preserve_rng_state=False)
            else:
                part = chunk_log_prob(value, start, stop)
            total = part if total is None else torch.logaddexp(total, part)
        return total


class MixtureOfGaussiansPrior(Prior):
    """p(z) = sum_k pi_k N(z; m_k, diag s_k^2) with learnable pi, m and s.

    Initialised with equal weights, unit scales and means drawn from N(0, I), so that the
    components start apart. With ``num_components=1`` it is :class:`DiagonalNormalPrior`.

    :param latent_dim: size of z.
    :param num_components: K, the number of Gaussian components.

    Example::

        prior = MixtureOfGaussiansPrior(latent_dim=50, num_components=10)
        prior().log_prob(torch.zeros(3, 50))  # (3,) nats
    """

    def __init__(self, latent_dim: int, num_components: int = 10) -> None:
        super().__init__(latent_dim)
        if num_components < 1:
            raise ValueError(f"num_components must be positive, got {num_components}")
        self.num_components = num_components
        self.logits = PyroParam(torch.zeros(num_components), event_dim=1)
        self.locs = PyroParam(torch.randn(num_components, latent_dim), event_dim=2)
        self.scales = PyroParam(torch.ones(num_components, latent_dim),
                                constraint=constraints.positive, event_dim=2)

    @classmethod
    def from_config(cls, config: Any, **context: Any) -> MixtureOfGaussiansPrior:
        return cls(config.latent_dim, config.num_components)

    def forward(self, posterior: Posterior | None = None) -> dist.Distribution:
        components = dist.Normal(self.locs, self.scales).to_event(1)
        return _BroadcastingMixture(dist.Categorical(logits=self.logits), components)


#: how the VampPrior's parameters map to its pseudo-inputs (:class:`VampPrior`), each link
#: with the name of the parameter it keeps (its own, so that a checkpoint of one link does
#: not load into another)
PSEUDO_INPUT_PARAMETERS = {"identity": "pseudo_inputs", "sigmoid": "pseudo_input_logits",
                           "hardtanh": "pseudo_inputs_unclipped"}
PSEUDO_INPUT_LINKS = tuple(PSEUDO_INPUT_PARAMETERS)
#: the sigmoid link's initial logits, N(mean, std^2): the VampPrior authors' command-line
#: defaults (``pseudoinputs_mean``, ``pseudoinputs_std`` in jmtomczak/vae_vampprior)
SIGMOID_LOGIT_MEAN, SIGMOID_LOGIT_STD = -0.05, 0.01
#: the hardtanh link's initial values, N(mean, std^2): dark images, the start the VampPrior
#: authors' loaders set for binary MNIST (``load_static_mnist``), inside [0, 1] where the
#: clip passes gradients
HARDTANH_START_MEAN, HARDTANH_START_STD = 0.05, 0.01
#: data points started through the sigmoid link are clamped to [c, 1 - c] first
SIGMOID_DATA_CLAMP = 1e-3


class VampPrior(Prior):
    """The variational mixture of posteriors: p(z) = (1/K) sum_k q(z | u_k).

    The u_k are K learnable pseudo-inputs in data space, pushed through the VAE's own
    encoder and guide (the ``posterior`` the VAE passes in), so the prior follows whatever
    guide family the VAE uses. Scoring a batch costs K guide densities per z. With the
    diagonal guide they are one matrix product (memory ``num_samples * batch_size * K``);
    with the other guides they are evaluated elementwise, a chunk of components at a time
    (at most ``chunk_bytes`` of autograd graph per chunk, recomputed in the backward pass).
    With the IAF guide each of those densities inverts the flows, ``latent_dim``
    sequential passes per flow step, so its arithmetic grows as K times that of the guide's
    own density: :meth:`log_prob_cost` says what a batch costs, and :meth:`check_fits`
    refuses a combination that cannot fit in memory.

    :param latent_dim: size of z.
    :param data_dim: size of a flattened data point; the pseudo-inputs are ``(K, data_dim)``.
    :param num_components: K, the number of pseudo-inputs.
    :param pseudo_inputs_from_data: whether :meth:`init_from_data` sets the pseudo-inputs to
        K random training points (otherwise they keep their initial values: uniform(0, 1),
        with the sigmoid link logits from N(-0.05, 0.01), grey images near 0.49, with the
        hardtanh link values from N(0.05, 0.01), dark images).
    :param pseudo_input_link: ``"identity"``: the parameter ``pseudo_inputs`` is the
        pseudo-inputs themselves, free to leave the data's range; ``"sigmoid"``: the parameter
        ``pseudo_input_logits`` holds their logits and the pseudo-inputs are its sigmoid,
        inside (0, 1) like binary data's means (a sigmoid layer on an identity input, as an
        earlier version of the VampPrior authors' code has it); ``"hardtanh"``: the
        parameter ``pseudo_inputs_unclipped`` clipped to [0, 1], with no gradient where it
        lies outside (``Hardtanh(0, 1)`` on an identity input, the authors' final code).
        Each link's parameter has its own name, so that a checkpoint of one link does not
        load into another.  :meth:`inputs` gives the pseudo-inputs whichever the link.
    :param chunk_bytes: autograd graph that one chunk of elementwise-scored components may
        keep.

    Example::

        prior = VampPrior(latent_dim=50, data_dim=784, num_components=500)
        prior.init_pseudo_inputs(x_train)
        vae = VAE(encoder, decoder, prior, likelihood, guide)  # vae.prior(vae.posterior) is p(z)
        print(prior.log_prob_cost(vae.posterior, (100,)).describe())

    References:

    1. Tomczak, Welling (2018). VAE with a VampPrior. AISTATS.
    """

    def __init__(self, latent_dim: int, data_dim: int, num_components: int = 10,
                 pseudo_inputs_from_data: bool = True, *,
                 pseudo_input_link: str = "identity",
                 chunk_bytes: int = LOG_PROB_CHUNK_BYTES) -> None:
        super().__init__(latent_dim)
        if num_components < 1:
            raise ValueError(f"num_components must be positive, got {num_components}")
        if pseudo_input_link not in PSEUDO_INPUT_LINKS:
            raise ValueError(f"pseudo_input_link must be one of {', '.join(PSEUDO_INPUT_LINKS)}, "
                             f"got {pseudo_input_link!r}")
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
        self.num_components = num_components
        self.chunk_bytes = chunk_bytes
        # per-pair cost of scoring a z against a component, measured once per family
        self._cost_cache: dict[Any, tuple[float, float]] = {}
        self.data_dim = data_dim
        self.pseudo_inputs_from_data = pseudo_inputs_from_data
        self.pseudo_input_link = pseudo_input_link
        shape = (num_components, data_dim)
        if pseudo_input_link == "sigmoid":
            start = SIGMOID_LOGIT_MEAN + SIGMOID_LOGIT_STD * torch.randn(shape)
        elif pseudo_input_link == "hardtanh":
            start = HARDTANH_START_MEAN + HARDTANH_START_STD * torch.randn(shape)
        else:
            start = torch.rand(shape)
        setattr(self, PSEUDO_INPUT_PARAMETERS[pseudo_input_link], nn.Parameter(start))
        # a buffer, so that a reloaded checkpoint remembers and is not re-initialised
        self.register_buffer("initialized_from_data", torch.tensor(False))

    @classmethod
    def from_config(cls, config: Any, *, data_dim: int, **context: Any) -> VampPrior:
        return cls(config.latent_dim, data_dim, config.num_components,
                   config.pseudo_inputs_from_data, pseudo_input_link=config.pseudo_input_link)

    def inputs(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The pseudo-inputs ``start:stop`` in data space, ``(stop - start, data_dim)``."""
        free = self._free_parameter()[start:stop]
        if self.pseudo_input_link == "sigmoid":
            return torch.sigmoid(free)
        if self.pseudo_input_link == "hardtanh":
            return F.hardtanh(free, 0.0, 1.0)
        return free

    def _free_parameter(self) -> nn.Parameter:
        """The parameter the pseudo-inputs are made from (themselves, their logits, or their
        values before the clip)."""
        return getattr(self, PSEUDO_INPUT_PARAMETERS[self.pseudo_input_link])

    @torch.no_grad()
    def init_pseudo_inputs(self, x: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Set the pseudo-inputs to K data points drawn from ``x`` ``(N, data_dim)``.

        Without replacement when ``N >= K``, with replacement otherwise.
        """
        if x.dim() != 2 or x.shape[1] != self.data_dim:
            raise ValueError(f"expected data of shape (N, {self.data_dim}), got {tuple(x.shape)}")
        if x.shape[0] >= self.num_components:
            index = torch.randperm(x.shape[0], generator=generator)[: self.num_components]
        else:
            index = torch.randint(x.shape[0], (self.num_components,), generator=generator)
        chosen = x[index.to(x.device)]
        if self.pseudo_input_link != "identity" and bool(((chosen < 0) | (chosen > 1)).any()):
            raise ValueError(f"the {self.pseudo_input_link} link keeps pseudo-inputs inside "
                             "[0, 1], and these data points lie outside [0, 1]: use "
                             "pseudo_input_link='identity'")
        if self.pseudo_input_link == "sigmoid":  # logits of the points, kept finite
            chosen = torch.logit(chosen.clamp(SIGMOID_DATA_CLAMP, 1 - SIGMOID_DATA_CLAMP))
        self._free_parameter().copy_(chosen)
        self.initialized_from_data.fill_(True)

    def init_from_data(self, x: torch.Tensor) -> None:
        if self.pseudo_inputs_from_data and not bool(self.initialized_from_data):
            self.init_pseudo_inputs(x)

    def forward(self, posterior: Posterior | None = None) -> dist.Distribution:
        if posterior is None:
            raise ValueError("the VampPrior needs the VAE's posterior q(z|x) to build p(z)")
        components = posterior(self.inputs())  # batch (K,), event (latent_dim,)
        free = self._free_parameter()
        logits = torch.zeros(self.num_components, dtype=free.dtype, device=free.device)

        def component_chunks(start: int, stop: int) -> dist.Distribution:
            return posterior(self.inputs(start, stop))

        return _BroadcastingMixture(dist.Categorical(logits=logits), components,
                                    component_chunks=component_chunks,
                                    chunk_bytes=self.chunk_bytes, cost_cache=self._cost_cache)

    def log_prob_cost(self, posterior: Posterior, batch_shape: tuple[int, ...], *,
                      requires_grad: bool = True) -> LogProbCost:
        """What ``log_prob`` of z with batch shape ``batch_shape`` costs in memory and flops.

        :param posterior: the VAE's q(z|x), as for :meth:`forward`.
        :param batch_shape: e.g. ``(batch_size,)``, or ``(num_particles, batch_size)`` for
            vectorized particles.
        :param requires_grad: a training step (the graph is kept) or an evaluation.
        :returns: a :class:`LogProbCost`.
        """
        with torch.no_grad():
            return self(posterior).log_prob_cost(tuple(batch_shape), requires_grad=requires_grad)

    def check_fits(self, posterior: Posterior, batch_shape: tuple[int, ...], *,
                   requires_grad: bool = True, available_bytes: int | None = None,
                   device: torch.device | str | None = None) -> LogProbCost:
        """Raise :class:`~pyrovae.errors.ConfigError` (one line) if scoring cannot fit in memory.

        Refuses when even one component at a time would not fit; where only the default
        chunks would not, lowers :attr:`chunk_bytes` to half the memory available.

        :param posterior: the VAE's q(z|x).
        :param batch_shape: the batch shape of the z scored at once.
        :param requires_grad: a training step or an evaluation.
        :param available_bytes: the memory to fit in; by default what ``device`` (that of
            the pseudo-inputs) has free.
        :param device: where the scoring runs.
        :returns: the :class:`LogProbCost` it will run at, for the caller to report.
        """
        cost = self.log_prob_cost(posterior, batch_shape, requires_grad=requires_grad)
        if available_bytes is None:
            available_bytes = available_memory_bytes(device or self._free_parameter().device)
        if available_bytes is None or cost.peak_bytes <= available_bytes:
            return cost
        if cost.minimum_bytes > available_bytes:
            raise ConfigError(
                f"the VampPrior with {cost.num_components} pseudo-inputs and "
                f"{cost.family} posteriors cannot score a batch of {cost.num_values} z in "
                f"memory: about {_gigabytes(cost.minimum_bytes)} even one component at a "
                f"time, {_gigabytes(available_bytes)} available "
                f"({cost.flops / 1e9:.3g} GFLOP per pass); use fewer components, a smaller "
                f"batch or the diagonal guide")
        self.chunk_bytes = max(1, available_bytes // 2)
        return self.log_prob_cost(posterior, batch_shape, requires_grad=requires_grad)


def _identity_at_init(arn: AutoRegressiveNN) -> AutoRegressiveNN:
    # zero output layer: shift 0 and log-scale 0, so that a new flow is the identity map
    final = arn.layers[-1]
    nn.init.zeros_(final.weight)
    nn.init.zeros_(final.bias)
    return arn


class FlowPrior(Prior):
    """p(z): N(0, I) pushed through ``num_flows`` masked autoregressive affine transforms.

    In the density direction each step maps u_i = mu_i(z_<i) + sigma_i(z_<i) z_i with a MADE
    network, so log p(z) takes one parallel pass per step (the MAF direction); sampling is
    sequential over the ``latent_dim`` coordinates, which only
    :meth:`~pyrovae.models.VAE.sample` does.
    Consecutive steps reverse the coordinate order. Every step starts as the identity, so
    the prior starts at N(0, I).

    :param latent_dim: size of z; at least 2 (an autoregressive net on one coordinate is
        a plain affine map).
    :param num_flows: number of autoregressive steps; 0 gives N(0, I).
    :param hidden_dims: hidden widths of each autoregressive network (default
        ``(3 * latent_dim + 1,)``).

    Example::

        prior = FlowPrior(latent_dim=50, num_flows=4)
        prior().log_prob(torch.zeros(50))

    References:

    1. Papamakarios, Pavlakou, Murray (2017). Masked Autoregressive Flow for Density
       Estimation. NeurIPS.
    2. Chen et al. (2017). Variational Lossy Autoencoder. ICLR (autoregressive flow prior).
    """

    def __init__(self, latent_dim: int, num_flows: int = 2,
                 hidden_dims: tuple[int, ...] | None = None) -> None:
        super().__init__(latent_dim)
        if num_flows < 0:
            raise ValueError(f"num_flows must be >= 0, got {num_flows}")
        if num_flows > 0 and latent_dim < 2:
            raise ValueError("the flow prior needs latent_dim >= 2")
        self.num_flows = num_flows
        hidden = list(hidden_dims) if hidden_dims is not None else [3 * latent_dim + 1]
        forward_order = torch.arange(latent_dim)
        self.flows = nn.ModuleList(
            AffineAutoregressive(_identity_at_init(AutoRegressiveNN(
                latent_dim, hidden,
                permutation=forward_order if i % 2 == 0 else forward_order.flip(0))))
            for i in range(num_flows)
        )
        self.register_buffer("loc", torch.zeros(latent_dim))
        self.register_buffer("scale", torch.ones(latent_dim))

    @classmethod
    def from_config(cls, config: Any, **context: Any) -> FlowPrior:
        return cls(config.latent_dim, config.prior_flows)

    def forward(self, posterior: Posterior | None = None) -> dist.Distribution:
        base = dist.Normal(self.loc, self.scale).to_event(1)
        if not self.flows:
            return base
        # .inv: the autoregressive transforms' cheap direction z -> u scores densities
        return dist.TransformedDistribution(base, [flow.inv for flow in self.flows])


#: priors selectable by name from the CLI and config
PRIORS: dict[str, type[Prior]] = {
    "normal": StandardNormalPrior,
    "diagonal": DiagonalNormalPrior,
    "mog": MixtureOfGaussiansPrior,
    "vamp": VampPrior,
    "flow": FlowPrior,
}
