"""Saving and loading runs: model parameters, optimizer state, progress, RNG states and
config in one file.

Checkpoints hold only tensors and plain Python values, so they load with
``torch.load(weights_only=True)``: no code in a checkpoint is ever executed.
Writes are atomic (temporary file, fsync, rename), so a crash during a write leaves the
previous checkpoint intact.  :func:`check_checkpoint` validates everything a loaded
checkpoint holds before any of it is used, and names the key or tensor that is wrong.
"""

from __future__ import annotations

import contextlib
import math
import pickle
import random
import re
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pyro
import torch
from pyro.distributions import constraints as pyro_constraints
from torch.distributions import transform_to

from pyrovae.argtypes import MAX_INT
from pyrovae.config import TrainConfig, build_vae
from pyrovae.errors import CheckpointError, ConfigError
from pyrovae.models import VAE
from pyrovae.rundir import copy_atomically, write_atomically

CHECKPOINT_NAME = "checkpoint.pt"
BEST_CHECKPOINT_NAME = "checkpoint_best.pt"
HISTORY_DIR = "checkpoints"
#: what a run's checkpoints consist of
CHECKPOINT_FILES = (CHECKPOINT_NAME, BEST_CHECKPOINT_NAME, HISTORY_DIR)
FORMAT_VERSION = 1


