"""``splitlearn train``: load → plan → place → run → record. Detail lives one level down.

The run directory is created only once every stage is placed and has built its segment,
so bad input leaves nothing half-written.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import statistics
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from cluster.ray_cluster import check_devices, connect, devices_in_cluster
from partitioners import Plan, PlanRequest, partition
from partitioners.profile import ModelProfile
from splitlearn import checkpoint as ckpt
from splitlearn import finetune
from splitlearn.config import LoadedConfig
from splitlearn.errors import ConfigError, StageFailed, UserError
from splitlearn.models.chain import import_adapter_module, meta_profile
from splitlearn.runtime import StageGroup

log = logging.getLogger("splitlearn")


def load_profile(cfg: LoadedConfig) -> ModelProfile:
    """The layer costs the planner uses: ``plan.profile`` (measured by ``splitlearn
    profile``) when given and matching this run, else counted on the meta device."""
    run = cfg.run
    mb = run.train.batch_size // run.train.micro_batches
    seq = run.data.seq_len
    finetune.check_lora_targets(run)
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
        finetune.check_profile(prof, run, path)
        return prof
    variants = finetune.variants(run)
    layers = meta_profile(run.model, mb, seq, run.train.seed, variants, finetune.lora_spec(run))
    return ModelProfile(
        layers=layers,
        micro_batch=mb,
        seq_len=seq,
        dtype=run.train.dtype,
        device="meta",
        lora=finetune.lora_record(run) if variants else None,
    )


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
        finetune=finetune.policy(run),
        allow=tuple(run.plan.allow),
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
    check_offload_schedule(cfg, plan)
    simulate_plan(plan)
    return plan


def check_offload_schedule(cfg: LoadedConfig, plan: Plan) -> None:
    """A params-offloaded (ZeRO-3) stage must hold one micro-batch at a time: checked on the
    plan, before anything is placed."""
    from partitioners import schedule as S
    from splitlearn.zero import check_schedule

    run = cfg.run
    sched = S.build(run.runtime.schedule, plan.num_stages, run.train.micro_batches)
    for st in plan.stages:
        for r in range(len(st.devices)):
            check_schedule(
                st.offload, S.replica_actions(sched[st.index], r, len(st.devices)), st.index, run.runtime.schedule
            )


def simulate_plan(plan: Plan) -> None:
    """Add the simulator's step time (same schedule data as the workers) to the plan."""
    from partitioners.partition import simulate_plan as _simulate

    plan.predicted["simulated_step_ms"] = round(_simulate(plan).step_ms, 4)


STAGE_METRICS = ("stage", "replica", "device", "compute_s", "fwd_s", "bwd_s", "micro_batches", "comm_s", "trace")


def ran_plan(plan: Plan, stage_metrics: list[dict[str, Any]]) -> bool:
    """Whether one step's stage metrics come from this plan's workers (a re-planned run's
    earlier attempts ran other stages on other devices)."""
    ranks = sorted((s.index, d) for s in plan.stages for d in s.devices)
    return sorted((m["stage"], m["device"]) for m in stage_metrics) == ranks


def measured_stage_costs(plan: Plan, steps: list[list[dict[str, Any]]], skip_first: bool = True):
    """The compute a run's workers measured, as the simulator's per-stage costs: per stage,
    the median over steps of one micro-batch's forward and backward (the step's forward and
    backward time over the micro-batches the replica ran, averaged over replicas) and of the
    ``STEP`` action's own compute. ``steps``: each step's stage metrics (``run_step``'s).
    The first step is left out when there are others (it allocates the optimizer state),
    unless ``skip_first`` is off (steps after a warm-up)."""
    from partitioners.simulator import StageCosts

    steps = [s for s in steps if ran_plan(plan, s) and all("fwd_s" in m for m in s)]
    if skip_first and len(steps) > 1:
        steps = steps[1:]
    if not steps:
        return None

    def median_of(stage: int, value) -> float:
        per_step = []
        for metrics in steps:
            mine = [m for m in metrics if m["stage"] == stage]
            per_step.append(statistics.fmean(value(m) for m in mine) * 1e3)
        return statistics.median(per_step)

    return [
        StageCosts(
            median_of(s.index, lambda m: m["fwd_s"] / max(m["micro_batches"], 1)),
            median_of(s.index, lambda m: m["bwd_s"] / max(m["micro_batches"], 1)),
            median_of(s.index, lambda m: max(m["compute_s"] - m["fwd_s"] - m["bwd_s"], 0.0)),
            s.allreduce_ms,
        )
        for s in plan.stages
    ]


