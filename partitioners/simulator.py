"""Pipeline simulator: replay a schedule's action lists on per-stage and per-link costs.

The simulator reads the same :mod:`partitioners.schedule` lists the stage workers execute
and mirrors the runtime's rules:

- each stage runs its list strictly in order, one action at a time; ``F``, ``B`` and
  ``STEP`` occupy the stage for its forward, backward and optimizer time;
- a send takes no stage time (sends are asynchronous; host CPU costs below aside): it
  queues one transfer on its wire and the stage moves on at once. A wire is one direction of a link (``link s->s+1``
  carries activations, ``link s+1->s`` gradients) or the labels line from stage 0 to the
  last stage; it carries one transfer at a time, first in first out, and a transfer starts
  when it has been issued and the wire is free;
- a receive blocks its stage until the transfer of that micro-batch has arrived;
- optionally (``send_host``/``recv_host``, default free) each end of a transfer also spends
  host CPU on it, ``fixed_ms + ms_per_mb * MB`` (:class:`HostCost`): the sender's stage is
  busy for its share right after it issues the send (the transfer starts at the issue), the
  receiver's right after the transfer has arrived, before its next action (``recv_late_host``
  instead when the transfer had already arrived when the receiver reached its receive: the
  library then holds the message until it is asked for it, which costs more). This is the
  communication library's own work (copies, socket calls, its network threads), which on a
  host with as many cores as stages competes with the stages' compute for the cores;
- optionally (``step_overhead_ms``, default 0) a fixed cost per step that no stage's list
  holds (the driver's call to the workers and its reply, the step's global collectives) is
  added to the makespan;
- a stage on R replicas runs as R timelines: replica r runs the stage's list kept to the
  micro-batches ``m % R == r`` (:func:`~partitioners.schedule.replica_actions`), micro-batch
  m travels between the neighbours' replicas of m, each pair of replicas on its own wires,
  and the replicas' ``STEP`` starts when all of them reach it, with the gradient all-reduce.

Every resource (a stage, a wire) has a single issuer that uses it in program order, so the
start of each action is the latest end among its predecessors: the end of the previous
action on its stage, and for a receive the arrival of its transfer, which in turn waits for
the previous transfer on the same wire. The simulation therefore advances each stage as far
as it can, revisiting blocked stages when a transfer they wait for has been issued; this
gives the same times as a discrete-event loop without a global event queue. When no stage
can advance and some have actions left, the schedule deadlocks and :class:`DeadlockError`
names the stuck actions.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from partitioners.schedule import (
    RECV_ACT,
    RECV_GRAD,
    RECV_LABELS,
    SEND_ACT,
    SEND_GRAD,
    SEND_LABELS,
    STEP,
    Action,
    B,
    F,
    Schedule,
    ScheduleError,
    peak_in_flight,
    replica_actions,
    replica_pairs,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

ALLREDUCE = "ALLREDUCE"  # interval kind: a replicated stage's gradient all-reduce, before its STEP
HOST = "HOST"  # interval kind: a stage's host CPU work on one end of a transfer (see HostCost)
# Interval kinds of transfers, by the send that issues them
TRANSFER_KINDS = {SEND_ACT: "ACT", SEND_GRAD: "GRAD", SEND_LABELS: "LABELS"}
RECV_KINDS = (RECV_ACT, RECV_GRAD, RECV_LABELS)


@dataclass
class StageCosts:
    """Milliseconds of one stage: forward and backward of ONE micro-batch, and the ``STEP``
    action (gradient reduction, clipping, optimizer), which runs once per step. A replicated
    stage's replicas first all-reduce their gradients for ``allreduce_ms``."""

    fwd_ms: float
    bwd_ms: float
    step_ms: float = 0.0
    allreduce_ms: float = 0.0


@dataclass
class LinkCosts:
    """Milliseconds of one transfer over the link between stage s and s+1, per direction:
    latency plus bytes over bandwidth. The labels line (stage 0 to the last stage) is not
    one of these S-1 links; its cost is ``simulate(labels_ms=...)``. Between replicated
    stages every pair of replicas has its own wires at these figures."""

    act_ms: float  # one activation, s -> s+1
    grad_ms: float  # one gradient, s+1 -> s
    act_bytes: float = 0.0  # bytes of one activation transfer (only for send_host / recv_host)
    grad_bytes: float = 0.0  # bytes of one gradient transfer


