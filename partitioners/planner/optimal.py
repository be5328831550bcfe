"""``optimal``: the best plan over device choice, order, cuts and stage methods."""

from __future__ import annotations

import math

from partitioners.costmodel import StageMethod
from partitioners.plan import Plan
from partitioners.planner.assemble import build_plan
from partitioners.planner.cuts import CutChoice, best_cuts
from partitioners.planner.exhaustive import device_sequences
from partitioners.planner.feasibility import infeasible_reason
from partitioners.planner.objective import evaluate
from partitioners.planner.replicas import add_replicas
from partitioners.planner.request import PlanError, PlanRequest, closed_sequence
from partitioners.planner.tables import CostTables

EXACT_MAX_DEVICES = 7
VERIFY_PER_SEQUENCE = 4  # per device sequence, the plans with the smallest bounds the simulator checks first
VERIFY_BUDGET = 2000  # then at most this many more plans, across sequences, in the order of their bounds
MAX_LABELS = 200_000  # listing every plan below the best step: give up past this many partial plans


def ranked_devices(req: PlanRequest) -> list[str]:
    """The data owner, then the others ranked for the large-topology search: devices whose
    link from the owner is faster first, then faster devices, then more memory."""
    topo = req.topology
    pool = req.pool
    owner = next(d for d in pool if topo.device(d).owns_data)
    rest = [d for d in pool if d != owner]
    rest.sort(key=lambda d: (-topo.link(owner, d).bandwidth_mbps, -topo.device(d).tflops, -topo.device(d).memory_gb, d))
    return [owner, *rest]


def candidate_sequences(req: PlanRequest) -> tuple[list[list[str]], bool]:
    """The device sequences ``optimal`` searches, and whether they are all of them (up to
    ``EXACT_MAX_DEVICES`` devices); beyond, prefixes of two rankings."""
    if len(req.pool) <= EXACT_MAX_DEVICES:
        return device_sequences(req), True
    ranked = ranked_devices(req)
    by_speed = [ranked[0], *sorted(ranked[1:], key=lambda d: (-req.topology.device(d).tflops, d))]
    longer = [k for k in (16, 24, 32, 48, 64, 96, 128) if k <= len(ranked)]
    lengths = sorted({*range(1, min(len(ranked), 12) + 1), *longer})
    seen: set[tuple[str, ...]] = set()
    candidates = []
    for order in (ranked, by_speed):
        for k in lengths:
            seq = closed_sequence(req, order[:k])
            if len(seq) <= req.n and tuple(seq) not in seen:
                seen.add(tuple(seq))
                candidates.append(seq)
    return candidates, False


class _Search:
    """The best plan found so far by the simulator's step, and what is left unchecked."""

    def __init__(self, req: PlanRequest, tables: CostTables):
        self.req, self.tables = req, tables
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

    def every_plan_below(self, seq: list[str], lowest: float) -> None:
        """Check the plans of ``seq`` whose bound is below the best step, smallest bound
        first, while the budget lasts (what is left keeps its bound in ``open_low``)."""
        if self.budget <= 0:
            self.open_low = min(self.open_low, lowest)
            return
        top = self.budget
        choices = best_cuts(self.req, self.tables, seq, self.step, top=top, prune=False, max_labels=MAX_LABELS)
        if choices is None:  # too many plans below the bound to list
            self.open_low = min(self.open_low, lowest)
            return
        for choice in choices:
            if choice.lower_ms >= self.step:
                return
            if self.budget <= 0:
                self.open_low = min(self.open_low, choice.lower_ms)
                return
            self.budget -= 1
            self.check(seq, choice)
        if len(choices) == top:  # the list stopped at ``top``: plans past it are unchecked
            self.open_low = min(self.open_low, choices[-1].lower_ms)


def optimal(req: PlanRequest) -> Plan:
    """The plan with the smallest simulated step over every device sequence, cut and stage
    method (every sequence up to ``EXACT_MAX_DEVICES`` devices).

    Each sequence's cut search (:func:`~partitioners.planner.cuts.best_cuts`) ranks plans by
    a bound below their step, exact for sequential and GPipe plans with nothing shared; the
    simulator checks the best-ranked plans, then every plan whose bound is still below the
    best step (within ``VERIFY_BUDGET`` simulations). When every sequence was searched, the
    plan carries ``lower_bound_ms``: no plan without replicas steps faster (equal to its
    step: proven optimal)."""
    tables = CostTables(req)
    candidates, complete = candidate_sequences(req)
    search = _Search(req, tables)
    lowest: dict[tuple[str, ...], float] = {}  # per sequence, the smallest bound of its plans
    for seq in sorted(candidates, key=len):
        for choice in best_cuts(req, tables, seq, search.step, top=VERIFY_PER_SEQUENCE) or []:
            lowest.setdefault(tuple(seq), choice.lower_ms)
            if choice.lower_ms >= search.step:
                break
            search.check(seq, choice)
    # where a bound is below the best step, plans the bound ranks lower may step faster
    for seq in sorted((s for s in candidates if tuple(s) in lowest), key=lambda s: lowest[tuple(s)]):
        if lowest[tuple(seq)] < search.step:
            search.every_plan_below(seq, lowest[tuple(seq)])
    if search.best is None:
        raise PlanError(infeasible_reason(req, tables, candidates))
    step, seq, bounds, opts = search.best
    groups = add_replicas(req, tables, seq, bounds, opts) if req.replicate else None
    plan = build_plan(req, tables, seq, bounds, "optimal", opts, groups)
    if complete and all(len(s.devices) == 1 for s in plan.stages):  # replicas: the bound is for plans without
        plan.predicted["lower_bound_ms"] = round(min(search.open_low, step), 4)
    return plan
