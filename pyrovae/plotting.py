"""Figures of a trained model: image grids of samples and reconstructions, and learning curves.

Images are rows ``(N, D)`` of values in [0, 1] with ``D = prod(image_shape)`` and
``image_shape = (channels, height, width)``.  Every file is written atomically
(:func:`~pyrovae.rundir.write_atomically`), so a kill never leaves half a PNG.  Figures
are drawn on :class:`matplotlib.figure.Figure` objects, not through ``pyplot``'s global
state, so no backend needs choosing and nothing stays open.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from pyrovae.config import LABEL_MODELS
from pyrovae.errors import ConfigError
from pyrovae.rundir import write_atomically
from pyrovae.train import EpochRecord


def image_grid(images: torch.Tensor, image_shape: Sequence[int], nrow: int, *,
               pad_value: float = 1.0) -> torch.Tensor:
    """``images`` ``(N, D)`` as one ``(channels, H, W)`` grid of ``nrow`` per row, on the CPU,
    with 2 pixels of ``pad_value`` between images."""
    from torchvision.utils import make_grid

    images = images.reshape(images.shape[0], *image_shape).clamp(0, 1).cpu()
    return make_grid(images, nrow=nrow, padding=2, pad_value=pad_value)


#: the pixels each image of a sample grid spans at least, on its longer side: small images
#: are enlarged by a whole factor (a 28x28 digit to 84x84, an 8x8 one to 80x80), so an 8x8
#: grid of digits is 726 pixels wide instead of 242
MIN_IMAGE_PIXELS = 80


def display_scale(image_shape: Sequence[int]) -> int:
    """The whole factor that enlarges an image of ``image_shape`` ``(channels, height,
    width)`` to at least :data:`MIN_IMAGE_PIXELS` on its longer side (1 for larger ones)."""
    return max(1, math.ceil(MIN_IMAGE_PIXELS / max(image_shape[1:])))


def save_image_grid(images: torch.Tensor, path: str | Path, image_shape: Sequence[int],
                    nrow: int, *, pad_value: float = 1.0, scale: int = 1) -> None:
    """Save ``images`` ``(N, D)`` with values in [0, 1] as a PNG grid of ``nrow`` per row.

    :param scale: enlarge the grid by this whole factor, each pixel a ``scale x scale``
        block (nearest neighbour: no blur between pixels).
    """
    from torchvision.utils import save_image

    grid = image_grid(images, image_shape, nrow, pad_value=pad_value)
    if scale > 1:
        grid = grid.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    write_atomically(path, lambda handle: save_image(grid, handle, format="png"))


def save_sample_grid(vae: Any, path: str | Path, image_shape: Sequence[int] | None,
                     num_samples: int = 64, label: int | None = None) -> None:
    """Decode ``num_samples`` z ~ p(z) and save E[x|z] as an image grid PNG, small images
    enlarged to be seen (:func:`display_scale`).

    :param vae: a :class:`~pyrovae.models.VAE` or any model with ``sample(n)`` and
        ``data_dim`` (a model of labelled data also has ``num_classes`` and ``check_label``).
    :param label: a model of labelled data draws this class (0..C-1) only; without one, its
        grid holds every class in turn, one row per class where ``num_samples`` is a
        multiple of C.  A model without labels refuses a ``label`` (:class:`ConfigError`).
    """
    if image_shape is None:
        raise ConfigError("the data are not images (no image shape); cannot draw a grid")
    shape = tuple(image_shape)
    if len(shape) != 3 or math.prod(shape) != vae.data_dim:
        raise ConfigError(f"image shape {shape} is not (channels, height, width) of the "
                          f"model's {vae.data_dim} values per data point")
    num_classes = getattr(vae, "num_classes", None)
    nrow = int(num_samples**0.5) or 1
    if num_classes is None:
        if label is not None:
            raise ConfigError(f"--label needs a model of labelled data (--model "
                              f"{' or '.join(LABEL_MODELS)}); this one is a "
                              f"{type(vae).__name__} without labels")
        images = vae.sample(num_samples)
    elif label is None:
        images = vae.sample(num_samples, label=torch.arange(num_samples) * num_classes // num_samples)
        nrow = num_samples // num_classes if num_samples % num_classes == 0 else nrow
    else:
        images = vae.sample(num_samples, label=vae.check_label(label))
    # black between images, as torchvision draws by default
    save_image_grid(images.reshape(num_samples, -1), path, shape, nrow, pad_value=0.0,
                    scale=display_scale(shape))


def program_samples(program: Any, num_samples: int, data_dim: int) -> torch.Tensor:
    """``(num_samples, data_dim)`` values of x drawn from your own program, for a grid.

    The program's own ``sample(num_samples)`` method where it has one (its values are
    taken as they come, reshaped to rows); else one run of its model on an all-zero
    ``(num_samples, data_dim)`` template with every observation unconditioned
    (``poutine.uncondition``): the observed site of the template's size gives E[x | z], the
    mean of its distribution (a draw where the distribution has no mean), z from the prior.

    :raises ProgramError: the model needs more than x, fails on the template, or has no
        observed site of x's size; the message says how to make it draw.
    """
    import pyro
    from pyro import poutine

    from pyrovae.programs import ProgramError, as_program, observed_site_of_size

    sample = getattr(program, "sample", None)
    if callable(sample):
        with torch.no_grad():
            return sample(num_samples).reshape(num_samples, -1)
    resolved = as_program(program)
    template = torch.zeros(num_samples, data_dim, device=resolved.device)
    advice = "; give the program a sample(num_samples) method returning (N, D) values"
    try:
        with torch.no_grad(), pyro.validation_enabled(False):
            conditioned = poutine.trace(resolved.model).get_trace(template)
            drawn = poutine.trace(poutine.uncondition(resolved.model)).get_trace(template)
    except Exception as error:  # the user's model can fail in any way on the template
        raise ProgramError(f"the program cannot draw x: its model, run on x alone without "
                           f"observations, failed ({type(error).__name__}: {error}){advice}"
                           ) from None
    site = drawn.nodes[observed_site_of_size(conditioned, template.numel(), "draw x", advice)]
    try:
        values = site["fn"].mean
    except NotImplementedError:
        values = site["value"]
    return values.detach().reshape(num_samples, -1)


def save_program_samples(program: Any, path: str | Path, image_shape: Sequence[int] | None,
                         data_dim: int, num_samples: int = 64) -> None:
    """:func:`program_samples` of your own program saved as an image grid PNG, as
    :func:`save_sample_grid` saves a VAE's.

    :raises ConfigError: the data are not images of ``data_dim`` values.
    :raises ProgramError: the program cannot draw x.
    """
    if image_shape is None or math.prod(image_shape) != data_dim or len(image_shape) != 3:
        raise ConfigError(f"the data are not images of {data_dim} values (image shape "
                          f"{image_shape}); cannot draw a grid")
    images = program_samples(program, num_samples, data_dim)
    save_image_grid(images, path, tuple(image_shape), int(num_samples**0.5) or 1, pad_value=0.0)


def save_reconstructions(vae: Any, x: torch.Tensor, path: str | Path,
                         image_shape: Sequence[int], *, num_images: int = 10) -> None:
    """The first ``num_images`` rows of ``x`` (top row) above E[x' | z], z ~ q(z | x) (bottom
    row).

    :param vae: a model with ``reconstruct(x)`` (a :class:`~pyrovae.models.VAE`).
    """
    x = x[:num_images]
    images = torch.cat([x.cpu(), vae.reconstruct(x).cpu()])
    save_image_grid(images, path, image_shape, nrow=x.shape[0])


def _save_figure(figure: Any, path: str | Path) -> None:
    write_atomically(path, lambda handle: figure.savefig(handle, format="png", dpi=120))


def plot_image_rows(rows: Mapping[str, torch.Tensor], path: str | Path,
                    image_shape: Sequence[int], *, title: str) -> None:
    """One labelled row of images ``(N, D)`` per entry of ``rows`` (e.g. reconstructions per
    setting), in one PNG."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 1.3 * len(rows) + 0.6))
    axes = figure.subplots(len(rows), 1, squeeze=False)
    for axis, (label, images) in zip(axes[:, 0], rows.items(), strict=True):
        grid = image_grid(images, image_shape, nrow=images.shape[0])
        axis.imshow(grid.permute(1, 2, 0).numpy(), cmap="gray", vmin=0, vmax=1)
        axis.set_ylabel(label, rotation=0, ha="right", va="center")
        axis.set_xticks([])
        axis.set_yticks([])
    figure.suptitle(title)
    figure.tight_layout()
    _save_figure(figure, path)