@dataclass
class HostCost:
    """Host CPU milliseconds one end of one transfer spends on it: ``fixed_ms + ms_per_mb *
    bytes / 1e6``. It occupies that end's stage (see :func:`simulate`); zero by default."""

    fixed_ms: float = 0.0
    ms_per_mb: float = 0.0

    def __call__(self, nbytes: float) -> float:
        return self.fixed_ms + self.ms_per_mb * nbytes / 1e6


@dataclass
class Interval:
    """One busy span of a resource. Compute (``F``, ``B``, ``STEP``, and ``ALLREDUCE``
    before a replicated stage's ``STEP``) and ``HOST`` (one end's CPU work on a transfer, with
    the transfer's micro-batch) occupy ``stage s`` (``stage s.r`` for replica r);
    transfers (``ACT``, ``GRAD``, ``LABELS``) occupy their wire and name the sending stage
    and replica. ``mb`` is -1 for whole-step actions."""

    stage: int
    kind: str
    mb: int
    start_ms: float
    end_ms: float
    resource: str
    replica: int = 0


@dataclass
class SimResult:
    """What one simulated training step costs. Per-stage lists have one entry per
    timeline: each stage, or each replica of a replicated stage (``workers`` says which)."""

    step_ms: float  # makespan: end of the last action or transfer, plus step_overhead_ms
    busy_ms: list[float]  # per timeline, time computing (F, B, ALLREDUCE, STEP, HOST)
    idle_ms: list[float]  # per timeline, step_ms - busy
    bubble_fraction: float  # 1 - sum(busy) / (timelines * step_ms); 0 for an empty step
    peak_in_flight: list[int]  # per timeline, most micro-batches forwarded and not yet backwarded
    timeline: list[Interval]
    link_busy_ms: dict[str, float]  # per wire ("link 0->1", "link 1->0", "labels 0->2"), time carrying
    num_micro_batches: int
    workers: list[tuple[int, int]] = field(default_factory=list)  # per timeline: (stage, replica)

    @property
    def num_stages(self) -> int:
        return len({s for s, _ in self.workers}) if self.workers else len(self.busy_ms)

    @property
    def num_workers(self) -> int:
        return len(self.busy_ms)

    @property
    def replicas(self) -> list[int]:
        """Replicas per stage."""
        if not self.workers:
            return [1] * len(self.busy_ms)
        out = [0] * self.num_stages
        for s, _ in self.workers:
            out[s] += 1
        return out


class DeadlockError(ScheduleError):
    """No stage can take its next action: each waits for a transfer that is never sent."""


def _node(stage: int, replica: int = 0, num_replicas: int = 1) -> str:
    """``1`` for stage 1, ``1.0`` for replica 0 of a replicated stage 1."""
    return f"{stage}" if num_replicas == 1 else f"{stage}.{replica}"


def stage_resource(stage: int, replica: int = 0, num_replicas: int = 1) -> str:
    return f"stage {_node(stage, replica, num_replicas)}"


def link_resource(src: int | str, dst: int | str) -> str:
    return f"link {src}->{dst}"


def labels_resource(num_stages: int, dst: str | None = None) -> str:
    return f"labels 0->{dst if dst is not None else num_stages - 1}"


def _stage_of(node: str) -> int:
    return int(node.split(".")[0])


@dataclass
class _Wire:
    """One direction of a link, or the labels line: one transfer at a time, in issue order."""

    resource: str
    src: tuple[int, int]  # the sending (stage, replica)
    transfer_ms: float
    send_host_ms: float = 0.0  # the sender's CPU per transfer
    recv_host_ms: float = 0.0  # the receiver's CPU per transfer, waiting for it at its receive
    recv_late_host_ms: float = 0.0  # ... reaching its receive after the transfer arrived
    free_at: float = 0.0
    busy_ms: float = 0.0
    pending: dict[int, float] = field(default_factory=dict)  # micro-batch -> arrival, not yet received