def capture_rng_state() -> dict[str, Any]:
    """The states of every RNG a run draws from: torch (CPU, CUDA), numpy and python.

    Pyro draws from torch's generators, so these cover Pyro too.  Values are tensors and
    plain Python, so they survive ``torch.load(weights_only=True)``.
    """
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)),
                  "position": int(position), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached_gaussian)},
        "python": random.getstate(),
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32),
                         numpy_state["position"], numpy_state["has_gauss"],
                         numpy_state["cached_gaussian"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``.

    :raises ~pyrovae.rundir.RunFileError: the write failed (disk full, read-only folder);
        ``path`` keeps its previous content and no temporary file is left.
    """
    write_atomically(path, lambda handle: torch.save(obj, handle))


def save_checkpoint(path: str | Path, vae: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None, epoch: int,
                    config: TrainConfig | Mapping[str, Any] | None,
                    image_shape: tuple[int, ...] | None = None,
                    progress: dict[str, Any] | None = None, *, data_dim: int | None = None,
                    param_store: Mapping[str, Any] | None = None,
                    program: Mapping[str, Any] | None = None) -> None:
    """Write model parameters, optimizer state, RNG states, epoch and config to ``path`` atomically.

    Any program's checkpoint: its module's state dict (``vae``: a :class:`VAE`, a user's
    module, or an empty module for plain functions), the ``pyro.param`` values outside it
    (``param_store``, :func:`param_store_entry`), the optimizer, the RNG states and plain
    dicts of its config and ``program`` record (:func:`program_record`).

    :param epoch: the number of completed epochs.
    :param config: a :class:`TrainConfig` or its plain dict.
    :param progress: the training loop's position (see :mod:`pyrovae.train`), for resuming.
    :param data_dim: values per data point; default ``vae.data_dim``.
    """
    if data_dim is None:
        data_dim = vae.data_dim  # type: ignore[assignment]
    if config is not None and not isinstance(config, Mapping):
        config = config.to_dict()
    atomic_torch_save({
        "format_version": FORMAT_VERSION,
        "epoch": epoch,
        "data_dim": data_dim,
        "image_shape": list(image_shape) if image_shape is not None else None,
        "config": dict(config) if config is not None else None,
        "model": vae.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else {},
        "rng": capture_rng_state(),
        "progress": progress,
        "param_store": dict(param_store) if param_store is not None else empty_param_store(),
        "program": dict(program) if program is not None else None,
    }, path)


def keep_history(run_dir: Path, epoch: int, keep_last: int) -> None:
    """Copy the latest checkpoint to ``checkpoints/epoch-NNNN.pt`` and keep the newest ``keep_last``."""
    if keep_last < 1:
        return
    folder = run_dir / HISTORY_DIR
    folder.mkdir(exist_ok=True)
    copy_atomically(run_dir / CHECKPOINT_NAME, history_path(run_dir, epoch))
    for old in history_checkpoints(run_dir)[:-keep_last]:
        old.unlink()


def history_path(run_dir: Path, epoch: int) -> Path:
    """Where :func:`keep_history` keeps the copy of epoch ``epoch``."""
    return run_dir / HISTORY_DIR / f"epoch-{epoch:04d}.pt"


_HISTORY_NAME = re.compile(r"epoch-(\d+)\.pt")


def history_checkpoints(run_dir: Path) -> list[Path]:
    """The history copies in ``run_dir/checkpoints``, oldest epoch first (sorted by number,
    so epoch 10000 comes after 9999); temporary files of unfinished copies are not counted."""
    folder = run_dir / HISTORY_DIR
    if not folder.is_dir():
        return []
    found = [(int(match.group(1)), path) for path in folder.iterdir()
             if (match := _HISTORY_NAME.fullmatch(path.name))]
    return [path for _, path in sorted(found)]


def mark_best(run_dir: Path) -> None:
    """Copy the latest checkpoint to ``checkpoint_best.pt`` (atomically)."""
    copy_atomically(run_dir / CHECKPOINT_NAME, run_dir / BEST_CHECKPOINT_NAME)


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
#: the first bytes of what ``torch.save`` writes: a zip archive
_ZIP_MAGIC = b"PK\x03\x04"
#: the first byte of a bare pickle (``torch.save`` of old, or ``pickle.dump``)
_PICKLE_MAGIC = b"\x80"
#: the top-level keys :func:`save_checkpoint` writes; a checkpoint with any other is refused
#: before its tensors are read
CHECKPOINT_KEYS = frozenset({"format_version", "epoch", "data_dim", "image_shape", "config",
                             "model", "optimizer", "rng", "progress", "param_store", "program"})
#: where a checkpoint's large tensors live (the parameters, the optimizer's moments, the Pyro
#: parameter store, and the store as older checkpoints kept it in the training position);
#: every other tensor is an RNG state of a few kilobytes
LARGE_TENSOR_PLACES = (("model",), ("optimizer",), ("param_store",), ("progress", "param_store"))
#: the largest tensor outside :data:`LARGE_TENSOR_PLACES` (torch's RNG state is 5056 bytes)
MAX_SMALL_TENSOR_BYTES = 64 * 2**10
#: the largest ``data.pkl`` (the structure, config and epoch history; a few hundred KB after
#: thousands of epochs)
MAX_PICKLE_BYTES = 64 * 2**20
#: the largest of torch's own small records (``version``, ``byteorder``, ...)
MAX_RECORD_BYTES = 4096
#: the deepest nesting of lists and dicts a checkpoint holds (a config, a history record)
MAX_DEPTH = 16
_PICKLE_ENTRY = re.compile(r"[^/]+/data\.pkl")
_DATA_ENTRY = re.compile(r"[^/]+/data/\d+")


def _unsafe_reason(error: Exception) -> str:
    """What torch's weights-only unpickler found, without its advice to load unsafely."""
    lines = [_ANSI.sub("", line).strip() for line in str(error).splitlines()]
    found = [line for line in lines
             if ("GLOBAL" in line or "Unsupported" in line or "WeightsUnpickler" in line)
             and "weights_only" not in line]
    reason = " ".join(found) or "an object other than tensors and plain values"
    return reason.rstrip(":. ")


def _corrupted(path: Path, error: BaseException) -> CheckpointError:
    reason = _ANSI.sub("", str(error)).strip().splitlines()
    return CheckpointError(f"cannot read checkpoint {path}: truncated or corrupted "
                           f"({type(error).__name__}: {reason[0] if reason else ''})")


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", *,
                    check: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Load a checkpoint without executing code, refusing what ``torch.save`` never writes
    before reading the tensors' values.

    In order: the zip directory (only stored entries, as ``torch.save`` writes them: a
    compressed one can take a thousand times its size in memory; a ``data.pkl`` of at most
    :data:`MAX_PICKLE_BYTES`) and the CRC-32 of ``data.pkl`` (so that damage is told from an
    unsafe pickle); the structure, unpickled weights-only with the tensors memory-mapped,
    not read: only :data:`CHECKPOINT_KEYS`, dense tensors, small ones outside
    :data:`LARGE_TENSOR_PLACES`, no more tensor data than the tensors take; then ``check``
    on that structure (the callers compare the tensors' names, shapes and dtypes with their
    model); then every entry's CRC-32; only then are the tensors read.

    :param check: called with the checkpoint whose tensors are still memory-mapped (their
        names, shapes and dtypes, not their values); raises to refuse it.
    :raises CheckpointError: missing, truncated, corrupted, unsafe or oversized file.
    """
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with path.open("rb") as handle:
            start = handle.read(4)
            if start.startswith(_ZIP_MAGIC):
                archive, data_bytes = _check_archive(handle, path)
    except OSError as error:
        raise CheckpointError(f"cannot read checkpoint {path}: {error.strerror}") from None
    if start.startswith(_PICKLE_MAGIC):
        raise CheckpointError(f"refusing to load {path}: it is a bare pickle, not the zip "
                              f"archive torch.save writes, and unpickling it could run code; "
                              f"re-create the checkpoint with pyrovae train")
    if not start.startswith(_ZIP_MAGIC):
        raise CheckpointError(f"{path} is not a checkpoint: torch.save writes a zip archive, "
                              f"and this file is not one")
    mapped = _load_mapped(path)
    _check_structure(mapped, path, data_bytes)
    if check is not None:
        check(mapped)
    try:
        with path.open("rb") as handle, zipfile.ZipFile(handle) as again:
            for name in archive:
                with again.open(name) as entry:  # zipfile checks the CRC-32 at the end
                    while entry.read(2**20):
                        pass
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as error:
        raise _corrupted(path, error) from None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # threads copying from a mapped file wait on each other's faults
    try:
        checkpoint = _materialized(mapped, torch.device(map_location))
    finally:
        torch.set_num_threads(threads)
    del mapped  # unmaps the file
    return checkpoint


def _check_archive(handle: BinaryIO, path: Path) -> tuple[list[str], int]:
    """The entries of a checkpoint's zip archive and the bytes of tensor data they hold,
    after refusing compressed or oversized entries and checking ``data.pkl``'s CRC-32.

    :raises CheckpointError: naming the entry.
    """
    try:
        handle.seek(0)
        with zipfile.ZipFile(handle) as archive:
            entries = archive.infolist()
            pickles = [entry for entry in entries if _PICKLE_ENTRY.fullmatch(entry.filename)]
            for entry in entries:
                if entry.compress_type != zipfile.ZIP_STORED:
                    raise CheckpointError(
                        f"refusing to load {path}: its entry {entry.filename} is compressed "
                        f"(zip method {entry.compress_type}), which torch.save never does: "
                        f"the file was re-written or is damaged, and a compressed entry can "
                        f"take a thousand times its size in memory")
                limit = (MAX_PICKLE_BYTES if entry in pickles else
                         None if _DATA_ENTRY.fullmatch(entry.filename) else MAX_RECORD_BYTES)
                if limit is not None and entry.file_size > limit:
                    raise CheckpointError(
                        f"refusing to load {path}: its entry {entry.filename} holds "
                        f"{entry.file_size:,} bytes; torch.save writes at most {limit:,} there")
            if len(pickles) != 1:
                raise CheckpointError(f"{path} is not a checkpoint: a zip archive without the "
                                      f"data.pkl that torch.save writes")
            archive.read(pickles[0])  # checks its CRC-32
    except (OSError, EOFError, zipfile.BadZipFile, ValueError, NotImplementedError) as error:
        raise _corrupted(path, error) from None
    data_bytes = sum(entry.file_size for entry in entries if _DATA_ENTRY.fullmatch(entry.filename))
    return [entry.filename for entry in entries], data_bytes


def _load_mapped(path: Path) -> Any:
    """``torch.load`` weights-only, the tensors memory-mapped from the file (nothing of their
    values is read until used)."""
    try:
        with warnings.catch_warnings():
            # torch warns about foreign pickle protocols before refusing them below, and
            # about the scan of a sparse tensor, refused by _check_structure
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            warnings.filterwarnings("ignore", message="Validating sparse tensor")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"refusing to load {path}: it holds objects other than tensors and plain values, "
            f"which could run code when unpickled (found: {_unsafe_reason(error)}); "
            f"re-create the checkpoint with pyrovae train"
        ) from None
    except Exception as error:  # a damaged tensor record can fail anywhere inside torch
        raise _corrupted(path, error) from None


def _tensors(value: Any, path: Path) -> Iterator[tuple[tuple[Any, ...], torch.Tensor]]:
    """Every tensor in ``value`` (dicts, lists, tuples of them) with its keys from the top.

    :raises CheckpointError: nested deeper than :data:`MAX_DEPTH`.
    """
    stack: list[tuple[tuple[Any, ...], Any]] = [((), value)]
    while stack:
        keys, item = stack.pop()
        if isinstance(item, torch.Tensor):
            yield keys, item
            continue
        if isinstance(item, Mapping):
            children = list(item.items())
        elif isinstance(item, list | tuple):
            children = list(enumerate(item))
        else:
            continue
        if len(keys) >= MAX_DEPTH and children:
            raise CheckpointError(f"checkpoint {path}: {_key_name(keys)} nests lists or dicts "
                                  f"deeper than {MAX_DEPTH} levels; a checkpoint never does")
        stack.extend(((*keys, key), child) for key, child in reversed(children))


def _key_name(keys: Sequence[Any]) -> str:
    """``model['encoder.body.0.weight']`` for the keys ``("model", "encoder.body.0.weight")``."""
    return str(keys[0]) + "".join(f"[{key!r}]" for key in keys[1:]) if keys else "the top"


def _check_structure(checkpoint: Any, path: Path, data_bytes: int) -> None:
    """What :func:`read_checkpoint` checks before reading any tensor's values: the format,
    the top-level keys, dense tensors, small ones outside :data:`LARGE_TENSOR_PLACES`, and
    no more tensor data in the file than its tensors take."""
    if not isinstance(checkpoint, dict) or checkpoint.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} is not a pyrovae checkpoint (format {FORMAT_VERSION})")
    unknown = sorted(map(str, set(checkpoint) - CHECKPOINT_KEYS))
    if unknown:
        raise CheckpointError(f"refusing to load {path}: it has keys that pyrovae never writes "
                              f"({', '.join(unknown)})")
    needed = 0
    for keys, tensor in _tensors(checkpoint, path):
        if tensor.layout != torch.strided:
            raise CheckpointError(f"checkpoint {path}: {_key_name(keys)} is a {tensor.layout} "
                                  f"tensor; a checkpoint holds only dense ones")
        size = tensor.numel() * tensor.element_size()
        large = any(tuple(keys[:len(place)]) == place for place in LARGE_TENSOR_PLACES)
        if not large and size > MAX_SMALL_TENSOR_BYTES:
            raise CheckpointError(f"refusing to load {path}: {_key_name(keys)} holds "
                                  f"{size:,} bytes, and a random number generator state "
                                  f"never more than {MAX_SMALL_TENSOR_BYTES:,}")
        needed += size
    if data_bytes > needed:
        raise CheckpointError(f"refusing to load {path}: it holds {data_bytes:,} bytes of "
                              f"tensor data and its tensors take {needed:,}; torch.save "
                              f"writes nothing else")


def _materialized(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor copied out of the memory-mapped file onto ``device``
    (tensors of the meta device stay there, to be refused by name)."""
    if isinstance(value, torch.Tensor):
        if value.device.type == "meta":
            return value
        return torch.empty_like(value, device=device).copy_(value)
    if isinstance(value, dict):
        return {key: _materialized(item, device) for key, item in value.items()}
    if isinstance(value, list):
        return [_materialized(item, device) for item in value]
    if isinstance(value, tuple):
        return tuple(_materialized(item, device) for item in value)
    return value


#: the training loop's position in a checkpoint's ``"progress"``, with the types it needs
PROGRESS_TYPES: dict[str, type | tuple[type, ...]] = {
    "epoch": int, "batch": int, "step": int, "total_loss": (int, float), "seen": int,
    "lr": (int, float), "epoch_generator_state": torch.Tensor, "best_elbo": (int, float),
    "rollbacks": int, "history": list,
}


def _type_name(expected: type | tuple[type, ...]) -> str:
    kinds = expected if isinstance(expected, tuple) else (expected,)
    return " or ".join(kind.__name__ for kind in kinds)


def _check_type(path: Path, key: str, value: Any, expected: type | tuple[type, ...]) -> None:
    # bool is an int to isinstance, and never what a count or a rate should be
    if isinstance(value, bool) or not isinstance(value, expected):
        raise CheckpointError(f"checkpoint {path}: {key} should be {_type_name(expected)}, "
                              f"got {type(value).__name__}")


def check_checkpoint(checkpoint: Mapping[str, Any], path: str | Path, *,
                     resumable: bool = False, values: bool = True) -> TrainConfig | None:
    """Validate what :func:`read_checkpoint` returned, before anything of it is used.

    Checks every key :func:`save_checkpoint` writes and its type, ``data_dim`` (1 to
    2**31 - 1, the values of ``image_shape``), the embedded config (as
    :meth:`TrainConfig.from_dict` does), the model's tensors (values, finite), the RNG
    states (restored once and put back), and, with ``resumable``, the training position.
    Tensor shapes are checked against a model by :func:`check_state_dict` and
    :func:`check_optimizer_state`.

    :param values: ``False`` leaves out what reads tensor values (finite weights, the RNG
        states), for the memory-mapped checkpoint that :func:`read_checkpoint` gives its
        ``check``.

    :returns: the embedded config, or ``None`` where the checkpoint has none.
    :raises CheckpointError: naming the first key that is missing or wrong.
    """
    path = Path(path)
    required: dict[str, type | tuple[type, ...]] = {
        "epoch": int, "data_dim": int, "model": Mapping, "optimizer": Mapping, "rng": Mapping}
    for key, expected in required.items():
        if key not in checkpoint:
            raise CheckpointError(f"checkpoint {path} has no {key!r}; it is not complete")
        _check_type(path, key, checkpoint[key], expected)
    for name, value in checkpoint["model"].items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"checkpoint {path}: model tensor {name!r} is a "
                                  f"{type(value).__name__}, not a tensor")
        if value.device.type == "meta":
            raise CheckpointError(f"checkpoint {path}: model tensor {name!r} holds no values "
                                  f"(it was saved from the meta device)")
        if values and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            kind = "NaN" if bool(torch.isnan(value).any()) else "infinite"
            raise CheckpointError(f"checkpoint {path}: model tensor {name!r} holds {bad} "
                                  f"non-finite values ({kind}); the run diverged before it "
                                  f"was saved, or the file was altered")
    data_dim = checkpoint["data_dim"]
    if not 1 <= data_dim <= MAX_INT:
        raise CheckpointError(f"checkpoint {path}: data_dim should be a positive integer of at "
                              f"most {MAX_INT}, got {data_dim}")
    image_shape = checkpoint.get("image_shape")
    if image_shape is not None and (not isinstance(image_shape, Sequence) or not all(
            isinstance(size, int) and size > 0 for size in image_shape)):
        raise CheckpointError(f"checkpoint {path}: image_shape should be a list of positive "
                              f"integers, got {image_shape!r}")
    if image_shape is not None and math.prod(image_shape) != data_dim:
        raise CheckpointError(f"checkpoint {path}: image_shape {list(image_shape)} holds "
                              f"{math.prod(image_shape)} values per data point and data_dim "
                              f"says {data_dim}")
    config = None
    if checkpoint.get("config") is not None:
        if not isinstance(checkpoint["config"], Mapping):
            raise CheckpointError(f"checkpoint {path}: config should be a dict, got "
                                  f"{type(checkpoint['config']).__name__}")
        try:
            config = TrainConfig.from_dict(dict(checkpoint["config"]))
        except ConfigError as error:
            raise CheckpointError(f"checkpoint {path}: its config is invalid: {error}") from None
    if values:
        _check_rng_state(checkpoint["rng"], path)
    if resumable:
        _check_progress(checkpoint.get("progress"), path, values=values)
    return config


