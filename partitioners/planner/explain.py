"""Plans that explain themselves: why a device of the topology is not in a plan."""

from __future__ import annotations

from partitioners.plan import Plan
from partitioners.planner.request import GB, PlanRequest
from partitioners.planner.tables import CostTables


def unused_devices(req: PlanRequest, plan: Plan) -> dict[str, str]:
    """For each device of the topology that runs no stage of ``plan``, one reason:

    - too little memory: no single layer fits on it as a stage, whatever its method;
    - link too slow: one activation over its cheapest link to a device of the plan takes
      longer than the plan spends per micro-batch, so any stage on it would slow the step;
    - not needed: ``optimal`` searched every plan with it and none is faster (or, beyond
      the exact search's size, none it tried);
    - not listed: ``plan.devices`` names the devices to use (or the candidates) without it.
    """
    tables = CostTables(req)
    used = set(plan.devices)
    pool = set(req.pool)
    n, M = req.n, max(req.num_micro_batches, 1)
    S = max(plan.num_stages + 1, 2)
    per_mb = plan.step_ms / M
    notes: dict[str, str] = {}
    for d in req.topology.device_names:
        if d in used:
            continue
        if d not in pool:
            notes[d] = "not listed in plan.devices"
            continue
        s = 1 if n > 1 else 0
        least = min(
            max(
                tables.dev_mem(d, i, i + 1, s, S, o) / tables.capacity(d),
                tables.host_mem(d, i, i + 1, o) / tables.host_capacity(d),
            )
            for i in range(n)
            for o in tables.options(s, d)
        )
        if least > 1:
            need = least * tables.capacity(d) / GB
            notes[d] = (
                f"too little memory: its smallest stage (one layer) needs {need:.3g} GB of its "
                f"memory_gb={tables.dev[d].memory_gb:g}"
            )
            continue
        cheapest = min((tables.link(u, d, i)[0], u) for u in used for i in range(1, n))
        if cheapest[0] > per_mb:
            notes[d] = (
                f"link too slow: one activation from {cheapest[1]} takes {cheapest[0]:.1f} ms, more than the "
                f"plan's {per_mb:.1f} ms per micro-batch"
            )
            continue
        proven = plan.partitioner == "exhaustive" or plan.optimality().startswith("proven")
        notes[d] = "not needed: no plan using it is faster" + ("" if proven else " (of those the search tried)")
    return notes
