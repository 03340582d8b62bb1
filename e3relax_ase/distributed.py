"""Running under torchrun: this process's place in the job, the process group, sharding, merging.

torchrun (``python -m torch.distributed.run``) starts one process per GPU and tells each where
it stands through environment variables: ``RANK`` (0 .. WORLD_SIZE - 1 over all hosts),
``WORLD_SIZE``, ``LOCAL_RANK`` (its GPU on this host) and the rendezvous address. ``join``
turns them into a process group, NCCL with ``cuda:LOCAL_RANK`` made current when CUDA is
available, gloo on CPU; outside torchrun nothing is initialised and the process is rank 0 of 1.

Work is shared round robin: item ``i`` (counted over the whole input) goes to rank
``i % world_size``, and ``gather_ordered`` puts every result back at its index on rank 0, so
the merged output is in input order whatever the number of processes. docs/scaling.md is the
user guide.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

logger = logging.getLogger(__name__)

# How long a rank waits in a collective for the slowest one (a rank refining its share of a chunk
# with a slow calculator, or rank 0 evaluating while the others wait) before the job fails.
DEFAULT_TIMEOUT = timedelta(minutes=60)


@dataclass(frozen=True)
class World:
    """This process's place in a torchrun job (rank 0 of 1 without one)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def current(cls) -> World:
        """The process group this process has already joined (rank 0 of 1 when none)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return cls(torch.distributed.get_rank(), torch.distributed.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
        return cls()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def device(self, requested: str = "auto") -> str:
        """The device this rank computes on: ``cuda:LOCAL_RANK`` for "auto" or "cuda" under a
        multi-process job with CUDA, ``requested`` otherwise (an explicit "cpu" or "cuda:N" is kept)."""
        if self.active and requested in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank}"
        return requested

    def broadcast(self, value):
        """Rank 0's ``value`` (any picklable object) on every rank.

        Decisions that must be the same everywhere (early stop, LR plateau, time budget) are
        taken from rank 0's view: a rank leaving a training loop alone would hang the others
        in DDP's next all-reduce.
        """
        if not self.active:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the ranks, in place (on the device the backend expects)."""
        if self.active:
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return tensor


def launched_by_torchrun() -> bool:
    """True when torchrun started this process as one of several."""
    return "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def join(timeout: timedelta = DEFAULT_TIMEOUT) -> World:
    """Join the process group of the torchrun job that started this process.

    Args:
        timeout: how long a collective waits for the other ranks.

    Returns:
        This process's ``World``.

    Raises:
        RuntimeError: the process was not started by torchrun (or is its only process).
    """
    if not launched_by_torchrun():
        raise RuntimeError("not started by torchrun with more than one process (LOCAL_RANK/WORLD_SIZE unset)")
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        # Made current, so "cuda" means this rank's GPU for NCCL and for any other library.
        torch.cuda.set_device(local_rank)
        torch.distributed.init_process_group("nccl", timeout=timeout, device_id=torch.device("cuda", local_rank))
    else:
        torch.distributed.init_process_group("gloo", timeout=timeout)
    world = World(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank)
    logger.debug("joined as rank %d of %d (local rank %d, %s)", world.rank, world.world_size, local_rank, torch.distributed.get_backend())
    return world


def leave() -> None:
    """Tear down the process group, if one was initialised."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@contextmanager
def process_group(enabled: bool | None = None, timeout: timedelta = DEFAULT_TIMEOUT) -> Iterator[World]:
    """``join`` for the duration of a block (``enabled=None``: when started by torchrun).

    Yields:
        This process's ``World`` (rank 0 of 1 when not enabled).
    """
    if not (launched_by_torchrun() if enabled is None else enabled):
        yield World()
        return
    world = join(timeout)
    try:
        yield world
    finally:
        leave()


def shard(n: int, world: World, start: int = 0) -> range:
    """Indices (into ``n`` items numbered from ``start`` overall) that this rank takes: those
    with ``(start + i) % world_size == rank``."""
    return range((world.rank - start) % world.world_size, n, world.world_size)


def gather_ordered(local: dict[int, Any], n: int, world: World) -> list | None:
    """Every rank's ``{index: result}`` merged in index order on rank 0.

    Args:
        local: this rank's results, keyed by their index among the ``n`` items.
        n: the number of items all ranks were sharing.
        world: this process's place in the job.

    Returns:
        The ``n`` results in order on rank 0; None on the other ranks.

    Raises:
        RuntimeError: the ranks did not share the same ``n`` items (their inputs differ).
    """
    if not world.active:
        return [local[i] for i in range(n)]
    parts: list[Any] | None = [None] * world.world_size if world.is_main else None
    torch.distributed.gather_object((n, local), parts, dst=0)
    if parts is None:  # not rank 0
        return None
    merged: dict[int, Any] = {}
    for rank, (n_rank, part) in enumerate(parts):
        if n_rank != n or merged.keys() & part.keys():
            raise RuntimeError(f"rank {rank} shared {n_rank} items, rank 0 {n}: the ranks read different inputs")
        merged.update(part)
    if len(merged) != n:
        raise RuntimeError(f"the ranks returned {len(merged)} results for {n} items")
    return [merged[i] for i in range(n)]


def map_sharded(function: Callable[[list], list], items: Sequence, world: World, start: int = 0) -> list | None:
    """``function`` over this rank's share of ``items``; all results in input order on rank 0.

    Args:
        function: maps a list of items to a list of results of the same length.
        items: the same sequence on every rank.
        world: this process's place in the job.
        start: how many items earlier calls shared, so that sharding follows the overall index.

    Returns:
        ``function``'s results for every item, in order, on rank 0; None on the other ranks.
    """
    indices = shard(len(items), world, start)
    results = function([items[i] for i in indices])
    return gather_ordered(dict(zip(indices, results)), len(items), world)
