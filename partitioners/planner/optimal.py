"""``optimal``: the best plan over device choice, order, cuts and stage methods."""

from __future__ import annotations

import math
import time

import numpy as np

from partitioners.costmodel import StageMethod
from partitioners.plan import Plan
from partitioners.planner.assemble import build_plan
from partitioners.planner.bounds import PoolBounds
from partitioners.planner.cuts import CutArrays, CutChoice, best_cuts, every_cut
from partitioners.planner.devices import DeviceSearch
from partitioners.planner.feasibility import infeasible_reason
from partitioners.planner.objective import array_steps, batch_steps, evaluate, plain_sequence
from partitioners.planner.replicas import add_replicas
from partitioners.planner.request import PlanError, PlanRequest, closed_sequence
from partitioners.planner.tables import CostTables

SEED_TOP = 64  # per seed sequence, the plans with the smallest bounds checked (all at once where plain)
VERIFY_PER_SEQUENCE = 4  # per device sequence, the plans with the smallest bounds the simulator checks first
VERIFY_BUDGET = 2000  # then at most this many more plans, across sequences, in the order of their bounds
MAX_NODES = 20_000  # device prefixes the branch and bound expands before it stops with a bound
MAX_LABELS = 200_000  # listing every plan below the best step: give up past this many partial plans


def natural_orders(req: PlanRequest, owner: str) -> dict[str, list[str]]:
    """Orders of the pool a person would try, ``owner`` first: the others as listed, by the
    link from the owner (then speed), and by speed."""
    topo = req.topology
    rest = [d for d in req.pool if d != owner]
    return {
        "given": [owner, *rest],
        "link": [owner, *sorted(rest, key=lambda d: (-topo.link(owner, d).bandwidth_mbps, -topo.device(d).tflops, d))],
        "speed": [owner, *sorted(rest, key=lambda d: (-topo.device(d).tflops, d))],
    }


def seed_sequences(req: PlanRequest) -> list[list[str]]:
    """Device sequences that often hold a good plan: each data owner, then prefixes of the
    other devices ranked by link from it and speed, or by speed alone."""
    return [seq for _, seq in ranked_seeds(req)]


def ranked_seeds(req: PlanRequest) -> list[tuple[int, list[str]]]:
    """:func:`seed_sequences`, the short ones first, each with the ranking it is a prefix of."""
    out: list[tuple[int, list[str]]] = []
    seen: set[tuple[str, ...]] = set()
    rest = len(req.pool) - 1
    lengths = sorted({*range(0, min(rest, 8) + 1), *(k for k in (12, 16, 24, 32, 48, 64) if k <= rest)})
    owners = [d for d in req.pool if req.topology.device(d).owns_data]
    orders = [(o, order) for o in owners for order in (natural_orders(req, o)["link"], natural_orders(req, o)["speed"])]
    for k in lengths:  # the short ones first: they are cheap, and their step bounds the long ones'
        for i, (_, order) in enumerate(orders):
            seq = closed_sequence(req, order[: k + 1])
            if len(seq) <= req.n and tuple(seq) not in seen:
                seen.add(tuple(seq))
                out.append((i, seq))
    return out