def replay(plan: Plan, steps: list[list[dict[str, Any]]], skip_first: bool = True) -> tuple[float, float] | None:
    """The simulator's step time for this plan and schedule with the compute the run
    measured (:func:`measured_stage_costs`): on the plan's links, and on free links. What
    separates the cost model's error from the links' and the schedule's, and what the links
    cost. None when the run has no stage metrics of this plan."""
    from partitioners.partition import simulate_plan as _simulate

    costs = measured_stage_costs(plan, steps, skip_first)
    if costs is None:
        return None
    return _simulate(plan, stage_costs=costs).step_ms, _simulate(plan, stage_costs=costs, free_links=True).step_ms


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
    since_checkpoint_s: float = 0.0
    current_step: int = 0
    last_checkpoint_step: int | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    events_path: Path | None = None

    stage_metrics: list[list[dict[str, Any]]] = field(default_factory=list)  # per step, each worker's

    def record(self, rec: dict[str, Any]) -> None:
        self.losses.append(rec["loss"])
        self.step_times.append(rec["step_s"])
        self.tokens_per_s.append(rec["tokens_per_s"])
        self.stage_metrics.append(rec.get("stages", []))

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
            for i in range(step):
                if i in by_step:
                    self.record(by_step[i])
        del self.losses[step:], self.step_times[step:], self.tokens_per_s[step:], self.stage_metrics[step:]

    def event(self, kind: str, reason: str, step: int) -> None:
        ev = {"time": datetime.now().isoformat(timespec="seconds"), "kind": kind, "step": step, "reason": reason}
        self.events.append(ev)
        if self.events_path is not None:
            with open(self.events_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(ev) + "\n")


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

    def __init__(self, total: int, mode: str, log_every: int, initial: int = 0):
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "log"
        self.mode, self.log_every, self.total = mode, log_every, total
        self.bar = None
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


@dataclass
class Decision:
    """What the failure policy decided, and why: carried out by :func:`train`, logged, and
    recorded in the run directory's ``events.jsonl``."""

    action: str  # restart | replan | stop
    reason: str
    plan: Plan | None = None


def decide_on_failure(cfg: LoadedConfig, plan: Plan, error: Exception, restarts: int) -> Decision:
    """Restart on the same devices when they are all still in the cluster; re-plan on the
    devices that remain when one is gone and ``runtime.replan_on_failure`` allows it;
    otherwise stop. Never more than ``runtime.max_restarts`` times."""
    rt = cfg.run.runtime
    if restarts >= rt.max_restarts:
        return Decision("stop", f"{error}; runtime.max_restarts={rt.max_restarts} reached")
    present = devices_in_cluster()
    missing = sorted({d for d in plan.devices if d not in present})
    if not missing:
        return Decision("restart", f"{error}; every device of the plan is still in the cluster", plan)
    if not rt.replan_on_failure:
        return Decision(
            "stop",
            f"{error}; device(s) {', '.join(missing)} left the cluster "
            "(set runtime.replan_on_failure: true to continue on the others)",
        )
    try:
        topo = cfg.topology.without(missing)
    except Exception as e:  # the data owner left: privacy forbids moving its stage
        return Decision("stop", f"{error}; without {', '.join(missing)} no plan is possible: {e}")
    reduced = LoadedConfig(cfg.run, topo, cfg.source, cfg.base_dir)
    partitioner = cfg.run.plan.partitioner
    if partitioner == "manual":
        partitioner = "optimal"  # manual cuts name the lost device
    req = plan_request(reduced)
    req.devices = [d for d in (req.devices or []) if d not in missing] or None
    req.cuts = None
    try:
        new = make_plan(reduced, partitioner, req)
    except UserError as e:
        return Decision("stop", f"{error}; no feasible plan without {', '.join(missing)}: {e}")
    return Decision(
        "replan",
        f"{error}; device(s) {', '.join(missing)} left the cluster: re-planned with {partitioner} on "
        f"{', '.join(dict.fromkeys(new.devices))}",
        new,
    )