def _check_rng_state(state: Mapping[str, Any], path: Path) -> None:
    saved = capture_rng_state()
    try:
        restore_rng_state(state)  # type: ignore[arg-type]
    except Exception as error:  # a malformed state fails in torch, numpy or random
        raise CheckpointError(f"checkpoint {path}: the random number generator state is "
                              f"malformed ({type(error).__name__}: {error})") from None
    finally:
        restore_rng_state(saved)


def _check_progress(position: Any, path: Path, *, values: bool = True) -> None:
    if position is None:
        raise CheckpointError(f"{path} has no training position; it cannot be resumed")
    if not isinstance(position, Mapping):
        raise CheckpointError(f"checkpoint {path}: progress should be a dict, got "
                              f"{type(position).__name__}")
    for key, expected in PROGRESS_TYPES.items():
        if key not in position:
            raise CheckpointError(f"checkpoint {path}: the training position has no {key!r}; "
                                  f"it cannot be resumed")
        _check_type(path, f"progress[{key!r}]", position[key], expected)
    if position["epoch"] < 1 or position["batch"] < 0 or position["step"] < 0:
        raise CheckpointError(f"checkpoint {path}: the training position is out of range "
                              f"(epoch {position['epoch']}, batch {position['batch']}, "
                              f"step {position['step']})")
    if not values:
        return
    try:
        torch.Generator().set_state(position["epoch_generator_state"])
    except Exception as error:
        raise CheckpointError(f"checkpoint {path}: the shuffling generator state is malformed "
                              f"({error})") from None
    if not all(isinstance(record, Mapping) for record in position["history"]):
        raise CheckpointError(f"checkpoint {path}: the epoch history should be a list of dicts")


