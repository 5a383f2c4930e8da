"""Data-parallel training and evaluation on ``torch.distributed``.

One model is trained by ``W`` processes (ranks), launched by ``torchrun`` (or ``pyrovae train
--nproc W``, which calls torch's own launcher, ``torch.distributed.run``).  Every rank holds
the whole model and the whole dataset; each global minibatch of ``batch_size`` rows is cut
into ``W`` contiguous slices (:func:`shard_of`), one per rank.  After ``loss.backward()``
the gradients of all parameters are summed over ranks in one flattened all-reduce
(:func:`all_reduce_gradients`): the per-rank loss is the sum over its slice, so the sum of
gradients is the gradient of the global-batch sum, the same ELBO scale per data point as one
process.  ``DistributedDataParallel`` is not used because the training loop never calls the
module's ``forward`` (it calls a Pyro ELBO's ``differentiable_loss`` of the program).

The shuffling order and the Bernoulli draws of dynamic binarization come from the shared
stream (every rank draws them for the whole global batch and keeps its rows); the draws
inside the program's traces come from a per-rank seed taken off the shared stream
(:func:`rank_seeded`), so a run agrees with one process in distribution, as
``DistributedDataParallel`` does, not bit for bit.

Evaluation is sharded here too (:func:`sharded`): the estimators of
:mod:`pyrovae.evaluation` evaluate the data batches they are given, and this module gives
each rank its contiguous run of them and puts the per-point values back together.

Backend: ``gloo`` on CPU, ``nccl`` on CUDA (rank ``r`` uses ``cuda:LOCAL_RANK``).  When a
process is gone (killed, crashed), the others fail in their next collective: they raise
:class:`LostProcessError`, which the CLI prints as one line, and the launcher names the
process that went first.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.distributed as dist

from pyrovae.devices import seeded
from pyrovae.errors import ConfigError, PyrovaeError
from pyrovae.programs import as_data

if TYPE_CHECKING:
    from pyrovae.data import DataSplits

T = TypeVar("T")

#: environment variables torchrun sets in every worker
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def is_distributed() -> bool:
    """Whether a default process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """The number of processes (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Rank 0, the one process that writes files and logs."""
    return get_rank() == 0


def launched_by_torchrun() -> bool:
    """Whether the environment holds torchrun's rendezvous variables for more than one process."""
    return all(name in os.environ for name in LAUNCH_VARIABLES) and int(os.environ["WORLD_SIZE"]) > 1


def init_from_environment(device_name: str = "auto", *, timeout_minutes: float = 30) -> torch.device:
    """Join the process group torchrun describes in the environment; return this rank's device.

    ``gloo`` on CPU; ``nccl`` on CUDA with this rank on ``cuda:LOCAL_RANK`` (``device_name``
    ``auto`` picks CUDA when there is one).  A no-op returning ``device_name``'s device when
    not launched by torchrun or already initialized.

    :raises PyrovaeError: a named CUDA device other than ``cuda`` (ranks pick theirs), or
        CUDA requested where there is none.
    """
    from pyrovae.devices import resolve_device

    device = resolve_device(device_name)
    if not launched_by_torchrun():
        return device
    if device.type == "cuda":
        if device.index is not None:
            raise PyrovaeError(f"--device {device_name} names one GPU; in a multi-process run each "
                               f"rank uses cuda:LOCAL_RANK, so pass --device cuda (or auto)")
        local_rank = int(os.environ["LOCAL_RANK"])
        if local_rank >= torch.cuda.device_count():
            raise PyrovaeError(f"local rank {local_rank} has no GPU: this node has "
                               f"{torch.cuda.device_count()}; start at most that many processes per node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes),
                                device_id=device if device.type == "cuda" else None)
    return device


class LostProcessError(PyrovaeError):
    """Another process of the group is gone (killed, crashed, or stopped by an error of its
    own) while this one waited for it in a collective operation.

    The process that is gone reports its own cause (the ``--nproc`` launcher names it); this
    one says in one line that it stopped because of it, instead of the backend's traceback.
    """


#: what gloo and nccl say (lower case) when the process at the other end of a collective is gone
LOST_PROCESS_SIGNS = ("connection reset by peer", "connection closed by peer", "broken pipe",
                      "connection refused", "timed out", "communicator was aborted")