def _wires(
    links: Sequence[LinkCosts],
    replicas: Sequence[int],
    labels_ms: float,
    m: int,
    labels_bytes: float = 0.0,
    send_host: HostCost | None = None,
    recv_host: HostCost | None = None,
    recv_late_host: HostCost | None = None,
) -> dict[str, _Wire]:
    snd, rcv = send_host or HostCost(), recv_host or HostCost()
    late = recv_late_host or rcv
    wires: dict[str, _Wire] = {}
    for s, link in enumerate(links):
        for r, q in replica_pairs(replicas[s], replicas[s + 1], m):
            a, b = _node(s, r, replicas[s]), _node(s + 1, q, replicas[s + 1])
            act = snd(link.act_bytes), rcv(link.act_bytes), late(link.act_bytes)
            grad = snd(link.grad_bytes), rcv(link.grad_bytes), late(link.grad_bytes)
            wires[link_resource(a, b)] = _Wire(link_resource(a, b), (s, r), link.act_ms, *act)
            wires[link_resource(b, a)] = _Wire(link_resource(b, a), (s + 1, q), link.grad_ms, *grad)
    n = len(replicas)
    if n > 1:
        for q in range(replicas[-1]):
            name = labels_resource(n, _node(n - 1, q, replicas[-1]))
            wires[name] = _Wire(name, (0, 0), labels_ms, snd(labels_bytes), rcv(labels_bytes), late(labels_bytes))
    return wires


def _wires_of(action: Action, stage: int, replica: int, replicas: Sequence[int]) -> list[str]:
    """The wires a send uses (labels go to every replica of the last stage), or the one a
    receive uses. The neighbour's replica of micro-batch m is ``m % its replicas``."""
    n = len(replicas)
    last = n - 1
    kind, mb = action.kind, action.mb
    me = _node(stage, replica, replicas[stage])

    def peer(s: int) -> str:
        return _node(s, mb % replicas[s], replicas[s])

    if kind == SEND_ACT and stage < last:
        return [link_resource(me, peer(stage + 1))]
    if kind == RECV_ACT and stage > 0:
        return [link_resource(peer(stage - 1), me)]
    if kind == SEND_GRAD and stage > 0:
        return [link_resource(me, peer(stage - 1))]
    if kind == RECV_GRAD and stage < last:
        return [link_resource(peer(stage + 1), me)]
    if kind == SEND_LABELS and stage == 0 < last:
        return [labels_resource(n, _node(last, q, replicas[last])) for q in range(replicas[last])]
    if kind == RECV_LABELS and stage == last > 0:
        return [labels_resource(n, me)]
    raise ScheduleError(f"stage {me}: {action} has no wire to use in a {n}-stage pipeline")


def _infer_micro_batches(schedule: Schedule) -> int:
    mbs = [a.mb for acts in schedule for a in acts if a.kind in (F, B)]
    return max(mbs) + 1 if mbs else 0