def _shape(tensor: torch.Tensor) -> str:
    return "(" + ", ".join(map(str, tensor.shape)) + ")"


def check_state_dict(module: torch.nn.Module, state: Mapping[str, Any], path: str | Path,
                     what: str = "this model") -> None:
    """Compare the names, shapes and dtypes of ``state`` with ``module``'s before loading it
    (``load_state_dict`` would cast a float64 tensor silently).

    :raises CheckpointError: naming the first missing, unexpected, mis-shaped or mis-typed
        tensor (with both shapes or dtypes).
    """
    expected = module.state_dict()
    missing = [name for name in expected if name not in state]
    unexpected = [name for name in state if name not in expected]
    if missing:
        raise CheckpointError(f"checkpoint {path} does not match {what}: it lacks {missing[0]}"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if unexpected:
        raise CheckpointError(f"checkpoint {path} does not match {what}: it has {unexpected[0]}, "
                              f"which the model lacks"
                              + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1
                                 else ""))
    for name, tensor in expected.items():
        if state[name].shape != tensor.shape:
            raise CheckpointError(f"checkpoint {path} does not match {what}: {name} has shape "
                                  f"{_shape(state[name])} in the checkpoint and "
                                  f"{_shape(tensor)} in the model")
        if state[name].dtype != tensor.dtype:
            raise CheckpointError(f"checkpoint {path} does not match {what}: {name} is "
                                  f"{state[name].dtype} in the checkpoint and {tensor.dtype} "
                                  f"in the model")


