"""Names of the Pyro sites shared by every model and guide.

Keeping them in one place lets the evaluation code find the latent and
observed sites of any :class:`~pyrovae.models.VAE` without guessing.
"""

from __future__ import annotations

#: the plate over data points; always the rightmost batch dimension (``dim=-1``)
DATA_PLATE = "data"
#: the latent variable z, event shape ``(latent_dim,)``
LATENT_SITE = "z"
#: the observed data x, event shape ``(data_dim,)``
OBSERVED_SITE = "x"
#: an observed class label y of a model of labelled data (integers 0..C-1)
LABEL_SITE = "y"
#: the label y of an unlabelled point, drawn by the guide and summed out by enumeration
UNLABELLED_SITE = "y_unlabelled"
#: the classifier q(y|x) scored on the observed labels (a training term, not part of p(x))
CLASSIFIED_SITE = "y_classified"
#: the plate over importance samples added by the evaluation code (``dim=-2``)
PARTICLE_PLATE = "particles"


def layer_site(layer: int) -> str:
    """The site of latent layer ``layer`` of a hierarchical model: ``"z1"`` next to x,
    ``"z2"`` above it, and so on; event shape ``(latent_dims[layer - 1],)``."""
    if layer < 1:
        raise ValueError(f"latent layers count from 1, got {layer}")
    return f"{LATENT_SITE}{layer}"
