"""Feasibility: whether a plan's devices, cuts, methods and replicas satisfy the
constraints (the data owner first, memory and host memory per device, replica rules), and
one-line reasons when nothing fits."""

from __future__ import annotations

import functools

from partitioners.costmodel import StageMethod, stage_memory
from partitioners.planner.request import (
    GB,
    Groups,
    PlanRequest,
    difference,
    group_name,
    groups_of,
    identical,
    owner_layers_check,
    uniform_cuts,
)
from partitioners.planner.tables import CostTables


def base_options(tables: CostTables, seq: list[str]) -> list[StageMethod]:
    """The configured method of each stage (no planner choice)."""
    return [tables.options(s, dev)[0] for s, dev in enumerate(seq)]


def check_replicas(req: PlanRequest, groups: Groups, where: str = "plan.devices") -> str | None:
    """Why these replica groups are not allowed, or None."""
    topo, M = req.topology, req.num_micro_batches
    for s, group in enumerate(groups):
        if len(group) < 2:
            continue
        name = f"{where}: '{group_name(group)}'"
        if s == 0 and req.clients:
            if tuple(group) != tuple(req.clients):
                return f"{name}: with federation the first stage runs on the clients '{group_name(req.clients)}'"
            if M % len(group):
                return f"{name}: {len(group)} clients need train.micro_batches a multiple of {len(group)}, got {M}"
            continue  # clients may differ: each runs its own front, the slowest sets the pace
        if s == 0:
            return f"{name}: the first stage (embedding, raw inputs) runs on the data owner and cannot be replicated"
        if req.label_privacy and s == len(groups) - 1:
            return (
                f"{name}: label_privacy: the last stage (head, labels) runs on the data owner and cannot be replicated"
            )
        first = topo.device(group[0])
        for d in group[1:]:
            if not identical(first, topo.device(d)):
                return (
                    f"{name}: replicas need identical devices, but '{group[0]}' and '{d}' differ in "
                    f"{difference(first, topo.device(d))}"
                )
        if M % len(group):
            return (
                f"{name}: stage {s} on {len(group)} replicas needs train.micro_batches to be a multiple of "
                f"{len(group)} (each replica takes every {len(group)}th micro-batch), got {M}"
            )
    return None


def closest_options(tables: CostTables, seq: list[str], bounds: list[int]) -> list[StageMethod]:
    """For an error message when nothing fits: each stage's option closest to fitting (the
    smallest overflow of device memory or host budget, relative to it; the configured one
    on ties), so that the message names the tightest constraint."""
    S = len(seq)

    def over(s: int, o: StageMethod) -> float:
        dev, a, b = seq[s], bounds[s], bounds[s + 1]
        if not a < b:
            return 0.0
        return max(
            tables.dev_mem(dev, a, b, s, S, o) / tables.capacity(dev),
            tables.host_mem(dev, a, b, o) / tables.host_capacity(dev),
        )

    return [min(tables.options(s, dev), key=functools.partial(over, s)) for s, dev in enumerate(seq)]