def check_optimizer_state(state: Mapping[str, Any], parameters: Sequence[torch.Tensor],
                          path: str | Path) -> None:
    """Check a ``torch.optim`` state dict against the ``parameters`` it will drive: one
    group holding them all, every per-parameter tensor (Adam's moments) of the parameter's
    shape and dtype (a scalar ``step`` aside), and no state for other parameters.

    :raises CheckpointError: naming the parameter, the state and both shapes.
    """
    groups = state.get("param_groups")
    per_parameter = state.get("state")
    if not isinstance(groups, list) or not isinstance(per_parameter, Mapping):
        raise CheckpointError(f"checkpoint {path}: the optimizer state has no param_groups "
                              f"and state")
    indices = [index for group in groups if isinstance(group, Mapping)
               for index in group.get("params", [])]
    if len(indices) != len(parameters):
        raise CheckpointError(f"checkpoint {path}: the optimizer state is for {len(indices)} "
                              f"parameters and this model has {len(parameters)}")
    strangers = [index for index in per_parameter if index not in indices]
    if strangers:
        raise CheckpointError(f"checkpoint {path}: the optimizer state holds parameter "
                              f"{strangers[0]!r}, which none of its groups has")
    for position, index in enumerate(indices):
        values = per_parameter.get(index, {})
        if not isinstance(values, Mapping):
            raise CheckpointError(f"checkpoint {path}: the optimizer state of parameter "
                                  f"{index} is malformed")
        for name, value in values.items():
            if not isinstance(value, torch.Tensor):
                continue
            if name == "step":
                if value.numel() != 1:
                    raise CheckpointError(f"checkpoint {path}: the optimizer's step of "
                                          f"parameter {index} has shape {_shape(value)}, not "
                                          f"one number")
                continue
            if value.shape != parameters[position].shape:
                raise CheckpointError(
                    f"checkpoint {path}: the optimizer's {name} of parameter {index} has shape "
                    f"{_shape(value)} and the parameter {_shape(parameters[position])}")
            if value.dtype != parameters[position].dtype:
                raise CheckpointError(
                    f"checkpoint {path}: the optimizer's {name} of parameter {index} is "
                    f"{value.dtype} and the parameter {parameters[position].dtype}")


