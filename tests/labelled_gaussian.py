"""Linear-Gaussian models of labelled data, whose marginals are known exactly.

    z ~ N(0, I_L),  x | z, y ~ N(W z + m_y, sigma^2 I_D)
    => p(x | y) = N(m_y, W W^T + sigma^2 I)
       p(z | x, y) = N(S W^T (x - m_y) / sigma^2, S),  S = (I + W^T W / sigma^2)^{-1}

Built from pyrovae's parts: an affine decoder of ``[z, onehot(y)]`` with weights ``[W, M]``
(M's columns the class means m_y), the identity encoder (features ``[x, onehot(y)]``) and
:class:`ExactLabelPosteriorGuide`, whose mean is affine in those features.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from torch import nn

from pyrovae import GaussianLikelihood, GuideFamily, MLPDecoder, MLPEncoder, StandardNormalPrior
from pyrovae.models import ConditionalVAE, SemiSupervisedVAE

DOUBLE = torch.float64


class ExactLabelPosteriorGuide(GuideFamily):
    """q(z | x, y) = p(z | x, y) from the features ``h = [x, onehot(y)]``."""

    def __init__(self, weight: torch.Tensor, means: torch.Tensor, sigma: float) -> None:
        data_dim, latent_dim = weight.shape
        super().__init__(data_dim + means.shape[1], latent_dim)
        covariance = torch.linalg.inv(torch.eye(latent_dim, dtype=weight.dtype)
                                      + weight.T @ weight / sigma**2)
        # x - m_y = [I, -M] h
        residual = torch.cat([torch.eye(data_dim, dtype=weight.dtype), -means], 1)
        self.register_buffer("gain", covariance @ weight.T @ residual / sigma**2)  # (L, D + C)
        self.register_buffer("scale_tril", torch.linalg.cholesky(covariance))

    def forward(self, h: torch.Tensor) -> dist.Distribution:
        return dist.MultivariateNormal(h @ self.gain.T, scale_tril=self.scale_tril)


class LinearGaussianLabels:
    """Random W, class means M and noise sigma, and the pyrovae models built on them."""

    def __init__(self, data_dim: int = 4, latent_dim: int = 2, num_classes: int = 3,
                 sigma: float = 0.75, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(data_dim, latent_dim, generator=g, dtype=DOUBLE)
        self.means = 2 * torch.randn(data_dim, num_classes, generator=g, dtype=DOUBLE)
        self.sigma, self.num_classes = sigma, num_classes

    def parts(self, guide: GuideFamily | None = None) -> dict:
        data_dim, latent_dim = self.weight.shape
        decoder = MLPDecoder(latent_dim + self.num_classes, data_dim, hidden_dims=()).to(DOUBLE)
        with torch.no_grad():
            decoder.body[0].weight.copy_(torch.cat([self.weight, self.means], 1))
            decoder.body[0].bias.zero_()
        return {"encoder": MLPEncoder(data_dim + self.num_classes, hidden_dims=()),
                "decoder": decoder, "prior": StandardNormalPrior(latent_dim).to(DOUBLE),
                "likelihood": GaussianLikelihood(sigma=self.sigma).to(DOUBLE),
                "guide": guide or ExactLabelPosteriorGuide(self.weight, self.means, self.sigma),
                "num_classes": self.num_classes}

    def conditional_vae(self, **options) -> ConditionalVAE:
        return ConditionalVAE(**self.parts(**options)).to(DOUBLE).eval()

    def semi_supervised_vae(self, alpha: float = 0.0, seed: int = 1, **options) -> SemiSupervisedVAE:
        torch.manual_seed(seed)
        classifier = nn.Linear(self.weight.shape[0], self.num_classes).to(DOUBLE)
        return SemiSupervisedVAE(classifier=classifier, alpha=alpha,
                                 **self.parts(**options)).to(DOUBLE).eval()

    def log_px_given_y(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """log N(x; m_y, W W^T + sigma^2 I): ``(N,)`` nats."""
        covariance = self.weight @ self.weight.T + self.sigma**2 * torch.eye(
            self.weight.shape[0], dtype=DOUBLE)
        return dist.MultivariateNormal(self.means.T[y], covariance).log_prob(x)

    def log_px_and_y(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x, y) = log (1/C) + log p(x | y) for every class: ``(C, N)`` nats."""
        labels = torch.arange(self.num_classes)
        return torch.stack([self.log_px_given_y(x, label.expand(x.shape[0]))
                            for label in labels]) - math.log(self.num_classes)

    def sample(self, n: int, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        y = torch.randint(self.num_classes, (n,), generator=g)
        z = torch.randn(n, self.weight.shape[1], generator=g, dtype=DOUBLE)
        noise = torch.randn(n, self.weight.shape[0], generator=g, dtype=DOUBLE)
        return z @ self.weight.T + self.means.T[y] + self.sigma * noise, y
