"""The :class:`VAE`: a Pyro model and an amortized Pyro guide composed from parts.

::

    model:  z ~ p(z)                       (site "z", inside plate "data")
            x ~ p(x | decoder(z))          (site "x", observed)
    guide:  z ~ q(z | encoder(x))          (site "z", inside plate "data")

Every part is an object passed in, so priors, likelihoods, guides and networks swap
without subclassing.  The :class:`HierarchicalVAE` stacks L latent layers z1, ..., zL the
same way, each conditional prior and guide layer a part (:mod:`pyrovae.layers`).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import pyro_method
from torch import nn

from pyrovae import sites
from pyrovae.devices import module_device
from pyrovae.errors import ConfigError
from pyrovae.guides import GuideFamily
from pyrovae.likelihoods import Likelihood
from pyrovae.priors import Prior
from pyrovae.registration import LeanPyroModule
from pyrovae.sites import DATA_PLATE, LATENT_SITE, OBSERVED_SITE, layer_site
from pyrovae.validation import check_data

_instance_counter = itertools.count()


def _unique_name() -> str:
    # Pyro keys parameters by name in a global store; a distinct root name per VAE keeps
    # two VAEs in one process from sharing (and overwriting) each other's parameters.
    index = next(_instance_counter)
    return "vae" if index == 0 else f"vae_{index}"


class VAE(LeanPyroModule):
    """A variational autoencoder as a Pyro model/guide pair.

    :param encoder: ``nn.Module`` mapping x ``(..., data_dim)`` to features ``(..., feature_dim)``.
    :param decoder: ``nn.Module`` mapping z ``(..., latent_dim)`` to likelihood parameters
        ``(..., data_dim)``.
    :param prior: a :class:`~pyrovae.priors.Prior`.
    :param likelihood: a :class:`~pyrovae.likelihoods.Likelihood`.
    :param guide: a :class:`~pyrovae.guides.GuideFamily` mapping features to q(z|x).
    :param data_dim: size of a flattened data point; read from ``decoder.data_dim`` if omitted.
    :param name: root name of the Pyro parameters; unique per instance by default.

    Example::

        vae = VAE(
            encoder=MLPEncoder(784, (200, 200)),
            decoder=MLPDecoder(50, 784, (200, 200)),
            prior=StandardNormalPrior(50),
            likelihood=BernoulliLikelihood(),
            guide=DiagonalNormalGuide(200, 50),
        )
        svi = pyro.infer.SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}),
                             pyro.infer.Trace_ELBO())
        svi.step(x)  # x: (N, 784) binary
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module, prior: Prior,
                 likelihood: Likelihood, guide: GuideFamily, *, data_dim: int | None = None,
                 name: str | None = None) -> None:
        super().__init__(name or _unique_name())
        self.encoder = encoder
        self.decoder = decoder
        self.prior = prior
        self.likelihood = likelihood
        self.guide_family = guide
        self.data_dim = data_dim if data_dim is not None else getattr(decoder, "data_dim", None)
        self.latent_dim = prior.latent_dim
        if guide.latent_dim != prior.latent_dim:
            raise ConfigError(
                f"the guide's latent_dim ({guide.latent_dim}) differs from the prior's "
                f"({prior.latent_dim})"
            )
        # checked here, or the first step fails inside the guide's first layer
        feature_dim = getattr(encoder, "feature_dim", None)
        if feature_dim is not None and feature_dim != guide.feature_dim:
            raise ConfigError(
                f"the guide takes features of width {guide.feature_dim} but the encoder "
                f"gives {feature_dim}: build the guide with feature_dim={feature_dim}"
            )

    @pyro_method
    def model(self, x: torch.Tensor) -> None:
        """The generative model p(x, z) = p(z) p(x|z), conditioned on ``x`` of shape ``(N, D)``."""
        # the networks are read outside the plate: their parameters are global, so their
        # param messages belong to no data point
        prior, decoder, likelihood = self.prior(self.posterior), self.decoder, self.likelihood
        with pyro.plate(DATA_PLATE, x.shape[0], dim=-1):
            z = pyro.sample(LATENT_SITE, prior)
            pyro.sample(OBSERVED_SITE, likelihood(decoder(z)), obs=x)

    @pyro_method
    def guide(self, x: torch.Tensor) -> None:
        """The amortized guide q(z|x) for ``x`` of shape ``(N, D)``."""
        posterior = self.posterior(x)  # outside the plate, as in the model
        with pyro.plate(DATA_PLATE, x.shape[0], dim=-1):
            pyro.sample(LATENT_SITE, posterior)

    @pyro_method
    def posterior(self, x: torch.Tensor) -> dist.Distribution:
        """q(z|x): batch shape ``x.shape[:-1]``, event shape ``(latent_dim,)``."""
        return self.untraced_posterior(x)

    def untraced_posterior(self, x: torch.Tensor) -> dist.Distribution:
        """:meth:`posterior` outside Pyro's module bookkeeping: the same distribution.

        Calling a ``PyroModule`` (or a ``pyro_method``) opens its Pyro context, in which
        every access to a plain ``nn.Module`` child registers that child's parameters in the
        parameter store (``pyro.module``), host time that needs no paying where no Pyro effect
        is wanted.  Code that needs no Pyro effects (:meth:`encode`, :meth:`sample`)
        calls ``forward`` directly instead.
        """
        return self.guide_family.forward(self.encoder(x))

    @property
    def device(self) -> torch.device:
        """The device of the first parameter or buffer (CPU for a parameterless VAE)."""
        return module_device(self)

    def check_data(self, x: object, name: str = "x") -> torch.Tensor:
        """Validate ``x`` for this model (shape, dtype, finiteness, likelihood support)."""
        return check_data(x, self.data_dim, self.likelihood, name=name)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> dist.Distribution:
        """q(z|x) for data ``x`` of shape ``(N, D)``; e.g. ``vae.encode(x).mean`` is ``(N, latent_dim)``."""
        self.check_data(x)
        return self.posterior(x.to(self.device))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """E[x' | z] for one z ~ q(z|x): ``(N, D)``."""
        z = self.encode(x).sample()
        return self.likelihood.mean(self.decoder(z))

    @torch.no_grad()
    def sample(self, num_samples: int) -> torch.Tensor:
        """E[x | z] for ``num_samples`` draws z ~ p(z): ``(num_samples, D)``."""
        if num_samples < 1:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        z = self.prior(self.posterior).sample((num_samples,))
        return self.likelihood.mean(self.decoder(z))


