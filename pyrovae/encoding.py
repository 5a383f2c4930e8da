"""``pyrovae encode`` and ``pyrovae reconstruct``: what a trained run makes of its data.

``encode`` writes, for every point of a split, the guide's posterior mean and standard
deviation of each latent site (and optionally draws from it) to an ``.npz`` file, with the
points' class labels where the data has them; ``reconstruct`` draws a PNG grid of inputs
above their reconstructions E[x' | z].  Both read the run's checkpoint and, unless told
otherwise, its own dataset.

Posterior moments come from the Pyro guide's trace: a site's closed-form mean and standard
deviation where its distribution has them and no other latent site is drawn before it (the
VAE's q(z|x), whatever its family); otherwise (an IAF guide, the upper layers of a hierarchy,
whose q depends on the draw below) the mean and standard deviation of
``moment_samples`` draws.
"""

from __future__ import annotations

import argparse
import io
import logging
import math
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from pyrovae.argtypes import device_name, non_negative_int, positive_int, seed
from pyrovae.config import LABEL_MODELS, TrainConfig
from pyrovae.data import LABELLED_DATASETS, load_dataset
from pyrovae.devices import resolve_device, seed_everything
from pyrovae.errors import ConfigError, PyrovaeError
from pyrovae.plotting import save_image_grid
from pyrovae.programs import as_program, observed_site_of_size
from pyrovae.rundir import write_atomically
from pyrovae.validation import check_data

logger = logging.getLogger(__name__)

#: the splits ``encode`` and ``reconstruct`` read
SPLITS = ("test", "train")
#: guide draws behind a Monte Carlo mean and standard deviation
MOMENT_SAMPLES = 100
ENCODING_NAME = "encoding_{split}.npz"
RECONSTRUCTIONS_NAME = "reconstructions.png"
#: the arrays by which an ``.npz`` is taken for an earlier ``encode`` output
_ENCODING_ARRAYS = ("split.npy", "dataset.npy", "epoch.npy")


def split_points(config: TrainConfig, device: torch.device, *, split: str = "test",
                 dataset: str | None = None, data_dir: str | None = None, seed: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, ...] | None]:
    """The points of ``split`` of the run's dataset (or ``dataset``), as the run's model
    scores them, with their labels where the data has them and the image shape.

    Binarized as the run was: under dynamic binarization the stored grey levels of the
    training split are drawn once, from a generator seeded by ``seed``.

    :returns: ``(x (N, D), labels (N,) or None, image_shape or None)`` on ``device``.
    """
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    name = dataset or config.dataset
    options = {"binarize": config.binarize, "download": config.download,
               "test_fraction": config.test_fraction}
    folder = data_dir if data_dir is not None else config.data_dir
    data = None
    if name in LABELLED_DATASETS or name.startswith("npz:"):
        try:
            data = load_dataset(name, folder, labels=True, **options)
        except PyrovaeError:  # an npz file without label arrays
            data = None
    if data is None:
        data = load_dataset(name, folder, **options)
    if split == "test":
        x, labels = data.test, data.test_labels
    else:
        x, labels = data.train, data.train_labels
        if data.dynamic_binarization:
            generator = torch.Generator().manual_seed(seed)
            x = torch.bernoulli(x, generator=generator)
    return x.to(device), None if labels is None else labels.to(device), data.image_shape


