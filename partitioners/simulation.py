"""The simulation behind :func:`partitioners.simulator.simulate`: the wires (one direction of
a link, the labels line, a shared uplink) and the step being simulated, one method per kind
of action. The rules it follows are the simulator module's notes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

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
from partitioners.simulator import (
    ALLREDUCE,
    HOST,
    RECV_KINDS,
    TRANSFER_KINDS,
    DeadlockError,
    HostCost,
    Interval,
    LinkCosts,
    SimResult,
    StageCosts,
    labels_resource,
    link_resource,
    node_name,
    stage_resource,
)


@dataclass
class Channel:
    """A zone uplink several wires cross: one transfer at a time over all of them."""

    free_at: float = 0.0


@dataclass
class Wire:
    """One direction of a link, or the labels line: one transfer at a time, in issue order."""

    resource: str
    src: tuple[int, int]  # the sending (stage, replica)
    transfer_ms: float
    send_host_ms: float = 0.0  # the sender's CPU per transfer
    recv_host_ms: float = 0.0  # the receiver's CPU per transfer, waiting for it at its receive
    recv_late_host_ms: float = 0.0  # ... reaching its receive after the transfer arrived
    channel: Channel | None = None  # a shared uplink: its free time is the channel's
    free_at: float = 0.0
    busy_ms: float = 0.0
    pending: dict[int, float] = field(default_factory=dict)  # micro-batch -> arrival, not yet received


def build_wires(
    links: Sequence[LinkCosts],
    replicas: Sequence[int],
    labels_ms: float,
    m: int,
    labels_bytes: float = 0.0,
    send_host: HostCost | None = None,
    recv_host: HostCost | None = None,
    recv_late_host: HostCost | None = None,
) -> dict[str, Wire]:
    snd, rcv = send_host or HostCost(), recv_host or HostCost()
    late = recv_late_host or rcv
    wires: dict[str, Wire] = {}
    for s, link in enumerate(links):
        for r, q in replica_pairs(replicas[s], replicas[s + 1], m):
            a, b = node_name(s, r, replicas[s]), node_name(s + 1, q, replicas[s + 1])
            act = snd(link.act_bytes), rcv(link.act_bytes), late(link.act_bytes)
            grad = snd(link.grad_bytes), rcv(link.grad_bytes), late(link.grad_bytes)
            wires[link_resource(a, b)] = Wire(link_resource(a, b), (s, r), link.act_ms, *act)
            wires[link_resource(b, a)] = Wire(link_resource(b, a), (s + 1, q), link.grad_ms, *grad)
    n = len(replicas)
    if n > 1:
        for p in range(replicas[0]):  # a replicated first stage: federated clients, each its labels
            for q in range(replicas[-1]):
                name = _labels_wire(n, p, replicas[0], node_name(n - 1, q, replicas[-1]))
                wires[name] = Wire(name, (0, p), labels_ms, snd(labels_bytes), rcv(labels_bytes), late(labels_bytes))
    return wires


def wires_of(action: Action, stage: int, replica: int, replicas: Sequence[int]) -> list[str]:
    """The wires a send uses (labels go to every replica of the last stage), or the one a
    receive uses. The neighbour's replica of micro-batch m is ``m % its replicas``."""
    n = len(replicas)
    last = n - 1
    kind, mb = action.kind, action.mb
    me = node_name(stage, replica, replicas[stage])

    def peer(s: int) -> str:
        return node_name(s, mb % replicas[s], replicas[s])

    if kind == SEND_ACT and stage < last:
        return [link_resource(me, peer(stage + 1))]
    if kind == RECV_ACT and stage > 0:
        return [link_resource(peer(stage - 1), me)]
    if kind == SEND_GRAD and stage > 0:
        return [link_resource(me, peer(stage - 1))]
    if kind == RECV_GRAD and stage < last:
        return [link_resource(peer(stage + 1), me)]
    if kind == SEND_LABELS and stage == 0 < last:
        return [
            _labels_wire(n, replica, replicas[0], node_name(last, q, replicas[last])) for q in range(replicas[last])
        ]
    if kind == RECV_LABELS and stage == last > 0:
        return [_labels_wire(n, p, replicas[0], me) for p in range(replicas[0])]
    raise ScheduleError(f"stage {me}: {action} has no wire to use in a {n}-stage pipeline")


def _labels_wire(num_stages: int, sender: int, senders: int, dst: str) -> str:
    """The labels line from the first stage's replica ``sender`` (of ``senders``: more than
    one only for federated clients, each sending its own labels) to the loss replica ``dst``."""
    name = labels_resource(num_stages, dst)
    return name if senders == 1 else f"{name} from 0.{sender}"


