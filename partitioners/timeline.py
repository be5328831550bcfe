"""Timelines of a step: a measured one in the simulator's terms, and the Gantt chart of either.

:func:`observed` turns the workers' traces (``runtime.trace``) into a
:class:`~partitioners.simulator.SimResult`; :func:`timeline_figure` and :func:`timeline_png`
draw a simulated or an observed step, one row per stage (per replica) and per wire.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

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
    peak_in_flight,
)
from partitioners.simulation import wires_of
from partitioners.simulator import (
    ALLREDUCE,
    HOST,
    RECV_KINDS,
    TRANSFER_KINDS,
    Interval,
    SimResult,
    stage_resource,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def _stage_of(node: str) -> int:
    return int(node.split(".")[0])


RECV_OF = {SEND_ACT: RECV_ACT, SEND_GRAD: RECV_GRAD, SEND_LABELS: RECV_LABELS}


def observed(traces: dict[tuple[int, int], Sequence[Sequence[Any]]], replicas: Sequence[int]) -> SimResult:
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
                for wire in wires_of(Action(kind, mb), s, r, replicas):
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
                for wire in wires_of(Action(kind, mb), s, r, replicas):
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
    drawn: list[tuple[Axes, SimResult, dict[str, int]]] = []
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
    for ax, res, y_of in drawn:
        _write_micro_batches(ax, res, y_of, fig.dpi)
    return fig


def _write_micro_batches(ax: Axes, result: SimResult, y_of: dict[str, int], dpi: float) -> None:
    """The micro-batch of each interval of ``result`` written in its box on ``ax``, where the
    box is wide enough for it (``ax`` already laid out)."""
    char_px = 0.62 * _FONT_PT * dpi / 72
    px_per_ms = ax.get_window_extent().width / (ax.get_xlim()[1] - ax.get_xlim()[0])
    for iv in result.timeline:
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


def _draw_timeline(
    ax: Axes, result: SimResult, title: str, stage_labels: Sequence[str] | None, used: set[str]
) -> dict[str, int]:
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
