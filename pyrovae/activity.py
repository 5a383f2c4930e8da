"""Active latent units: which dimensions of z the encoder uses, to detect posterior collapse.

A unit d is *active* when its posterior mean varies over the data (Burda et al. 2016):

    A_d = Var_x( E_q[z_d | x] ) > 0.01.

A VAE whose every unit is inactive has collapsed: q(z|x) ignores x, the KL term is about
zero, and the decoder models the data without z (for MNIST, a factorised Bernoulli of
about -206 nats).

References:

1. Burda, Grosse, Salakhutdinov (2016). Importance Weighted Autoencoders. ICLR.
"""

from __future__ import annotations

import torch

from pyrovae.models import VAE

#: the variance of a posterior mean over the data below which a unit is inactive
ACTIVE_UNIT_THRESHOLD = 0.01
#: draws per point where the posterior has no closed-form mean (a flow)
MEAN_SAMPLES = 256


@torch.no_grad()
def posterior_mean_variance(vae: VAE, x: torch.Tensor, *, batch_size: int = 100) -> torch.Tensor:
    """Var over the data points of E_q[z_d | x], per latent dimension.

    Where ``q(z|x)`` has no ``.mean`` (an inverse autoregressive flow), the mean is the
    average of :data:`MEAN_SAMPLES` draws, and the Monte Carlo part of its variance (the
    within-point variance over the number of draws) is subtracted.

    :param x: data ``(N, D)``, ``N >= 2``.
    :returns: ``(latent_dim,)`` variances, float64 on the CPU.
    """
    vae.check_data(x)
    if x.shape[0] < 2:
        raise ValueError(f"the variance over data points needs at least 2, got {x.shape[0]}")
    means, noise = [], []
    for batch in x.split(batch_size):
        posterior = vae.encode(batch)
        try:
            means.append(posterior.mean.double().cpu())
            noise.append(torch.zeros_like(means[-1]))
        except NotImplementedError:
            draws = posterior.sample((MEAN_SAMPLES,)).double().cpu()
            means.append(draws.mean(0))
            noise.append(draws.var(0) / MEAN_SAMPLES)
    mean = torch.cat(means)
    return (mean.var(0) - torch.cat(noise).mean(0)).clamp(min=0)


def active_units(vae: VAE, x: torch.Tensor, *,
                 threshold: float = ACTIVE_UNIT_THRESHOLD) -> int:
    """The number of latent dimensions whose posterior mean varies over ``x`` by more than
    ``threshold`` (see :func:`posterior_mean_variance`); 0 means the posterior collapsed."""
    return int((posterior_mean_variance(vae, x) > threshold).sum())