def infer_micro_batches(schedule: Schedule) -> int:
    mbs = [a.mb for acts in schedule for a in acts if a.kind in (F, B)]
    return max(mbs) + 1 if mbs else 0


def checked_inputs(
    schedule: Schedule,
    stages: Sequence[StageCosts],
    links: Sequence[LinkCosts],
    replicas: Sequence[int] | None,
    num_micro_batches: int | None,
) -> tuple[list[int], int]:
    """The replicas per stage (default 1 each) and the schedule's micro-batches, after checking
    that the costs, the replicas and ``num_micro_batches`` fit the schedule."""
    n = len(schedule)
    if len(stages) != n:
        raise ValueError(f"{n} action lists but {len(stages)} stage costs")
    if len(links) != max(n - 1, 0):
        raise ValueError(f"{n} stages need {max(n - 1, 0)} links, got {len(links)}")
    counts = list(replicas) if replicas is not None else [1] * n
    if len(counts) != n or any(r < 1 for r in counts):
        raise ValueError(f"replicas {counts}: one count >= 1 per stage ({n})")
    inferred = infer_micro_batches(schedule)
    if num_micro_batches is not None and num_micro_batches != inferred:
        raise ScheduleError(f"the schedule has {inferred} micro-batches, not {num_micro_batches}")
    bad = [s for s, R in enumerate(counts) if inferred % R]
    if bad:
        raise ScheduleError(f"stage {bad[0]}: {inferred} micro-batches do not share among {counts[bad[0]]} replicas")
    return counts, inferred


