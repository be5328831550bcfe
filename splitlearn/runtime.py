"""The driver's side of the workers: place one actor per stage, bring them up, step them.

Every wait is bounded: ``ray.get`` always has a timeout, and a failed or dead worker turns
into one error that names its stage and device.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Any

from cluster.errors import UserError
from cluster.ray_cluster import actor_options, place_stages
from cluster.topology import Topology
from partitioners.plan import Plan
from splitlearn.errors import StageFailed
from splitlearn.stage import StageWorker

log = logging.getLogger(__name__)
ACTOR_NAMESPACE = "splitlearn"


def _unwrap(e: Exception) -> Exception:
    """The user's error inside a Ray task error, if there is one."""
    cause = getattr(e, "cause", None)
    while cause is not None:
        if isinstance(cause, (UserError, StageFailed)):
            return cause
        cause = getattr(cause, "cause", None) or cause.__cause__
    return e


# the variables :func:`worker_env` may set (what a process reads back to know it runs as a worker)
WORKER_ENV_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX", "THP_MEM_ALLOC_ENABLE")


def worker_env(run: dict[str, Any]) -> dict[str, str]:
    """Environment of a stage worker's process: its glibc malloc settings. With
    ``runtime.malloc_mmap_threshold_kb`` set, allocations of that size and up are mapped on
    their own and freed memory is trimmed, so the resident set (what a CPU stage's budget is
    checked against) is what is alive; ``runtime.malloc_arena_max`` caps the arenas, so a
    buffer one thread frees (a received activation) serves the next allocation of any other;
    ``runtime.huge_pages`` has torch back tensors of 2 MB and up with transparent huge pages
    (where the kernel's THP mode is ``madvise`` or ``always``), so a fresh tensor faults in
    2 MB at a time."""
    rt = run.get("runtime", {})
    env = {}
    kb = int(rt.get("malloc_mmap_threshold_kb", 0) or 0)
    if kb:
        env.update({"MALLOC_MMAP_THRESHOLD_": str(kb * 1024), "MALLOC_TRIM_THRESHOLD_": str(kb * 1024)})
    arenas = int(rt.get("malloc_arena_max", 0) or 0)
    if arenas:
        env["MALLOC_ARENA_MAX"] = str(arenas)
    if rt.get("huge_pages", False):
        env["THP_MEM_ALLOC_ENABLE"] = "1"
    return env


