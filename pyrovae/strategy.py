"""How the training loop runs in one process or in many: one small strategy object.

:class:`~pyrovae.train.TrainingLoop` and its callbacks never ask for a rank: they ask the
strategy for this process's minibatches, to reduce a step's gradients, and to let the main
process compute (and share) what only one process should.  :class:`SingleProcess` does each
of these directly; :class:`DataParallel` does them over the running ``torch.distributed``
group with the collectives of :mod:`pyrovae.distributed`.

Example::

    strategy = current_strategy()   # DataParallel under torchrun, else SingleProcess
    test_elbo = strategy.on_main(lambda: elbo(program, x_test).mean().item())
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from pyrovae import distributed

if TYPE_CHECKING:
    from pyrovae.data import DataSplits

T = TypeVar("T")


class SingleProcess:
    """Training in this process alone: every method is the plain operation."""

    #: this process's index and the number of processes
    rank, world_size = 0, 1

    @property
    def is_main(self) -> bool:
        """Whether this process writes files and logs."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def check_batch_size(self, batch_size: int, num_points: int) -> None:
        """Refuse a batch size the processes cannot share (:func:`~pyrovae.distributed.check_batch_size`)."""
        distributed.check_batch_size(batch_size, self.world_size, num_points=num_points)

    def batches(self, data: DataSplits, batch_size: int, *, generator: torch.Generator,
                start: int = 0) -> Iterator[Any]:
        """One epoch of this process's minibatches from batch ``start`` on."""
        return data.train_batches(batch_size, generator=generator, start=start)

    def step_context(self, device: torch.device, rows: int,
                     global_rows: int | None) -> contextlib.AbstractContextManager[None]:
        """Where a step's loss is computed (``rows`` of a global batch of ``global_rows``)."""
        return contextlib.nullcontext()

    def reduce(self, parameters: Sequence[torch.Tensor], loss: torch.Tensor,
               vote: int | None) -> tuple[float, int | None]:
        """After ``loss.backward()``: the whole batch's loss (nats) and the stop signal the
        processes agree on (``vote`` is this process's; one process agrees with itself only
        through :meth:`stop_signal`)."""
        return loss.item(), None

    def stop_signal(self, local: int | None, agreed: int | None) -> int | None:
        """The signal to stop on after a step: this process's own."""
        return local

    def on_main(self, function: Callable[[], T]) -> T:
        """``function()`` on the main process, its result on every process."""
        return function()

    def broadcast(self, values: Sequence[Any]) -> list[Any]:
        """The main process's ``values`` on every process."""
        return list(values)

    def sharded(self, estimator: Callable[..., torch.Tensor], program: Any, x: Any,
                **options: Any) -> torch.Tensor:
        """A per-data-point estimator over ``x``, its batches shared among the processes."""
        return distributed.sharded(estimator, program, x, **options)

    def barrier(self) -> None:
        """Wait for every process."""

    def share_rng_state(self, device: torch.device) -> None:
        """Give every process the main one's torch RNG state."""

    def broadcast_parameters(self, module: torch.nn.Module) -> None:
        """Give every process the main one's parameters."""

    def launcher_gone(self) -> bool:
        """Whether the launcher of this process has died (the process then stops)."""
        return False


class DataParallel(SingleProcess):
    """One model trained by every process of the running ``torch.distributed`` group: each
    takes its contiguous slice of every global batch and the gradients are summed
    (:mod:`pyrovae.distributed`); rank 0 writes files and logs."""

    def __init__(self) -> None:
        self.rank, self.world_size = distributed.get_rank(), distributed.get_world_size()
        # a worker of `pyrovae train --nproc` whose launcher died (kill -9) is adopted by
        # another process: it stops as on SIGTERM instead of training unsupervised
        self._launcher = os.getppid()

    def batches(self, data: DataSplits, batch_size: int, *, generator: torch.Generator,
                start: int = 0) -> Iterator[Any]:
        return distributed.local_batches(data, batch_size, generator=generator, start=start,
                                         rank=self.rank, world_size=self.world_size)

    def step_context(self, device: torch.device, rows: int,
                     global_rows: int | None) -> contextlib.AbstractContextManager[None]:
        if global_rows is None:
            raise ValueError("a multi-process train_step needs global_rows, the size of the "
                             "global batch x is a slice of")
        shard = distributed.shard_of(global_rows, self.rank, self.world_size)
        if rows != shard.num_rows:
            raise ValueError(f"rank {self.rank} holds {rows} rows of a global batch of "
                             f"{global_rows}; expected {shard.num_rows}")
        # Pyro draws inside its trace; per-rank streams keep the ranks' draws independent
        return distributed.rank_seeded(device)

    def reduce(self, parameters: Sequence[torch.Tensor], loss: torch.Tensor,
               vote: int | None) -> tuple[float, int | None]:
        value, votes = distributed.all_reduce_gradients(
            parameters, [loss.item(), float(vote is not None)])
        if votes > 0:
            return value, vote if vote is not None else signal.SIGTERM
        return value, None

    def stop_signal(self, local: int | None, agreed: int | None) -> int | None:
        # every process stops on the signal they agreed on in the step, all together
        return agreed

    def on_main(self, function: Callable[[], T]) -> T:
        return distributed.rank0_call(function)

    def broadcast(self, values: Sequence[Any]) -> list[Any]:
        return distributed.broadcast_from_main(values)

    def barrier(self) -> None:
        distributed.barrier()

    def share_rng_state(self, device: torch.device) -> None:
        distributed.share_rng_state(device)

    def broadcast_parameters(self, module: torch.nn.Module) -> None:
        distributed.broadcast_parameters(module)

    def launcher_gone(self) -> bool:
        return os.getppid() != self._launcher


def current_strategy() -> SingleProcess:
    """:class:`DataParallel` when a process group of several processes is running, else
    :class:`SingleProcess`."""
    return DataParallel() if distributed.is_distributed() else SingleProcess()