def simulate(
    schedule: Schedule,
    stages: Sequence[StageCosts],
    links: Sequence[LinkCosts],
    labels_ms: float = 0.0,
    num_micro_batches: int | None = None,
    replicas: Sequence[int] | None = None,
    *,
    step_overhead_ms: float = 0.0,
    send_host: HostCost | None = None,
    recv_host: HostCost | None = None,
    recv_late_host: HostCost | None = None,
    labels_bytes: float = 0.0,
) -> SimResult:
    """Replay one step of ``schedule`` (one action list per stage) on the given costs.

    ``links[s]`` is the link between stage s and s+1; ``labels_ms`` is one transfer on the
    labels line from stage 0 to the last stage. ``num_micro_batches``, when given, must match
    the schedule's (the highest micro-batch of any ``F``/``B``, plus one).

    ``replicas[s]`` (default 1) runs stage s as that many timelines, replica r with
    :func:`~partitioners.schedule.replica_actions` (micro-batches ``m % R == r``); transfers
    of micro-batch m go between the neighbours' replicas of m, each pair on its own wires;
    ``SEND_LABELS`` sends to every replica of the last stage; a replicated stage's ``STEP``
    waits for all its replicas (the all-reduce is a collective), then takes
    ``allreduce_ms + step_ms`` on each.

    Costs outside the stages' lists, all zero by default: ``step_overhead_ms`` is added to
    the makespan once per step (the driver's round trip, the step's global collectives);
    ``send_host`` / ``recv_host`` (:class:`HostCost` of the transfer's bytes,
    ``LinkCosts.act_bytes`` / ``grad_bytes``, ``labels_bytes``) is the host CPU a sender
    spends right after issuing a send and a receiver right after the transfer arrived, each
    on its own stage (``HOST`` intervals, counted as busy); ``recv_late_host`` (default
    ``recv_host``) replaces ``recv_host`` for a transfer that had arrived before its receiver
    reached the receive. The transfer itself still starts when it is issued.

    Raises :class:`DeadlockError` when the lists wait on each other or on a transfer never
    sent, and :class:`~partitioners.schedule.ScheduleError` for a send or receive with no wire
    to use, a transfer sent twice before it is received, or one never received.
    """
    n = len(schedule)
    if len(stages) != n:
        raise ValueError(f"{n} action lists but {len(stages)} stage costs")
    if len(links) != max(n - 1, 0):
        raise ValueError(f"{n} stages need {max(n - 1, 0)} links, got {len(links)}")
    replicas = list(replicas) if replicas is not None else [1] * n
    if len(replicas) != n or any(r < 1 for r in replicas):
        raise ValueError(f"replicas {replicas}: one count >= 1 per stage ({n})")
    inferred = _infer_micro_batches(schedule)
    if num_micro_batches is not None and num_micro_batches != inferred:
        raise ScheduleError(f"the schedule has {inferred} micro-batches, not {num_micro_batches}")
    bad = [s for s, R in enumerate(replicas) if inferred % R]
    if bad:
        raise ScheduleError(f"stage {bad[0]}: {inferred} micro-batches do not share among {replicas[bad[0]]} replicas")

    wires = _wires(links, replicas, labels_ms, inferred, labels_bytes, send_host, recv_host, recv_late_host)
    workers = [(s, r) for s in range(n) for r in range(replicas[s])]
    index = {w: i for i, w in enumerate(workers)}
    acts_of = [replica_actions(schedule[s], r, replicas[s]) for s, r in workers]
    names = [_node(s, r, replicas[s]) for s, r in workers]
    W = len(workers)
    timeline: list[Interval] = []
    pc = [0] * W  # next action of each timeline
    clock = [0.0] * W  # when each timeline is free
    busy = [0.0] * W

    def wire(name: str, w: int, a: Action) -> _Wire:
        if name not in wires:
            raise ScheduleError(f"stage {names[w]}: {a} has no wire to use ({name})")
        return wires[name]

    def host(w: int, s: int, r: int, mb: int, ms: float) -> None:
        """One end's CPU work on a transfer: occupies its stage from its clock on."""
        if ms > 0:
            timeline.append(Interval(s, HOST, mb, clock[w], clock[w] + ms, stage_resource(s, r, replicas[s]), r))
            clock[w] += ms
            busy[w] += ms

    progressed = True
    while progressed:
        progressed = False
        for w, (s, r) in enumerate(workers):
            acts = acts_of[w]
            while pc[w] < len(acts):
                a = acts[pc[w]]
                if a.kind == STEP and replicas[s] > 1:
                    siblings = [index[(s, q)] for q in range(replicas[s])]
                    if not all(pc[x] < len(acts_of[x]) and acts_of[x][pc[x]].kind == STEP for x in siblings):
                        break  # the all-reduce waits for every replica
                    start = max(clock[x] for x in siblings)
                    cost = stages[s]
                    for x in siblings:
                        q = workers[x][1]
                        res = stage_resource(s, q, replicas[s])
                        mid = start + cost.allreduce_ms
                        timeline.append(Interval(s, ALLREDUCE, -1, start, mid, res, q))
                        timeline.append(Interval(s, STEP, -1, mid, mid + cost.step_ms, res, q))
                        clock[x] = mid + cost.step_ms
                        busy[x] += cost.allreduce_ms + cost.step_ms
                        pc[x] += 1
                    progressed = True
                    continue
                if a.kind in (F, B, STEP):
                    cost = stages[s]
                    ms = cost.fwd_ms if a.kind == F else cost.bwd_ms if a.kind == B else cost.step_ms
                    res = stage_resource(s, r, replicas[s])
                    timeline.append(Interval(s, a.kind, a.mb, clock[w], clock[w] + ms, res, r))
                    clock[w] += ms
                    busy[w] += ms
                elif a.kind in TRANSFER_KINDS:
                    for name in _wires_of(a, s, r, replicas):
                        wr = wire(name, w, a)
                        if a.mb in wr.pending:
                            raise ScheduleError(f"stage {names[w]}: {a} sent again before it was received")
                        start = max(clock[w], wr.free_at)
                        wr.free_at = start + wr.transfer_ms
                        wr.busy_ms += wr.transfer_ms
                        wr.pending[a.mb] = wr.free_at
                        timeline.append(Interval(s, TRANSFER_KINDS[a.kind], a.mb, start, wr.free_at, wr.resource, r))
                        host(w, s, r, a.mb, wr.send_host_ms)
                elif a.kind in RECV_KINDS:
                    (name,) = _wires_of(a, s, r, replicas)
                    wr = wire(name, w, a)
                    if a.mb not in wr.pending:
                        break  # blocked until the sender issues it
                    arrival = wr.pending.pop(a.mb)
                    host_ms = wr.recv_late_host_ms if arrival < clock[w] else wr.recv_host_ms
                    clock[w] = max(clock[w], arrival)
                    host(w, s, r, a.mb, host_ms)
                else:
                    raise ScheduleError(f"stage {names[w]}: unknown action {a}")
                pc[w] += 1
                progressed = True

    stuck = [w for w in range(W) if pc[w] < len(acts_of[w])]
    if stuck:
        raise DeadlockError(
            "deadlock: " + "; ".join(_why_stuck(w, workers, acts_of, pc, wires, replicas) for w in stuck)
        )
    unreceived = [f"{wr.resource} micro-batch {mb}" for wr in wires.values() for mb in sorted(wr.pending)]
    if unreceived:
        raise ScheduleError(f"sent but never received: {', '.join(unreceived)}")

    step = max((iv.end_ms for iv in timeline), default=0.0) + step_overhead_ms
    return SimResult(
        step_ms=step,
        busy_ms=busy,
        idle_ms=[step - b for b in busy],
        bubble_fraction=1.0 - sum(busy) / (W * step) if step > 0 else 0.0,
        peak_in_flight=[peak_in_flight(acts) for acts in acts_of],  # every list ran to its end
        timeline=timeline,
        link_busy_ms={name: wr.busy_ms for name, wr in wires.items()},
        num_micro_batches=inferred,
        workers=workers,
    )


