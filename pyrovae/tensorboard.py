"""TensorBoard event files for a training run: ELBOs, their terms, the learning rate, log p(x),
the latent usage and sample grids per epoch.

Needs the ``tensorboard`` package (``pip install 'pyrovae[tensorboard]'``); ``metrics.csv``
is written either way.  The KL and reconstruction terms are
:func:`~pyrovae.evaluation.elbo_terms` of the program on the first test points, one draw
per point, averaged: nats.

Example::

    writer = TensorBoardWriter("runs/vae/tensorboard", image_shape=(1, 28, 28))
    fit(vae, data, epochs=10, callbacks=[writer])
    writer.close()
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pyrovae.callbacks import Callback
from pyrovae.errors import ConfigError
from pyrovae.evaluation import elbo_terms
from pyrovae.programs import as_data

#: test points the KL and reconstruction terms are read on
TERMS_POINTS = 500


class TensorBoardWriter(Callback):
    """A callback of :func:`~pyrovae.train.fit` (:mod:`pyrovae.callbacks`) that writes TensorBoard
    scalars (``elbo/train``, ``elbo/test``, ``elbo/validation``, ``terms/reconstruction``,
    ``terms/kl``, ``lr``, ``log_px/test``; with ``--activity-every``, ``activity/active_units``,
    ``activity/active_units_<site>`` per latent site of a hierarchy and
    ``activity/mutual_information``, nats) and a grid of decoded prior samples per epoch.
    A scalar that is NaN in an epoch's record (not measured that epoch) is not written.

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

    def on_epoch_end(self, loop: Any, record: Any) -> None:
        if loop.strategy.is_main:
            self(record, loop)

    def __call__(self, record: Any, loop: Any) -> None:
        """Write ``record``'s epoch (also usable as ``fit``'s ``on_epoch_end`` function)."""
        epoch = record.epoch
        scalars = {"elbo/train": record.train_elbo, "elbo/test": record.test_elbo,
                   "elbo/validation": record.valid_elbo, "log_px/test": record.test_log_px,
                   "lr": loop.optimizer.param_groups[0]["lr"],
                   "activity/active_units": record.active_units,
                   "activity/mutual_information": record.mutual_information}
        if len(record.active_units_per_site or {}) > 1:  # a hierarchy's layers, as metrics.csv
            scalars.update({f"activity/active_units_{site}": float(count)
                            for site, count in record.active_units_per_site.items()})
        first = tuple(a[:TERMS_POINTS] for a in as_data(loop.data.test_inputs))
        loop.program.train(False)
        if not loop.program.structure(*first).enumerates:  # those terms do not split
            terms = elbo_terms(loop.program, first, batch_size=TERMS_POINTS)
            scalars.update({f"terms/{name}": value.mean().item()
                            for name, value in terms.items()})
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