class Simulation:
    """One step being simulated: per timeline (a stage, or a replica of one) its action list,
    its next action and the time it is free; the wires; the intervals so far.

    :meth:`run` advances each timeline as far as it can, one method per kind of action
    (:class:`~partitioners.schedule.ActionKind`): compute (``F``, ``B``, ``STEP``), a
    replicated stage's ``STEP`` with its all-reduce, a send, a receive."""

    def __init__(
        self,
        schedule: Schedule,
        stages: Sequence[StageCosts],
        replicas: list[int],
        wires: dict[str, Wire],
        shared: Sequence[Sequence[int]] = (),
        step_barrier: bool = False,
    ) -> None:
        self.stages = stages
        self.step_barrier = step_barrier
        self.replicas = replicas
        self.wires = wires
        self.workers = [(s, r) for s in range(len(schedule)) for r in range(replicas[s])]
        self.index = {w: i for i, w in enumerate(self.workers)}
        self.acts_of = [replica_actions(schedule[s], r, replicas[s]) for s, r in self.workers]
        self.names = [node_name(s, r, replicas[s]) for s, r in self.workers]
        W = len(self.workers)
        self.timeline: list[Interval] = []
        self.pc = [0] * W  # next action of each timeline
        self.clock = [0.0] * W  # when each timeline is free
        self.busy = [0.0] * W
        # timelines that share a device: index of the device's free time in ``device_free``
        self.device_of = list(range(W))
        for group in shared:
            for s in group[1:]:
                if replicas[s] != 1 or replicas[group[0]] != 1:
                    raise ValueError(f"shared stages {list(group)}: a replicated stage cannot share a device")
                self.device_of[self.index[(s, 0)]] = self.index[(group[0], 0)]
        self.device_free = [0.0] * W
        self.ordered = bool(shared) or any(wr.channel is not None for wr in wires.values())
        # ``step_barrier``: every timeline with a STEP steps together (the global gradient norm)
        self.stepping = [w for w in range(W) if any(a.kind == STEP for a in self.acts_of[w])]

    def run(self) -> None:
        """Advance every timeline as far as it can, again while any of them moved (in time
        order over all timelines when a device or a channel is shared)."""
        if self.ordered:
            self._run_in_time_order()
            return
        progressed = True
        while progressed:
            progressed = False
            for w in range(len(self.workers)):
                while self.pc[w] < len(self.acts_of[w]) and self._take(w, self.acts_of[w][self.pc[w]]):
                    progressed = True

    def _run_in_time_order(self) -> None:
        """Each time, take the next action that can start earliest (the lower timeline on
        ties); blocked timelines wait for their transfer or their replicas."""
        W = len(self.workers)
        while True:
            best, when = -1, 0.0
            for w in range(W):
                if self.pc[w] >= len(self.acts_of[w]):
                    continue
                t = self._ready_at(w, self.acts_of[w][self.pc[w]])
                if t is not None and (best < 0 or t < when):
                    best, when = w, t
            if best < 0 or not self._take(best, self.acts_of[best][self.pc[best]]):
                return

    def _ready_at(self, w: int, a: Action) -> float | None:
        """When timeline ``w`` could start ``a``, or None while it cannot."""
        s, r = self.workers[w]
        if a.kind == STEP and (self.step_barrier or self.replicas[s] > 1):
            group = self._step_group(s)
            return None if group is None else min(self._step_starts(group).values())
        if a.kind in RECV_KINDS:
            if any(a.mb not in self._wire(name, w, a).pending for name in wires_of(a, s, r, self.replicas)):
                return None
            return self.clock[w]
        if a.kind in (F, B, STEP):
            return max(self.clock[w], self.device_free[self.device_of[w]])
        return self.clock[w]

    def _take(self, w: int, a: Action) -> bool:
        """Run ``a``, the next action of timeline ``w``; False when it has to wait."""
        s = self.workers[w][0]
        if a.kind == STEP and (self.step_barrier or self.replicas[s] > 1):
            return self._joint_step(s)
        if a.kind in (F, B, STEP):
            self._compute(w, a)
        elif a.kind in TRANSFER_KINDS:
            self._send(w, a)
        elif a.kind in RECV_KINDS:
            if not self._receive(w, a):
                return False
        else:
            raise ScheduleError(f"stage {self.names[w]}: unknown action {a}")
        self.pc[w] += 1
        return True

    def _compute(self, w: int, a: Action) -> None:
        """``F``, ``B`` or an unreplicated ``STEP``: the stage's cost of it, from its clock on."""
        s, r = self.workers[w]
        cost = self.stages[s]
        ms = cost.fwd_ms if a.kind == F else cost.bwd_ms if a.kind == B else cost.step_ms
        res = stage_resource(s, r, self.replicas[s])
        start = max(self.clock[w], self.device_free[self.device_of[w]])
        self.timeline.append(Interval(s, a.kind, a.mb, start, start + ms, res, r))
        self.clock[w] = self.device_free[self.device_of[w]] = start + ms
        self.busy[w] += ms

    def _step_group(self, s: int) -> list[int] | None:
        """The timelines that step together with stage ``s`` (its replicas; under
        ``step_barrier`` every timeline that steps), or None while some of them has not
        reached its ``STEP``."""
        group = self.stepping if self.step_barrier else [self.index[(s, q)] for q in range(self.replicas[s])]
        pc, acts_of = self.pc, self.acts_of
        if not all(pc[x] < len(acts_of[x]) and acts_of[x][pc[x]].kind == STEP for x in group):
            return None
        return group

    def _step_starts(self, group: list[int]) -> dict[int, float]:
        """When each timeline of ``group`` starts its optimizer step: a replicated stage's
        replicas all-reduce from the latest one's clock; under ``step_barrier`` every step
        then waits for the last of them (and a shared device's stages step one after another)."""
        reduced: dict[int, float] = {}
        for x in group:
            s = self.workers[x][0]
            if s not in reduced:
                siblings = [self.index[(s, q)] for q in range(self.replicas[s])]
                ar = self.stages[s].allreduce_ms if self.replicas[s] > 1 else 0.0  # as an unreplicated STEP
                reduced[s] = max(self.clock[y] for y in siblings) + ar
        together = max(reduced.values()) if self.step_barrier else None
        starts = {}
        for x in group:
            s = self.workers[x][0]
            start = reduced[s] if together is None else together
            starts[x] = max(start, self.device_free[self.device_of[x]]) if self.step_barrier else start
        return starts

    def _joint_step(self, s: int) -> bool:
        """``STEP`` of a replicated stage, or of every stage under ``step_barrier``: once all of
        its group have reached it, the replicas all-reduce, then (together, under the barrier)
        each steps. False while some of the group has not."""
        group = self._step_group(s)
        if group is None:
            return False
        ready = {x: self.clock[x] for x in group}
        starts = self._step_starts(group)
        for x in group:
            t, q = self.workers[x]
            cost = self.stages[t]
            res = stage_resource(t, q, self.replicas[t])
            if self.replicas[t] > 1:
                begin = max(ready[self.index[(t, p)]] for p in range(self.replicas[t]))
                self.timeline.append(Interval(t, ALLREDUCE, -1, begin, begin + cost.allreduce_ms, res, q))
            start = starts[x]
            if self.step_barrier:  # a shared device's stages step one after another
                start = max(start, self.device_free[self.device_of[x]])
            self.timeline.append(Interval(t, STEP, -1, start, start + cost.step_ms, res, q))
            self.clock[x] = start + cost.step_ms
            if self.step_barrier:
                self.device_free[self.device_of[x]] = self.clock[x]
            self.busy[x] += (cost.allreduce_ms if self.replicas[t] > 1 else 0.0) + cost.step_ms
            self.pc[x] += 1
        return True

    def _send(self, w: int, a: Action) -> None:
        """Queue one transfer on each wire the send uses; the sender's host CPU follows."""
        s, r = self.workers[w]
        for name in wires_of(a, s, r, self.replicas):
            wr = self._wire(name, w, a)
            if a.mb in wr.pending:
                raise ScheduleError(f"stage {self.names[w]}: {a} sent again before it was received")
            free = wr.channel.free_at if wr.channel is not None else wr.free_at
            start = max(self.clock[w], free)
            wr.free_at = start + wr.transfer_ms
            if wr.channel is not None:
                wr.channel.free_at = wr.free_at
            wr.busy_ms += wr.transfer_ms
            wr.pending[a.mb] = wr.free_at
            self.timeline.append(Interval(s, TRANSFER_KINDS[a.kind], a.mb, start, wr.free_at, wr.resource, r))
            self._host(w, a.mb, wr.send_host_ms)

    def _receive(self, w: int, a: Action) -> bool:
        """Wait for the transfer's arrival, then the receiver's host CPU; False while the
        sender has not issued it."""
        s, r = self.workers[w]
        wires = [self._wire(name, w, a) for name in wires_of(a, s, r, self.replicas)]  # several: clients' labels
        if any(a.mb not in wr.pending for wr in wires):
            return False  # blocked until the senders issue it
        for wr in wires:
            arrival = wr.pending.pop(a.mb)
            host_ms = wr.recv_late_host_ms if arrival < self.clock[w] else wr.recv_host_ms
            self.clock[w] = max(self.clock[w], arrival)
            self._host(w, a.mb, host_ms)
        return True

    def _wire(self, name: str, w: int, a: Action) -> Wire:
        if name not in self.wires:
            raise ScheduleError(f"stage {self.names[w]}: {a} has no wire to use ({name})")
        return self.wires[name]

    def _host(self, w: int, mb: int, ms: float) -> None:
        """One end's CPU work on a transfer: occupies its stage from its clock on."""
        if ms > 0:
            s, r = self.workers[w]
            res = stage_resource(s, r, self.replicas[s])
            start = max(self.clock[w], self.device_free[self.device_of[w]])
            self.timeline.append(Interval(s, HOST, mb, start, start + ms, res, r))
            self.clock[w] = self.device_free[self.device_of[w]] = start + ms
            self.busy[w] += ms

    def check_finished(self) -> None:
        """Raise :class:`DeadlockError` if a timeline has actions left, ScheduleError if a
        transfer was never received."""
        stuck = [w for w in range(len(self.workers)) if self.pc[w] < len(self.acts_of[w])]
        if stuck:
            raise DeadlockError("deadlock: " + "; ".join(self._why_stuck(w) for w in stuck))
        unreceived = [f"{wr.resource} micro-batch {mb}" for wr in self.wires.values() for mb in sorted(wr.pending)]
        if unreceived:
            raise ScheduleError(f"sent but never received: {', '.join(unreceived)}")

    def _why_stuck(self, w: int) -> str:
        workers, acts_of, pc, replicas = self.workers, self.acts_of, self.pc, self.replicas
        s, r = workers[w]
        me = node_name(s, r, replicas[s])
        a = acts_of[w][pc[w]]
        if a.kind == STEP:
            whom = (
                "every stage's STEP (the global gradient norm)"
                if self.step_barrier
                else f"the other replicas of stage {s}"
            )
            return f"stage {me} blocked at STEP (action {pc[w]}) waiting for {whom}"
        wire = self.wires[wires_of(a, s, r, replicas)[0]]
        src = workers.index(wire.src)
        them = node_name(wire.src[0], wire.src[1], replicas[wire.src[0]])
        if pc[src] < len(acts_of[src]):
            sender = f"stage {them} is itself blocked at {acts_of[src][pc[src]]} (action {pc[src]})"
        else:
            sender = f"stage {them} finished without sending it"
        return f"stage {me} blocked at {a} (action {pc[w]}) waiting on {wire.resource}, {sender}"

    def result(self, num_micro_batches: int, step_overhead_ms: float) -> SimResult:
        """The finished step (after :meth:`check_finished`)."""
        busy, W = self.busy, len(self.workers)
        step = max((iv.end_ms for iv in self.timeline), default=0.0) + step_overhead_ms
        return SimResult(
            step_ms=step,
            busy_ms=busy,
            idle_ms=[step - b for b in busy],
            bubble_fraction=1.0 - sum(busy) / (W * step) if step > 0 else 0.0,
            peak_in_flight=[peak_in_flight(acts) for acts in self.acts_of],  # every list ran to its end
            timeline=self.timeline,
            link_busy_ms={name: wr.busy_ms for name, wr in self.wires.items()},
            num_micro_batches=num_micro_batches,
            workers=self.workers,
        )
