"""Partitioners: which devices run which contiguous layer ranges, in which order.

All partitioners share one cost model and one objective, so their plans compare fairly:

- a stage's cost per micro-batch is its forward and backward time on its device, plus its
  optimizer step spread over the step's micro-batches;
- a cut between two devices costs, per micro-batch, one activation transfer forward and
  one gradient transfer back (latency + bytes / bandwidth, each direction its own link);
- the predicted step time is what the simulator makes of the schedule's action lists on
  these costs (:mod:`partitioners.planner.objective`).

Constraints, checked for every plan of every partitioner:

- the first stage (the embedding, on raw inputs) runs on a data-owning device; with
  ``label_privacy`` the last stage (head and loss, on the labels) runs there too, making a
  U-shaped pipeline in which that device runs two stages;
- each stage's memory (weights, gradients, optimizer state, activations in flight for the
  schedule, buffers: :func:`partitioners.costmodel.stage_memory`) fits its device; a device
  running two stages must fit both.

Fine-tuning methods: each stage trains with a :class:`~partitioners.costmodel.StageMethod`
(full, frozen or LoRA; activation recompute; compact frozen weights), configured by a
:class:`~partitioners.costmodel.FinetunePolicy` (default, by device tier, by stage). With
``allow`` (``plan.allow``), a stage on an *edge* device may also take the listed options
(``lora``, ``frozen``, ``recompute``, ``bf16``, ``fp16``, ``int8``): every partitioner picks,
for each stage, the fastest option that fits (the configured one on ties), so an option is
used where it makes the plan fit or faster. Stages on different devices choose
independently; the U-shaped pipeline's two stages on the data owner choose together.

ZeRO offload: a stage on a ``cuda`` device may also move its optimizer state (``optimizer``)
or its weights too (``params``) to host memory, with no ``allow`` needed; the configured
offload comes first. The stages on a device must then fit its host budget
(``host_memory_gb``) as well, and an offloaded stage pays for its optimizer step on the
host CPU and the host-link transfers (:func:`partitioners.costmodel.stage_time`), so the
planner takes offload only where it makes a plan fit or faster.

Replicas: a stage may run on several identical devices (:func:`identical`) as
data-parallel replicas: replica ``r`` of an ``R``-replica stage handles micro-batches
``m % R == r`` and the replicas all-reduce their gradients before the optimizer step (ring
all-reduce over the link between the first two). Each replica holds the whole stage's
memory; its device is busy ``1/R`` of the stage's forward and backward work plus the whole
optimizer step and all-reduce. ``uniform``, ``balanced`` and ``manual`` take replicas from
``plan.devices`` entries like ``cloud-c+cloud-d``; ``optimal`` adds them as a post-pass
(:func:`add_replicas`) on the best plan without replicas, so ``exhaustive`` remains the
reference for plans without replicas.

Partitioners: ``uniform`` (equal layer counts, devices in the order given), ``balanced``
(the cuts that minimise the largest stage cost, devices in the order given; ties broken by
the sum), ``manual`` (cuts and devices from the config), ``exhaustive`` (every device
sequence and every cut: the reference for tests), and ``optimal`` (the best plan over device
choice, order, cuts and methods: a branch and bound over sequences of device classes around a
Pareto dynamic programme over cuts, pruned by bounds that hold for every plan
(:mod:`partitioners.planner.bounds`), the simulator checking every plan whose bound is below
the best step (replayed on arrays for all the plans of a plain 1F1B sequence at once); within
``plan.search_seconds`` it proves the plan optimal, past it the plan carries the bound it
reached: :mod:`partitioners.planner.optimal`).

The predicted step of every plan is the simulator's (:mod:`partitioners.planner.objective`).
"""

from __future__ import annotations

from partitioners.plan import Plan
from partitioners.planner.assemble import build_plan, simulate_plan
from partitioners.planner.exhaustive import exhaustive
from partitioners.planner.feasibility import check_plan, check_replicas
from partitioners.planner.fixed import balanced, manual, uniform
from partitioners.planner.objective import Evaluation, evaluate
from partitioners.planner.optimal import optimal
from partitioners.planner.request import (
    PlanError,
    PlanRequest,
    default_device_order,
    identical,
    uniform_cuts,
)
from partitioners.planner.tables import CostTables

PARTITIONERS = {
    "uniform": uniform,
    "balanced": balanced,
    "optimal": optimal,
    "manual": manual,
    "exhaustive": exhaustive,
}


def partition(name: str, req: PlanRequest) -> Plan:
    if name not in PARTITIONERS:
        raise PlanError(f"plan.partitioner: '{name}' is not one of {', '.join(PARTITIONERS)}")
    return PARTITIONERS[name](req)


__all__ = [
    "PARTITIONERS",
    "CostTables",
    "Evaluation",
    "PlanError",
    "PlanRequest",
    "build_plan",
    "check_plan",
    "check_replicas",
    "default_device_order",
    "evaluate",
    "identical",
    "partition",
    "simulate_plan",
    "uniform_cuts",
]