def _is_encoding(path: Path) -> bool:
    """Whether ``path`` is an ``.npz`` that ``encode`` wrote (read from its zip directory
    alone, whatever its size)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return set(_ENCODING_ARRAYS) <= set(archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _is_png(path: Path) -> bool:
    from pyrovae.runs import PNG_SIGNATURE

    with open(path, "rb") as handle:
        return handle.read(len(PNG_SIGNATURE)) == PNG_SIGNATURE


def _check_points(model: Any, config: TrainConfig, saved: dict[str, Any], x: torch.Tensor,
                  split: str) -> None:
    """Refuse points the run's model cannot take: a VAE checks its own; your program is
    held to the width of the data it was trained on."""
    if config.program is None:
        model.check_data(x, name=f"the {split} points")
    else:
        check_data(x, saved.get("data_dim"), name=f"the {split} points")


def _refuse_label_models(config: TrainConfig, command: str) -> None:
    if config.model in LABEL_MODELS:
        raise ConfigError(f"{command} takes models of x alone; this run's model is "
                          f"{config.model}, whose guide needs the label")


@torch.no_grad()
def posterior_moments(program: Any, x: torch.Tensor, *, batch_size: int = 1000,
                      num_samples: int = 0, moment_samples: int = MOMENT_SAMPLES
                      ) -> dict[str, torch.Tensor]:
    """The guide's posterior mean and standard deviation of every latent site, per point.

    :param program: a VAE, an object with ``model`` and ``guide``, or a ``(model, guide)``
        pair, taking ``x`` alone.
    :param x: ``(N, D)``.
    :param num_samples: also this many draws of each site per point.
    :param moment_samples: draws behind a Monte Carlo mean and standard deviation.
    :returns: ``{"<site>_loc": (N, L), "<site>_scale": (N, L)}`` and, with
        ``num_samples``, ``"<site>_samples": (num_samples, N, L)``, float32 on the CPU, and
        ``"<site>_moments"``: a 0-d string array, ``"exact"`` or ``"monte_carlo_<S>"``.
    """
    program = as_program(program)
    nesting = program.structure(x[:1]).max_plate_nesting
    parts: dict[str, list[torch.Tensor]] = {}
    kinds: dict[str, str] = {}
    was_training = program.module.training if program.module is not None else False
    program.train(False)
    try:
        with pyro.validation_enabled(False):
            for batch in x.split(batch_size):
                _encode_batch(program, batch, nesting, num_samples, moment_samples, parts, kinds)
    finally:
        program.train(was_training)
    values: dict[str, Any] = {}
    for key, chunks in parts.items():
        values[key] = torch.cat(chunks, dim=1 if key.endswith("_samples") else 0).float()
    for site, kind in kinds.items():
        values[f"{site}_moments"] = np.array(kind)
    return values


def _latent_sites(trace: Any) -> list[str]:
    return [name for name, site in trace.nodes.items()
            if site["type"] == "sample" and not site["is_observed"]
            and not site_is_subsample(site)]


def _encode_batch(program: Any, batch: torch.Tensor, nesting: int, num_samples: int,
                  moment_samples: int, parts: dict[str, list[torch.Tensor]],
                  kinds: dict[str, str]) -> None:
    """Add one batch's moments (and draws) of every latent site to ``parts``."""
    trace = poutine.trace(program.guide).get_trace(batch)
    sites = _latent_sites(trace)
    count = max(num_samples, moment_samples)
    drawn = None
    for position, name in enumerate(sites):
        fn = trace.nodes[name]["fn"]
        exact = None
        if position == 0:
            try:
                exact = (fn.mean, fn.stddev)
            except NotImplementedError:
                exact = None
        if exact is None or num_samples:
            if drawn is None:
                with pyro.plate("encode_particles", count, dim=-(nesting + 1)):
                    drawn = poutine.trace(program.guide).get_trace(batch)
            draws = drawn.nodes[name]["value"].reshape(count, batch.shape[0], -1).cpu()
        if exact is None:
            loc, scale = draws.mean(0), draws.std(0)
            kinds[name] = f"monte_carlo_{count}"
        else:
            loc, scale = (value.reshape(batch.shape[0], -1).cpu() for value in exact)
            kinds.setdefault(name, "exact")
        parts.setdefault(f"{name}_loc", []).append(loc)
        parts.setdefault(f"{name}_scale", []).append(scale)
        if num_samples:
            parts.setdefault(f"{name}_samples", []).append(draws[:num_samples])


def encode_checkpoint(checkpoint: str | Path, device: torch.device, *, split: str = "test",
                      dataset: str | None = None, data_dir: str | None = None,
                      num_samples: int = 0, batch_size: int = 1000, seed: int = 0,
                      output: str | Path | None = None, program: str | None = None,
                      force: bool = False) -> Path:
    """What ``pyrovae encode`` does: :func:`posterior_moments` of every point of ``split``
    written to an ``.npz`` (default ``encoding_<split>.npz`` in the run directory, or the
    next free ``-N`` name), with ``labels`` where the data has them, ``split``, ``dataset``
    and the checkpoint's ``epoch``.

    :param program: a run of your own program: its spec again
        (:func:`~pyrovae.runs.load_run_checkpoint`).
    :param force: replace an ``output`` that is not an earlier encoding (refused otherwise).
    :returns: the file written.
    """
    from pyrovae.runs import check_output, free_name, load_run_checkpoint, run_dir_of

    vae, config, saved = load_run_checkpoint(checkpoint, device, program=program,
                                             command="encode")
    _refuse_label_models(config, "encode")
    output = Path(output) if output else free_name(
        run_dir_of(checkpoint) / ENCODING_NAME.format(split=split))
    check_output(output, kind="a pyrovae encoding (.npz)", same_kind=_is_encoding, force=force)
    x, labels, _ = split_points(config, device, split=split, dataset=dataset,
                                data_dir=data_dir, seed=seed)
    _check_points(vae, config, saved, x, split)
    seed_everything(seed)
    values = posterior_moments(vae, x, batch_size=batch_size, num_samples=num_samples)
    arrays = {key: value.numpy() if torch.is_tensor(value) else value
              for key, value in values.items()}
    if labels is not None:
        arrays["labels"] = labels.cpu().numpy()
    arrays.update(split=np.array(split), dataset=np.array(dataset or config.dataset),
                  epoch=np.array(saved["epoch"]))

    def write(handle: Any) -> None:
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        handle.write(buffer.getvalue())

    write_atomically(output, write)
    return output


