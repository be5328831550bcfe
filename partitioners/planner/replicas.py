"""Replicas as a post-pass on a plan: identical free devices take copies of the bottleneck
stage while the predicted step drops."""

from __future__ import annotations

from partitioners.costmodel import StageMethod
from partitioners.planner.feasibility import check_plan
from partitioners.planner.objective import evaluate
from partitioners.planner.request import Groups, PlanRequest, groups_of, identical
from partitioners.planner.tables import CostTables


def add_replicas(
    req: PlanRequest, tables: CostTables, seq: list[str], bounds: list[int], opts: list[StageMethod]
) -> Groups:
    """Replicas for a plan's bottleneck, greedily: while the bottleneck is a device running
    one stage (not the data owner's) and free devices (in the pool, used by no stage) are
    identical to it, give that stage the replica count (a divisor of the micro-batches, up
    to what the free devices allow) with the lowest predicted step, as long as the step
    drops. The cuts and methods stay; a post-pass, not part of the exact search."""
    topo, M = req.topology, req.num_micro_batches
    groups = groups_of(seq, None)
    if req.schedule == "sequential" or M < 2:
        return groups  # one micro-batch at a time: replicas only add an all-reduce
    step = evaluate(tables, seq, bounds, opts, groups)
    while step.bottleneck.startswith("device "):
        dev = step.bottleneck.removeprefix("device ")
        on = [s for s, g in enumerate(groups) if dev in g]
        if len(on) != 1 or on[0] == 0 or (req.label_privacy and on[0] == len(seq) - 1):
            break
        s = on[0]
        used = {d for g in groups for d in g}
        first = topo.device(groups[s][0])
        twins = [d for d in req.pool if d not in used and identical(first, topo.device(d))]
        twins.sort(key=lambda d: (-topo.link(first.name, d).bandwidth_mbps, topo.link(first.name, d).latency_ms))
        best = None
        R = len(groups[s])
        for extra in range(1, len(twins) + 1):
            if M % (R + extra):
                continue
            trial = [*groups[:s], (*groups[s], *twins[:extra]), *groups[s + 1 :]]
            if check_plan(req, tables, seq, bounds, opts, trial) is not None:
                continue
            ev = evaluate(tables, seq, bounds, opts, trial)
            if best is None or ev.step_ms < best[0].step_ms - 1e-12:
                best = (ev, trial)
        if best is None or best[0].step_ms >= step.step_ms - 1e-12:
            break
        step, groups = best
    return groups
