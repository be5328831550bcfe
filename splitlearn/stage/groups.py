"""Who talks to whom: the ranks of a plan's workers and the process groups they share.

One rank per stage replica, in stage order (:class:`RankLayout`). Each worker builds the
groups it belongs to (:func:`build_groups`), all on one store served by rank 0 (see
:mod:`splitlearn.stage.fabric`): the world (the global gradient norm), one group per pair of ranks
that exchange micro-batches (so independent links never serialise), the data owner with
every replica of the loss stage (labels, tied embed/head gradients), and each replicated
stage's replicas (their gradient sum). An offloaded stage also gets DeepSpeed's engine, on
torch's default group made of that stage's replicas (:func:`init_deepspeed`).
"""

from __future__ import annotations

import datetime
import socket
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from cluster.topology import Topology
from partitioners.plan import Plan
from splitlearn.stage import fabric


def rendezvous_address() -> tuple[str, int]:
    """An address of this node and a free port on it."""
    try:
        import ray

        ip = ray.util.get_node_ip_address()
    except Exception:
        ip = "127.0.0.1"
    with socket.socket() as s:
        s.bind(("", 0))
        return ip, s.getsockname()[1]


class RankLayout:
    """The ranks of a plan: stage ``s``'s replica ``r`` is rank ``offsets[s] + r``."""

    def __init__(self, plan: Plan, topology: Topology):
        self.plan, self.topology = plan, topology
        self.replicas = [len(s.devices) for s in plan.stages]
        self.offsets = [sum(self.replicas[:i]) for i in range(len(self.replicas))]
        self.world_size = sum(self.replicas)
        self.num_stages = plan.num_stages

    def rank(self, stage: int, replica: int) -> int:
        return self.offsets[stage] + replica

    def rank_of(self, stage: int, mb: int) -> int:
        """The rank of the replica of ``stage`` that handles micro-batch ``mb``."""
        return self.offsets[stage] + mb % self.replicas[stage]

    def stage_ranks(self, stage: int) -> list[int]:
        return [self.offsets[stage] + r for r in range(self.replicas[stage])]

    def stage_of(self, rank: int) -> int:
        return max(s for s in range(self.num_stages) if self.offsets[s] <= rank)

    def device_of(self, rank: int) -> str:
        stage = max(s for s in range(self.num_stages) if self.offsets[s] <= rank)
        return self.plan.stages[stage].devices[rank - self.offsets[stage]]

    def is_cuda_rank(self, rank: int) -> bool:
        dev = self.topology.device(self.device_of(rank))
        return dev.accelerator == "cuda" and torch.cuda.is_available()


@dataclass
class Groups:
    """The groups one worker belongs to (``ends`` and ``replicas`` are None where it is not a member)."""

    store: Any
    world: fabric.Group
    links: dict[str, fabric.Group] = field(default_factory=dict)  # "link/<a>-<b>", a < b
    ends: fabric.Group | None = None
    replicas: fabric.Group | None = None
    fedavg: fabric.Group | None = None  # federated: the server and the clients

    def link(self, rank: int, peer: int) -> fabric.Group:
        return self.links[f"link/{min(rank, peer)}-{max(rank, peer)}"]


def build_groups(
    layout: RankLayout,
    stage: int,
    rank: int,
    num_micro_batches: int,
    addr: str,
    port: int,
    timeout: datetime.timedelta,
    federated: bool = False,
    sequential: bool = False,
) -> Groups:
    """Join the world's store and create, in one global order, the groups ``rank`` is in.
    ``federated``: stage 0's replicas are clients: each sends its own labels (``ends`` holds
    them all), and they average their fronts through the server (stage 1's first replica)
    over the ``fedavg`` group, never over a group of clients alone. ``sequential``: each
    client, on its turn, sends every micro-batch to the next stage: a link from every client."""
    store = fabric.store_for(addr, port, rank, layout.world_size, timeout)
    n = layout.num_stages
    wanted: list[tuple[str, list[int], str]] = [("world", list(range(layout.world_size)), "gloo")]
    # NCCL when both ends are CUDA devices (tensors stay on the GPUs), gloo through host memory otherwise
    pairs = sorted(
        {(layout.rank_of(s, m), layout.rank_of(s + 1, m)) for s in range(n - 1) for m in range(num_micro_batches)}
        | {(c, layout.rank_of(1, m)) for c in layout.stage_ranks(0) for m in range(num_micro_batches) if sequential}
    )
    for a, b in pairs:
        backend = "nccl" if layout.is_cuda_rank(a) and layout.is_cuda_rank(b) else "gloo"
        wanted.append((f"link/{a}-{b}", [a, b], backend))
    if n > 1:
        owners = layout.stage_ranks(0) if federated else [0]
        wanted.append(("ends", [*owners, *layout.stage_ranks(n - 1)], "gloo"))
    for s in range(n):
        if layout.replicas[s] > 1 and not (federated and s == 0):
            wanted.append((f"replicas/{s}", layout.stage_ranks(s), "gloo"))
    if federated and n > 1:
        wanted.append(("fedavg", [layout.offsets[1], *layout.stage_ranks(0)], "gloo"))
    groups = fabric.build(store, rank, timeout, wanted)
    return Groups(
        store=store,
        world=groups["world"],
        links={k: g for k, g in groups.items() if k.startswith("link/")},
        ends=groups.get("ends"),
        replicas=groups.get(f"replicas/{stage}"),
        fedavg=groups.get("fedavg"),
    )


def init_deepspeed(
    store: Any,
    segment: torch.nn.Module,
    run: Any,
    stage: int,
    replica: int,
    num_replicas: int,
    num_micro_batches: int,
    offload: str,
    on_cuda: bool,
    timeout: datetime.timedelta,
) -> Any:
    """torch's default group over this stage's replicas (replica 0 publishes an address in the
    store), then DeepSpeed's engine on it: its world is the replica group."""
    from splitlearn import zero

    key = f"splitlearn/deepspeed/{stage}"
    if replica == 0:
        ip, port = rendezvous_address()
        store.set(key, f"{ip}:{port}")
    address = store.get(key).decode()
    dist.init_process_group(
        "nccl" if on_cuda else "gloo",
        init_method=f"tcp://{address}",
        rank=replica,
        world_size=num_replicas,
        timeout=timeout,
    )
    own = [dist.new_group([r]) for r in range(num_replicas)]
    params = [p for p in segment.parameters() if p.requires_grad]
    config = zero.ds_config(
        run.train,
        offload=offload,
        rows_per_micro_batch=run.train.batch_size // num_micro_batches,
        micro_batches_per_replica=num_micro_batches // num_replicas,
        replicas=num_replicas,
        trainable_params=sum(p.numel() for p in params),
        on_cuda=on_cuda,
        user=run.deepspeed,
    )
    env = {"RANK": replica, "WORLD_SIZE": num_replicas, "LOCAL_RANK": 0}
    groups = zero.ReplicaGroups(dist.group.WORLD, own[replica])
    return zero.initialize(segment, params, config, groups, env)
