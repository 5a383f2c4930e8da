"""Training objectives: Pyro ELBO implementations selectable by name.

- ``trace_elbo``: :class:`pyro.infer.Trace_ELBO`, the Monte Carlo ELBO with the
  reparameterisation trick;
- ``meanfield_elbo``: :class:`pyro.infer.TraceMeanField_ELBO`, which uses the analytic
  KL(q(z|x) || p(z)) where the pair has one and falls back to Monte Carlo otherwise.
"""

from __future__ import annotations

from pyro.infer import ELBO, Trace_ELBO, TraceMeanField_ELBO

#: objectives selectable by name from the CLI and config
OBJECTIVES: dict[str, type[ELBO]] = {
    "trace_elbo": Trace_ELBO,
    "meanfield_elbo": TraceMeanField_ELBO,
}


def make_objective(name: str, num_particles: int = 1) -> ELBO:
    """An ELBO from :data:`OBJECTIVES` that draws ``num_particles`` z per data point, vectorized.

    The loss it returns is minus the ELBO summed over the minibatch, in nats.
    """
    from pyrovae.errors import ConfigError

    if name not in OBJECTIVES:
        raise ConfigError(f"unknown objective {name!r}; known: {', '.join(OBJECTIVES)}")
    if num_particles < 1:
        raise ConfigError(f"num_particles must be positive, got {num_particles}")
    # our models have exactly one plate (the data plate), so nesting is known up front
    return OBJECTIVES[name](num_particles=num_particles, vectorize_particles=num_particles > 1,
                            max_plate_nesting=1)
