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
- stages that run on one device (the U-shape's first and last stage on the data owner,
  ``shared``) share its compute: their compute and host actions never overlap, and the
  device takes whichever is ready first (first come, first served; the lower stage on ties);
- wires that cross one zone uplink (``channels``: e.g. ``home -> cloud`` carrying stage 0's
  activations and the last stage's gradients of a U-shape) share it: one transfer at a time
  over all of them, in the order they were issued;
- a stage on R replicas runs as R timelines: replica r runs the stage's list kept to the
  micro-batches ``m % R == r`` (:func:`~partitioners.schedule.replica_actions`), micro-batch
  m travels between the neighbours' replicas of m, each pair of replicas on its own wires,
  and the replicas' ``STEP`` starts when all of them reach it, with the gradient all-reduce.

Every resource (a stage, a wire) has a single issuer that uses it in program order, so the
start of each action is the latest end among its predecessors: the end of the previous
action on its stage, and for a receive the arrival of its transfer, which in turn waits for
the previous transfer on the same wire. The simulation therefore advances each stage as far
as it can, revisiting blocked stages when a transfer they wait for has been issued; this
gives the same times as a discrete-event loop without a global event queue. Shared devices
and channels have several issuers; with either, the simulation instead takes, each time, the
action (over all timelines) that can start earliest, so every shared resource serves its
users in time order. When no stage
can advance and some have actions left, the schedule deadlocks and :class:`DeadlockError`
names the stuck actions.

A measured step in the same terms (:func:`~partitioners.timeline.observed`) and the Gantt chart
of either are in :mod:`partitioners.timeline`.
"""

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
    Schedule,
    ScheduleError,
)

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


def node_name(stage: int, replica: int = 0, num_replicas: int = 1) -> str:
    """``1`` for stage 1, ``1.0`` for replica 0 of a replicated stage 1."""
    return f"{stage}" if num_replicas == 1 else f"{stage}.{replica}"


def stage_resource(stage: int, replica: int = 0, num_replicas: int = 1) -> str:
    return f"stage {node_name(stage, replica, num_replicas)}"


def link_resource(src: int | str, dst: int | str) -> str:
    return f"link {src}->{dst}"


def labels_resource(num_stages: int, dst: str | None = None) -> str:
    return f"labels 0->{dst if dst is not None else num_stages - 1}"


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
    shared: Sequence[Sequence[int]] = (),
    channels: dict[str, str] | None = None,
    step_barrier: bool = False,
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

    ``shared``: groups of stages that run on one device (unreplicated): their compute and
    host work never overlap. ``channels``: wire name (``link 0->1``) -> the uplink it
    crosses; wires with the same uplink carry one transfer at a time between them.

    ``step_barrier``: every stage's ``STEP`` starts when the last of them has reached it (a
    replicated stage's after its replicas' all-reduce), as the workers step: their global
    gradient norm is an all-reduce over every worker before any optimizer step. Off, each
    stage steps as soon as it gets there (the planner's figure; the two differ only where a
    later stage's step outlasts the first stage's by more than the backwards between them).

    Raises :class:`DeadlockError` when the lists wait on each other or on a transfer never
    sent, and :class:`~partitioners.schedule.ScheduleError` for a send or receive with no wire
    to use, a transfer sent twice before it is received, or one never received.
    """
    from partitioners.simulation import Channel, Simulation, build_wires, checked_inputs

    counts, inferred = checked_inputs(schedule, stages, links, replicas, num_micro_batches)
    wires = build_wires(links, counts, labels_ms, inferred, labels_bytes, send_host, recv_host, recv_late_host)
    uplinks: dict[str, Channel] = {}
    for name, key in (channels or {}).items():
        if name not in wires:
            raise ValueError(f"channels: no wire '{name}' in this pipeline (wires: {', '.join(wires)})")
        wires[name].channel = uplinks.setdefault(key, Channel())
    sim = Simulation(schedule, stages, counts, wires, shared, step_barrier)
    sim.run()
    sim.check_finished()
    return sim.result(inferred, step_overhead_ms)
