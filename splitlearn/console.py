"""What ``splitlearn train`` shows on the terminal: the plan, the run directory, the progress
of the steps and the summary lines."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from partitioners import Plan
from splitlearn.config import LoadedConfig
from splitlearn.run_record import RunResult


class Progress:
    """A tqdm bar on a terminal, a plain log line every ``log_every`` steps otherwise."""

    def __init__(self, total: int, mode: str, log_every: int, initial: int = 0) -> None:
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "log"
        self.mode, self.log_every, self.total = mode, log_every, total
        self.bar: Any = None
        if mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def update(self, rec: dict[str, Any]) -> None:
        text = f"loss={rec['loss']:.4f} tok/s={rec['tokens_per_s']:.0f}"
        if self.bar is not None:
            self.bar.set_postfix_str(text)
            self.bar.update(1)
        elif self.mode == "log":
            step = rec["step"] + 1
            if step == 1 or step % self.log_every == 0 or step == self.total:
                print(f"step {step}/{self.total} {text} step_s={rec['step_s']:.3f}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def show_plan(plan: Plan) -> None:
    print(plan.table(), flush=True)


def show_run_dir(run_dir: Path) -> None:
    print(f"run directory: {run_dir}", flush=True)


def show_summary(cfg: LoadedConfig, result: RunResult) -> None:
    """The run's result in a few lines: the loss and throughput, the failures survived, and
    the step time measured against the simulator's prediction and its replay."""
    s = result.summary
    if s["median_step_s"] is not None:
        print(
            f"done: {s['steps']} steps, loss {s['first_loss']:.4f} -> {s['final_loss']:.4f}, "
            f"median step {s['median_step_s']:.3f} s, {s['median_tokens_per_s']:.0f} tokens/s"
            + (f", MFU {s['mfu']:.1%} of the devices' tflops" if s.get("mfu") else ""),
            flush=True,
        )
    else:
        print(f"done: {s['steps']} steps (nothing left to run)", flush=True)
    if "eval_loss" in s:
        print(
            f"eval: loss {s['eval_loss']:.4f}, perplexity {s['eval_perplexity']:.2f} "
            f"(best {s['best_eval_loss']:.4f} over {len(s['evals'])} evals)",
            flush=True,
        )
    if result.restarts:
        print(
            f"survived {result.restarts} failure(s) ({result.replans} re-plan(s)): {result.steps_redone} step(s) "
            f"redone, {result.time_lost_s:.1f} s lost; see events.jsonl",
            flush=True,
        )
    pred = s.get("simulated_step_ms")
    if pred and "measured_step_ms" in s:
        print(
            f"step time: measured {s['measured_step_ms']:.1f} ms (median), "
            f"predicted {pred:.1f} ms by the simulator for this plan and schedule "
            f"(costs {'measured by plan.profile' if cfg.run.plan.profile else 'counted, FLOPs over device tflops'})",
            flush=True,
        )
    if s.get("memory"):
        show_memory(s["memory"])
    if "replayed_step_ms" in s:
        where = "as emulated" if cfg.run.runtime.emulate_links else "as planned"
        print(
            f"replayed with the compute this run measured: {s['replayed_step_ms']:.1f} ms on the links {where}, "
            f"{s['replayed_free_links_step_ms']:.1f} ms on free links",
            flush=True,
        )


def show_memory(rows: list[dict[str, Any]]) -> None:
    """Each stage's memory as planned and as held on its device (a CPU's resident memory above
    the runtime's; a GPU's peak allocated by torch)."""
    from cluster.tables import render_table

    table = [
        [
            str(r["stage"]),
            r["device"],
            f"{r['planned_gb']:.3f}",
            f"{r['measured_gb']:.3f}",
            f"{r['measured_gb'] / r['planned_gb']:.2f}" if r["planned_gb"] else "-",
            f"{r['runtime_rss_gb']:.2f}",
        ]
        for r in rows
    ]
    header = ["stage", "device", "planned GB", "held GB", "held/planned", "runtime GB"]
    print(
        "memory per stage: held = on a CPU, peak resident memory above the runtime's (interpreter, torch, Ray); "
        "on a GPU, torch's peak allocated",
        flush=True,
    )
    print(render_table(header, table, numeric=header[2:]), flush=True)
