"""The linear-Gaussian VAE, whose marginal likelihood and posterior are known exactly.

    z ~ N(0, I_L),  x | z ~ N(W z + b, sigma^2 I_D)
    => p(x) = N(b, W W^T + sigma^2 I)
       p(z | x) = N(S W^T (x - b) / sigma^2, S),  S = (I + W^T W / sigma^2)^{-1}

The exact posterior is a full-covariance Gaussian whose mean is affine in x: the guide
family :class:`ExactPosteriorGuide` below reproduces it from identity encoder features.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch

from pyrovae import VAE, GaussianLikelihood, GuideFamily, MLPDecoder, MLPEncoder, StandardNormalPrior


class ExactPosteriorGuide(GuideFamily):
    """q(z|x) = p(z|x) of the linear-Gaussian model with decoder ``W z + b`` and noise ``sigma``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, sigma: float) -> None:
        data_dim, latent_dim = weight.shape
        super().__init__(data_dim, latent_dim)
        precision = torch.eye(latent_dim, dtype=weight.dtype) + weight.T @ weight / sigma**2
        covariance = torch.linalg.inv(precision)
        self.register_buffer("gain", covariance @ weight.T / sigma**2)  # (L, D)
        self.register_buffer("bias", bias)
        self.register_buffer("scale_tril", torch.linalg.cholesky(covariance))

    def forward(self, h: torch.Tensor) -> dist.Distribution:
        loc = (h - self.bias) @ self.gain.T
        return dist.MultivariateNormal(loc, scale_tril=self.scale_tril)


def linear_gaussian_vae(data_dim: int = 5, latent_dim: int = 2, sigma: float = 0.5,
                        guide: GuideFamily | None = None, seed: int = 0,
                        dtype: torch.dtype = torch.float64) -> VAE:
    """A linear-Gaussian VAE with random W, b; the exact-posterior guide unless ``guide`` is given."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(data_dim, latent_dim, generator=generator, dtype=dtype)
    bias = torch.randn(data_dim, generator=generator, dtype=dtype)
    decoder = MLPDecoder(latent_dim, data_dim, hidden_dims=()).to(dtype)
    with torch.no_grad():
        decoder.body[0].weight.copy_(weight)
        decoder.body[0].bias.copy_(bias)
    vae = VAE(
        encoder=MLPEncoder(data_dim, hidden_dims=()),
        decoder=decoder,
        prior=StandardNormalPrior(latent_dim),
        likelihood=GaussianLikelihood(sigma=sigma),
        guide=guide if guide is not None else ExactPosteriorGuide(weight, bias, sigma),
    )
    return vae.to(dtype)


def exact_log_marginal(vae: VAE, x: torch.Tensor) -> torch.Tensor:
    """log N(x; b, W W^T + sigma^2 I) per data point, ``(N,)`` nats."""
    linear = vae.decoder.body[0]
    weight, bias = linear.weight.detach(), linear.bias.detach()
    sigma = float(vae.likelihood.sigma)
    covariance = weight @ weight.T + sigma**2 * torch.eye(weight.shape[0], dtype=weight.dtype)
    return dist.MultivariateNormal(bias, covariance_matrix=covariance).log_prob(x)


def sample_data(vae: VAE, num_points: int, seed: int = 1) -> torch.Tensor:
    """Draw x ~ p(x) from the linear-Gaussian model: ``(num_points, data_dim)``."""
    generator = torch.Generator().manual_seed(seed)
    linear = vae.decoder.body[0]
    weight, bias = linear.weight.detach(), linear.bias.detach()
    z = torch.randn(num_points, weight.shape[1], generator=generator, dtype=weight.dtype)
    noise = torch.randn(num_points, weight.shape[0], generator=generator, dtype=weight.dtype)
    return z @ weight.T + bias + float(vae.likelihood.sigma) * noise
