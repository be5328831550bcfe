"""What a run records: its run directory, the trajectory by step (``metrics.jsonl``), its
failures (``events.jsonl``) and its summary (``summary.json``)."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from partitioners import Plan
from splitlearn.config import LoadedConfig
from splitlearn.errors import ConfigError
from splitlearn.replay import ran_plan, replay

# what metrics.jsonl keeps of each stage's metrics, per step
STAGE_METRICS = (
    "transfers",  # runtime.audit_transport
    "stage",
    "replica",
    "device",
    "compute_s",
    "fwd_s",
    "bwd_s",
    "micro_batches",
    "comm_s",
    "exec_s",  # the worker's step (actions, batch, metrics)
    "run_s",  # the worker's whole call (with its memory readings)
    "rss_peak_bytes",
    "rss_base_bytes",
    "cuda_peak_allocated_bytes",
    "cuda_peak_reserved_bytes",
    "trace",
)


@dataclass
class RunResult:
    """What a run has done so far: its trajectory by step (redone steps replace the steps
    they redo), its failures and what they cost."""

    run_dir: Path
    plan: Plan
    losses: list[float] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    tokens_per_s: list[float] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    restarts: int = 0
    replans: int = 0
    steps_redone: int = 0
    time_lost_s: float = 0.0
    progress_mark: float = 0.0  # perf_counter at the last whole checkpoint, or at the attempt's start
    current_step: int = 0
    steps_done: int | None = None  # steps recorded by this process; None: none yet (see recorded_steps)
    last_checkpoint_step: int | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    events_path: Path | None = None

    stage_metrics: list[list[dict[str, Any]]] = field(default_factory=list)  # per step, each worker's
    evals: list[dict[str, Any]] = field(default_factory=list)  # {"step", "eval_loss", ...} per eval

    def record(self, rec: dict[str, Any]) -> None:
        self.losses.append(rec["loss"])
        self.step_times.append(rec["step_s"])
        self.tokens_per_s.append(rec["tokens_per_s"])
        self.stage_metrics.append(rec.get("stages", []))
        if "eval_loss" in rec:
            keys = ("eval_loss", "eval_perplexity", "eval_tokens")
            self.evals.append({"step": rec["step"] + 1, **{k: rec[k] for k in keys}})

    def truncate(self, step: int) -> None:
        """Forget steps at and after ``step`` (they will run again); on a resumed run, read
        the earlier ones back from metrics.jsonl."""
        if len(self.losses) < step and (self.run_dir / "metrics.jsonl").is_file():
            by_step: dict[int, dict[str, Any]] = {}
            for line in (self.run_dir / "metrics.jsonl").read_text().splitlines():
                if line.strip():
                    r = json.loads(line)
                    by_step[r["step"]] = r
            self.losses, self.step_times, self.tokens_per_s, self.stage_metrics = [], [], [], []
            self.evals = []
            for i in range(step):
                if i in by_step:
                    self.record(by_step[i])
        del self.losses[step:], self.step_times[step:], self.tokens_per_s[step:], self.stage_metrics[step:]
        self.evals = [e for e in self.evals if e["step"] <= step]

    def recorded_steps(self) -> int:
        """Steps recorded in ``metrics.jsonl`` (one past the highest step): what a resumed run
        had done before it stopped."""
        path = self.run_dir / "metrics.jsonl"
        if not path.is_file():
            return 0
        steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]
        return 1 + max(steps, default=-1)

    def event(self, kind: str, reason: str, step: int) -> None:
        ev = {"time": datetime.now().isoformat(timespec="seconds"), "kind": kind, "step": step, "reason": reason}
        self.events.append(ev)
        if self.events_path is not None:
            with open(self.events_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(ev) + "\n")


def new_run_dir(cfg: LoadedConfig) -> Path:
    """A new, empty run directory under ``runtime.output_dir``: ``runtime.run_name``, or the
    config's name and the time; ``-2``, ``-3``... when that exists."""
    rt = cfg.run.runtime
    root = Path(rt.output_dir)
    name = rt.run_name or f"{cfg.run.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    path, k = root / name, 1
    while path.exists():
        k += 1
        path = root / f"{name}-{k}"
    path.mkdir(parents=True)
    return path


def find_resume_dir(cfg: LoadedConfig, resume: str | bool) -> Path:
    """The run directory to resume: the one given, or the newest of this config's name."""
    if isinstance(resume, str):
        path = Path(resume)
        if not (path / "config.yaml").is_file():
            raise ConfigError(f"--resume: {path} is not a run directory (no config.yaml)")
        return path
    root = Path(cfg.run.runtime.output_dir)
    runs = sorted(
        (p for p in root.glob(f"{cfg.run.name}-*") if (p / "config.yaml").is_file()),
        key=lambda p: p.stat().st_mtime,
    )
    if cfg.run.runtime.run_name and (root / cfg.run.runtime.run_name / "config.yaml").is_file():
        runs.append(root / cfg.run.runtime.run_name)
    if not runs:
        raise ConfigError(f"--resume: no run of '{cfg.run.name}' under {root}; give the run directory")
    return runs[-1]