def train(cfg: LoadedConfig, progress: str | None = None, resume: str | bool | None = None) -> RunResult:
    """Plan, place, train and record; survive lost workers and devices as configured."""
    run = cfg.run
    import_adapter_module(run.model.adapter_module)
    plan = make_plan(cfg)
    print(plan.table(), flush=True)
    run_dir = find_resume_dir(cfg, resume) if resume else None
    handle = connect(cfg.topology, run.ray.address, run.ray.num_cpus)
    group = None
    try:
        group = _start_group(cfg, plan, attempt=0)  # user errors surface here, before any file
        if run_dir is None:
            run_dir = _new_run_dir(cfg)
            ckpt.atomic_write(run_dir / "config.yaml", cfg.to_yaml())
        print(f"run directory: {run_dir}", flush=True)
        ckpt.atomic_write(run_dir / "plan.yaml", plan.to_yaml())
        result = RunResult(run_dir=run_dir, plan=plan)
        result.events_path = run_dir / "events.jsonl"
        step = _restore(group, result, resumed=bool(resume))
        bar_mode = progress or run.runtime.progress
        t_start = time.perf_counter()
        attempt = 0
        while True:
            try:
                _train_loop(cfg, group, result, bar_mode, start=step, attempt=attempt)
                break
            except StageFailed as e:
                t_fail = time.perf_counter()
                failed_at = result.current_step
                group.shutdown()
                group = None
                decision = decide_on_failure(cfg, result.plan, e, result.restarts)
                result.event(decision.action, decision.reason, step=failed_at)
                log.warning("%s: %s", decision.action, decision.reason)
                if decision.action == "stop":
                    raise
                result.restarts += 1
                attempt += 1
                if decision.action == "replan":
                    result.replans += 1
                    result.plan = decision.plan
                    print(result.plan.table(), flush=True)
                    ckpt.atomic_write(run_dir / "plan.yaml", result.plan.to_yaml())
                group = _start_group(cfg, result.plan, attempt=attempt)
                step = _restore(group, result, resumed=True)
                result.steps_redone += max(0, failed_at - step)
                result.time_lost_s += time.perf_counter() - t_fail + result.since_checkpoint_s
        if run.runtime.checkpoint and result.last_checkpoint_step != run.train.steps:
            _save_checkpoint(cfg, group, result, run.train.steps)
        exported = None
        if finetune.needs_export(run, result.plan):  # adapters in peft's format; the merged model
            exported = finetune.export_model(run, group, result.plan, run_dir)
        _summarise(cfg, result, time.perf_counter() - t_start)
        if exported:
            result.summary["exported"] = exported
        ckpt.atomic_write(run_dir / "summary.json", json.dumps(result.summary, indent=2))
        return result
    finally:
        if group is not None:
            group.shutdown()
        handle.shutdown()


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


def _start_group(cfg: LoadedConfig, plan: Plan, attempt: int) -> StageGroup:
    run = cfg.run
    check_devices(cfg.topology, plan.devices)
    name = f"{run.runtime.run_name or run.name}:a{attempt}"
    group = StageGroup(
        plan,
        cfg.topology,
        cfg.resolved_dict(),
        str(cfg.base_dir.resolve()),
        run.runtime.timeout_s,
        run.runtime.placement_timeout_s,
        name=name,
    )
    # an offloaded stage may build DeepSpeed's CPU Adam on first use: minutes, once per node
    build_s = 600.0 if any(s.offload != "none" for s in plan.stages) else 0.0
    try:
        infos = group.start(prepare_timeout_s=max(run.runtime.timeout_s, 120.0) + build_s)
    except BaseException:
        group.shutdown()
        raise
    for info in infos:
        log.info(
            "stage %(stage)d on %(device)s: %(params)d params, node %(node)s, pid %(pid)d, %(threads)d threads", info
        )
    return group


def _restore(group: StageGroup, result: RunResult, resumed: bool) -> int:
    """Load the newest whole checkpoint into the workers, falling back past broken ones;
    return the step to continue from (0 without a checkpoint: the seed's initial model)."""
    skip: set[Path] = set()
    while True:
        ck = ckpt.latest(result.run_dir, skip, on_skip=lambda d, e: result.event("checkpoint_skipped", str(e), -1))
        if ck is None:
            if resumed:
                result.event("resume", "no whole checkpoint: starting from step 0 with the seed's initial model", 0)
            result.truncate(0)
            return 0
        try:  # every stage checks before any loads: a checkpoint is taken whole or not at all
            group.check_checkpoint(str(ck.path), ck.files)
        except ckpt.CheckpointError as e:
            log.warning("checkpoint skipped: %s; falling back to the previous one", e)
            result.event("checkpoint_skipped", str(e), ck.step)
            skip.add(ck.path)
            continue
        group.load_checkpoint(str(ck.path), ck.files)
        if resumed:
            result.event("resume", f"continuing from {ck.path.name} (step {ck.step})", ck.step)
        result.truncate(ck.step)
        result.last_checkpoint_step = ck.step
        return ck.step