class _Search:
    """The best plan found so far by the simulator's step, and what is left unchecked."""

    def __init__(self, req: PlanRequest, tables: CostTables, limits: PoolBounds, deadline: float = math.inf):
        self.req, self.tables, self.limits = req, tables, limits
        self.deadline = deadline
        self.best: tuple[float, list[str], list[int], list[StageMethod]] | None = None
        self.budget = VERIFY_BUDGET
        self.open_low = math.inf  # the smallest bound of the plans left unchecked

    @property
    def step(self) -> float:
        return self.best[0] if self.best else math.inf

    def check(self, seq: list[str], choice: CutChoice) -> None:
        ev = evaluate(self.tables, seq, choice.bounds, choice.opts)
        if ev.step_ms < self.step - 1e-12:
            self.best = (ev.step_ms, seq, choice.bounds, choice.opts)

    def check_all(self, seq: list[str], choices: list[CutChoice] | CutArrays) -> None:
        """Check these plans of ``seq`` (smallest bound first): all at once where the
        sequence is plain and the schedule 1F1B (:func:`array_steps`, the simulator
        replayed on arrays), else the first ``VERIFY_PER_SEQUENCE`` by the simulator."""
        if isinstance(choices, CutArrays):
            below = np.flatnonzero(choices.lower_ms < self.step)
            if not len(below):
                return
            if self.req.schedule == "1f1b" and plain_sequence(self.tables, seq):
                steps = array_steps(self.tables, seq, choices.bounds[below], choices.opts[below])
                i = int(np.argmin(steps))
                if steps[i] < self.step:
                    self.check(seq, choices.choice(int(below[i]), self.tables, seq))  # the simulator's own figure
                return
            choices = [choices.choice(int(i), self.tables, seq) for i in below[:VERIFY_PER_SEQUENCE]]
        choices = [c for c in choices if c.lower_ms < self.step]
        if not choices:
            return
        if self.req.schedule != "1f1b" or not plain_sequence(self.tables, seq):
            for choice in choices[:VERIFY_PER_SEQUENCE]:
                if choice.lower_ms >= self.step:
                    break
                self.check(seq, choice)
            return
        steps = batch_steps(self.tables, seq, choices)
        i = int(np.argmin(steps))
        if steps[i] < self.step:
            self.check(seq, choices[i])  # the simulator's own figure for the plan kept

    def every_plan_below(self, seq: list[str], lowest: float) -> None:
        """Check the plans of ``seq`` whose bound is below the best step, smallest bound
        first, while the budget lasts (what is left keeps its bound in ``open_low``)."""
        if time.monotonic() > self.deadline:
            self.open_low = min(self.open_low, lowest)
            return
        if self.req.schedule == "1f1b" and plain_sequence(self.tables, seq):  # all at once, no budget
            every = every_cut(self.req, self.tables, seq, self.step, MAX_LABELS, tail=self.limits.sequence_tail)
            if every is None:  # too many to list
                self.open_low = min(self.open_low, lowest)
                return
            if len(every.lower_ms):
                steps = array_steps(self.tables, seq, every.bounds, every.opts)
                i = int(np.argmin(steps))
                if steps[i] < self.step:
                    self.check(seq, every.choice(i, self.tables, seq))  # the simulator's own figure
            return
        if self.budget <= 0:
            self.open_low = min(self.open_low, lowest)
            return
        top = self.budget
        choices = best_cuts(
            self.req,
            self.tables,
            seq,
            self.step,
            top=top,
            prune=False,
            max_labels=MAX_LABELS,
            tail=self.limits.sequence_tail,
        )
        if choices is None:  # too many plans below the bound to list
            self.open_low = min(self.open_low, lowest)
            return
        for choice in choices:
            if choice.lower_ms >= self.step:
                return
            if self.budget <= 0 or time.monotonic() > self.deadline:
                self.open_low = min(self.open_low, choice.lower_ms)
                return
            self.budget -= 1
            self.check(seq, choice)
        if len(choices) == top:  # the list stopped at ``top``: plans past it are unchecked
            self.open_low = min(self.open_low, choices[-1].lower_ms)


def optimal(req: PlanRequest) -> Plan:
    """The plan with the smallest simulated step over every device sequence, cut and stage
    method.

    Seeds (prefixes of two device rankings, short ones first) give a first step; the
    bounds valid for every plan (:mod:`partitioners.planner.bounds`) then leave out the
    devices and links no faster plan can use. The device search
    (:mod:`partitioners.planner.devices`, branch and bound over sequences of device
    classes) hands each complete sequence's best-ranked plans to be checked; the cut search
    ranks plans by a bound below their step, exact for sequential and GPipe plans with
    nothing shared. Then every plan whose bound is still below the best step is checked
    too: for a plain 1F1B sequence all of them at once (:func:`every_cut` lists them as
    arrays, :func:`array_steps` replays the simulator on them), else by the simulator in the
    order of their bounds (within ``VERIFY_BUDGET`` simulations), all within
    ``search_seconds``. The plan carries ``lower_bound_ms``: no plan without replicas steps
    faster (equal to its step: proven optimal; below it when a budget stopped the search)."""
    tables = CostTables(req)
    deadline = time.monotonic() + req.search_seconds
    limits = PoolBounds(req, tables)
    search = _Search(req, tables, limits, deadline)
    # a good plan first, from prefixes of two device rankings: the bound then prunes more
    # (and leaves out the sequences whose devices or links cannot beat the best step); a
    # ranking stops after two longer prefixes in a row found no better plan
    misses: dict[int, int] = {}
    for order, seq in ranked_seeds(req):
        if time.monotonic() > deadline and search.best is not None:
            break
        if misses.get(order, 0) >= 2 or not limits.admits(seq, search.step):
            continue
        before = search.step
        search.check_all(seq, best_cuts(req, tables, seq, search.step, top=SEED_TOP, tail=limits.sequence_tail) or [])
        if search.best is not None:
            misses[order] = 0 if search.step < before else misses.get(order, 0) + 1
    devices = DeviceSearch(
        req,
        tables,
        search.check_all,
        lambda: search.step,
        top=SEED_TOP,
        max_nodes=MAX_NODES,
        deadline=deadline,
        bounds=limits,
        pool=limits.usable(search.step),
    )
    devices.run()
    # where a bound is below the best step, plans the bound ranks lower may step faster
    for found in sorted(devices.sequences, key=lambda q: q.lower_ms):
        if found.lower_ms < search.step:
            search.every_plan_below(found.devices, found.lower_ms)
    if search.best is None:
        raise PlanError(infeasible_reason(req, tables, seed_sequences(req)))
    step, seq, bounds, opts = search.best
    groups = add_replicas(req, tables, seq, bounds, opts) if req.replicate else None
    plan = build_plan(req, tables, seq, bounds, "optimal", opts, groups)
    if all(len(s.devices) == 1 for s in plan.stages):  # replicas: the bound is for plans without
        plan.predicted["lower_bound_ms"] = round(min(search.open_low, devices.open_low, step), 4)
    return plan
