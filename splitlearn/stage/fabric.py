"""The pipeline's process groups: standalone ones, outside torch's default group.

Every group a worker needs (one per pair of ranks that exchange micro-batches, the data
owner with the loss stage's replicas, each stage's replicas, and every rank for the
gradient norm) is a ``ProcessGroupGloo`` (``ProcessGroupNCCL`` between two CUDA devices)
built on one ``TCPStore``, by its members only. torch's default group is left free: an
offloaded stage makes it its replica group, which is the whole world DeepSpeed sees. That is
what lets ZeRO-3 run inside a pipeline: its world-wide barriers and rank-0 broadcasts stay
within the stage.

Groups are created in one global order by every rank (each rank the ones it belongs to),
so their rendezvous cannot wait on each other in a cycle.
"""

from __future__ import annotations

import datetime
from typing import Any

import torch
import torch.distributed as dist


class Group:
    """A standalone process group over ``members`` (global ranks, in order)."""

    def __init__(
        self, store, name: str, members: list[int], rank: int, timeout: datetime.timedelta, backend: str = "gloo"
    ):
        self.members, self.backend = list(members), backend
        index, size = self.members.index(rank), len(self.members)
        prefix = dist.PrefixStore(f"splitlearn/{name}/", store)
        self.pg: Any
        if backend == "nccl":
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            self.pg = dist.ProcessGroupNCCL(prefix, index, size, opts)
        else:
            self.pg = dist.ProcessGroupGloo(prefix, index, size, timeout)

    def isend(self, tensor: torch.Tensor, dst: int):
        """Post a send to global rank ``dst``; returns the work to wait on."""
        return self.pg.send([tensor], self.members.index(dst), 0)

    def recv(self, tensor: torch.Tensor, src: int) -> None:
        """Receive into ``tensor`` from global rank ``src`` (within the group's timeout)."""
        self.pg.recv([tensor], self.members.index(src), 0).wait()

    def all_reduce(self, tensor: torch.Tensor) -> None:
        """Sum ``tensor`` over the members, in place."""
        self.pg.allreduce([tensor]).wait()


def store_for(addr: str, port: int, rank: int, world_size: int, timeout: datetime.timedelta):
    """The rendezvous store: rank 0 serves it on ``port``."""
    return dist.TCPStore(addr, port, world_size, rank == 0, timeout=timeout, wait_for_workers=False)


def build(store, rank: int, timeout: datetime.timedelta, wanted: list[tuple[str, list[int], str]]) -> dict[str, Group]:
    """Create, in the order given (the same on every rank), the groups of ``wanted`` that
    ``rank`` belongs to: ``(name, members, backend)``."""
    groups = {}
    for name, members, backend in wanted:
        if rank in members:
            groups[name] = Group(store, name, members, rank, timeout, backend)
    return groups