def step_record(step: int, stages: list[dict[str, Any]], step_s: float, attempt: int) -> dict[str, Any]:
    """One line of ``metrics.jsonl``: the step's loss, time and throughput from every
    worker's metrics (``StageGroup.step``'s)."""
    rec: dict[str, Any] = {
        "step": step,
        "loss": sum(s["loss"] for s in stages if s["loss"] is not None),  # loss-stage replicas' shares
        "grad_norm": stages[0]["grad_norm"],
        "step_s": step_s,
        # every data owner's tokens (federated clients: each its own batch)
        "tokens_per_s": sum(s["tokens"] or 0 for s in stages if s.get("stage") == 0) / step_s,
        "attempt": attempt,
        "stages": [{k: s[k] for k in STAGE_METRICS if k in s} for s in stages],
        "bytes_sent": {k: v for s in stages for k, v in s["bytes_sent"].items()},
    }
    if any("peak_bytes" in s for s in stages):
        rec["peak_bytes"] = [s.get("peak_bytes") for s in stages]
    return rec


def memory_by_stage(result: RunResult) -> list[dict[str, Any]]:
    """Per stage replica of the final plan: the memory its plan predicted against the most it
    held on its device in any step (``measured_gb``: on a CPU, resident memory above the
    runtime's; on a GPU, torch's peak allocated, with the host's resident memory as
    ``host_gb``)."""
    rows: dict[tuple[int, str], dict[str, Any]] = {}
    for metrics in result.stage_metrics:
        if not ran_plan(result.plan, metrics):
            continue
        for m in metrics:
            if "rss_peak_bytes" not in m:
                continue
            row = rows.setdefault(
                (m["stage"], m["device"]),
                {
                    "stage": m["stage"],
                    "device": m["device"],
                    "planned_gb": result.plan.stages[m["stage"]].memory_gb,
                    "runtime_rss_gb": m["rss_base_bytes"] / 1e9,
                    "measured_gb": 0.0,
                },
            )
            host = (m["rss_peak_bytes"] - m["rss_base_bytes"]) / 1e9
            if "cuda_peak_allocated_bytes" in m:
                row["cuda_allocated_gb"] = m["cuda_peak_allocated_bytes"] / 1e9
                row["cuda_reserved_gb"] = m["cuda_peak_reserved_bytes"] / 1e9
                row["measured_gb"] = row["cuda_allocated_gb"]
                row["host_gb"] = max(row.get("host_gb", 0.0), host)
            else:
                row["measured_gb"] = max(row["measured_gb"], host)
    return sorted(rows.values(), key=lambda r: (r["stage"], r["device"]))


def summary(result: RunResult, wall_s: float) -> dict[str, Any]:
    """``summary.json``: the trajectory's medians, the plan's predictions, the failures and,
    when the run measured its stages, the simulator replayed on that compute."""
    times = result.step_times
    losses = result.losses
    out: dict[str, Any] = {
        "steps": len(losses),
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "wall_s": wall_s,
        "median_step_s": statistics.median(times) if times else None,
        "median_tokens_per_s": statistics.median(result.tokens_per_s) if result.tokens_per_s else None,
        "stages": [{"stage": s.index, "device": s.device, "layers": [s.start, s.stop]} for s in result.plan.stages],
        "predicted_step_ms": result.plan.predicted.get("step_ms"),
        "simulated_step_ms": result.plan.predicted.get("simulated_step_ms"),
        "restarts": result.restarts,
        "replans": result.replans,
        "steps_redone": result.steps_redone,
        "time_lost_s": round(result.time_lost_s, 3),
        "events": result.events,
        "last_checkpoint": result.last_checkpoint_step,
    }
    if times:
        out["measured_step_ms"] = statistics.median(times) * 1e3
        flops, peak = result.plan.predicted.get("flops_per_step"), result.plan.predicted.get("peak_tflops")
        if flops and peak:  # model FLOPs per second over the devices' peak (topology tflops)
            out["mfu"] = flops / (statistics.median(times) * peak * 1e12)
    if result.evals:
        last = result.evals[-1]
        out["eval_loss"], out["eval_perplexity"] = last["eval_loss"], last["eval_perplexity"]
        out["best_eval_loss"] = min(e["eval_loss"] for e in result.evals)
        out["evals"] = result.evals
    memory = memory_by_stage(result)
    if memory:
        out["memory"] = memory
    # (sequential split learning: the simulator has no turns; its figures are one client's step)
    if out["simulated_step_ms"] and times and not result.plan.predicted.get("sequential_clients"):
        replayed = replay(result.plan, result.stage_metrics)
        if replayed is not None:
            out["replayed_step_ms"], out["replayed_free_links_step_ms"] = replayed
    return out