def plot_elbo_curves(histories: Mapping[str, Sequence[EpochRecord]], path: str | Path, *,
                     title: str, log_px_labels: Mapping[str, str] | None = None,
                     published: Mapping[str, float] | None = None,
                     final: Mapping[str, float] | None = None) -> None:
    """Train objective and test ELBO per epoch, one colour per run, and the test log p(x)
    at the epochs that estimated it (``log_px_every``); nats per data point.

    :param histories: per run name, its epoch records (:func:`~pyrovae.train.read_metrics`).
    :param log_px_labels: per run name, what its log p(x) curve estimates (e.g. ``"K=1000,
        first 1000 images"``), for the legend.
    :param published: per run name, a published log p(x), drawn as a dashed line.
    :param final: per run name, our final test log p(x), drawn as a point at the last epoch.
    """
    from matplotlib import rcParams
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.5, 4.8))
    axis = figure.subplots()
    colors = rcParams["axes.prop_cycle"].by_key()["color"]
    shown: list[float] = []  # values after the first epoch, which would squash the y axis
    for index, (name, records) in enumerate(histories.items()):
        color = colors[index % len(colors)]
        epochs = [r.epoch for r in records]
        later = records[1:] if len(records) > 2 else records
        shown += [v for r in later for v in (r.train_elbo, r.test_elbo, r.test_log_px)
                  if math.isfinite(v)]
        shown += [table[name] for table in (published, final)
                  if table and table.get(name) is not None]
        axis.plot(epochs, [r.train_elbo for r in records], color=color, alpha=0.45, lw=1,
                  label=f"{name}: train objective")
        tested = [(r.epoch, r.test_elbo) for r in records if math.isfinite(r.test_elbo)]
        if tested:
            axis.plot(*zip(*tested, strict=True), color=color,
                      marker="." if len(tested) < 30 else None, lw=1.6, label=f"{name}: test ELBO")
        curve = [(r.epoch, r.test_log_px) for r in records if math.isfinite(r.test_log_px)]
        if curve:
            estimate = (log_px_labels or {}).get(name)
            axis.plot(*zip(*curve, strict=True), color=color, marker="o", ms=3.5, lw=1.2, ls=":",
                      label=f"{name}: test log p(x)" + (f", {estimate}" if estimate else ""))
        if final and name in final and epochs:
            axis.plot([epochs[-1]], [final[name]], color=color, marker="*", ms=11, ls="",
                      label=f"{name}: test log p(x), final")
        if published and published.get(name) is not None:
            axis.axhline(published[name], color=color, ls="--", lw=1,
                         label=f"{name}: published log p(x)")
    if shown:
        low, high = min(shown), max(shown)
        margin = 0.05 * (high - low) + 0.5
        axis.set_ylim(low - margin, high + margin)
    axis.set_xlabel("epoch")
    axis.set_ylabel("nats per image")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    _save_figure(figure, path)