def _described(config: TrainConfig, checkpoint: Mapping[str, Any]) -> str:
    return (f"the config (latent_dim={config.latent_dim}, prior={config.prior}, "
            f"guide={config.guide}, net={config.net}) and data_dim {checkpoint['data_dim']}")


def _model_skeleton(config: TrainConfig, checkpoint: Mapping[str, Any],
                    path: str | Path) -> torch.nn.Module:
    """The model of ``config`` and the checkpoint's ``data_dim`` on the meta device (shapes
    and dtypes, no memory); where a part cannot be built there (Pyro's autoregressive
    networks read values while built), on the CPU, once ``data_dim`` is known to be no
    larger than the checkpoint's largest model tensor, as every model's input or output
    layer is."""
    image_shape = checkpoint.get("image_shape")
    options = {"data_dim": checkpoint["data_dim"],
               "image_shape": tuple(image_shape) if image_shape is not None else None}
    # the draws of a build are not the caller's
    with torch.random.fork_rng(devices=[]):
        try:
            with torch.device("meta"), pyro.validation_enabled(False), _no_argument_checks():
                return build_vae(config, **options)
        except (RuntimeError, NotImplementedError):
            pass
        largest = max((tensor.numel() for tensor in checkpoint["model"].values()), default=0)
        if checkpoint["data_dim"] > largest:
            raise CheckpointError(f"checkpoint {path}: data_dim {checkpoint['data_dim']} is "
                                  f"larger than every tensor of its model (the largest holds "
                                  f"{largest} values)")
        return build_vae(config, **options)


@contextlib.contextmanager
def _no_argument_checks() -> Iterator[None]:
    """torch.distributions without argument validation (it reads values)."""
    before = torch.distributions.Distribution._validate_args
    torch.distributions.Distribution.set_default_validate_args(False)
    try:
        yield
    finally:
        torch.distributions.Distribution.set_default_validate_args(before)


def load_vae(path: str | Path, device: str | torch.device = "cpu",
             config: TrainConfig | None = None) -> tuple[VAE, TrainConfig, dict[str, Any]]:
    """Rebuild the VAE of a checkpoint from its config and load its parameters.

    :param path: a checkpoint file or a run directory holding ``checkpoint.pt``.
    :param config: build this config's model instead of the checkpoint's.
    :returns: ``(vae, config, checkpoint)``; the VAE is on ``device`` in eval mode.
    :raises CheckpointError: the file is unreadable, incomplete, or does not match.
    """
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    chosen = config

    def config_of(checkpoint: Mapping[str, Any], values: bool) -> TrainConfig:
        embedded = check_checkpoint(checkpoint, path, values=values)
        config = chosen if chosen is not None else embedded
        if config is None:
            raise CheckpointError(f"{path} has no config; pass the config used to train it")
        if getattr(config, "program", None) is not None:
            raise CheckpointError(
                f"{path} holds a run of your own program ({config.program}), not a built-in "
                f"VAE: build the program and load the run into it with "
                f"pyrovae.load_program_state(program, run_dir)")
        return config

    def against_model(mapped: dict[str, Any]) -> None:
        # the model is built on the meta device (no memory) to compare the tensors' names,
        # shapes and dtypes before their values are read
        config = config_of(mapped, values=False)
        model = _model_skeleton(config, mapped, path)
        check_state_dict(model, mapped["model"], path, _described(config, mapped))
        if mapped["optimizer"]:
            check_optimizer_state(mapped["optimizer"], list(model.parameters()), path)

    checkpoint = read_checkpoint(path, check=against_model)
    config = config_of(checkpoint, values=True)
    image_shape = checkpoint.get("image_shape")
    vae = build_vae(config, data_dim=checkpoint["data_dim"],
                    image_shape=tuple(image_shape) if image_shape is not None else None)
    check_state_dict(vae, checkpoint["model"], path, _described(config, checkpoint))
    vae.load_state_dict(checkpoint["model"])
    return vae.to(device).eval(), config, checkpoint