def check_plan(
    req: PlanRequest,
    tables: CostTables,
    seq: list[str],
    bounds: list[int],
    opts: list[StageMethod] | None = None,
    groups: Groups | None = None,
) -> str | None:
    """Why this device sequence, these cuts and these stage methods (default: the
    configured ones) break a constraint, or None. ``groups``: each stage's replicas
    (default: ``seq``, no replicas)."""
    S = len(seq)
    opts = opts or base_options(tables, seq)
    groups = groups_of(seq, groups)
    topo = req.topology
    if not topo.device(seq[0]).owns_data:
        return f"the first stage (embedding, raw inputs) must run on a data-owning device, not '{seq[0]}'"
    if req.label_privacy and seq[-1] != seq[0]:
        return f"label_privacy: the last stage (head, labels) must run on '{seq[0]}', not '{seq[-1]}'"
    why = check_replicas(req, groups) or owner_layers_check(req, bounds)
    if why:
        return why
    used: dict[str, float] = {}
    host: dict[str, float] = {}
    stages_on: dict[str, list[str]] = {}
    for s in range(S):
        a, b = bounds[s], bounds[s + 1]
        if not a < b:
            return f"stage {s} would be empty (cuts {bounds[1:-1]})"
        what = f"stage {s} ({req.layers[a].name}..{req.layers[b - 1].name}"
        what += f", {opts[s].label})" if opts[s] != StageMethod() else ")"
        for dev in groups[s]:  # each replica holds the whole stage
            used[dev] = used.get(dev, 0.0) + tables.dev_mem(dev, a, b, s, S, opts[s])
            host[dev] = host.get(dev, 0.0) + tables.host_mem(dev, a, b, opts[s])
            stages_on.setdefault(dev, []).append(what)
    for dev, need in used.items():
        cap = tables.capacity(dev)
        if need > cap:
            return (
                f"{' and '.join(stages_on[dev])} on device '{dev}' needs {need / GB:.3g} GB but the device has "
                f"memory_gb={cap / GB:g} ({(need - cap) / GB:.3g} GB short)"
            )
        cap = tables.host_capacity(dev)
        if host[dev] > cap:
            unset = "" if tables.dev[dev].host_memory_gb else " (host_memory_gb unset: memory_gb)"
            return (
                f"{' and '.join(stages_on[dev])} on device '{dev}' needs {host[dev] / GB:.3g} GB of host memory "
                f"for offload but the device has host_memory_gb={cap / GB:g}{unset} "
                f"({(host[dev] - cap) / GB:.3g} GB short)"
            )
    return None


def allow_hint(req: PlanRequest, seq: list[str]) -> str:
    """A pointer to ``plan.allow`` when edge stages could shrink but may not."""
    if req.allow or not any(req.topology.device(d).tier == "edge" for d in seq):
        return ""
    return "; plan.allow: [lora, recompute, int8] lets edge stages train with less memory"


def infeasible_reason(req: PlanRequest, tables: CostTables, seqs: list[list[str]]) -> str:
    """One line: which constraint fails, and by how much, for the most promising attempt."""
    topo = req.topology
    owner = topo.data_owner
    pool = req.pool
    hint = allow_hint(req, pool)
    cuda = any(topo.device(d).accelerator == "cuda" for d in pool)  # offload could move state off them
    if req.finetune is None and not req.allow and not cuda:  # every stage full: the whole model's need is known
        total_need = stage_memory(
            req.layers, schedule=req.schedule, num_micro_batches=req.num_micro_batches, precision=req.precision
        ).device_total
        total_cap = sum(topo.device(d).memory_gb for d in pool) * GB
        if total_need > total_cap:
            return (
                f"no feasible plan: the model needs {total_need / GB:.2f} GB for training but the devices "
                f"together have {total_cap / GB:.2f} GB ({(total_need - total_cap) / GB:.2f} GB short){hint}"
            )

    def least(a: int, b: int, s: int, S: int) -> float:
        return min(req.stage_memory(a, b, s, S, o, owner.name).device_total for o in req.options(s, owner.name))

    S = max(len(pool), 1)
    front = min(req.min_owner_front, req.n)
    tail = min(req.min_owner_tail, req.n - front) if req.label_privacy else 0
    first = least(0, front, 0, S)
    if tail:
        first += least(req.n - tail, req.n, S, S + 1)
    if first > owner.memory_gb * GB:
        what = "the embedding and the head (label_privacy)" if req.label_privacy else "the embedding"
        if front > 1 or tail > 1:
            what = f"{front} chain layers" + (f" and the last {tail}" if tail else "")
            what += f" ({req.privacy_why or 'privacy'})"
        return (
            f"no feasible plan: privacy pins {what} to '{owner.name}', which needs {first / GB:.3f} GB "
            f"but has memory_gb={owner.memory_gb:g} ({(first - owner.memory_gb * GB) / GB:.3f} GB short){hint}"
        )
    # report the tightest stage of the first sequence's uniform split
    seq = max(seqs, key=len) if seqs else [owner.name]
    bounds = [0, *uniform_cuts(req.n, min(len(seq), req.n)), req.n]
    seq = seq[: len(bounds) - 1]
    why = check_plan(req, tables, seq, bounds, closest_options(tables, seq, bounds))
    return f"no feasible plan: memory does not fit on any device sequence (e.g. {why}){hint}"