class StageGroup:
    """The workers of one plan, as Ray actors placed on their devices."""

    def __init__(
        self,
        plan: Plan,
        topology: Topology,
        run: dict[str, Any],
        base_dir: str,
        timeout_s: float,
        placement_timeout_s: float,
        name: str | None = None,
    ):
        """``name``: actors are named ``{name}:stage{i}`` (``{name}:stage{i}.{r}`` for replica
        r > 0) in the ``splitlearn`` namespace, so an operator (or a test) can find a stage's
        worker with ``ray.get_actor``. One actor per stage replica, in rank order."""
        import ray

        self.plan, self.topology, self.timeout_s = plan, topology, timeout_s
        self.pg = place_stages(topology, plan.devices, placement_timeout_s)
        self.unresponsive: list[int] = []  # actors found silent after a failure (killed at once)
        self.dead: list[int] = []  # actors found dead after a failure
        self.infos: list[dict[str, Any]] = []  # each worker's prepare() info (its pid, its node)
        remote_cls: Any = ray.remote(StageWorker)
        self.actors: list[Any] = []
        self.ranks: list[tuple[int, int]] = []  # (stage, replica) of each actor
        for s in plan.stages:
            for r, device in enumerate(s.devices):
                bundle = len(self.actors)
                opts = actor_options(
                    topology, device, self.pg, bundle, 1.0 / plan.devices.count(device), worker_env(run)
                )
                if name:
                    suffix = f".{r}" if r else ""
                    opts.update(name=f"{name}:stage{s.index}{suffix}", namespace=ACTOR_NAMESPACE)
                self.actors.append(remote_cls.options(**opts).remote(s.index, run, plan.to_dict(), base_dir, r))
                self.ranks.append((s.index, r))

    def _get(self, refs, what: str, timeout: float | None = None, step: int = -1):
        """Results of ``refs`` (one per actor, or actor 0's one), failing as soon as any one
        fails: a dead worker or a worker's error is reported at once, naming its stage, not
        after the others have timed out waiting for it. When something failed, every worker
        is asked whether it still answers (:meth:`silent`): a stopped or hung one is named,
        not the peer that timed out waiting for it."""
        import ray

        single = not isinstance(refs, list)
        ref_list = [refs] if single else list(refs)
        try:
            self._wait(ref_list, what, timeout or self.timeout_s, step)
        except (StageFailed, ray.exceptions.RayTaskError) as e:
            stopped = self._name_silent(what, step, e)
            if stopped is not None:
                raise stopped from e
            raise
        out = ray.get(ref_list, timeout=10)
        return out[0] if single else out

    def _where(self, i: int) -> tuple[int, str]:
        """Stage and device of actor ``i``."""
        stage, replica = self.ranks[i]
        return stage, self.plan.stages[stage].devices[replica]

    def _wait(self, ref_list: list[Any], what: str, timeout: float, step: int) -> None:
        """Wait for every ref (ref i is actor i's call); raise the first failure, named."""
        import ray

        index = {ref: i for i, ref in enumerate(ref_list)}
        deadline = time.monotonic() + timeout
        pending = list(ref_list)
        while pending:
            left = deadline - time.monotonic()
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(left, 0))
            if not ready:
                stage, dev = self._where(index[pending[0]])
                raise StageFailed(stage, dev, step, what, f"no answer within {timeout:g} s (runtime.timeout_s)")
            ref = ready[0]
            try:
                ray.get(ref, timeout=10)
            except ray.exceptions.RayActorError as e:
                stage, dev = self._where(index[ref])
                raise StageFailed(stage, dev, step, what, f"worker died: {str(e).strip().splitlines()[0]}") from e
            except ray.exceptions.RayTaskError as e:
                inner = _unwrap(e)
                if inner is not e:
                    raise inner from None
                raise

    def silent(self, timeout_s: float) -> list[int]:
        """The actors that do not answer a liveness call (``ping``) within ``timeout_s``. A
        worker busy with a step or waiting on a peer answers on its second concurrency slot;
        a stopped (SIGSTOP) or wedged process answers nothing. A dead one answers with its
        death (see :attr:`dead`), so it is not counted."""
        import ray

        refs = [a.ping.remote() for a in self.actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        answered = set(ready)
        self.dead = []
        for i, ref in enumerate(refs):
            if ref in answered:
                try:
                    ray.get(ref, timeout=1)
                except ray.exceptions.RayActorError:
                    self.dead.append(i)
        return [i for i, ref in enumerate(refs) if ref not in answered]

    def _name_silent(self, what: str, step: int, error: BaseException) -> StageFailed | None:
        """After ``error``: a StageFailed naming the first worker that died (when the error
        was a peer's, that saw the connection drop: a split-federated client is dropped only
        for its own failure) or stopped answering, or None when every worker answers (then
        ``error`` stands). The silent ones are remembered: :meth:`shutdown` kills them
        without waiting for them."""
        probe_s = min(max(self.timeout_s, 2.0), 10.0)
        self.unresponsive = self.silent(probe_s)
        seen = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if self.dead:
            stage, dev = self._where(self.dead[0])
            if isinstance(error, StageFailed) and (error.stage, error.device) == (stage, dev):
                return None  # the error is already the dead worker's own
            return StageFailed(stage, dev, step, what, f"worker died; seen first as: {seen}")
        if not self.unresponsive:
            return None
        stage, dev = self._where(self.unresponsive[0])
        log.warning("stage %d on %s does not answer; its peers saw: %s", stage, dev, seen)
        return StageFailed(
            stage,
            dev,
            step,
            what,
            f"stopped answering (no reply to a liveness call within {probe_s:g} s: the process is stopped or "
            f"hung); seen first as: {seen}",
        )

    def start(self, prepare_timeout_s: float) -> list[dict[str, Any]]:
        """Build the segments (user errors surface here), then join the process group."""
        infos = self._get([a.prepare.remote() for a in self.actors], "prepare", prepare_timeout_s)
        self.infos = infos
        addr, port = self._get(self.actors[0].rendezvous_address.remote(), "rendezvous")
        self._get([a.init_dist.remote(addr, port) for a in self.actors], "init_dist")
        return infos

    def step(self, step: int) -> list[dict[str, Any]]:
        """One call per worker per step. The driver waits a little longer than a worker's own
        transfer timeout, so that a worker's error, which names its action, arrives first."""
        refs = [a.run_step.remote(step) for a in self.actors]
        return self._get(refs, f"step {step}", self.timeout_s * 1.5 + 10, step)

    def save_checkpoint(self, directory: str, step: int = -1) -> list[dict[str, Any]]:
        """Every stage writes its files of the checkpoint after ``step`` steps."""
        refs = [a.save_checkpoint.remote(directory) for a in self.actors]
        return self._get(refs, "save_checkpoint", step=step)

    def check_checkpoint(self, directory: str, files: list[str], step: int = -1) -> None:
        """Every stage can load this checkpoint (names, shapes); nothing is changed."""
        refs = [a.check_checkpoint.remote(directory, files) for a in self.actors]
        self._get(refs, "check_checkpoint", step=step)

    def load_checkpoint(self, directory: str, files: list[str], step: int = -1) -> None:
        self._get([a.load_checkpoint.remote(directory, files) for a in self.actors], "load_checkpoint", step=step)

    def export(self, directory: str, merge: bool) -> list[dict[str, Any]]:
        """Each stage's LoRA adapters, and its merged shard written under ``directory``."""
        return self._first_replicas(self._get([a.export.remote(directory, merge) for a in self.actors], "export"))

    def evaluate(self, num_chunks: int) -> dict[str, Any]:
        """Forward-only eval through every stage; the loss stage's summed loss and tokens."""
        timeout = self.timeout_s * 1.5 + 10 + num_chunks
        results = self._get([a.run_eval.remote(num_chunks) for a in self.actors], "eval", timeout)
        return next(r for r in results if r["loss_sum"] is not None)

    def model_states(self) -> list[dict[str, Any]]:
        """Each stage's tensors of the fine-tuned model (LoRA merged), pulled through Ray from
        whichever node holds the stage."""
        return self._first_replicas(self._get([a.model_state.remote() for a in self.actors], "model_state"))

    def _first_replicas(self, results: list[Any]) -> list[Any]:
        """One result per stage: its first replica's (the replicas hold the same tensors)."""
        return [res for res, (_, r) in zip(results, self.ranks, strict=True) if r == 0]

    def gradients(self) -> list[dict[str, Any]]:
        return self._first_replicas(self._get([a.gradients.remote() for a in self.actors], "gradients"))

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        silent = set(self.unresponsive)
        closing = [a.close.remote() for i, a in enumerate(self.actors) if i not in silent]
        ray.wait(closing, num_returns=len(closing), timeout=10)  # a dead or stuck worker is killed below
        for i, a in enumerate(self.actors):
            if i in silent:
                self._kill_process(i)
            ray.kill(a, no_restart=True)  # Ray also ends a stopped process, after a grace period
        remove_placement_group(self.pg)

    def _kill_process(self, i: int) -> None:
        """SIGKILL actor ``i``'s process at once when it runs on this node (a stopped process
        handles no request, and Ray's kill waits a grace period first)."""
        import ray

        info = self.infos[i] if i < len(self.infos) else {}
        if not info.get("pid") or info.get("node") != ray.get_runtime_context().get_node_id():
            return
        try:
            os.kill(int(info["pid"]), signal.SIGKILL)
        except OSError:  # already gone
            pass