@torch.no_grad()
def program_reconstructions(program: Any, x: torch.Tensor) -> torch.Tensor:
    """E[x' | z] for one draw of every latent site from your program's guide: the guide run
    on ``x``, the model replayed on its draws, and the mean of the model's observed site of
    ``x``'s size (a draw where that distribution has no mean): ``(N, D)``.

    :raises ProgramError: the model has no single observed site of ``x``'s size.
    """

    resolved = as_program(program)
    with pyro.validation_enabled(False):
        guide_trace = poutine.trace(resolved.guide).get_trace(x)
        trace = poutine.trace(poutine.replay(resolved.model, trace=guide_trace)).get_trace(x)
    site = trace.nodes[observed_site_of_size(trace, x.numel(), "reconstruct x")]
    try:
        values = site["fn"].mean
    except NotImplementedError:
        values = site["fn"].sample()
    return values.reshape(x.shape[0], -1)


@torch.no_grad()
def reconstruction_grid(vae: Any, x: torch.Tensor, *, columns: int = 8,
                        decode: str = "sample") -> torch.Tensor:
    """Rows of ``columns`` inputs, each above the row of their reconstructions: ``(2 R
    columns, D)`` for R = ceil(N / columns) row pairs, blank (zero) images filling the last.

    :param vae: a VAE, or your own program (:func:`program_reconstructions`, ``decode``
        ``"sample"`` only).
    :param decode: ``"sample"``, E[x' | z] for one z ~ q(z | x) (``vae.reconstruct``);
        ``"mean"``, E[x' | z] at z = E[z | x] (a VAE's decoder and likelihood).
    """
    own_program = not all(hasattr(vae, name)
                          for name in ("reconstruct", "encode", "decoder", "likelihood"))
    if own_program and decode == "mean":
        raise ConfigError("--decode mean is for the built-in models (their decoder at E[z|x]); "
                          "your program's run reconstructs with --decode sample")
    if decode == "sample":
        reconstructions = program_reconstructions(vae, x) if own_program else vae.reconstruct(x)
    elif decode == "mean":
        try:
            z = vae.encode(x).mean
        except NotImplementedError:
            raise ConfigError("this guide has no closed-form posterior mean; use --decode "
                              "sample") from None
        reconstructions = vae.likelihood.mean(vae.decoder(z))
    else:
        raise ConfigError(f"unknown decode {decode!r}; known: sample, mean")
    rows = math.ceil(x.shape[0] / columns)
    blank = rows * columns - x.shape[0]
    pad = x.new_zeros(blank, x.shape[1])
    inputs = torch.cat([x, pad]).reshape(rows, columns, -1)
    outputs = torch.cat([reconstructions, pad]).reshape(rows, columns, -1)
    return torch.stack([inputs, outputs], dim=1).reshape(2 * rows * columns, -1).cpu()


def reconstruct_checkpoint(checkpoint: str | Path, device: torch.device, *,
                           num_images: int = 32, columns: int = 8, split: str = "test",
                           dataset: str | None = None, data_dir: str | None = None,
                           decode: str = "sample", seed: int = 0,
                           output: str | Path | None = None, program: str | None = None,
                           force: bool = False) -> Path:
    """What ``pyrovae reconstruct`` does: the first ``num_images`` points of ``split`` above
    their reconstructions (:func:`reconstruction_grid`), as a PNG (default
    ``reconstructions.png`` in the run directory, or the next free ``-N`` name).

    :param program: a run of your own program: its spec again
        (:func:`~pyrovae.runs.load_run_checkpoint`).
    :param force: replace an ``output`` that is not a PNG image (refused otherwise).
    :returns: the file written.
    """
    from pyrovae.runs import check_output, free_name, load_run_checkpoint, run_dir_of

    vae, config, saved = load_run_checkpoint(checkpoint, device, program=program,
                                             command="reconstruct")
    _refuse_label_models(config, "reconstruct")
    image_shape = saved.get("image_shape")
    if image_shape is None:
        raise ConfigError("the run's data are not images (no image shape); cannot draw a grid")
    output = Path(output) if output else free_name(run_dir_of(checkpoint) / RECONSTRUCTIONS_NAME)
    check_output(output, kind="a PNG image", same_kind=_is_png, force=force)
    x, _, _ = split_points(config, device, split=split, dataset=dataset, data_dir=data_dir,
                           seed=seed)
    x = x[:num_images]
    _check_points(vae, config, saved, x, split)
    seed_everything(seed)
    as_program(vae).train(False)
    grid = reconstruction_grid(vae, x, columns=columns, decode=decode)
    save_image_grid(grid, output, tuple(image_shape), nrow=columns, pad_value=0.0)
    return output


