"""``splitlearn plan`` and ``splitlearn timeline``: compare partitioners, draw the schedule, the
predicted memory and a run's traced step."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cluster.tables import render_table
from partitioners import Plan, PlanError
from partitioners.planner import simulate_plan
from splitlearn.config import LoadedConfig
from splitlearn.errors import ConfigError
from splitlearn.fsio import atomic_write, check_writable
from splitlearn.planning import make_plan, plan_request
from splitlearn.replay import measured_stage_costs, ran_plan


def compare(cfg: LoadedConfig, names: list[str]) -> tuple[dict[str, Plan | str], str]:
    """Plans of several partitioners for one request, and a side-by-side table: predicted
    step time, throughput, bottleneck, peak memory per device, bytes over the slowest link,
    and the ratio of each step time to the best."""
    req = plan_request(cfg)
    plans: dict[str, Plan | str] = {}
    for name in names:
        try:
            plans[name] = make_plan(cfg, name, req)
        except PlanError as e:
            plans[name] = str(e)
    ok = {n: p for n, p in plans.items() if isinstance(p, Plan)}
    best = min((p.step_ms for p in ok.values()), default=0.0)
    # a bound below every plan's step, from an exact search among them (optimal's)
    bound = max((p.predicted["lower_bound_ms"] for p in ok.values() if "lower_bound_ms" in p.predicted), default=None)
    tokens = cfg.run.train.batch_size * cfg.run.data.seq_len
    head = (
        "partitioner",
        "stages",
        "step ms",
        "tokens/s",
        "x best",
        "bottleneck",
        "peak mem GB (device)",
        "slowest link: MB/step",
        "vs bound",
    )
    rows: list[tuple[str, ...]] = []
    for name, p in plans.items():
        if not isinstance(p, Plan):
            rows.append((name, "-", "-", "-", "-", f"infeasible: {p}", "", "", ""))
            continue
        mem: dict[str, float] = {}
        for s in p.stages:
            mem[s.device] = mem.get(s.device, 0.0) + s.memory_gb
        peak_dev = max(mem, key=lambda d: mem[d])
        slow = max(p.stages[:-1], key=lambda s: s.link_act_ms, default=None)
        link = "-"
        if slow is not None:
            nxt = p.stages[slow.index + 1].device
            mb = 2 * slow.cut_bytes * p.num_micro_batches / 1e6  # activations forward, gradients back
            link = f"{slow.device}->{nxt}: {mb:.2f}"
        rows.append(
            (
                name,
                str(p.num_stages),
                f"{p.step_ms:.2f}",
                f"{tokens / (p.step_ms / 1e3):.0f}",
                f"{p.step_ms / best:.2f}" if best else "-",
                str(p.predicted.get("bottleneck")),
                f"{mem[peak_dev]:.3f} ({peak_dev})",
                link,
                _versus(p.step_ms, bound),
            )
        )
    return plans, render_table(head, rows, numeric=("stages", "step ms", "tokens/s", "x best"))


def _versus(step_ms: float, bound: float | None) -> str:
    """A plan's step against a proven bound: "optimal" (at the bound) or how far above it."""
    if bound is None or bound <= 0:
        return "-"
    if step_ms <= bound * (1 + 1e-6) + 1e-4:
        return "optimal"
    return f"+{step_ms / bound - 1:.1%}"


def draw_timeline(plan: Plan, path: str | Path, title: str = "") -> None:
    """The simulated step of the plan, as a PNG."""
    from partitioners.timeline import timeline_png

    result = simulate_plan(plan, shared_cpus=plan.predicted.get("shared_cpus"), step_barrier=True)  # as in the plan
    labels = [f"{s.index}: {s.device}" for s in plan.stages]
    atomic_write(
        path, timeline_png(result, title=title or f"{plan.partitioner} plan, {plan.schedule}", stage_labels=labels)
    )


