"""``exhaustive``: every device sequence, every cut and every combination of stage methods;
the reference for small cases."""

from __future__ import annotations

import itertools

from partitioners.costmodel import StageMethod
from partitioners.plan import Plan
from partitioners.planner.assemble import build_plan
from partitioners.planner.feasibility import check_plan, infeasible_reason
from partitioners.planner.objective import evaluate
from partitioners.planner.request import PlanError, PlanRequest, closed_sequence
from partitioners.planner.tables import CostTables


def device_sequences(req: PlanRequest) -> list[list[str]]:
    """Every ordered choice of devices that starts on a data owner (and, with label
    privacy, ends on it too)."""
    topo = req.topology
    pool = req.pool
    owners = [d for d in pool if topo.device(d).owns_data]
    out = []
    for first in owners:
        rest = [d for d in pool if d != first]
        for k in range(0, len(rest) + 1):
            for mid in itertools.permutations(rest, k):
                seq = [first, *mid]
                out.append(closed_sequence(req, seq))
    return [s for s in out if len(s) <= req.n]


def exhaustive(req: PlanRequest) -> Plan:
    """Every device sequence and every cut: for small cases and as the tests' reference."""
    tables = CostTables(req)
    best: tuple[float, list[str], list[int]] | None = None
    n = req.n
    best_opts: list[StageMethod] = []
    for seq in device_sequences(req):
        S = len(seq)
        for cuts in itertools.combinations(range(1, n), S - 1):
            bounds = [0, *cuts, n]
            # every combination of the options that fit alone (memory only adds up)
            fits = [
                [o for o in tables.options(s, dev) if tables.fits(dev, bounds[s], bounds[s + 1], s, S, o)]
                for s, dev in enumerate(seq)
            ]
            for combo in itertools.product(*fits):
                opts = list(combo)
                if check_plan(req, tables, seq, bounds, opts):
                    continue
                t = evaluate(tables, seq, bounds, opts).step_ms
                if best is None or t < best[0] - 1e-12:
                    best, best_opts = (t, seq, bounds), opts
    if best is None:
        raise PlanError(infeasible_reason(req, tables, device_sequences(req)))
    return build_plan(req, tables, best[1], best[2], "exhaustive", best_opts)