def _why_stuck(
    w: int,
    workers: list[tuple[int, int]],
    acts_of: list[list[Action]],
    pc: list[int],
    wires: dict[str, _Wire],
    replicas: list[int],
) -> str:
    s, r = workers[w]
    me = _node(s, r, replicas[s])
    a = acts_of[w][pc[w]]
    if a.kind == STEP:
        return f"stage {me} blocked at STEP (action {pc[w]}) waiting for the other replicas of stage {s}"
    wire = wires[_wires_of(a, s, r, replicas)[0]]
    src = workers.index(wire.src)
    them = _node(wire.src[0], wire.src[1], replicas[wire.src[0]])
    if pc[src] < len(acts_of[src]):
        sender = f"stage {them} is itself blocked at {acts_of[src][pc[src]]} (action {pc[src]})"
    else:
        sender = f"stage {them} finished without sending it"
    return f"stage {me} blocked at {a} (action {pc[w]}) waiting on {wire.resource}, {sender}"


RECV_OF = {SEND_ACT: RECV_ACT, SEND_GRAD: RECV_GRAD, SEND_LABELS: RECV_LABELS}


def observed(traces: dict[tuple[int, int], Sequence[Sequence]], replicas: Sequence[int]) -> SimResult:
    """A measured step in the simulator's terms, to draw or compare with a simulated one.

    ``traces[(stage, replica)]``: that worker's actions as ``(kind, micro-batch, start ms,
    end ms)`` on a clock the workers share (``runtime.trace``). ``F``, ``B`` and ``STEP`` are
    busy intervals on the worker's row; each transfer spans its wire from the send's start to
    the end of the matching receive: the wire's time plus any wait for a late receiver (the
    runtime does not see when the bytes arrived). Times start at the earliest action."""
    if not traces:
        raise ValueError("no traces: run with runtime.trace=true")
    t0 = min(a[2] for acts in traces.values() for a in acts)
    workers = sorted(traces)
    timeline: list[Interval] = []
    busy: list[float] = []
    received: dict[tuple[str, str, int], float] = {}  # (wire, receive kind, mb) -> end
    for s, r in workers:
        for kind, mb, _, end in traces[(s, r)]:
            if kind in RECV_KINDS:
                for wire in _wires_of(Action(kind, mb), s, r, replicas):
                    received[(wire, kind, mb)] = end - t0
    wires: dict[str, float] = {}
    for s, r in workers:
        me = stage_resource(s, r, replicas[s])
        total = 0.0
        for kind, mb, start, end in traces[(s, r)]:
            start, end = start - t0, end - t0
            if kind in (F, B, STEP):
                timeline.append(Interval(s, kind, mb, start, end, me, r))
                total += end - start
            elif kind in RECV_OF:
                for wire in _wires_of(Action(kind, mb), s, r, replicas):
                    arrived = received.get((wire, RECV_OF[kind], mb))
                    if arrived is None:
                        raise ValueError(f"{wire}: {kind}{mb} of stage {me} has no matching receive in the traces")
                    timeline.append(Interval(s, TRANSFER_KINDS[kind], mb, start, arrived, wire, r))
                    wires[wire] = wires.get(wire, 0.0) + arrived - start
        busy.append(total)
    step = max(iv.end_ms for iv in timeline) if timeline else 0.0
    mbs = [iv.mb for iv in timeline if iv.kind == F]
    return SimResult(
        step_ms=step,
        busy_ms=busy,
        idle_ms=[step - b for b in busy],
        bubble_fraction=1 - sum(busy) / (len(busy) * step) if step > 0 else 0.0,
        peak_in_flight=[peak_in_flight([Action(k, mb) for k, mb, *_ in traces[w]]) for w in workers],
        timeline=timeline,
        link_busy_ms=wires,
        num_micro_batches=max(mbs) + 1 if mbs else 0,
        workers=workers,
    )