def _width(layer: nn.Module, names: tuple[str, ...]) -> int | None:
    """The first of ``names`` that ``layer`` (or, for an ``nn.Sequential``, its relevant end)
    declares as an attribute; ``None`` where none does."""
    candidates = [layer]
    if isinstance(layer, nn.Sequential) and len(layer) > 0:
        candidates.append(layer[0] if names[0] == "in_dim" else layer[-1])
    for candidate in candidates:
        for name in names:
            value = getattr(candidate, name, None)
            if isinstance(value, int):
                return value
    return None


_IN, _OUT = ("in_dim", "data_dim", "feature_dim"), ("out_dim", "latent_dim")


class HierarchicalVAE(LeanPyroModule):
    """A VAE with L stochastic layers z_1 (next to x), ..., z_L, as a Pyro model/guide pair::

        model:  z_L ~ p(z_L)                          (prior, site "zL")
                z_l ~ p(z_l | z_{l+1}),  l = L-1..1   (prior_layers[l - 1], site "zl")
                x   ~ p(x | decoder(z_1))             (likelihood, site "x", observed)
        guide:  z_1 ~ q(z_1 | x)                      (guide_layers[0])
                z_l ~ q(z_l | z_{l-1}),  l = 2..L     (guide_layers[l - 1])

    every site inside the plate ``"data"`` (``dim=-1``); site names come from
    :func:`~pyrovae.sites.layer_site`.  Each layer is a part mapping its input to a
    distribution (:class:`~pyrovae.layers.ConditionalNormal`, or any module with that
    contract); the prior, decoder and likelihood are the parts a :class:`VAE` takes.  With
    L = 1 it is a one-layer VAE whose guide is ``guide_layers[0]`` applied to x.  Training
    and every estimator run this program as they run a :class:`VAE`.

    The top prior is called without a posterior: a prior built from q(z|x) (the VampPrior)
    has no q(z_L | x) in closed form here and is refused.

    :param guide_layers: L modules; ``guide_layers[0](x)`` is q(z_1 | x) for x
        ``(..., data_dim)``, ``guide_layers[l](z_l)`` is q(z_{l+1} | z_l).
    :param prior_layers: L - 1 modules; ``prior_layers[l - 1](z_{l+1})`` is p(z_l | z_{l+1}).
    :param prior: a :class:`~pyrovae.priors.Prior` over the top layer z_L.
    :param decoder: ``nn.Module`` mapping z_1 ``(..., latent_dims[0])`` to likelihood
        parameters ``(..., data_dim)``.
    :param likelihood: a :class:`~pyrovae.likelihoods.Likelihood`.
    :param data_dim: size of a flattened data point; read from ``decoder.data_dim`` if omitted.
    :param name: root name of the Pyro parameters; unique per instance by default.
    :raises ConfigError: the layer counts or the widths that the parts declare disagree.

    Example::

        # Burda et al. (2016)'s two-layer MNIST model: 784-200-200-100 and 100-100-100-50
        hvae = HierarchicalVAE(
            guide_layers=[ConditionalNormal(784, 100, (200, 200)),
                          ConditionalNormal(100, 50, (100, 100))],
            prior_layers=[ConditionalNormal(50, 100, (100, 100))],
            prior=StandardNormalPrior(50),
            decoder=MLPDecoder(100, 784, (200, 200)),
            likelihood=BernoulliLikelihood(),
        )
        fit(hvae, data)                              # Trace_ELBO of the program
        log_marginal_likelihood(hvae, x, 5000)       # (N,) nats

    References:

    1. Burda, Grosse, Salakhutdinov (2016). Importance Weighted Autoencoders. ICLR.
    """

    def __init__(self, guide_layers: Sequence[nn.Module], prior_layers: Sequence[nn.Module],
                 prior: Prior, decoder: nn.Module, likelihood: Likelihood, *,
                 data_dim: int | None = None, name: str | None = None) -> None:
        super().__init__(name or _unique_name())
        if len(guide_layers) < 1 or len(prior_layers) != len(guide_layers) - 1:
            raise ConfigError(f"{len(guide_layers)} guide layers need {len(guide_layers) - 1} "
                              f"conditional prior layers, got {len(prior_layers)}")
        self.guide_layers = nn.ModuleList(guide_layers)
        self.prior_layers = nn.ModuleList(prior_layers)
        self.prior = prior
        self.decoder = decoder
        self.likelihood = likelihood
        self.data_dim = data_dim if data_dim is not None else getattr(decoder, "data_dim", None)
        try:
            top = prior()
        except ValueError as error:  # the VampPrior's "needs the VAE's posterior"
            raise ConfigError(f"the top prior of a hierarchical VAE gets no posterior: "
                              f"{error}") from None
        #: widths of z_1, ..., z_L
        self.latent_dims = tuple(_width(layer, _OUT) for layer in guide_layers)
        self._check_widths(tuple(top.event_shape))

    def _check_widths(self, top_shape: tuple[int, ...]) -> None:
        dims = self.latent_dims
        if top_shape != (dims[-1],) and dims[-1] is not None:
            raise ConfigError(f"the prior is over {top_shape} but the top guide layer gives "
                              f"z{len(dims)} of width {dims[-1]}")
        inputs = (self.data_dim, *dims[:-1])
        for index, (layer, expected) in enumerate(zip(self.guide_layers, inputs, strict=True)):
            below = "x" if index == 0 else layer_site(index)
            self._agree(f"guide layer {index + 1} takes", _width(layer, _IN),
                        f"{below} of width", expected)
        for index, layer in enumerate(self.prior_layers, 1):
            self._agree(f"prior layer {index} gives {layer_site(index)} of width",
                        _width(layer, _OUT), "the guide's", dims[index - 1])
            self._agree(f"prior layer {index} takes {layer_site(index + 1)} of width",
                        _width(layer, _IN), "the guide's", dims[index])
        self._agree("the decoder takes z1 of width", getattr(self.decoder, "latent_dim", None),
                    "the guide's", dims[0])

    @staticmethod
    def _agree(what: str, value: int | None, other: str, expected: int | None) -> None:
        if value is not None and expected is not None and value != expected:
            raise ConfigError(f"{what} {value}, {other} {expected}")

    @property
    def num_layers(self) -> int:
        """L, the number of stochastic layers."""
        return len(self.guide_layers)

    @pyro_method
    def model(self, x: torch.Tensor) -> None:
        """p(x, z_1..z_L) = p(z_L) prod_l p(z_l | z_{l+1}) p(x | z_1), conditioned on ``x``
        of shape ``(N, D)``."""
        # the networks are read once, outside the plate: their parameters are global (see
        # VAE.model)
        prior, layers, decoder, likelihood = (self.prior, self.prior_layers, self.decoder,
                                              self.likelihood)
        with pyro.plate(DATA_PLATE, x.shape[0], dim=-1):
            z = pyro.sample(layer_site(len(layers) + 1), prior())
            for index in range(len(layers), 0, -1):
                z = pyro.sample(layer_site(index), layers[index - 1](z))
            pyro.sample(OBSERVED_SITE, likelihood(decoder(z)), obs=x)

    @pyro_method
    def guide(self, x: torch.Tensor) -> None:
        """q(z_1..z_L | x) = q(z_1 | x) prod_l q(z_{l+1} | z_l) for ``x`` of shape ``(N, D)``."""
        layers = self.guide_layers  # read once, outside the plate (see model)
        with pyro.plate(DATA_PLATE, x.shape[0], dim=-1):
            h = x
            for index, layer in enumerate(layers, 1):
                h = pyro.sample(layer_site(index), layer(h))

    @property
    def device(self) -> torch.device:
        """The device of the first parameter or buffer (CPU for a parameterless model)."""
        return module_device(self)

    def check_data(self, x: object, name: str = "x") -> torch.Tensor:
        """Validate ``x`` for this model (shape, dtype, finiteness, likelihood support)."""
        return check_data(x, self.data_dim, self.likelihood, name=name)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> dist.Distribution:
        """q(z_1 | x), the bottom layer, for data ``x`` of shape ``(N, D)``: batch ``(N,)``,
        event ``(latent_dims[0],)`` (what active units are counted on)."""
        self.check_data(x)
        return self.guide_layers[0].forward(x.to(self.device))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """E[x' | z_1] for one z_1 ~ q(z_1 | x): ``(N, D)``."""
        return self.likelihood.mean(self.decoder(self.encode(x).sample()))

    @torch.no_grad()
    def sample(self, num_samples: int) -> torch.Tensor:
        """E[x | z_1] for ``num_samples`` ancestral draws z_L ~ p(z_L), z_l ~ p(z_l | z_{l+1}):
        ``(num_samples, D)``."""
        if num_samples < 1:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        z = self.prior().sample((num_samples,))
        for layer in reversed(self.prior_layers):
            z = layer.forward(z).sample()
        return self.likelihood.mean(self.decoder(z))
