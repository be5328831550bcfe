"""The simulator replayed on the compute a run measured: what separates the cost model's
error from the links' and the schedule's (docs/decisions.md, "checked against a replay")."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

from partitioners import Plan
from partitioners.planner import simulate_plan
from partitioners.simulator import StageCosts


def ran_plan(plan: Plan, stage_metrics: list[dict[str, Any]]) -> bool:
    """Whether one step's stage metrics come from this plan's workers (a re-planned run's
    earlier attempts ran other stages on other devices)."""
    ranks = sorted((s.index, d) for s in plan.stages for d in s.devices)
    return sorted((m["stage"], m["device"]) for m in stage_metrics) == ranks


def measured_stage_costs(
    plan: Plan, steps: list[list[dict[str, Any]]], skip_first: bool = True
) -> list[StageCosts] | None:
    """The compute a run's workers measured, as the simulator's per-stage costs: per stage,
    the median over steps of one micro-batch's forward and backward (the step's forward and
    backward time over the micro-batches the replica ran, averaged over replicas) and of the
    ``STEP`` action's own compute. ``steps``: each step's stage metrics (``run_step``'s).
    The first step is left out when there are others (it allocates the optimizer state),
    unless ``skip_first`` is off (steps after a warm-up)."""
    steps = [s for s in steps if ran_plan(plan, s) and all("fwd_s" in m for m in s)]
    if skip_first and len(steps) > 1:
        steps = steps[1:]
    if not steps:
        return None

    def median_of(stage: int, value: Callable[[dict[str, Any]], float]) -> float:
        per_step = []
        for metrics in steps:
            mine = [m for m in metrics if m["stage"] == stage]
            per_step.append(statistics.fmean(value(m) for m in mine) * 1e3)
        return statistics.median(per_step)

    return [
        StageCosts(
            median_of(s.index, lambda m: m["fwd_s"] / max(m["micro_batches"], 1)),
            median_of(s.index, lambda m: m["bwd_s"] / max(m["micro_batches"], 1)),
            median_of(s.index, lambda m: max(m["compute_s"] - m["fwd_s"] - m["bwd_s"], 0.0)),
            s.allreduce_ms,
        )
        for s in plan.stages
    ]


def replay(plan: Plan, steps: list[list[dict[str, Any]]], skip_first: bool = True) -> tuple[float, float] | None:
    """The simulator's step time for this plan and schedule with the compute the run
    measured (:func:`measured_stage_costs`): on the plan's links, and on free links. What
    separates the cost model's error from the links' and the schedule's, and what the links
    cost. None when the run has no stage metrics of this plan."""
    costs = measured_stage_costs(plan, steps, skip_first)
    if costs is None:
        return None
    # the workers step together, after the global gradient norm
    on_links = simulate_plan(plan, stage_costs=costs, step_barrier=True).step_ms
    return on_links, simulate_plan(plan, stage_costs=costs, free_links=True, step_barrier=True).step_ms