# -- timeline plot -----------------------------------------------------------------------

COLOURS = {
    F: "#3b6fb6",
    B: "#e07b39",
    ALLREDUCE: "#8c8c8c",
    STEP: "#4e9a55",
    HOST: "#c9c9c9",
    "ACT": "#9cc3ea",
    "GRAD": "#f4c29a",
    "LABELS": "#b8a2d9",
}
LEGEND = {
    F: "forward",
    B: "backward",
    ALLREDUCE: "gradient all-reduce",
    STEP: "optimizer step",
    HOST: "host CPU of a transfer",
    "ACT": "activation transfer",
    "GRAD": "gradient transfer",
    "LABELS": "labels transfer",
}
_FONT_PT = 7.0


def _row_groups(result: SimResult) -> list[list[str]]:
    """Rows of the Gantt chart in groups: each stage's timelines with the wires to the next
    stage after them, then the labels lines."""
    n, R = result.num_stages, result.replicas
    wires = list(result.link_busy_ms)
    groups: list[list[str]] = []
    for s in range(n):
        rows = [stage_resource(s, r, R[s]) for r in range(R[s])]
        for name in wires:
            if name.startswith("link "):
                src, dst = name.removeprefix("link ").split("->")
                if {_stage_of(src), _stage_of(dst)} == {s, s + 1}:
                    rows.append(name)
        groups.append(rows)
    groups[-1] += [name for name in wires if name.startswith("labels ")]
    return groups


def timeline_rows(result: SimResult) -> list[str]:
    """Resources of the Gantt chart, top to bottom: each stage (each of its replicas)
    followed by the two directions of the links to the next stage, then the labels line."""
    return [row for rows in _row_groups(result) for row in rows]


def _row_label(resource: str, stage_labels: Sequence[str] | None, result: SimResult) -> str:
    what, where = resource.split(" ")
    if what == "stage":
        if not stage_labels:
            return resource
        s, _, r = where.partition(".")
        if len(stage_labels) == result.num_stages:
            return stage_labels[int(s)] + (f" r{r}" if r else "")
        return stage_labels[result.workers.index((int(s), int(r or 0)))]
    src, dst = where.split("->")
    if what == "labels":
        return f"labels {src}→{dst}"
    return f"{src}→{dst} " + ("act" if _stage_of(src) < _stage_of(dst) else "grad")


