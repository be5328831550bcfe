"""``splitlearn train``: load → plan → place → run → record. Detail lives one level down:
the plan in :mod:`splitlearn.planning`, the record in :mod:`splitlearn.run_record`, the
checkpoints in :mod:`splitlearn.run_checkpoints`, the failure policy in
:mod:`splitlearn.failure`, the terminal in :mod:`splitlearn.console`.

The run directory is created only once every stage is placed and has built its segment,
so bad input leaves nothing half-written.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

from cluster.ray_cluster import check_devices, connect, devices_in_cluster
from partitioners import Plan
from splitlearn import console, federation, logs, method_policy, run_checkpoints
from splitlearn.config import ON_CLUSTER, LoadedConfig
from splitlearn.curves import make_logger, step_scalars
from splitlearn.errors import StageFailed
from splitlearn.failure import Decision, Recovery, decide_on_failure
from splitlearn.fsio import atomic_write
from splitlearn.models.build import import_adapter_module
from splitlearn.models.check import require_exact
from splitlearn.optim import lr_at
from splitlearn.planning import check_data, make_plan
from splitlearn.run_record import RunResult, find_resume_dir, new_run_dir, step_record, summary
from splitlearn.runtime import StageGroup

log = logging.getLogger("splitlearn")


def train(cfg: LoadedConfig, progress: str | None = None, resume: str | bool | None = None) -> RunResult:
    """Plan, place, train and record; survive lost workers and devices as configured."""
    run = cfg.run
    import_adapter_module(run.model.adapter_module)
    run_dir = find_resume_dir(cfg, resume) if resume else None
    address = run.ray.address or os.environ.get("RAY_ADDRESS") or None
    check_data(cfg, embedded=address is None)  # here the driver reads the owner's very file
    require_exact(run.model)  # a tiny copy split vs unsplit: a wrong family adapter stops here
    # devices that time the layers themselves (plan.profile: on_cluster) need the cluster first
    on_cluster = run.plan.profile == ON_CLUSTER
    early = (
        connect(cfg.topology, address, run.ray.num_cpus, timeout_s=run.ray.connect_timeout_s) if on_cluster else None
    )
    logs.route_worker_output()  # the workers' warnings to the run's log, not the screen
    try:
        plan = make_plan(cfg)
    except BaseException:
        if early is not None:
            early.shutdown()
        raise
    console.show_plan(plan)
    handle = early or connect(cfg.topology, address, run.ray.num_cpus, timeout_s=run.ray.connect_timeout_s)
    logs.route_worker_output()
    group: StageGroup | None = None
    try:
        group = _start_group(cfg, plan, attempt=0)  # user errors surface here, before any file
        result = _open_run(cfg, plan, run_dir)
        step = run_checkpoints.restore(group, result, resumed=bool(resume))
        bar_mode = progress or run.runtime.progress
        t_start = time.perf_counter()
        roster = Roster(cfg)  # the federated clients taking part now (all of them: every other run)
        while True:
            try:
                if group is None:  # a client dropped or back: the clients taking part now, from the checkpoint
                    group, step = roster.regroup(result)
                until = roster.until(step)
                _train_loop(roster.cfg, group, result, bar_mode, start=step, until=until)
                if until == run.train.steps:
                    break
                if roster.rejoin(group, result, until):
                    group.shutdown()
                    group = None
                step = until
            except StageFailed as e:
                failed_at = e.step if e.step >= 0 else result.current_step
                if group is not None:
                    group.shutdown()
                group = None
                # a client is dropped only when the federation made progress since the last drop:
                # a failure that comes back at once is the policy's to restart or stop (bounded)
                clients = federation.clients(roster.cfg.run) if roster.progressed(result) else []
                decision = decide_on_failure(cfg, result.plan, e, result.restarts, clients)
                result.event(decision.action.value, decision.reason, step=failed_at)
                log.warning("%s: %s", decision.action.value, decision.reason)
                if decision.action is Recovery.STOP:
                    raise
                if decision.action is Recovery.DROP:
                    assert decision.client is not None
                    roster.drop(decision.client)  # the workers without it: placed at the loop's top
                else:
                    roster.reset()
                    group, step = _carry_out(cfg, result, decision)  # counts the steps to redo
                # lost: the work since the last checkpoint, the wait that found the failure, the restart
                result.time_lost_s += time.perf_counter() - result.progress_mark
        _finish(roster.cfg, group, result, t_start)
        return result
    finally:
        if group is not None:
            group.shutdown()
        handle.shutdown()


class Roster:
    """Which of a split-federated run's clients take part now. A dropped client is left out
    (:func:`splitlearn.federation.without_clients`) until the end of a round at which its
    device is in the cluster again; then the whole federation is placed again and loads that
    round's checkpoint: the client rejoins with the averaged front."""

    def __init__(self, cfg: LoadedConfig):
        self.full, self.cfg = cfg, cfg
        self.absent: list[str] = []
        self.groups = 0  # worker groups started after the first: their actors' names
        self.dropped_at: int | None = None  # the step the last drop's group continued from
        self._dropping = False

    def plan(self, full: Plan) -> Plan:
        """The plan the clients taking part now run (``full``: the whole federation's)."""
        return federation.plan_without(full, self.full.run, self.absent)

    def until(self, step: int) -> int:
        """Where the loop stops next: the end of the round of ``step`` while a client is
        absent (to let it rejoin), else the run's end."""
        steps = self.full.run.train.steps
        if not self.absent:
            return steps
        every = self.full.run.federation.rounds_every
        return min(steps, (step // every + 1) * every)

    def progressed(self, result: RunResult) -> bool:
        """Whether a step was done since the last drop's group started (always before one)."""
        return self.dropped_at is None or (result.steps_done or 0) > self.dropped_at

    def drop(self, client: str) -> None:
        self._dropping = True
        self.absent.append(client)
        self.cfg = federation.without_clients(self.full, self.absent)

    def reset(self) -> None:
        """A restart places every client again (the policy's other decisions)."""
        self.absent, self.cfg = [], self.full

    def rejoin(self, group: StageGroup, result: RunResult, done: int) -> bool:
        """At a round's end: whether an absent client's device is back (then this round's
        checkpoint is written, for the whole federation to load)."""
        present = devices_in_cluster()
        back = [c for c in self.absent if c in present]
        if not back:
            return False
        if result.last_checkpoint_step != done:
            run_checkpoints.save(self.cfg, group, result, done)
        for c in back:
            self.absent.remove(c)
            result.event("client_rejoined", f"client {c} rejoins at step {done} with the averaged front", done)
            log.warning("client %s rejoins at step %d with the averaged front", c, done)
        self.cfg = federation.without_clients(self.full, self.absent)
        return True

    def regroup(self, result: RunResult) -> tuple[StageGroup, int]:
        """The workers of the clients taking part now and the shared stages, loaded from the
        last checkpoint; the step to continue from."""
        self.groups += 1
        group = _start_group(self.cfg, self.plan(result.plan), attempt=result.restarts, tag=f"g{self.groups}")
        try:
            step = run_checkpoints.restore(group, result, resumed=True)
        except BaseException:
            group.shutdown()
            raise
        if self._dropping:
            self.dropped_at, self._dropping = step, False
        return group, step


def _open_run(cfg: LoadedConfig, plan: Plan, run_dir: Path | None) -> RunResult:
    """The run directory (a new one with the config, unless resuming) with the plan in it."""
    if run_dir is None:
        run_dir = new_run_dir(cfg)
        atomic_write(run_dir / "config.yaml", cfg.to_yaml())
        # what `splitlearn export` places the workers with again: topology inline, paths' base
        record = {"run": cfg.resolved_dict(), "base_dir": str(cfg.base_dir.resolve())}
        atomic_write(run_dir / "run.json", json.dumps(record, indent=2))
    logs.attach_run_log(run_dir)
    console.show_run_dir(run_dir)
    atomic_write(run_dir / "plan.yaml", plan.to_yaml())
    return RunResult(run_dir=run_dir, plan=plan, events_path=run_dir / "events.jsonl")


def _start_group(cfg: LoadedConfig, plan: Plan, attempt: int, tag: str = "") -> StageGroup:
    """One worker per stage, placed on its device, each with its segment built. ``tag``:
    told apart from the attempt's other groups (a federation without a dropped client)."""
    run = cfg.run
    check_devices(cfg.topology, plan.devices)
    name = f"{run.runtime.run_name or run.name}:a{attempt}{tag}"
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
            "stage %(stage)d on %(device)s: %(params)d params, node %(node)s, pid %(pid)d, %(threads)d threads; "
            "built in %(load_s).1f s, %(segment_bytes)d bytes, peak %(load_peak_rss_bytes)d bytes above the runtime",
            info,
        )
    return group


def _carry_out(cfg: LoadedConfig, result: RunResult, decision: Decision) -> tuple[StageGroup, int]:
    """Restart, on the decision's new plan for a re-plan, from the last whole checkpoint;
    return the new workers and the step to continue from."""
    result.restarts += 1
    if decision.action is Recovery.REPLAN:
        assert decision.plan is not None  # a re-plan carries its plan
        result.replans += 1
        result.plan = decision.plan
        console.show_plan(result.plan)
        atomic_write(result.run_dir / "plan.yaml", result.plan.to_yaml())
    group = _start_group(cfg, result.plan, attempt=result.restarts)
    return group, run_checkpoints.restore(group, result, resumed=True)


def _train_loop(
    cfg: LoadedConfig, group: StageGroup, result: RunResult, progress: str, start: int, until: int | None = None
) -> None:
    """Steps ``start`` to ``until`` (the end), one call per worker per step, recorded as they
    finish; checkpoints every ``checkpoint.every_steps``. The attempt is the restarts so far;
    a federated step records the clients that took part."""
    run = cfg.run
    every = run.checkpoint.every_steps
    bar = console.Progress(run.train.steps, progress, run.runtime.log_every, initial=start)
    result.progress_mark = time.perf_counter()
    curves = make_logger(run.runtime.logger, result.run_dir)
    with open(result.run_dir / "metrics.jsonl", "a", encoding="utf-8") as metrics:
        try:
            for step in range(start, run.train.steps if until is None else until):
                result.current_step = step
                t0 = time.perf_counter()
                stages = group.step(step)
                dt = time.perf_counter() - t0
                rec = step_record(step, stages, dt, attempt=result.restarts)
                if federation.enabled(run):
                    rec["clients"] = federation.clients(run)
                if _eval_due(cfg, group, step + 1):
                    rec.update(_evaluate(cfg, group))
                curves.log(step + 1, step_scalars(rec, lr_at(step, run.train)))
                metrics.write(json.dumps(rec) + "\n")
                metrics.flush()
                result.record(rec)
                result.steps_done = step + 1
                bar.update(rec)
                done = step + 1
                if run.runtime.checkpoint and every and done % every == 0 and done < run.train.steps:
                    run_checkpoints.save(cfg, group, result, done)
        finally:
            bar.close()
            curves.close()


def _eval_rows(group: StageGroup) -> int:
    return int(group.infos[0].get("eval_rows", 0))


def _eval_due(cfg: LoadedConfig, group: StageGroup, done: int) -> bool:
    """An eval after step ``done`` (1-based): every ``train.eval_every`` steps and after the last."""
    every = cfg.run.train.eval_every
    return _eval_rows(group) > 0 and (done == cfg.run.train.steps or bool(every and done % every == 0))


def _evaluate(cfg: LoadedConfig, group: StageGroup) -> dict[str, float]:
    """Forward-only eval of every eval row through the pipeline: the mean loss per label token."""
    rows = cfg.run.train.batch_size // cfg.run.train.micro_batches
    res = group.evaluate(math.ceil(_eval_rows(group) / rows))
    loss = res["loss_sum"] / res["tokens"] if res["tokens"] else float("nan")
    log.info("eval loss %.4f (perplexity %.2f) over %d tokens", loss, math.exp(min(loss, 50.0)), res["tokens"])
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)), "eval_tokens": res["tokens"]}


def _finish(cfg: LoadedConfig, group: StageGroup, result: RunResult, t_start: float) -> None:
    """The last checkpoint, the exported model, the summary on the terminal and on disk."""
    run = cfg.run
    if run.runtime.checkpoint and result.last_checkpoint_step != run.train.steps:
        run_checkpoints.save(cfg, group, result, run.train.steps)
    exported = None
    if method_policy.needs_export(run, result.plan):  # adapters in peft's format; the merged model
        exported = method_policy.export_model(run, group, result.plan, result.run_dir)
    result.summary = summary(result, time.perf_counter() - t_start)
    console.show_summary(cfg, result)
    if exported:
        result.summary["exported"] = exported
    result.summary["workers"] = group.infos  # each worker's build: params, load time and memory
    atomic_write(result.run_dir / "summary.json", json.dumps(result.summary, indent=2))