# --- the commands -----------------------------------------------------------------------------

def _common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint.pt or the run directory holding it")
    parser.add_argument("--split", choices=SPLITS, default="test",
                        help="which points (default: test)")
    parser.add_argument("--dataset", default=None,
                        help="read another dataset of the same shape (a name or npz:PATH, "
                             "npy:PATH, folder:PATH; default: the run's)")
    parser.add_argument("--data-dir", default=None, help="override the run's data folder")
    parser.add_argument("--device", type=device_name, default="auto",
                        help="cpu, cuda, cuda:N or auto (default: auto)")
    parser.add_argument("--seed", type=seed, default=0,
                        help="random seed of the draws (and of the training split's "
                             "binarization under dynamic binarization; default: 0)")
    parser.add_argument("--program", default=None, metavar="FILE.py:NAME",
                        help="a run of your own program: the program it was trained with, "
                             "named again (pyrovae never imports code because a run directory "
                             "names it); built with the run's recorded --program-args")


def encode_command(args: argparse.Namespace) -> int:
    output = encode_checkpoint(args.checkpoint, resolve_device(args.device), split=args.split,
                               dataset=args.dataset, data_dir=args.data_dir,
                               num_samples=args.num_samples, batch_size=args.batch_size,
                               seed=args.seed, output=args.output, program=args.program,
                               force=args.force)
    print(f"posterior means and scales of the {args.split} points written to {output}")
    return 0


def reconstruct_command(args: argparse.Namespace) -> int:
    output = reconstruct_checkpoint(args.checkpoint, resolve_device(args.device),
                                    num_images=args.num_images, columns=args.columns,
                                    split=args.split, dataset=args.dataset,
                                    data_dir=args.data_dir, decode=args.decode, seed=args.seed,
                                    output=args.output, program=args.program,
                                    force=args.force)
    print(f"{args.num_images} {args.split} images and their reconstructions written to {output}")
    return 0


def add_commands(commands: Any) -> None:
    """Add ``encode`` and ``reconstruct`` to the ``pyrovae`` command's subparsers."""
    encode = commands.add_parser(
        "encode", help="posterior means and scales of every point to an .npz",
        description="Write the guide's posterior mean and standard deviation of every point "
                    "of a split (and optionally draws), with the labels where the data has "
                    "them, to an .npz: arrays z_loc, z_scale (N, latent_dim), z_samples (S, N, "
                    "latent_dim), labels (N,), per latent site.")
    _common_arguments(encode)
    encode.add_argument("--num-samples", "-n", type=non_negative_int, default=0,
                        help="also draw this many z ~ q(z|x) per point (default: 0)")
    encode.add_argument("--batch-size", type=positive_int, default=1000,
                        help="points per guide call (default: 1000)")
    encode.add_argument("--output", "-o", default=None,
                        help="the .npz to write (default: encoding_<split>.npz in the run "
                             "directory)")
    encode.add_argument("--force", action="store_true",
                        help="replace an existing --output file that is not an earlier "
                             "encoding (refused otherwise)")
    encode.set_defaults(handler=encode_command)

    reconstruct = commands.add_parser(
        "reconstruct", help="a PNG grid of inputs above their reconstructions",
        description="Draw the first --num-images points of a split, each row of --columns "
                    "inputs above the row of their reconstructions E[x'|z].")
    _common_arguments(reconstruct)
    reconstruct.add_argument("--num-images", "-n", type=positive_int, default=32,
                             help="images to reconstruct (default: 32)")
    reconstruct.add_argument("--columns", type=positive_int, default=8,
                             help="images per row (default: 8)")
    reconstruct.add_argument("--decode", choices=("sample", "mean"), default="sample",
                             help="sample: decode one z ~ q(z|x); mean: decode E[z|x] "
                                  "(default: sample)")
    reconstruct.add_argument("--output", "-o", default=None,
                             help="PNG file to write (default: reconstructions.png in the run "
                                  "directory)")
    reconstruct.add_argument("--force", action="store_true",
                             help="replace an existing --output file that is not a PNG image "
                                  "(refused otherwise)")
    reconstruct.set_defaults(handler=reconstruct_command)
