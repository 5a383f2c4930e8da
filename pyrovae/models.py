"""The :class:`VAE`: a Pyro model and an amortized Pyro guide composed from parts.

    model:  z ~ p(z)                       (site "z", inside plate "data")
            x ~ p(x | decoder(z))          (site "x", observed)
    guide:  z ~ q(z | encoder(x))          (site "z", inside plate "data")

Every part is an object passed in, so priors, likelihoods, guides and networks swap
without subclassing.
"""

from __future__ import annotations

import itertools

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, pyro_method
from torch import nn

from pyrovae.errors import ConfigError
from pyrovae.guides import GuideFamily
from pyrovae.likelihoods import Likelihood
from pyrovae.priors import Prior
from pyrovae.sites import DATA_PLATE, LATENT_SITE, OBSERVED_SITE
from pyrovae.validation import check_data

_instance_counter = itertools.count()


def _unique_name() -> str:
    # Pyro keys parameters by name in a global store; a distinct root name per VAE keeps
    # two VAEs in one process from sharing (and overwriting) each other's parameters.
    index = next(_instance_counter)
    return "vae" if index == 0 else f"vae_{index}"


class VAE(PyroModule):
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
        with pyro.plate(DATA_PLATE, x.shape[0], dim=-1):
            z = pyro.sample(LATENT_SITE, self.prior(self.posterior))
            pyro.sample(OBSERVED_SITE, self.likelihood(self.decoder(z)), obs=x)

    @pyro_method
    def guide(self, x: torch.Tensor) -> None:
        """The amortized guide q(z|x) for ``x`` of shape ``(N, D)``."""
        with pyro.plate(DATA_PLATE, x.shape[0], dim=-1):
            pyro.sample(LATENT_SITE, self.posterior(x))

    @pyro_method
    def posterior(self, x: torch.Tensor) -> dist.Distribution:
        """q(z|x): batch shape ``x.shape[:-1]``, event shape ``(latent_dim,)``."""
        return self.untraced_posterior(x)

    def untraced_posterior(self, x: torch.Tensor) -> dist.Distribution:
        """:meth:`posterior` outside Pyro's module bookkeeping: the same distribution.

        Calling a ``PyroModule`` (or a ``pyro_method``) opens its Pyro context, in which
        every access to a plain ``nn.Module`` child registers that child's parameters in the
        parameter store (``pyro.module``): about 0.5 ms per training step on a CPU, more on
        a GPU's host.  Code that needs no Pyro effects (:meth:`encode`, :meth:`sample`)
        calls ``forward`` directly instead.
        """
        return self.guide_family.forward(self.encoder(x))

    @property
    def device(self) -> torch.device:
        """The device of the first parameter or buffer (CPU for a parameterless VAE)."""
        for tensor in itertools.chain(self.parameters(), self.buffers()):
            return tensor.device
        return torch.device("cpu")

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
