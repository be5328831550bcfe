"""The objective: the predicted step of a plan (devices, cuts, methods, replicas)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from partitioners.costmodel import StageMethod
from partitioners.planner.feasibility import base_options
from partitioners.planner.request import Groups, group_name, groups_of
from partitioners.planner.tables import CostTables
from partitioners.schedule import replica_pairs


@dataclass
class Evaluation:
    step_ms: float
    bottleneck: str
    busy_ms: float  # total compute of all stages, for the bubble fraction
    stage_ms: list[float]  # per stage, per micro-batch (its step's optimizer and all-reduce spread over M)
    link_ms: list[tuple[float, float]]  # per cut: (activation, gradient) per micro-batch
    allreduce_ms: list[float] = field(default_factory=list)  # per stage, once per step (replicas only)


def evaluate(
    tables: CostTables,
    seq: list[str],
    bounds: list[int],
    opts: list[StageMethod] | None = None,
    groups: Groups | None = None,
) -> Evaluation:
    """The predicted step of a plan: ``total + (M - 1) * worst`` (pipelined schedules), the
    fill and drain of one micro-batch plus the rest of the bottleneck's work.

    A stage on ``R`` replicas: each replica runs ``M / R`` forwards and backwards, then the
    all-reduce and the optimizer step, so its bottleneck term is ``(M/R - 1) (f + b) +
    (M - 1) / M (opt + allreduce)`` (for ``R = 1`` the usual ``(M - 1)`` times the stage's
    per-micro-batch cost); ``worst`` holds it divided by ``M - 1``, roughly ``1/R`` of the
    stage's per-micro-batch load. Under 1F1B, ``R`` counts at most ``S`` replicas
    (:func:`effective_replicas`). A cut between replicated stages spreads over
    ``lcm(R_s, R_s+1)`` pairs of wires, each carrying ``M / lcm`` transfers at its slowest
    pair's figures."""
    S, M = len(seq), tables.M
    opts = opts or base_options(tables, seq)
    groups = groups_of(seq, groups)
    stage_ms, allreduce = [], []
    load: dict[str, float] = {}
    busy = 0.0
    for s in range(S):
        a, b, R = bounds[s], bounds[s + 1], len(groups[s])
        ms = tables.stage_ms(seq[s], a, b, opts[s])
        if R == 1:
            per_dev, ar = ms, 0.0
            busy += ms
        else:
            opt = tables.opt_ms(seq[s], a, b, opts[s])
            ar = tables.allreduce_ms(groups[s], a, b, opts[s])
            fb = ms - opt / M
            per_dev = replica_load(fb, opt + ar, effective_replicas(tables.req.schedule, R, S), M)
            ms = fb + (opt + ar) / M
            busy += fb + R * (opt + ar) / M
        stage_ms.append(ms)
        allreduce.append(ar)
        for dev in groups[s]:
            load[dev] = load.get(dev, 0.0) + per_dev
    links: list[tuple[float, float]] = []
    wire_load: list[float] = []
    for s in range(S - 1):
        src, dst = groups[s], groups[s + 1]
        pairs = replica_pairs(len(src), len(dst), M)
        figs = [tables.link(src[r], dst[q], bounds[s + 1]) for r, q in pairs]
        act, grad = max(f[0] for f in figs), max(f[1] for f in figs)
        links.append((act, grad))
        k = math.lcm(len(src), len(dst))
        wire_load.append(max(act, grad) if k == 1 else (M // k - 1) * max(act, grad) / (M - 1))
    total = sum(stage_ms) + sum(a + g for a, g in links)
    worst_dev = max(load, key=lambda d: load[d])
    worst: float = load[worst_dev]
    bottleneck = f"device {worst_dev}"
    for s, (act_ms, grad_ms) in enumerate(links):
        if wire_load[s] > worst:
            src_name, dst_name = group_name(groups[s]), group_name(groups[s + 1])
            worst = wire_load[s]
            bottleneck = f"link {src_name}->{dst_name}" if act_ms >= grad_ms else f"link {dst_name}->{src_name}"
    return Evaluation(tables.objective(total, worst), bottleneck, busy, stage_ms, links, allreduce)


def effective_replicas(schedule: str, num_replicas: int, num_stages: int) -> int:
    """How many replicas of a stage can be busy at once: 1F1B lets the data owner's stage
    run at most ``S`` micro-batches ahead of its backwards (its warmup), so no more than
    ``S`` replicas find work at a time; GPipe forwards every micro-batch first."""
    return min(num_replicas, num_stages) if schedule == "1f1b" else num_replicas


def replica_load(fwd_bwd_ms: float, step_ms: float, busy_replicas: int, num_micro_batches: int) -> float:
    """A replicated stage's bottleneck term per micro-batch (see :func:`evaluate`): ``M / R``
    forwards and backwards one after another (``R`` replicas busy at once) and one optimizer
    step with the all-reduce, over ``M - 1``."""
    M, R = num_micro_batches, busy_replicas
    return ((M / R - 1) * fwd_bwd_ms + (M - 1) / M * step_ms) / (M - 1)


def stage_load(tables: CostTables, group: tuple[str, ...], a: int, b: int, opt: StageMethod, S: int) -> float:
    """Per micro-batch, what a stage keeps each of its devices busy (see :func:`evaluate`)."""
    ms = tables.stage_ms(group[0], a, b, opt)
    if len(group) == 1:
        return ms
    o = tables.opt_ms(group[0], a, b, opt)
    busy = effective_replicas(tables.req.schedule, len(group), S)
    return replica_load(ms - o / tables.M, o + tables.allreduce_ms(group, a, b, opt), busy, tables.M)