def check_resumable(path: str | Path, vae: torch.nn.Module,
                    parameters: Sequence[torch.Tensor] | None = None) -> dict[str, Any]:
    """Read the checkpoint at ``path`` and check that training ``vae`` can resume from it:
    :func:`check_checkpoint` with the training position, the parameters' names and shapes,
    the Pyro parameter store (:func:`check_param_store`), and the optimizer's moments
    against ``parameters`` (default ``vae.parameters()``; the loop's Adam holds them in that
    order, a program's ``pyro.param`` sites after its module's), and its ``data_dim``
    against ``vae.data_dim`` where ``vae`` has one.  The names, shapes and dtypes are
    compared before any tensor's values are read (:func:`read_checkpoint`'s ``check``).
    Nothing is loaded into ``vae``.

    :returns: the checkpoint.
    :raises CheckpointError: naming the key or tensor that is wrong.
    """
    parameters = list(vae.parameters()) if parameters is None else list(parameters)

    def check(checkpoint: Mapping[str, Any], values: bool = True) -> None:
        check_checkpoint(checkpoint, path, resumable=True, values=values)
        data_dim = getattr(vae, "data_dim", None)
        if isinstance(data_dim, int) and checkpoint["data_dim"] != data_dim:
            raise CheckpointError(f"checkpoint {path}: data_dim is {checkpoint['data_dim']} "
                                  f"and the data have {data_dim} values per point")
        check_state_dict(vae, checkpoint["model"], path)
        check_param_store(checkpoint, path)
        check_optimizer_state(checkpoint["optimizer"], parameters, path)

    checkpoint = read_checkpoint(path, check=lambda mapped: check(mapped, values=False))
    check(checkpoint)
    return checkpoint


# --- any program: the Pyro parameter store, the program's record, loading into it ------------

def empty_param_store() -> dict[str, Any]:
    """:func:`param_store_entry` of a program without ``pyro.param`` sites of its own."""
    return {"values": {}, "constraints": {}}


def _constraint_name(constraint: Any) -> str | None:
    """The name of ``constraint`` in :mod:`pyro.distributions.constraints` (``"positive"``),
    or ``None`` for one built with arguments (``interval(0, 5)``)."""
    return next((name for name, value in vars(pyro_constraints).items()
                 if value is constraint and not name.startswith("_")), None)