def is_lost_process(error: BaseException) -> bool:
    """Whether ``error``, raised by a collective, says that another process of the group is gone.

    Other failures of a collective (tensors that differ between ranks) are bugs and keep
    their traceback.
    """
    if isinstance(error, dist.DistNetworkError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(sign in text for sign in LOST_PROCESS_SIGNS)


@contextlib.contextmanager
def collective(operation: str) -> Iterator[None]:
    """Turn a collective's failure because another process is gone into :class:`LostProcessError`."""
    try:
        yield
    except RuntimeError as error:
        if not is_lost_process(error):
            raise
        raise LostProcessError(
            f"another process of this run stopped during {operation} ({_backend_reason(error)}); "
            f"this process {get_rank()} of {get_world_size()} stops too, the launcher reports "
            f"the other's exit") from None


def _backend_reason(error: BaseException) -> str:
    """The backend's message without its source location and advice: ``Read error ...:
    Connection reset by peer``."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[-1] if lines else type(error).__name__
    if text.startswith("[") and "] " in text:  # "[.../gloo/transport/tcp/pair.cc:545] Read error"
        text = text.split("] ", 1)[1]
    return text.split(". ", 1)[0].rstrip(".")[:200]


def shut_down(wait: bool = True) -> None:
    """Leave the process group.

    :param wait: first wait for every rank at a barrier (a normal end); ``False`` after an
        error, when another rank may be inside a different collective and never arrive.
    """
    if dist.is_available() and dist.is_initialized():
        if wait:
            with collective("the final barrier"):
                dist.barrier()
        dist.destroy_process_group()


# --- sharding -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shard:
    """The contiguous rows ``start:stop`` of a global batch of ``global_rows`` that one rank holds."""

    global_rows: int
    start: int
    stop: int

    @property
    def rows(self) -> slice:
        return slice(self.start, self.stop)

    @property
    def num_rows(self) -> int:
        return self.stop - self.start


def shard_of(global_rows: int, rank: int | None = None, world_size: int | None = None) -> Shard:
    """Rank ``rank``'s contiguous slice of ``global_rows`` rows.

    The split is ``torch.tensor_split``'s: with ``q, r = divmod(global_rows, world_size)``
    the first ``r`` ranks get ``q + 1`` rows and the others ``q`` (no row is repeated or
    dropped, unlike ``DistributedSampler``'s padding).  Training refuses batches with fewer
    rows than processes (:func:`check_batch_size`).

    :param rank: defaults to this process's rank.
    :param world_size: defaults to the number of processes.
    """
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    size, remainder = divmod(global_rows, world_size)
    start = rank * size + min(rank, remainder)
    return Shard(global_rows, start, start + size + (1 if rank < remainder else 0))


def local_batches(data: DataSplits, batch_size: int, *, generator: torch.Generator | None = None,
                  start: int = 0, rank: int | None = None, world_size: int | None = None,
                  ) -> Iterator[torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of this rank's slices of the global training batches of ``batch_size`` rows
    (:meth:`~pyrovae.data.DataSplits.train_batches` with :func:`shard_of` as its ``part``).

    Every rank computes the same order from the same ``generator`` state, and under dynamic
    binarization draws the Bernoulli uniforms for the whole global batch and keeps its
    slice, so the slices put together are exactly the batches of one process.

    :param rank: this process's index, ``0 <= rank < world_size`` (default: this process's).
    :param world_size: the number of processes sharing each batch (default: the group's).
    :raises ConfigError: a batch (the epoch's last included) with fewer rows than processes,
        or a rank outside the group.
    """
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    check_batch_size(batch_size, world_size, num_points=data.train.shape[0])
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank must be in [0, {world_size}), got {rank}")
    part = (lambda rows: shard_of(rows, rank, world_size).rows) if world_size > 1 else None
    return data.train_batches(batch_size, generator=generator, start=start, part=part)


def check_batch_size(batch_size: int, world_size: int, num_points: int | None = None) -> None:
    """Refuse a global batch with fewer rows than processes, the epoch's last batch included.

    :param num_points: the training set size, to check the short last batch of an epoch.
    :raises ConfigError: naming the batch size and the number of processes.
    """
    if batch_size < world_size:
        raise ConfigError(f"batch size {batch_size} is smaller than the {world_size} processes; "
                          f"each process needs at least one row of every batch: use --batch-size "
                          f">= {world_size} (the batch size is global, split across processes)")
    last = num_points % batch_size if num_points is not None else 0
    if 0 < last < world_size:
        raise ConfigError(f"the last batch of each epoch has {last} rows ({num_points} training "
                          f"points in batches of {batch_size}), fewer than the {world_size} "
                          f"processes; change --batch-size or --train-size so that it has at "
                          f"least {world_size}")


def batch_plan(num_points: int, batch_size: int) -> tuple[range, list[int]]:
    """The data batches this rank evaluates, and how many points every rank holds.

    The ``ceil(num_points / batch_size)`` batches are split into contiguous runs, one per
    rank (:func:`shard_of` on batch indices), so shards are aligned to ``batch_size`` and a
    batch's values do not depend on the number of processes.

    :returns: ``(batch indices of this rank, points per rank)``; the second has
        ``get_world_size()`` entries summing to ``num_points``.
    """
    num_batches = -(-num_points // batch_size)
    counts = []
    mine = range(0)
    for r in range(get_world_size()):
        shard = shard_of(num_batches, r)
        first = shard.start * batch_size
        last = min(shard.stop * batch_size, num_points)
        counts.append(max(last - first, 0))
        if r == get_rank():
            mine = range(shard.start, shard.stop)
    return mine, counts


def sharded(estimator: Callable[..., torch.Tensor], program: Any,
            x: torch.Tensor | Sequence[torch.Tensor], *args: Any, batch_size: int = 100,
            seed: int | None = None, dim: int = 0, **options: Any) -> torch.Tensor:
    """A per-data-point estimator evaluated by every process of the running group together.

    Calls ``estimator(program, x, *args, batch_size=batch_size, seed=seed,
    batches=mine, **options)`` with this rank's contiguous run of data batches
    (:func:`batch_plan`) and gathers the values of every rank in order, so every process
    gets the values of all points.  With a ``seed``, each batch draws from a stream of its
    own and the values do not depend on the number of processes; without one, a seed is
    drawn from the stream the ranks share.  Outside a group, this is ``estimator`` on every
    batch.

    :param estimator: a function taking ``batches`` (the indices of the data batches to
        evaluate) and returning the values of their points along ``dim``:
        :func:`~pyrovae.evaluation.log_marginal_likelihood`,
        :func:`~pyrovae.evaluation.elbo`,
        :func:`~pyrovae.labels.log_marginal_likelihood_over_labels`.
    :param x: the data, or a tuple of the program's data arguments, points along dim 0.
    :returns: the values of all ``N`` points, as ``estimator`` returns them for one process.
    """
    mine, counts = batch_plan(as_data(x)[0].shape[0], batch_size)
    if seed is None and is_distributed():
        seed = shared_seed()
    local = estimator(program, x, *args, batch_size=batch_size, seed=seed, batches=mine,
                      **options)
    return gather_rows(local, counts, dim=dim)


def gather_rows(local: torch.Tensor, counts: Sequence[int], dim: int = 0) -> torch.Tensor:
    """Concatenate every rank's ``local`` along ``dim`` in rank order (all_gather with padding).

    :param local: this rank's part; its size along ``dim`` is ``counts[rank]``.
    :param counts: the size along ``dim`` of every rank's part.
    :returns: the whole tensor, ``sum(counts)`` along ``dim``, on ``local``'s device.
    """
    if not is_distributed():
        return local
    dim = dim % local.dim()
    device = _communication_device()
    longest = max(counts)
    padding = list(local.shape)
    padding[dim] = longest - local.shape[dim]
    padded = torch.cat([local.to(device), local.new_zeros(padding, device=device)], dim=dim)
    parts = [torch.empty_like(padded) for _ in counts]
    with collective("an evaluation gather"):
        dist.all_gather(parts, padded.contiguous())
    whole = torch.cat([part.narrow(dim, 0, count) for part, count in zip(parts, counts, strict=True)],
                      dim=dim)
    return whole.to(local.device)


# --- collectives for training ---------------------------------------------------------------

def _communication_device() -> torch.device:
    """Where tensors must be for the backend: the current GPU under nccl, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_gradients(parameters: Sequence[torch.Tensor], extras: Sequence[float]) -> list[float]:
    """Sum the gradients of ``parameters`` and the numbers ``extras`` over all ranks, in place.

    The gradients travel in one flattened buffer, ``[grad_1, ..., grad_P, has_grad_1..P]``,
    in one all-reduce (not one call per parameter); the extras in a second, small one.
    A parameter whose gradient is ``None`` on a rank contributes zeros; it keeps ``None``
    only if it is ``None`` on every rank (as one process would leave it, so Adam skips it).

    :param extras: numbers to sum alongside (the loss, a stop flag), reduced in float64.
    :returns: the summed ``extras``.
    """
    if not is_distributed():
        return list(extras)
    reference = parameters[0]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    has_grad = torch.tensor([p.grad is not None for p in parameters], dtype=reference.dtype,
                            device=reference.device)
    buffer = torch.cat([g.reshape(-1) for g in grads] + [has_grad])
    # float64 for the extras: a loss summed over a big batch loses digits in float32
    numbers = torch.tensor(list(extras), dtype=torch.float64, device=reference.device)
    with collective("a gradient all-reduce"):
        dist.all_reduce(buffer)
        dist.all_reduce(numbers)
    offset = 0
    for grad in grads:
        size = grad.numel()
        grad.copy_(buffer[offset:offset + size].view_as(grad))
        offset += size
    for parameter, grad, present in zip(parameters, grads, buffer[offset:].tolist(), strict=True):
        parameter.grad = grad if present > 0 else None
    return numbers.tolist()


def broadcast_parameters(module: torch.nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers (as ``DistributedDataParallel`` does
    at construction), so that runs whose processes initialised differently still agree."""
    if not is_distributed():
        return
    device = _communication_device()
    tensors = [t for t in [*module.parameters(), *module.buffers()] if t.numel() > 0]
    for dtype in sorted({t.dtype for t in tensors}, key=str):
        group = [t for t in tensors if t.dtype == dtype]
        flat = torch.cat([t.detach().reshape(-1).to(device) for t in group])
        with collective("a parameter broadcast"):
            dist.broadcast(flat, src=0)
        offset = 0
        with torch.no_grad():
            for tensor in group:
                tensor.copy_(flat[offset:offset + tensor.numel()].view_as(tensor))
                offset += tensor.numel()


def rank0_call(function: Callable[[], T]) -> T:
    """Run ``function`` on rank 0 only and give its result (or its :class:`PyrovaeError`) to all.

    For file-system checks and reads that only rank 0 should do (the run directory, the
    config and checkpoint of a run being resumed), so that every rank agrees on the outcome
    and none waits for a rank that raised.  Results travel pickled.
    """
    if not is_distributed():
        return function()
    message: list[Any] = [None, None]
    if is_main_process():
        try:
            message[0] = function()
        except PyrovaeError as error:
            message[1] = error
    with collective("a broadcast from rank 0"):
        dist.broadcast_object_list(message, src=0)
    if message[1] is not None:
        raise message[1]
    return message[0]


def broadcast_from_main(values: Sequence[Any]) -> list[Any]:
    """Rank 0's ``values`` (picklable objects) on every rank."""
    if not is_distributed():
        return list(values)
    message = list(values)
    with collective("a broadcast from rank 0"):
        dist.broadcast_object_list(message, src=0)
    return message


def barrier() -> None:
    if is_distributed():
        with collective("a barrier"):
            dist.barrier()


def rng_state(device: torch.device) -> dict[str, torch.Tensor | None]:
    """The torch CPU generator state and ``device``'s CUDA generator state (``None`` on CPU)."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def set_rng_state(state: dict[str, torch.Tensor | None], device: torch.device) -> None:
    """Inverse of :func:`rng_state`; the CUDA state goes to ``device`` (each rank's own GPU)."""
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def share_rng_state(device: torch.device) -> None:
    """Give every rank rank 0's torch RNG state (CPU, and rank 0's GPU onto each rank's GPU).

    After rank 0 alone has drawn (the epoch-end test ELBO) or after a checkpoint's states
    were restored, this keeps the ranks drawing the same global noise.
    """
    if is_distributed():
        state, = broadcast_from_main([rng_state(device)])
        set_rng_state(state, device)


def shared_seed() -> int:
    """A seed drawn from the torch CPU stream that every rank shares (the same on all ranks)."""
    return int(torch.randint(0, 2**62, (1,)).item())


@contextlib.contextmanager
def rank_seeded(device: torch.device) -> Iterator[None]:
    """Draw per-rank independent noise without letting the ranks' shared RNG states drift apart.

    One number is drawn from the shared stream (every rank draws the same); inside, the
    RNG is seeded by it and this rank; afterwards the shared state continues.  For the
    traced Pyro objectives, whose draws cannot be taken from a global-batch noise tensor.
    """
    if not is_distributed():
        yield
        return
    with seeded(shared_seed(), get_rank(), device=device):
        yield


# --- reparameterising with noise drawn for the whole global batch ---------------------------
