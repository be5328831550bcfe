"""Pipeline simulator: replay a schedule's action lists on per-stage and per-link costs.

The simulator reads the same :mod:`partitioners.schedule` lists the stage workers execute
and mirrors the runtime's rules:

- each stage runs its list strictly in order, one action at a time; ``F``, ``B`` and
  ``STEP`` occupy the stage for its forward, backward and optimizer time;
- a send takes no stage time (sends are asynchronous): it queues one transfer on its wire
  and the stage moves on at once. A wire is one direction of a link (``link s->s+1``
  carries activations, ``link s+1->s`` gradients) or the labels line from stage 0 to the
  last stage; it carries one transfer at a time, first in first out, and a transfer starts
  when it has been issued and the wire is free;
- a receive blocks its stage until the transfer of that micro-batch has arrived.

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
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# Interval kinds of transfers, by the send that issues them
TRANSFER_KINDS = {SEND_ACT: "ACT", SEND_GRAD: "GRAD", SEND_LABELS: "LABELS"}
RECV_KINDS = (RECV_ACT, RECV_GRAD, RECV_LABELS)


@dataclass
class StageCosts:
    """Milliseconds of one stage: forward and backward of ONE micro-batch, and the ``STEP``
    action (gradient reduction, clipping, optimizer), which runs once per step."""

    fwd_ms: float
    bwd_ms: float
    step_ms: float = 0.0


@dataclass
class LinkCosts:
    """Milliseconds of one transfer over the link between stage s and s+1, per direction:
    latency plus bytes over bandwidth. The labels line (stage 0 to the last stage) is not
    one of these S-1 links; its cost is ``simulate(labels_ms=...)``."""

    act_ms: float  # one activation, s -> s+1
    grad_ms: float  # one gradient, s+1 -> s


@dataclass
class Interval:
    """One busy span of a resource. Compute (``F``, ``B``, ``STEP``) occupies ``stage s``;
    transfers (``ACT``, ``GRAD``, ``LABELS``) occupy their wire and name the sending stage.
    ``mb`` is -1 for whole-step actions."""

    stage: int
    kind: str
    mb: int
    start_ms: float
    end_ms: float
    resource: str


@dataclass
class SimResult:
    """What one simulated training step costs."""

    step_ms: float  # makespan: end of the last action or transfer
    busy_ms: list[float]  # per stage, time computing (F, B, STEP)
    idle_ms: list[float]  # per stage, step_ms - busy
    bubble_fraction: float  # 1 - sum(busy) / (S * step_ms); 0 for an empty step
    peak_in_flight: list[int]  # per stage, most micro-batches forwarded and not yet backwarded
    timeline: list[Interval]
    link_busy_ms: dict[str, float]  # per wire ("link 0->1", "link 1->0", "labels 0->2"), time carrying
    num_micro_batches: int

    @property
    def num_stages(self) -> int:
        return len(self.busy_ms)


class DeadlockError(ScheduleError):
    """No stage can take its next action: each waits for a transfer that is never sent."""


def stage_resource(stage: int) -> str:
    return f"stage {stage}"


def link_resource(src: int, dst: int) -> str:
    return f"link {src}->{dst}"


def labels_resource(num_stages: int) -> str:
    return f"labels 0->{num_stages - 1}"


@dataclass
class _Wire:
    """One direction of a link, or the labels line: one transfer at a time, in issue order."""

    resource: str
    src: int
    transfer_ms: float
    free_at: float = 0.0
    busy_ms: float = 0.0
    pending: dict[int, float] = field(default_factory=dict)  # micro-batch -> arrival, not yet received


def _wires(links: Sequence[LinkCosts], num_stages: int, labels_ms: float) -> dict[str, _Wire]:
    wires: dict[str, _Wire] = {}
    for s, link in enumerate(links):
        wires[link_resource(s, s + 1)] = _Wire(link_resource(s, s + 1), s, link.act_ms)
        wires[link_resource(s + 1, s)] = _Wire(link_resource(s + 1, s), s + 1, link.grad_ms)
    if num_stages > 1:
        wires[labels_resource(num_stages)] = _Wire(labels_resource(num_stages), 0, labels_ms)
    return wires


def _wire_of(action: Action, stage: int, num_stages: int) -> str:
    """The wire a send or receive uses."""
    last = num_stages - 1
    kind = action.kind
    if kind == SEND_ACT and stage < last:
        return link_resource(stage, stage + 1)
    if kind == RECV_ACT and stage > 0:
        return link_resource(stage - 1, stage)
    if kind == SEND_GRAD and stage > 0:
        return link_resource(stage, stage - 1)
    if kind == RECV_GRAD and stage < last:
        return link_resource(stage + 1, stage)
    if (kind == SEND_LABELS and stage == 0 < last) or (kind == RECV_LABELS and stage == last > 0):
        return labels_resource(num_stages)
    raise ScheduleError(f"stage {stage}: {action} has no wire to use in a {num_stages}-stage pipeline")


def _infer_micro_batches(schedule: Schedule) -> int:
    mbs = [a.mb for acts in schedule for a in acts if a.kind in (F, B)]
    return max(mbs) + 1 if mbs else 0


def simulate(
    schedule: Schedule,
    stages: Sequence[StageCosts],
    links: Sequence[LinkCosts],
    labels_ms: float = 0.0,
    num_micro_batches: int | None = None,
) -> SimResult:
    """Replay one step of ``schedule`` (one action list per stage) on the given costs.

    ``links[s]`` is the link between stage s and s+1; ``labels_ms`` is one transfer on the
    labels line from stage 0 to the last stage. ``num_micro_batches``, when given, must match
    the schedule's (the highest micro-batch of any ``F``/``B``, plus one).

    Raises :class:`DeadlockError` when the lists wait on each other or on a transfer never
    sent, and :class:`~partitioners.schedule.ScheduleError` for a send or receive with no wire
    to use, a transfer sent twice before it is received, or one never received.
    """
    n = len(schedule)
    if len(stages) != n:
        raise ValueError(f"{n} action lists but {len(stages)} stage costs")
    if len(links) != max(n - 1, 0):
        raise ValueError(f"{n} stages need {max(n - 1, 0)} links, got {len(links)}")
    inferred = _infer_micro_batches(schedule)
    if num_micro_batches is not None and num_micro_batches != inferred:
        raise ScheduleError(f"the schedule has {inferred} micro-batches, not {num_micro_batches}")

    wires = _wires(links, n, labels_ms)
    timeline: list[Interval] = []
    pc = [0] * n  # next action of each stage
    clock = [0.0] * n  # when each stage is free
    busy = [0.0] * n
    in_flight: list[set[int]] = [set() for _ in range(n)]
    peak = [0] * n

    progressed = True
    while progressed:
        progressed = False
        for s, acts in enumerate(schedule):
            while pc[s] < len(acts):
                a = acts[pc[s]]
                if a.kind in (F, B, STEP):
                    cost = stages[s]
                    ms = cost.fwd_ms if a.kind == F else cost.bwd_ms if a.kind == B else cost.step_ms
                    timeline.append(Interval(s, a.kind, a.mb, clock[s], clock[s] + ms, stage_resource(s)))
                    clock[s] += ms
                    busy[s] += ms
                    if a.kind == F:
                        in_flight[s].add(a.mb)
                        peak[s] = max(peak[s], len(in_flight[s]))
                    elif a.kind == B:
                        in_flight[s].discard(a.mb)
                elif a.kind in TRANSFER_KINDS:
                    wire = wires[_wire_of(a, s, n)]
                    if a.mb in wire.pending:
                        raise ScheduleError(f"stage {s}: {a} sent again before it was received")
                    start = max(clock[s], wire.free_at)
                    wire.free_at = start + wire.transfer_ms
                    wire.busy_ms += wire.transfer_ms
                    wire.pending[a.mb] = wire.free_at
                    timeline.append(Interval(s, TRANSFER_KINDS[a.kind], a.mb, start, wire.free_at, wire.resource))
                elif a.kind in RECV_KINDS:
                    wire = wires[_wire_of(a, s, n)]
                    if a.mb not in wire.pending:
                        break  # blocked until the sender issues it
                    clock[s] = max(clock[s], wire.pending.pop(a.mb))
                else:
                    raise ScheduleError(f"stage {s}: unknown action {a}")
                pc[s] += 1
                progressed = True

    stuck = [s for s in range(n) if pc[s] < len(schedule[s])]
    if stuck:
        raise DeadlockError("deadlock: " + "; ".join(_why_stuck(s, schedule, pc, wires) for s in stuck))
    unreceived = [f"{w.resource} micro-batch {mb}" for w in wires.values() for mb in sorted(w.pending)]
    if unreceived:
        raise ScheduleError(f"sent but never received: {', '.join(unreceived)}")

    step = max((iv.end_ms for iv in timeline), default=0.0)
    return SimResult(
        step_ms=step,
        busy_ms=busy,
        idle_ms=[step - b for b in busy],
        bubble_fraction=1.0 - sum(busy) / (n * step) if step > 0 else 0.0,
        peak_in_flight=peak,
        timeline=timeline,
        link_busy_ms={name: w.busy_ms for name, w in wires.items()},
        num_micro_batches=inferred,
    )


def _why_stuck(stage: int, schedule: Schedule, pc: list[int], wires: dict[str, _Wire]) -> str:
    a = schedule[stage][pc[stage]]
    wire = wires[_wire_of(a, stage, len(schedule))]
    src = wire.src
    if pc[src] < len(schedule[src]):
        sender = f"stage {src} is itself blocked at {schedule[src][pc[src]]} (action {pc[src]})"
    else:
        sender = f"stage {src} finished without sending it"
    return f"stage {stage} blocked at {a} (action {pc[stage]}) waiting on {wire.resource}, {sender}"


# -- timeline plot -----------------------------------------------------------------------

COLOURS = {
    F: "#3b6fb6",
    B: "#e07b39",
    STEP: "#4e9a55",
    "ACT": "#9cc3ea",
    "GRAD": "#f4c29a",
    "LABELS": "#b8a2d9",
}
LEGEND = {
    F: "forward",
    B: "backward",
    STEP: "optimizer step",
    "ACT": "activation transfer",
    "GRAD": "gradient transfer",
    "LABELS": "labels transfer",
}
_FONT_PT = 7.0


def timeline_rows(result: SimResult) -> list[str]:
    """Resources of the Gantt chart, top to bottom: each stage followed by the two directions
    of the link to the next stage, then the labels line."""
    n = result.num_stages
    rows: list[str] = []
    for s in range(n):
        rows.append(stage_resource(s))
        if s < n - 1:
            rows += [link_resource(s, s + 1), link_resource(s + 1, s)]
    if n > 1:
        rows.append(labels_resource(n))
    return rows


def _row_label(resource: str, stage_labels: Sequence[str] | None) -> str:
    what, where = resource.split(" ")
    if what == "stage":
        return stage_labels[int(where)] if stage_labels else resource
    src, dst = where.split("->")
    if what == "labels":
        return f"labels {src}→{dst}"
    return f"{src}→{dst} " + ("act" if int(src) < int(dst) else "grad")


def timeline_figure(result: SimResult, title: str = "", stage_labels: Sequence[str] | None = None) -> Figure:
    """A Gantt chart of ``result.timeline``: one row per stage and per wire, F and B in
    distinct colours, the micro-batch written in each box wide enough for it."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    if stage_labels is not None and len(stage_labels) != result.num_stages:
        raise ValueError(f"{len(stage_labels)} stage labels for {result.num_stages} stages")
    rows = timeline_rows(result)
    y_of = {r: i for i, r in enumerate(rows)}
    fig = Figure(figsize=(12, 1.6 + 0.38 * len(rows)), dpi=120, layout="constrained")
    ax = fig.add_subplot()

    boxes: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for iv in result.timeline:
        if iv.end_ms > iv.start_ms:
            boxes.setdefault((iv.resource, iv.kind), []).append((iv.start_ms, iv.end_ms - iv.start_ms))
    for (resource, kind), spans in boxes.items():
        height = 0.8 if resource.startswith("stage") else 0.5
        ax.broken_barh(
            spans, (y_of[resource] - height / 2, height), facecolors=COLOURS[kind], edgecolor="white", linewidth=0.6
        )

    ax.set_yticks(range(len(rows)), [_row_label(r, stage_labels) for r in rows])
    for tick, r in zip(ax.get_yticklabels(), rows, strict=True):
        if not r.startswith("stage"):
            tick.set_color("dimgray")
            tick.set_fontsize(8)
    for s in range(result.num_stages - 1):  # a rule under each stage's group of rows
        ax.axhline(y_of[link_resource(s + 1, s)] + 0.5, color="lightgray", linewidth=0.6)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlim(0, max(result.step_ms, 1e-9) * 1.01)
    ax.set_xlabel("time (ms)")
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    summary = (
        f"step {result.step_ms:.4g} ms · bubble {result.bubble_fraction:.0%} · "
        f"{result.num_micro_batches} micro-batches · peak in flight {result.peak_in_flight}"
    )
    ax.set_title(f"{title}\n{summary}" if title else summary, fontsize=10)
    kinds = [k for k in LEGEND if any(kind == k for _, kind in boxes)]
    fig.legend(
        handles=[Patch(facecolor=COLOURS[k], label=LEGEND[k]) for k in kinds],
        loc="outside lower center",
        ncol=len(kinds) or 1,
        frameon=False,
        fontsize=9,
    )

    # Write micro-batch numbers where they fit: needs the laid-out axes width in pixels.
    fig.draw_without_rendering()
    px_per_ms = ax.get_window_extent().width / (ax.get_xlim()[1] - ax.get_xlim()[0])
    char_px = 0.62 * _FONT_PT * fig.dpi / 72
    for iv in result.timeline:
        text = str(iv.mb) if iv.mb >= 0 else ""
        if text and (iv.end_ms - iv.start_ms) * px_per_ms >= len(text) * char_px + 4:
            dark = iv.kind in (F, B, STEP)
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


def plot_timeline(result: SimResult, path: str, title: str = "", stage_labels: Sequence[str] | None = None) -> None:
    """Save :func:`timeline_figure` as a PNG (rendered with Agg, no display needed)."""
    timeline_figure(result, title, stage_labels).savefig(path, format="png")
