"""Free bits: the ELBO with a floor under the KL of each latent dimension (or site).

Kingma et al. (2016) keep every group of latent units in use by no longer pushing its KL
below lambda nats: the objective trained is

    L_lambda = sum_n E_q[log p(x_n | z)] - N sum_g max(lambda, (1/N) sum_n KL_g(x_n)),

over the N points of a minibatch, with KL_g(x_n) the KL of group g between q(z | x_n) and
p(z): a latent dimension (``group="dimension"``) or a whole latent site (``"site"``).  A
group whose minibatch-mean KL is below lambda contributes the constant lambda and gets no
gradient; above it, the ELBO's own term.  L_lambda <= ELBO + N G lambda, and it equals the
ELBO where every group's KL exceeds lambda.

The groups are read off the Pyro traces: each latent site of the guide and the model's
distribution at the same site.  A KL per dimension needs both to factorize over the
dimensions of the site's last axis (diagonal Gaussians, the standard normal prior, a
hierarchy's conditional Gaussian layers); it is the analytic KL of each dimension with
``analytic=True`` where torch has one for the pair, else the one-sample estimate
log q(z_d | x) - log p(z_d) at the guide's draw (reparameterised, so its gradient is the
pathwise one).  Other pairs are refused in one line; ``group="site"`` takes any pair.

References:

1. Kingma, Salimans, Jozefowicz, Chen, Sutskever, Welling (2016). Improved variational
   inference with inverse autoregressive flow. NeurIPS (free bits, appendix C.8).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from pyro.distributions import Independent
from pyro.infer import ELBO
from pyro.infer.enum import get_importance_trace
from torch.distributions import kl_divergence

from pyrovae.errors import ConfigError

#: how the KL is grouped under the floor (``--free-bits-group``)
FREE_BITS_GROUPS = ("dimension", "site")


def _factors(distribution: Any) -> Any:
    """The distribution with its ``Independent`` wrappers removed."""
    while isinstance(distribution, Independent):
        distribution = distribution.base_dist
    return distribution


def _analytic(q: Any, p: Any) -> torch.Tensor | None:
    """torch's KL(q || p) for the pair, or ``None`` where none is registered."""
    try:
        return kl_divergence(q, p)
    except NotImplementedError:
        return None


class FreeBitsELBO(ELBO):
    """The free-bits objective L_lambda of the module doc, as a Pyro ELBO for the training
    loop: ``differentiable_loss`` is -L_lambda summed over the minibatch, in nats.

    Each latent site's KL terms are multiplied by the site's scale (a KL weight from
    :class:`~pyrovae.objectives.LatentScale`, a subsampling scale), the floor applied to the
    unscaled KL.  Particles are averaged, one trace each.  In a multi-process run each
    process floors the mean over its own slice of the global batch.

    :param free_bits: lambda, nats per group, > 0.
    :param group: ``"dimension"``, one floor per latent dimension; ``"site"``, one per latent
        site.
    :param analytic: the analytic KL where torch has one for the pair (``meanfield_elbo``'s
        choice), else the one-sample estimate.
    :param num_particles: draws of z per data point.

    Example::

        objective = FreeBitsELBO(free_bits=0.25)
        svi = SVI(vae.model, vae.guide, optimizer, objective)
    """

    def __init__(self, free_bits: float, group: str = "dimension", *, analytic: bool = False,
                 num_particles: int = 1, **elbo_options: Any) -> None:
        if not free_bits > 0:
            raise ConfigError(f"free_bits must be positive, got {free_bits}")
        if group not in FREE_BITS_GROUPS:
            raise ConfigError(f"unknown free_bits_group {group!r}; known: "
                              f"{', '.join(FREE_BITS_GROUPS)}")
        elbo_options["vectorize_particles"] = False
        super().__init__(num_particles=num_particles, **elbo_options)
        self.free_bits, self.group, self.analytic = float(free_bits), group, analytic

    def _get_trace(self, model: Callable[..., object], guide: Callable[..., object],
                   args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
        return get_importance_trace("flat", self.max_plate_nesting, model, guide, args, kwargs)

    def _kl(self, name: str, guide_site: dict[str, Any], model_site: dict[str, Any]
            ) -> torch.Tensor:
        """The unscaled KL of one latent site per data point and group, ``(N, G)`` nats."""
        q, p, z = guide_site["fn"], model_site["fn"], guide_site["value"]
        if self.group == "site":
            kl = _analytic(q, p) if self.analytic else None
            if kl is None:
                kl = q.log_prob(z) - p.log_prob(z)
            return kl.reshape(-1, 1)
        q_factors, p_factors = _factors(q), _factors(p)
        width = z.shape[-1] if z.dim() else 1
        for role, factors in (("q(z|x)", q_factors), ("p(z)", p_factors)):
            if not factors.batch_shape or factors.batch_shape[-1] != width or \
                    factors.event_shape:
                raise ConfigError(
                    f"free bits per dimension needs q(z|x) and p(z) that factorize over the "
                    f"dimensions of {name!r}; its {role} does not (a "
                    f"{type(factors).__name__.lstrip('_')}): use --free-bits-group site")
        kl = _analytic(q_factors, p_factors) if self.analytic else None
        if kl is None:
            kl = q_factors.log_prob(z) - p_factors.log_prob(z)
        return kl.reshape(-1, width)

    def _particle_loss(self, model_trace: Any, guide_trace: Any) -> torch.Tensor:
        """-L_lambda of one particle, summed over the minibatch, differentiable."""
        loss: Any = 0.0
        for site in model_trace.nodes.values():
            if site["type"] == "sample" and site["is_observed"]:
                loss = loss - site["log_prob_sum"]
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample" or site["is_observed"]:
                continue
            guide_site = guide_trace.nodes.get(name)
            if guide_site is None or guide_site["infer"].get("enumerate"):
                raise ConfigError(f"free bits needs every latent site drawn by the guide; "
                                  f"{name!r} is summed out or not in the guide")
            if not guide_site["fn"].has_rsample:
                raise ConfigError(f"free bits needs reparameterised latent sites; {name!r} "
                                  f"cannot be reparameterised")
            kl = self._kl(name, guide_site, site)  # (N, G)
            floored = kl.mean(0).clamp(min=self.free_bits).sum() * kl.shape[0]
            loss = loss + guide_site["scale"] * floored
        return torch.as_tensor(loss)

    def differentiable_loss(self, model: Callable[..., object], guide: Callable[..., object],
                            *args: Any, **kwargs: Any) -> torch.Tensor:
        """-L_lambda summed over the minibatch, averaged over particles: a scalar, nats."""
        loss: Any = 0.0
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            loss = loss + self._particle_loss(model_trace, guide_trace) / self.num_particles
        return torch.as_tensor(loss)

    def loss(self, model: Callable[..., object], guide: Callable[..., object], *args: Any,
             **kwargs: Any) -> float:
        with torch.no_grad():
            return self.differentiable_loss(model, guide, *args, **kwargs).item()

    def loss_and_grads(self, model: Callable[..., object], guide: Callable[..., object],
                       *args: Any, **kwargs: Any) -> float:
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward(retain_graph=self.retain_graph)
        return loss.item()
