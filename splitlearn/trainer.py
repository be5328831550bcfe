"""``splitlearn train``: load → plan → place → run → record. Detail lives one level down.

The run directory is created only once every stage is placed and has built its segment,
so bad input leaves nothing half-written.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from cluster.ray_cluster import check_devices, connect
from partitioners import Plan, PlanRequest, partition
from partitioners.profile import ModelProfile
from splitlearn.config import LoadedConfig
from splitlearn.errors import ConfigError
from splitlearn.models.chain import import_adapter_module, meta_profile
from splitlearn.runtime import StageGroup

log = logging.getLogger("splitlearn")


def load_profile(cfg: LoadedConfig) -> ModelProfile:
    """The layer costs the planner uses: ``plan.profile`` (measured by ``splitlearn
    profile``) when given and matching this run, else counted on the meta device."""
    run = cfg.run
    mb = run.train.batch_size // run.train.micro_batches
    seq = run.data.seq_len
    if run.plan.profile:
        path = cfg.resolve_path(run.plan.profile)
        try:
            prof = ModelProfile.from_json(path.read_text())
        except (ValueError, TypeError, KeyError) as e:
            raise ConfigError(f"plan.profile: {path} is not a profile written by `splitlearn profile`: {e}") from e
        if (prof.micro_batch, prof.seq_len) != (mb, seq):
            raise ConfigError(
                f"plan.profile: {path} was measured for micro_batch={prof.micro_batch}, seq_len={prof.seq_len}, "
                f"but this run has {mb}, {seq}; profile again with this config"
            )
        return prof
    layers = meta_profile(run.model, mb, seq, run.train.seed)
    return ModelProfile(layers=layers, micro_batch=mb, seq_len=seq, dtype=run.train.dtype, device="meta")


def plan_request(cfg: LoadedConfig, profile: ModelProfile | None = None) -> PlanRequest:
    run = cfg.run
    profile = profile or load_profile(cfg)
    n = len(profile.layers)
    if run.plan.profile and n != len(meta_chain_names(cfg)):
        raise ConfigError(f"plan.profile: it has {n} layers but the model's chain has {len(meta_chain_names(cfg))}")
    return PlanRequest(
        layers=profile.layers,
        topology=cfg.topology,
        num_micro_batches=run.train.micro_batches,
        schedule=run.runtime.schedule,
        devices=list(run.plan.devices) or None,
        cuts=list(run.plan.cuts) or None,
        label_privacy=run.plan.label_privacy,
        precision=run.train.dtype,
        calibrated_tflops=profile.calibrated_tflops,
        codec=run.plan.codec,
    )


def meta_chain_names(cfg: LoadedConfig) -> list[str]:
    import torch

    from splitlearn.models.chain import build_model, chain_names, num_blocks

    with torch.device("meta"):
        model = build_model(cfg.run.model, cfg.run.train.seed)
    return chain_names(num_blocks(model))


def make_plan(cfg: LoadedConfig, partitioner: str | None = None, request: PlanRequest | None = None) -> Plan:
    req = request or plan_request(cfg)
    plan = partition(partitioner or cfg.run.plan.partitioner, req)
    simulate_plan(plan)
    return plan


def simulate_plan(plan: Plan) -> None:
    """Add the simulator's step time (same schedule data as the workers) to the plan."""
    from partitioners.partition import simulate_plan as _simulate

    plan.predicted["simulated_step_ms"] = round(_simulate(plan).step_ms, 4)


@dataclass
class RunResult:
    run_dir: Path
    plan: Plan
    losses: list[float] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _new_run_dir(cfg: LoadedConfig) -> Path:
    rt = cfg.run.runtime
    root = Path(rt.output_dir)
    name = rt.run_name or f"{cfg.run.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    path, k = root / name, 1
    while path.exists():
        k += 1
        path = root / f"{name}-{k}"
    path.mkdir(parents=True)
    return path


class Progress:
    """A tqdm bar on a terminal, a plain log line every ``log_every`` steps otherwise."""

    def __init__(self, total: int, mode: str, log_every: int):
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "log"
        self.mode, self.log_every, self.total = mode, log_every, total
        self.bar = None
        if mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="step", dynamic_ncols=True)

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


