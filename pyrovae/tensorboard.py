"""TensorBoard event files for a training run: ELBOs, their terms, the learning rate, log p(x)
and sample grids per epoch.

Needs the ``tensorboard`` package (``pip install 'pyrovae[tensorboard]'``); ``metrics.csv``
is written either way.  The KL and reconstruction terms are read from one trace of the
program on the first test points: reconstruction = E_q[log p(x | z)] (the observed sites),
KL = E_q[log q(z | x) - log p(z)] (the latent sites), one draw per point, nats.

Example::

    writer = TensorBoardWriter("runs/vae/tensorboard", image_shape=(1, 28, 28))
    fit(vae, data, epochs=10, on_epoch_end=writer)
    writer.close()
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from pyrovae.errors import ConfigError
from pyrovae.evaluation import particle_traces
from pyrovae.programs import as_data, as_program, is_sample_site

#: test points the KL and reconstruction terms are read on
TERMS_POINTS = 500


def elbo_terms(program: Any, x: torch.Tensor | Sequence[torch.Tensor]) -> dict[str, float]:
    """The mean over points of the reconstruction and KL terms of a one-draw ELBO, nats;
    empty for a program that sums sites out by enumeration (its terms do not split so)."""
    program, args = as_program(program), as_data(x)
    with torch.no_grad():
        structure = program.structure(*args)
        if structure.enumerates:
            return {}
        model_trace, guide_trace = particle_traces(
            program.model, program.guide, *args, num_samples=1,
            max_plate_nesting=structure.max_plate_nesting)
    reconstruction = kl = 0.0
    for site in model_trace.nodes.values():
        if not is_sample_site(site):
            continue
        value = site["fn"].log_prob(site["value"]).sum().item()
        if site["is_observed"]:
            reconstruction += value
        else:
            kl -= value
    for site in guide_trace.nodes.values():
        if is_sample_site(site) and not site["is_observed"]:
            kl += site["fn"].log_prob(site["value"]).sum().item()
    num_points = args[0].shape[0]
    return {"reconstruction": reconstruction / num_points, "kl": kl / num_points}


class TensorBoardWriter:
    """An ``on_epoch_end`` callback of :func:`~pyrovae.train.fit` that writes TensorBoard
    scalars (``elbo/train``, ``elbo/test``, ``elbo/validation``, ``terms/reconstruction``,
    ``terms/kl``, ``lr``, ``log_px/test``) and a grid of decoded prior samples per epoch.

    :param log_dir: the folder of the event files.
    :param image_shape: ``(C, H, W)`` of the data, for the sample grid; ``None``: no grid.
    :param num_samples: images in the grid.
    :raises ConfigError: the ``tensorboard`` package is not installed.
    """

    def __init__(self, log_dir: str | Path, *, image_shape: Sequence[int] | None = None,
                 num_samples: int = 64) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("--tensorboard needs the tensorboard package: "
                              "pip install 'pyrovae[tensorboard]'") from None
        self.writer = SummaryWriter(str(log_dir))
        self.image_shape = tuple(image_shape) if image_shape is not None else None
        self.num_samples = num_samples

    def __call__(self, record: Any, loop: Any) -> None:
        epoch = record.epoch
        scalars = {"elbo/train": record.train_elbo, "elbo/test": record.test_elbo,
                   "elbo/validation": record.valid_elbo, "log_px/test": record.test_log_px,
                   "lr": loop.optimizer.param_groups[0]["lr"]}
        test = loop.data.test_inputs
        first = tuple(a[:TERMS_POINTS] for a in as_data(test))
        loop.program.train(False)
        scalars.update({f"terms/{name}": value
                        for name, value in elbo_terms(loop.program, first).items()})
        for tag, value in scalars.items():
            if not math.isnan(value):
                self.writer.add_scalar(tag, value, epoch)
        sample = getattr(loop.program.module, "sample", None)
        if self.image_shape is not None and callable(sample):
            try:
                images = sample(self.num_samples)
            except (TypeError, ValueError):  # a model whose samples need labels
                images = None
            if images is not None:
                grid = images.reshape(-1, *self.image_shape).clamp(0, 1).cpu()
                self.writer.add_images("samples", grid, epoch)
        loop.program.train()
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