def draw_memory(plan: Plan, cfg: LoadedConfig, path: str | Path) -> None:
    """Predicted memory per device, stacked by kind, against each device's capacity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = ("weights", "grads", "optimizer", "activations", "buffers")
    devices = list(dict.fromkeys(plan.devices))
    totals = {d: dict.fromkeys(kinds, 0.0) for d in devices}
    for s in plan.stages:
        for k in kinds:
            totals[s.device][k] += s.memory.get(k, 0.0)
    caps = {d: cfg.topology.device(d).memory_gb for d in devices}
    fig, ax = plt.subplots(figsize=(max(6.5, 1.1 * len(devices) + 3.5), 4.5))
    bottom = [0.0] * len(devices)
    for k in kinds:  # stacked, as a percentage of each device's capacity
        vals = [100 * totals[d][k] / caps[d] for d in devices]
        ax.bar(devices, vals, bottom=bottom, label=k)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    for i, d in enumerate(devices):
        used = sum(totals[d].values())
        ax.annotate(
            f"{used:.3g} / {caps[d]:g} GB",
            (i, bottom[i]),
            xytext=(0, 3),
            textcoords="offset points",
            ha="center",
            fontsize=8,
        )
    top = max(bottom, default=0.0)
    if top >= 40:
        ax.axhline(100, color="black", linewidth=1, linestyle="--", label="capacity")
        ax.set_ylim(0, max(110, top * 1.15))
    else:  # a few percent: scale to the bars, the capacity line (100%) is off the chart
        ax.set_ylim(0, max(top * 1.3, 1e-3))
        ax.text(0.99, 0.97, "capacity (100%) above the chart", transform=ax.transAxes, ha="right", va="top", fontsize=8)
    ax.set_ylabel("% of the device's memory_gb")
    ax.set_title(f"predicted memory per device: {plan.partitioner}, {plan.schedule}, M={plan.num_micro_batches}")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.tight_layout()
    fmt = Path(path).suffix.lstrip(".") or "png"  # from the target's name: the temporary file's is .tmp
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format=fmt))
    plt.close(fig)


def read_plan(path: Path, key: str) -> Plan:
    """A plan written by ``splitlearn plan`` (or a run), or one line naming ``key`` and the file."""
    if path.is_dir():
        raise ConfigError(f"{key}: {path} is a directory; give a plan.yaml written by `splitlearn plan`")
    if not path.is_file():
        raise ConfigError(f"{key}: file not found: {path}")
    try:
        return Plan.from_yaml(path.read_text(encoding="utf-8"))
    except Exception as e:  # YAML errors, missing or unknown keys, wrong types: all say "not a plan"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{key}: {path} is not a plan written by `splitlearn plan` ({first})") from e


def _metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a run's ``metrics.jsonl``, or one line naming the file and the line."""
    records = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        try:
            rec = json.loads(line) if line.strip() else None
        except json.JSONDecodeError as e:
            raise ConfigError(f"timeline: {path}:{lineno}: not valid JSON ({e.msg})") from e
        if rec is not None and not (isinstance(rec, dict) and isinstance(rec.get("stages"), list) and "step" in rec):
            raise ConfigError(f"timeline: {path}:{lineno}: not a step record of `splitlearn train`")
        if rec is not None:
            records.append(rec)
    return records


def draw_run_timeline(run_dir: str | Path, path: str | Path, step: int | None = None) -> tuple[int, float, float]:
    """A traced step of a run (``runtime.trace: true``) as measured, above the simulator's
    replay of the same plan on the compute the run measured (:func:`splitlearn.replay.replay`), on one
    time axis. ``step``: default the traced step of median step time. Returns the step, its
    measured span and the replay's step time, in ms."""
    from partitioners.timeline import observed, timeline_figure

    run_dir = Path(run_dir)
    check_writable(path)
    if not (run_dir / "plan.yaml").is_file() or not (run_dir / "metrics.jsonl").is_file():
        raise ConfigError(f"timeline: {run_dir} is not a run directory (no plan.yaml or metrics.jsonl)")
    plan = read_plan(run_dir / "plan.yaml", "timeline")
    records = _metrics(run_dir / "metrics.jsonl")
    traced = {r["step"]: r for r in records if ran_plan(plan, r["stages"]) and all("trace" in m for m in r["stages"])}
    if not traced:
        raise ConfigError(f"timeline: {run_dir} has no traced steps of its plan; run with runtime.trace=true")
    if step is None:
        steps = sorted(traced)[1:] or sorted(traced)  # the first step allocates the optimizer state
        steps.sort(key=lambda k: traced[k]["step_s"])
        step = steps[len(steps) // 2]
    elif step not in traced:
        raise ConfigError(
            f"timeline: --step {step} is not a traced step of {run_dir} (traced: {min(traced)}..{max(traced)})"
        )
    replicas = [len(s.devices) for s in plan.stages]
    measured = observed({(m["stage"], m["replica"]): m["trace"] for m in traced[step]["stages"]}, replicas)
    costs = measured_stage_costs(plan, [traced[k]["stages"] for k in sorted(traced)])
    replayed = simulate_plan(plan, stage_costs=costs, step_barrier=True)
    labels = [f"{s.index}: {s.device}" for s in plan.stages]
    fig = timeline_figure(
        measured,
        f"{run_dir.name}, step {step}, measured (a transfer: posted to received)",
        labels,
        below=replayed,
        below_title="simulated: the same plan and links on the compute this run measured (replay)",
    )
    atomic_write(path, lambda tmp: fig.savefig(str(tmp), format="png"))
    return step, measured.step_ms, replayed.step_ms