def train(cfg: LoadedConfig, progress: str | None = None) -> RunResult:
    run = cfg.run
    import_adapter_module(run.model.adapter_module)
    plan = make_plan(cfg)
    print(plan.table(), flush=True)
    handle = connect(cfg.topology, run.ray.address, run.ray.num_cpus)
    group = None
    try:
        check_devices(cfg.topology, plan.devices)
        group = StageGroup(
            plan,
            cfg.topology,
            cfg.resolved_dict(),
            str(cfg.base_dir.resolve()),
            run.runtime.timeout_s,
            run.runtime.placement_timeout_s,
        )
        infos = group.start(prepare_timeout_s=max(run.runtime.timeout_s, 120.0))
        for info in infos:
            log.info(
                "stage %(stage)d on %(device)s: %(params)d params, node %(node)s, pid %(pid)d, %(threads)d threads",
                info,
            )
        run_dir = _new_run_dir(cfg)
        print(f"run directory: {run_dir}", flush=True)
        _atomic_write(run_dir / "config.yaml", cfg.to_yaml())
        _atomic_write(run_dir / "plan.yaml", plan.to_yaml())
        result = RunResult(run_dir=run_dir, plan=plan)
        _train_loop(cfg, group, result, progress or run.runtime.progress)
        if run.runtime.checkpoint:
            _save_checkpoint(group, run_dir / "checkpoint", plan)
        _atomic_write(run_dir / "summary.json", json.dumps(result.summary, indent=2))
        return result
    finally:
        if group is not None:
            group.shutdown()
        handle.shutdown()


def _train_loop(cfg: LoadedConfig, group: StageGroup, result: RunResult, progress: str) -> None:
    run = cfg.run
    bar = Progress(run.train.steps, progress, run.runtime.log_every)
    start = time.perf_counter()
    step_times: list[float] = []
    tokens_per_s: list[float] = []
    with open(result.run_dir / "metrics.jsonl", "w", encoding="utf-8") as metrics:
        try:
            for step in range(run.train.steps):
                t0 = time.perf_counter()
                stages = group.step(step)
                dt = time.perf_counter() - t0
                tokens = stages[0]["tokens"]
                loss = stages[-1]["loss"]
                rec = {
                    "step": step,
                    "loss": loss,
                    "grad_norm": stages[0]["grad_norm"],
                    "step_s": dt,
                    "tokens_per_s": tokens / dt,
                    "stages": [{k: s[k] for k in ("stage", "device", "compute_s", "comm_s")} for s in stages],
                    "bytes_sent": {k: v for s in stages for k, v in s["bytes_sent"].items()},
                }
                metrics.write(json.dumps(rec) + "\n")
                metrics.flush()
                result.losses.append(loss)
                step_times.append(dt)
                tokens_per_s.append(rec["tokens_per_s"])
                bar.update(rec)
        finally:
            bar.close()
    result.summary = {
        "steps": len(result.losses),
        "first_loss": result.losses[0] if result.losses else None,
        "final_loss": result.losses[-1] if result.losses else None,
        "wall_s": time.perf_counter() - start,
        "median_step_s": statistics.median(step_times) if step_times else None,
        "median_tokens_per_s": statistics.median(tokens_per_s) if tokens_per_s else None,
        "stages": [{"stage": s.index, "device": s.device, "layers": [s.start, s.stop]} for s in result.plan.stages],
        "predicted_step_ms": result.plan.predicted.get("step_ms"),
        "simulated_step_ms": result.plan.predicted.get("simulated_step_ms"),
    }
    if step_times:
        result.summary["measured_step_ms"] = statistics.median(step_times) * 1e3
    print(
        f"done: {result.summary['steps']} steps, loss {result.summary['first_loss']:.4f} -> "
        f"{result.summary['final_loss']:.4f}, median step {result.summary['median_step_s']:.3f} s, "
        f"{result.summary['median_tokens_per_s']:.0f} tokens/s",
        flush=True,
    )
    pred = result.summary.get("simulated_step_ms")
    if pred:
        print(
            f"step time: measured {result.summary['measured_step_ms']:.1f} ms (median), "
            f"predicted {pred:.1f} ms by the simulator for this plan and schedule "
            f"(costs {'measured by plan.profile' if cfg.run.plan.profile else 'counted, FLOPs over device tflops'})",
            flush=True,
        )


def _save_checkpoint(group: StageGroup, directory: Path, plan: Plan) -> None:
    """Each stage writes its shard; the manifest is written last, so it names only whole files."""
    directory.mkdir(parents=True, exist_ok=True)
    shards = group.save(str(directory))
    manifest = {"format": "splitlearn-checkpoint/1", "plan": plan.to_dict(), "shards": shards}
    _atomic_write(directory / "manifest.json", json.dumps(manifest, indent=2))