def _train_loop(
    cfg: LoadedConfig, group: StageGroup, result: RunResult, progress: str, start: int, attempt: int
) -> None:
    run = cfg.run
    every = run.checkpoint.every_steps
    bar = Progress(run.train.steps, progress, run.runtime.log_every, initial=start)
    result.since_checkpoint_s = 0.0
    with open(result.run_dir / "metrics.jsonl", "a", encoding="utf-8") as metrics:
        try:
            for step in range(start, run.train.steps):
                result.current_step = step
                t0 = time.perf_counter()
                stages = group.step(step)
                dt = time.perf_counter() - t0
                result.since_checkpoint_s += dt
                rec = {
                    "step": step,
                    "loss": sum(s["loss"] for s in stages if s["loss"] is not None),  # loss-stage replicas' shares
                    "grad_norm": stages[0]["grad_norm"],
                    "step_s": dt,
                    "tokens_per_s": stages[0]["tokens"] / dt,
                    "attempt": attempt,
                    "stages": [{k: s[k] for k in STAGE_METRICS if k in s} for s in stages],
                    "bytes_sent": {k: v for s in stages for k, v in s["bytes_sent"].items()},
                }
                if any("peak_bytes" in s for s in stages):
                    rec["peak_bytes"] = [s.get("peak_bytes") for s in stages]
                metrics.write(json.dumps(rec) + "\n")
                metrics.flush()
                result.record(rec)
                bar.update(rec)
                done = step + 1
                if run.runtime.checkpoint and every and done % every == 0 and done < run.train.steps:
                    _save_checkpoint(cfg, group, result, done)
        finally:
            bar.close()


def _summarise(cfg: LoadedConfig, result: RunResult, wall_s: float) -> None:
    times = result.step_times
    losses = result.losses
    result.summary = {
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
        result.summary["measured_step_ms"] = statistics.median(times) * 1e3
    first = result.summary["first_loss"]
    final = result.summary["final_loss"]
    print(
        f"done: {result.summary['steps']} steps, loss {first:.4f} -> {final:.4f}, "
        f"median step {result.summary['median_step_s']:.3f} s, {result.summary['median_tokens_per_s']:.0f} tokens/s"
        if times
        else f"done: {result.summary['steps']} steps (nothing left to run)",
        flush=True,
    )
    if result.restarts:
        print(
            f"survived {result.restarts} failure(s) ({result.replans} re-plan(s)): {result.steps_redone} step(s) "
            f"redone, {result.time_lost_s:.1f} s lost; see events.jsonl",
            flush=True,
        )
    pred = result.summary.get("simulated_step_ms")
    if pred and times:
        print(
            f"step time: measured {result.summary['measured_step_ms']:.1f} ms (median), "
            f"predicted {pred:.1f} ms by the simulator for this plan and schedule "
            f"(costs {'measured by plan.profile' if cfg.run.plan.profile else 'counted, FLOPs over device tflops'})",
            flush=True,
        )
        replayed = replay(result.plan, result.stage_metrics)
        if replayed is not None:
            replayed, free = replayed
            result.summary["replayed_step_ms"] = replayed
            result.summary["replayed_free_links_step_ms"] = free
            where = "as emulated" if cfg.run.runtime.emulate_links else "as planned"
            print(
                f"replayed with the compute this run measured: {replayed:.1f} ms on the links {where}, "
                f"{free:.1f} ms on free links",
                flush=True,
            )


def _save_checkpoint(cfg: LoadedConfig, group: StageGroup, result: RunResult, step: int) -> None:
    """Every stage writes its files; the manifest, written last, makes the checkpoint whole."""
    directory = ckpt.step_dir(result.run_dir, step)
    directory.mkdir(parents=True, exist_ok=True)
    shards = group.save_checkpoint(str(directory))
    fault = os.environ.get("SPLITLEARN_FAULT", "")
    if fault == f"kill-before-manifest:{step}":  # fault injection for the crash-consistency test
        os.kill(os.getpid(), signal.SIGKILL)
    ckpt.write_manifest(directory, step, shards, {"plan": result.plan.to_dict(), "seed": cfg.run.train.seed})
    ckpt.prune(result.run_dir, cfg.run.checkpoint.keep)
    result.last_checkpoint_step = step
    result.since_checkpoint_s = 0.0