def param_store_entry(parameters: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The ``pyro.param`` sites of a program outside its module, as a checkpoint holds them:
    ``{"values": {name: unconstrained tensor}, "constraints": {name: constraint name or
    None}}``, tensors and strings only (weights-only loadable).

    :param parameters: ``{store name: unconstrained value}`` (what the optimizer updates).
    """
    constraints = pyro.get_param_store().get_state()["constraints"]
    return {"values": {name: value.detach().clone() for name, value in parameters.items()},
            "constraints": {name: _constraint_name(constraints.get(name))
                            for name in parameters}}


def stored_param_values(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The unconstrained ``pyro.param`` values of a checkpoint (those of a checkpoint written
    before they had a key of their own are in its training position)."""
    entry = checkpoint.get("param_store")
    if isinstance(entry, Mapping):
        return dict(entry.get("values", {}))
    progress = checkpoint.get("progress")
    return dict(progress.get("param_store", {})) if isinstance(progress, Mapping) else {}


def check_param_store(checkpoint: Mapping[str, Any], path: str | Path) -> None:
    """Validate a checkpoint's ``param_store`` and ``program`` entries (both optional).

    :raises CheckpointError: naming the entry that is malformed.
    """
    entry = checkpoint.get("param_store")
    if entry is not None:
        values, constraints = (entry.get("values"), entry.get("constraints")) \
            if isinstance(entry, Mapping) else (None, None)
        if not isinstance(values, Mapping) or not isinstance(constraints, Mapping):
            raise CheckpointError(f"checkpoint {path}: param_store should hold values and "
                                  f"constraints")
        for name, value in values.items():
            if not isinstance(name, str) or not isinstance(value, torch.Tensor):
                raise CheckpointError(f"checkpoint {path}: Pyro parameter {name!r} is not a "
                                      f"named tensor")
        for name, constraint in constraints.items():
            if constraint is not None and not isinstance(constraint, str):
                raise CheckpointError(f"checkpoint {path}: the constraint of Pyro parameter "
                                      f"{name!r} should be a name")
    record = checkpoint.get("program")
    if record is not None and not isinstance(record, Mapping):
        raise CheckpointError(f"checkpoint {path}: program should be a dict, got "
                              f"{type(record).__name__}")


def program_record(program: Any, config: Mapping[str, Any] | None) -> dict[str, Any]:
    """What a checkpoint says of the program it holds, as plain values: the qualified name of
    its class (``type``), and the command line's spec and arguments (``spec``, ``args``;
    ``None`` for a program given from Python).  A record only: nothing is ever imported
    from it."""
    from pyrovae.program_spec import program_type

    config = config or {}
    return {"type": program_type(program), "spec": config.get("program"),
            "args": config.get("program_args")}


def restore_param_store(checkpoint: Mapping[str, Any], path: str | Path,
                        device: torch.device | None = None) -> list[str]:
    """Set the ``pyro.param`` sites of a checkpoint in Pyro's parameter store, bit for bit:
    a site the store has gets the saved unconstrained value; one it lacks is created with
    its saved constraint.

    :returns: the names set.
    :raises CheckpointError: a missing site whose constraint has no name (run the program
        once on a data point first, so that it creates the site, or pass ``data`` to
        :func:`load_program_state`).
    """
    store = pyro.get_param_store()
    entry = checkpoint.get("param_store")
    constraints = dict(entry.get("constraints", {})) if isinstance(entry, Mapping) else {}
    values = stored_param_values(checkpoint)
    for name, value in values.items():
        if name not in store:
            constraint_name = constraints.get(name, "real")
            constraint = getattr(pyro_constraints, constraint_name, None) \
                if constraint_name else None
            if constraint is None:
                raise CheckpointError(
                    f"{path}: Pyro parameter {name!r} has a constraint without a name; let the "
                    f"program create it first (load_program_state(..., data=x[:1]))")
            unconstrained = value.to(device) if device is not None else value
            store.setdefault(name, transform_to(constraint)(unconstrained), constraint)
        with torch.no_grad():
            store[name].unconstrained().copy_(value)
    return list(values)


def load_program_state(program: Any, path: str | Path, *, best: bool = False,
                       data: Any = None) -> dict[str, Any]:
    """Load a finished (or interrupted) run into your own program object: its module's state
    dict and its ``pyro.param`` sites, from a checkpoint read weights-only.

    The program must be built as it was trained (the same class and arguments: tensor names
    and shapes are checked first, and nothing is changed if they differ).  It is left in
    eval mode.

    :param program: what was trained: an object with ``model`` and ``guide`` (a
        ``PyroModule``, an ``nn.Module``) or a ``(model, guide)`` pair.
    :param path: a run directory or a checkpoint file.
    :param best: from a run directory, ``checkpoint_best.pt`` (the best held-out ELBO)
        instead of the last ``checkpoint.pt``.
    :param data: a data point (or tuple of data arguments) to run the program on once
        first, so that it creates ``pyro.param`` sites whose constraints have no name.
    :returns: the checkpoint (``epoch``, ``config``, ``program``, ...).
    :raises CheckpointError: unreadable, or not of this program.

    Example::

        vae = MyVAE(z_dim=32)
        fit(vae, data, run_dir="runs/mine", epochs=10)
        ...                                     # later, in another process
        vae = MyVAE(z_dim=32)
        load_program_state(vae, "runs/mine")
        log_px = log_marginal_likelihood(vae, data.test, num_samples=1000)
    """
    from pyrovae.programs import as_data, as_program, program_parameters

    path = Path(path)
    if path.is_dir():
        path = path / (BEST_CHECKPOINT_NAME if best else CHECKPOINT_NAME)
    checkpoint = read_checkpoint(path)
    check_checkpoint(checkpoint, path)
    check_param_store(checkpoint, path)
    resolved = as_program(program)
    if data is not None:
        with pyro.validation_enabled(False):
            program_parameters(resolved, *(a[:1] for a in as_data(data)))
    module = resolved.module if resolved.module is not None else torch.nn.Module()
    record = checkpoint.get("program") or {}
    check_state_dict(module, checkpoint["model"], path,
                     f"this program ({record.get('type') or type(program).__name__} in the "
                     f"checkpoint)")
    module.load_state_dict(checkpoint["model"])
    restore_param_store(checkpoint, path, resolved.device)
    resolved.train(False)
    return checkpoint
