"""The driver's side of a run's checkpoints: every stage writes its files, the driver makes the
checkpoint whole (its manifest) and loads the newest whole one back into the workers."""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

from splitlearn import checkpoint as ckpt
from splitlearn.config import LoadedConfig
from splitlearn.run_record import RunResult
from splitlearn.runtime import StageGroup

log = logging.getLogger("splitlearn")


def restore(group: StageGroup, result: RunResult, resumed: bool) -> int:
    """Load the newest whole checkpoint into the workers, falling back past broken ones;
    return the step to continue from (0 without a checkpoint: the seed's initial model)."""
    skip: set[Path] = set()
    while True:
        ck = ckpt.latest(result.run_dir, skip, on_skip=lambda d, e: result.event("checkpoint_skipped", str(e), -1))
        if ck is None:
            redo = _redone(result, 0)
            if resumed:
                result.event(
                    "resume", f"no whole checkpoint: starting from step 0 with the seed's initial model{redo}", 0
                )
            result.truncate(0)
            return 0
        try:  # every stage checks before any loads: a checkpoint is taken whole or not at all
            group.check_checkpoint(str(ck.path), ck.files, ck.step)
        except ckpt.CheckpointError as e:
            log.warning("checkpoint skipped: %s; falling back to the previous one", e)
            result.event("checkpoint_skipped", str(e), ck.step)
            skip.add(ck.path)
            continue
        group.load_checkpoint(str(ck.path), ck.files, ck.step)
        redo = _redone(result, ck.step)
        if resumed:
            result.event("resume", f"continuing from {ck.path.name} (step {ck.step}){redo}", ck.step)
        result.truncate(ck.step)
        result.last_checkpoint_step = ck.step
        return ck.step


def _redone(result: RunResult, step: int) -> str:
    """Count the steps done (recorded) after ``step`` as redone: this process's, or, on a
    resumed run, those ``metrics.jsonl`` holds. Returns them as words for the event."""
    done = result.steps_done if result.steps_done is not None else result.recorded_steps()
    redone = max(0, done - step)
    result.steps_redone += redone
    result.steps_done = step
    return f"; {redone} step(s) to redo" if redone else ""


def save(cfg: LoadedConfig, group: StageGroup, result: RunResult, step: int) -> None:
    """Every stage writes its files; the manifest, written last, makes the checkpoint whole."""
    directory = ckpt.step_dir(result.run_dir, step)
    directory.mkdir(parents=True, exist_ok=True)
    shards = group.save_checkpoint(str(directory), step)
    fault = os.environ.get("SPLITLEARN_FAULT", "")
    if fault == f"kill-before-manifest:{step}":  # fault injection for the crash-consistency test
        os.kill(os.getpid(), signal.SIGKILL)
    ckpt.write_manifest(directory, step, shards, {"plan": result.plan.to_dict(), "seed": cfg.run.train.seed})
    ckpt.prune(result.run_dir, cfg.run.checkpoint.keep)
    result.last_checkpoint_step = step
    result.progress_mark = time.perf_counter()  # a failure from now on loses only what follows