def timeline_figure(
    result: SimResult,
    title: str = "",
    stage_labels: Sequence[str] | None = None,
    below: SimResult | None = None,
    below_title: str = "",
) -> Figure:
    """A Gantt chart of ``result.timeline``: one row per stage (per replica) and per wire, F
    and B in distinct colours, the micro-batch written in each box wide enough for it.
    ``stage_labels``: one per stage (replicas get `` r0``, `` r1``, ...) or one per timeline.
    ``below``: a second timeline of the same pipeline drawn under the first on the same time
    axis (e.g. a measured step above, the simulator's below)."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    panels = [(result, title)] + ([(below, below_title)] if below is not None else [])
    for res, _ in panels:
        if stage_labels is not None and len(stage_labels) not in (res.num_stages, res.num_workers):
            raise ValueError(f"{len(stage_labels)} stage labels for {res.num_stages} stages")
    n_rows = sum(len(timeline_rows(res)) for res, _ in panels)
    fig = Figure(figsize=(12, 1.6 * len(panels) + 0.38 * n_rows), dpi=120, layout="constrained")
    axes = fig.subplots(
        len(panels), 1, sharex=True, squeeze=False, height_ratios=[len(timeline_rows(r)) + 2 for r, _ in panels]
    )[:, 0]
    end = max(max(res.step_ms, 1e-9) for res, _ in panels) * 1.01
    used: set[str] = set()
    drawn = []
    for ax, (res, ttl) in zip(axes, panels, strict=True):
        y_of = _draw_timeline(ax, res, ttl, stage_labels, used)
        ax.set_xlim(0, end)
        drawn.append((ax, res, y_of))
    axes[-1].set_xlabel("time (ms)")
    kinds = [k for k in LEGEND if k in used]
    fig.legend(
        handles=[Patch(facecolor=COLOURS[k], label=LEGEND[k]) for k in kinds],
        loc="outside lower center",
        ncol=len(kinds) or 1,
        frameon=False,
        fontsize=9,
    )
    # Write micro-batch numbers where they fit: needs the laid-out axes width in pixels.
    fig.draw_without_rendering()
    char_px = 0.62 * _FONT_PT * fig.dpi / 72
    for ax, res, y_of in drawn:
        px_per_ms = ax.get_window_extent().width / (ax.get_xlim()[1] - ax.get_xlim()[0])
        for iv in res.timeline:
            text = str(iv.mb) if iv.mb >= 0 else ""
            if text and (iv.end_ms - iv.start_ms) * px_per_ms >= len(text) * char_px + 4:
                dark = iv.kind in (F, B, STEP, ALLREDUCE)
                ax.text(
                    (iv.start_ms + iv.end_ms) / 2,
                    y_of[iv.resource],
                    text,
                    ha="center",
                    va="center",
                    fontsize=_FONT_PT,
                    color="white" if dark else "black",
                )
    return fig


def _draw_timeline(ax, result: SimResult, title: str, stage_labels, used: set[str]) -> dict[str, int]:
    """One Gantt panel on ``ax``; adds the interval kinds drawn to ``used``; returns the row
    of each resource."""
    groups = _row_groups(result)
    rows = [row for g in groups for row in g]
    y_of = {r: i for i, r in enumerate(rows)}
    boxes: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for iv in result.timeline:
        if iv.end_ms > iv.start_ms:
            boxes.setdefault((iv.resource, iv.kind), []).append((iv.start_ms, iv.end_ms - iv.start_ms))
    for (resource, kind), spans in boxes.items():
        height = 0.8 if resource.startswith("stage") else 0.5
        ax.broken_barh(
            spans, (y_of[resource] - height / 2, height), facecolors=COLOURS[kind], edgecolor="white", linewidth=0.6
        )
        used.add(kind)
    ax.set_yticks(range(len(rows)), [_row_label(r, stage_labels, result) for r in rows])
    for tick, r in zip(ax.get_yticklabels(), rows, strict=True):
        if not r.startswith("stage"):
            tick.set_color("dimgray")
            tick.set_fontsize(8)
    for g in groups[:-1]:  # a rule under each stage's group of rows
        ax.axhline(y_of[g[-1]] + 0.5, color="lightgray", linewidth=0.6)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    summary = (
        f"step {result.step_ms:.4g} ms · bubble {result.bubble_fraction:.0%} · {result.num_micro_batches} micro-batches"
    )
    if result.peak_in_flight:
        summary += f" · peak in flight {result.peak_in_flight}"
    ax.set_title(f"{title}\n{summary}" if title else summary, fontsize=10)
    return y_of


def timeline_png(result: SimResult, title: str = "", stage_labels: Sequence[str] | None = None) -> bytes:
    """:func:`timeline_figure` as the bytes of a PNG (rendered with Agg, no display needed).
    Writes no file: the caller does (splitlearn with ``fsio.atomic_write``)."""
    buf = io.BytesIO()
    timeline_figure(result, title, stage_labels).savefig(buf, format="png")
    return buf.getvalue()
