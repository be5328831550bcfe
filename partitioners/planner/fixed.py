"""The partitioners on a given device order: ``uniform`` (equal layer counts), ``manual``
(the config's cuts) and ``balanced`` (the cuts that minimise the largest stage)."""

from __future__ import annotations

import math

from partitioners.plan import Plan
from partitioners.planner.assemble import build_plan
from partitioners.planner.feasibility import check_replicas, infeasible_reason
from partitioners.planner.objective import stage_load
from partitioners.planner.request import (
    REPLICA_SEP,
    Groups,
    PlanError,
    PlanRequest,
    default_device_order,
    uniform_cuts,
)
from partitioners.planner.tables import CostTables


def ordered_groups(req: PlanRequest) -> tuple[list[str], Groups]:
    """The stages' devices in the order given (``plan.devices``, else the data owner first):
    the device sequence (each stage's first replica) and each stage's replicas. An entry
    ``a+b`` is one stage replicated on ``a`` and ``b``."""
    entries = list(req.devices or default_device_order(req.topology))
    groups = [tuple(e.split(REPLICA_SEP)) for e in entries]
    names = [d for g in groups for d in g]
    for d in names:
        req.topology.device(d)
    if len(set(names)) != len(names):
        raise PlanError(f"plan.devices: a device is listed twice: {entries}")
    if req.label_privacy:
        groups.append(groups[0])
    why = check_replicas(req, groups)
    if why:
        raise PlanError(why)
    return [g[0] for g in groups], groups


def uniform(req: PlanRequest) -> Plan:
    tables = CostTables(req)
    seq, groups = ordered_groups(req)
    if len(seq) > req.n:
        raise PlanError(
            f"plan.devices: {len(seq)} stages but the model has only {req.n} layers to share; "
            "list fewer devices in plan.devices"
        )
    return build_plan(req, tables, seq, [0, *uniform_cuts(req.n, len(seq)), req.n], "uniform", groups=groups)


def manual(req: PlanRequest) -> Plan:
    tables = CostTables(req)
    seq, groups = ordered_groups(req)
    cuts = list(req.cuts or [])
    if len(cuts) != len(seq) - 1:
        raise PlanError(f"plan.cuts: {len(seq)} stages need {len(seq) - 1} cuts, got {len(cuts)}")
    bounds = [0, *cuts, req.n]
    if any(not bounds[i] < bounds[i + 1] for i in range(len(bounds) - 1)):
        raise PlanError(
            f"plan.cuts: {cuts} must be strictly increasing within 1..{req.n - 1} "
            f"(the chain has {req.n} layers: embed=0, blocks 1..{req.n - 2}, head={req.n - 1})"
        )
    return build_plan(req, tables, seq, bounds, "manual", groups=groups)


def balanced(req: PlanRequest) -> Plan:
    """The cuts over the devices in the order given that minimise the largest stage cost
    (per micro-batch, on its own device; a replicated stage's shared by its replicas), then
    the sum; memory respected."""
    tables = CostTables(req)
    seq, groups = ordered_groups(req)
    S, n = len(seq), req.n
    if S > n:
        raise PlanError(f"plan.devices: {S} stages but the model has only {n} layers")
    INF = (math.inf, math.inf)
    best: list[list[tuple[float, float]]] = [[INF] * (n + 1) for _ in range(S + 1)]
    back = [[-1] * (n + 1) for _ in range(S + 1)]
    best[0][0] = (0.0, 0.0)
    for s in range(S):
        for a in range(s, n):
            if best[s][a] == INF:
                continue
            for b in range(a + 1, n - (S - s - 1) + 1):
                fits = [o for o in tables.options(s, seq[s]) if tables.fits(seq[s], a, b, s, S, o)]
                if not fits:
                    continue
                c = min(stage_load(tables, groups[s], a, b, o, S) for o in fits)
                cand = (max(best[s][a][0], c), best[s][a][1] + c)
                if cand < best[s + 1][b]:
                    best[s + 1][b], back[s + 1][b] = cand, a
    if best[S][n] == INF:
        raise PlanError(infeasible_reason(req, tables, [seq]))
    bounds, b = [n], n
    for s in range(S, 0, -1):
        b = back[s][b]
        bounds.append(b)
    return build_plan(req, tables, seq, bounds[::-1], "balanced", groups=groups)