def one_hot_labels(labels: torch.Tensor, num_classes: int, like: torch.Tensor) -> torch.Tensor:
    """The one-hot code of integer ``labels`` ``(...)`` as ``(..., num_classes)`` in
    ``like``'s dtype (the network input it is concatenated to)."""
    return torch.nn.functional.one_hot(labels, num_classes).to(like.dtype)


class LabelConcat(nn.Module):
    """A network of an input and a class label: ``network(cat([inputs, one_hot(y)], -1))``.

    The leading dimensions of ``inputs`` and ``y`` broadcast against each other, so a
    minibatch ``(N, D)`` meets labels ``(N,)``, enumerated labels ``(C, 1)`` or importance
    samples ``(K, N, D)``.

    :param network: an ``nn.Module`` taking ``(..., in_dim + num_classes)``.
    :param num_classes: C.

    Example::

        encoder = LabelConcat(MLPEncoder(784 + 10, (200,)), 10)
        h = encoder(torch.rand(100, 784), torch.randint(0, 10, (100,)))  # (100, 200)
    """

    def __init__(self, network: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.network = network
        self.num_classes = num_classes

    def forward(self, inputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """:param inputs: ``(..., in_dim)``. :param y: labels ``(...)``, int64.
        :returns: the network's output on the broadcast leading shape."""
        code = one_hot_labels(y, self.num_classes, inputs)
        shape = torch.broadcast_shapes(inputs.shape[:-1], code.shape[:-1])
        return self.network(torch.cat([inputs.expand(*shape, -1), code.expand(*shape, -1)], -1))


class _LabelModel(LeanPyroModule):
    """What the models of labelled data share: the parts, their checks, data checks and
    sampling with a chosen label.  Not a model on its own."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module, prior: Prior,
                 likelihood: Likelihood, guide: GuideFamily, *, num_classes: int,
                 data_dim: int | None, name: str | None) -> None:
        super().__init__(name or _unique_name())
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
        self.num_classes = num_classes
        self.encoder = LabelConcat(encoder, num_classes)
        self.decoder = LabelConcat(decoder, num_classes)
        self.prior = prior
        self.likelihood = likelihood
        self.guide_family = guide
        self.data_dim = data_dim if data_dim is not None else getattr(decoder, "data_dim", None)
        self.latent_dim = prior.latent_dim
        try:
            prior()
        except ValueError as error:  # the VampPrior's "needs the VAE's posterior"
            raise ConfigError(f"a model of labelled data calls its prior without a "
                              f"posterior: {error}") from None
        widths = {
            "the guide's latent_dim": (guide.latent_dim, self.latent_dim),
            "the encoder's input width": (getattr(encoder, "data_dim", None),
                                          None if self.data_dim is None
                                          else self.data_dim + num_classes),
            "the encoder's feature width": (getattr(encoder, "feature_dim", None),
                                            guide.feature_dim),
            "the decoder's input width": (getattr(decoder, "latent_dim", None),
                                          self.latent_dim + num_classes),
        }
        for what, (value, expected) in widths.items():
            if value is not None and expected is not None and value != expected:
                raise ConfigError(f"{what} is {value}; this model needs {expected} (data_dim "
                                  f"{self.data_dim}, latent_dim {self.latent_dim}, "
                                  f"{num_classes} classes one-hot)")

    @property
    def device(self) -> torch.device:
        """The device of the first parameter or buffer (CPU for a parameterless model)."""
        return module_device(self)

    def check_data(self, x: object, name: str = "x") -> torch.Tensor:
        """Validate ``x`` for this model (shape, dtype, finiteness, likelihood support)."""
        return check_data(x, self.data_dim, self.likelihood, name=name)

    def check_label(self, label: int) -> int:
        """``label`` if it is one of the classes 0..C-1; else :class:`ConfigError`."""
        if isinstance(label, bool) or not isinstance(label, int) or \
                not 0 <= label < self.num_classes:
            raise ConfigError(f"label must be a class 0..{self.num_classes - 1}, got {label!r}")
        return label

    def _labels(self, num_samples: int, label: int | torch.Tensor | None) -> torch.Tensor:
        if isinstance(label, torch.Tensor):
            if tuple(label.shape) != (num_samples,) or label.is_floating_point() or \
                    bool(((label < 0) | (label >= self.num_classes)).any()):
                raise ConfigError(f"labels must be {num_samples} integers 0..{self.num_classes - 1}")
            return label.to(self.device, torch.long)
        if label is None:
            return torch.randint(self.num_classes, (num_samples,), device=self.device)
        return torch.full((num_samples,), self.check_label(label), device=self.device)

    @torch.no_grad()
    def sample(self, num_samples: int, label: int | torch.Tensor | None = None) -> torch.Tensor:
        """E[x | z, y] for ``num_samples`` draws z ~ p(z) of the class ``label`` (an int, or
        one label per sample ``(num_samples,)``; ``None``: uniformly random classes):
        ``(num_samples, D)``.  Deterministic under a seed (torch's random stream)."""
        if num_samples < 1:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        labels = self._labels(num_samples, label)
        z = self.prior().sample((num_samples,))
        return self.likelihood.mean(self.decoder(z, labels))

    def untraced_posterior(self, x: torch.Tensor, y: torch.Tensor) -> dist.Distribution:
        """q(z | x, y) outside Pyro's module bookkeeping: batch ``x.shape[:-1]``, event
        ``(latent_dim,)``."""
        return self.guide_family.forward(self.encoder(x, y))


class ConditionalVAE(_LabelModel):
    """A conditional VAE: a VAE of x given its class label y, as a Pyro model/guide pair.

    ::

        model:  z ~ p(z)                          (site "z", inside plate "data")
                x ~ p(x | decoder([z, onehot(y)])) (site "x", observed)
        guide:  z ~ q(z | encoder([x, onehot(y)])) (site "z")

    y is an input of both, not a random variable: the program's marginal is log p(x | y),
    which every estimator gives for ``(x, y)`` (``log_marginal_likelihood(cvae, (x, y))``).
    The parts are those of a :class:`VAE`; the encoder takes ``data_dim + num_classes``
    inputs and the decoder ``latent_dim + num_classes``, the one-hot label concatenated.

    :param encoder: ``nn.Module`` mapping ``(..., data_dim + num_classes)`` to features.
    :param decoder: ``nn.Module`` mapping ``(..., latent_dim + num_classes)`` to likelihood
        parameters ``(..., data_dim)``.
    :param prior: a :class:`~pyrovae.priors.Prior` (one that needs no posterior).
    :param likelihood: a :class:`~pyrovae.likelihoods.Likelihood`.
    :param guide: a :class:`~pyrovae.guides.GuideFamily` mapping features to q(z | x, y).
    :param num_classes: C; labels are integers 0..C-1.
    :param data_dim: size of a flattened data point; read from ``decoder.data_dim`` if omitted.
    :param name: root name of the Pyro parameters; unique per instance by default.

    Example::

        cvae = ConditionalVAE(
            encoder=MLPEncoder(784 + 10, (500,)), decoder=MLPDecoder(20 + 10, 784, (500,)),
            prior=StandardNormalPrior(20), likelihood=BernoulliLikelihood(),
            guide=DiagonalNormalGuide(500, 20), num_classes=10)
        fit(cvae, data)                           # data with labels: batches (x, y)
        sevens = cvae.sample(16, label=7)         # (16, 784)

    References:

    1. Sohn, Lee, Yan (2015). Learning Structured Output Representation using Deep
       Conditional Generative Models. NeurIPS.
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module, prior: Prior,
                 likelihood: Likelihood, guide: GuideFamily, *, num_classes: int,
                 data_dim: int | None = None, name: str | None = None) -> None:
        super().__init__(encoder, decoder, prior, likelihood, guide, num_classes=num_classes,
                         data_dim=data_dim, name=name)

    @pyro_method
    def model(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """p(x, z | y) = p(z) p(x | z, y) for ``x`` ``(N, D)`` and labels ``y`` ``(N,)``."""
        # the networks are read outside the plate: their parameters are global (see VAE.model)
        prior, decoder, likelihood = self.prior(), self.decoder, self.likelihood
        with pyro.plate(DATA_PLATE, x.shape[0], dim=-1):
            z = pyro.sample(LATENT_SITE, prior)
            pyro.sample(OBSERVED_SITE, likelihood(decoder(z, y)), obs=x)

    @pyro_method
    def guide(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """q(z | x, y) for ``x`` ``(N, D)`` and labels ``y`` ``(N,)``."""
        posterior = self.guide_family(self.encoder(x, y))  # outside the plate (see model)
        with pyro.plate(DATA_PLATE, x.shape[0], dim=-1):
            pyro.sample(LATENT_SITE, posterior)


def _masked(mask: torch.Tensor, needed: bool) -> contextlib.AbstractContextManager[None]:
    return pyro.poutine.mask(mask=mask) if needed else contextlib.nullcontext()


class SemiSupervisedVAE(_LabelModel):
    """Kingma et al. (2014)'s M2: a class label y and a style z behind each x, learned from
    few labels, as one Pyro model/guide pair.

    ::

        model:  y ~ Cat(1/C)                       (site "y" where labelled, observed;
                                                    "y_unlabelled" elsewhere)
                z ~ p(z)                           (site "z")
                x ~ p(x | decoder([z, onehot(y)])) (site "x", observed)
                alpha * log q(y | x)               (site "y_classified", observed; labelled
                                                    points, in training mode only)
        guide:  y ~ q(y | x) = Cat(softmax(classifier(x)))   ("y_unlabelled", enumerated)
                z ~ q(z | encoder([x, onehot(y)]))           ("z")

    A minibatch mixes both kinds of points: labels ``y >= 0`` are observed, ``-1``
    (:data:`~pyrovae.data.HIDDEN_LABEL`) marks an unlabelled point, whose y the guide
    draws from q(y | x) at a site marked ``infer={"enumerate": "parallel"}``, so that
    ``TraceEnum_ELBO`` sums it out over the C classes in one vectorized pass:

        ELBO(x) = sum_y q(y|x) [E_q(z|x,y) log p(x, y, z) / q(z|x,y) - log q(y|x)].

    Sites that cover only some points of a batch are masked (``poutine.mask``); a batch
    of one kind has no masks, so an estimator that ignores masks still reads it right.
    The classification term, Kingma et al.'s alpha * E[log q(y|x)] over labelled points,
    trains q(y|x) on the labels; it is not part of p(x) and is left out in eval mode
    (``model.eval()``, where every estimator runs).  ``alpha`` here weights each labelled
    point: the paper's alpha = 0.1 N on the mean over N_l labelled points is
    ``alpha = 0.1 N / N_l`` (:func:`paper_alpha`).

    log p(x) sums y exactly as log sum_y p(x, y), each p(x, y) an importance-sampled
    estimate with q(z | x, y) (:func:`pyrovae.labels.log_marginal_likelihood_over_labels`).

    :param encoder: ``nn.Module`` mapping ``(..., data_dim + num_classes)`` to features.
    :param decoder: ``nn.Module`` mapping ``(..., latent_dim + num_classes)`` to likelihood
        parameters ``(..., data_dim)``.
    :param classifier: ``nn.Module`` mapping x ``(..., data_dim)`` to the logits of q(y|x)
        ``(..., num_classes)``.
    :param prior: a :class:`~pyrovae.priors.Prior` over z (one that needs no posterior).
    :param likelihood: a :class:`~pyrovae.likelihoods.Likelihood`.
    :param guide: a :class:`~pyrovae.guides.GuideFamily` mapping features to q(z | x, y).
    :param num_classes: C.
    :param alpha: weight of log q(y | x) per labelled point (>= 0).
    :param data_dim: size of a flattened data point; read from ``decoder.data_dim`` if omitted.
    :param name: root name of the Pyro parameters; unique per instance by default.

    Example::

        m2 = SemiSupervisedVAE(
            encoder=MLPEncoder(784 + 10, (500,)), decoder=MLPDecoder(50 + 10, 784, (500,)),
            classifier=mlp((784, 500, 10)), prior=StandardNormalPrior(50),
            likelihood=BernoulliLikelihood(), guide=DiagonalNormalGuide(500, 50),
            num_classes=10, alpha=paper_alpha(50000, 100))
        svi = SVI(m2.model, m2.guide, Adam({"lr": 1e-3}), TraceEnum_ELBO(max_plate_nesting=1))
        svi.step(x, y)                     # y: (N,) labels, -1 where unknown
        m2.classify(x)                     # (N,) argmax q(y|x)

    References:

    1. Kingma, Rezende, Mohamed, Welling (2014). Semi-Supervised Learning with Deep
       Generative Models. NeurIPS.
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module, classifier: nn.Module,
                 prior: Prior, likelihood: Likelihood, guide: GuideFamily, *,
                 num_classes: int, alpha: float, data_dim: int | None = None,
                 name: str | None = None) -> None:
        super().__init__(encoder, decoder, prior, likelihood, guide, num_classes=num_classes,
                         data_dim=data_dim, name=name)
        if not alpha >= 0:
            raise ConfigError(f"alpha must be >= 0, got {alpha}")
        self.classifier = classifier
        self.alpha = float(alpha)

    def _label_prior(self, x: torch.Tensor) -> dist.Distribution:
        return dist.Categorical(logits=x.new_zeros(self.num_classes))

    @pyro_method
    def model(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """p(x, y, z) = p(y) p(z) p(x | y, z) for ``x`` ``(N, D)`` and labels ``y`` ``(N,)``,
        -1 where unknown; plus the classification term in training mode."""
        labelled = y >= 0
        num_labelled, num_points = int(labelled.sum()), x.shape[0]
        mixed = 0 < num_labelled < num_points
        classified = self.training and num_labelled and self.alpha > 0
        # the networks are read outside the plate: their parameters are global (see VAE.model)
        prior, decoder, likelihood = self.prior(), self.decoder, self.likelihood
        classifier = self.classifier if classified else None
        with pyro.plate(DATA_PLATE, num_points, dim=-1):
            label = y
            if num_labelled:
                with _masked(labelled, mixed):
                    label = pyro.sample(sites.LABEL_SITE, self._label_prior(x), obs=y.clamp(min=0))
            if num_labelled < num_points:
                with _masked(~labelled, mixed):
                    hidden = pyro.sample(sites.UNLABELLED_SITE, self._label_prior(x))
                label = torch.where(labelled, label, hidden) if mixed else hidden
            z = pyro.sample(LATENT_SITE, prior)
            pyro.sample(OBSERVED_SITE, likelihood(decoder(z, label)), obs=x)
            if classifier is not None:
                with _masked(labelled, mixed), pyro.poutine.scale(scale=self.alpha):
                    pyro.sample(sites.CLASSIFIED_SITE, dist.Categorical(logits=classifier(x)),
                                obs=y.clamp(min=0))

    @pyro_method
    def guide(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """q(y | x) q(z | x, y) for unlabelled points, q(z | x, y) for labelled ones."""
        labelled = y >= 0
        num_labelled, num_points = int(labelled.sum()), x.shape[0]
        mixed = 0 < num_labelled < num_points
        # the networks are read outside the plate (see model)
        classifier = self.classifier if num_labelled < num_points else None
        encoder, guide_family = self.encoder, self.guide_family
        with pyro.plate(DATA_PLATE, num_points, dim=-1):
            label = y
            if classifier is not None:
                with _masked(~labelled, mixed):
                    hidden = pyro.sample(sites.UNLABELLED_SITE,
                                         dist.Categorical(logits=classifier(x)),
                                         infer={"enumerate": "parallel"})
                label = torch.where(labelled, y, hidden) if mixed else hidden
            pyro.sample(LATENT_SITE, guide_family(encoder(x, label)))

    @torch.no_grad()
    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """The most probable class under q(y | x) for ``x`` ``(N, D)``: ``(N,)`` int64."""
        self.check_data(x)
        return self.classifier(x.to(self.device)).argmax(-1)


def paper_alpha(num_points: int, num_labelled: int) -> float:
    """The weight per labelled point of Kingma et al. (2014)'s alpha = 0.1 N: their term
    alpha E[log q(y|x)] averages over the ``num_labelled`` labelled points of a training set
    of ``num_points``, so each carries ``0.1 * num_points / num_labelled``."""
    if num_labelled < 1:
        raise ConfigError("alpha weights labelled points; there are none")
    return 0.1 * num_points / num_labelled
