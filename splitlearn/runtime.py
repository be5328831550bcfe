"""The driver's side of the workers: place one actor per stage, bring them up, step them.

Every wait is bounded: ``ray.get`` always has a timeout, and a failed or dead worker turns
into one error that names its stage and device.
"""

from __future__ import annotations

import logging
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


def worker_env(run: dict[str, Any]) -> dict[str, str]:
    """Environment of a stage worker's process: glibc's malloc told to map allocations of
    ``runtime.malloc_mmap_threshold_kb`` and up on their own and to trim freed memory, so the
    resident set (what a CPU stage's budget is checked against) is what is alive."""
    kb = int(run.get("runtime", {}).get("malloc_mmap_threshold_kb", 0) or 0)
    if not kb:
        return {}
    return {"MALLOC_MMAP_THRESHOLD_": str(kb * 1024), "MALLOC_TRIM_THRESHOLD_": str(kb * 1024)}


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

    def _get(self, refs, what: str, timeout: float | None = None):
        """Results of ``refs`` (one per actor, or one), failing as soon as any one fails:
        a dead worker or a worker's error is reported at once, naming its stage, not after
        the others have timed out waiting for it."""
        import ray

        single = not isinstance(refs, list)
        ref_list = [refs] if single else list(refs)
        index = {ref: i for i, ref in enumerate(ref_list)}
        timeout = timeout or self.timeout_s
        deadline = time.monotonic() + timeout
        pending = list(ref_list)
        while pending:
            left = deadline - time.monotonic()
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(left, 0))
            if not ready:
                raise StageFailed(-1, "?", -1, what, f"no answer within {timeout:g} s (runtime.timeout_s)")
            ref = ready[0]
            i = index[ref] if not single else -1
            try:
                ray.get(ref, timeout=10)
            except ray.exceptions.RayActorError as e:
                stage, replica = self.ranks[i] if i >= 0 else (-1, 0)
                dev = self.plan.stages[stage].devices[replica] if i >= 0 else "?"
                raise StageFailed(stage, dev, -1, what, f"worker died: {str(e).strip().splitlines()[0]}") from e
            except ray.exceptions.RayTaskError as e:
                inner = _unwrap(e)
                if inner is not e:
                    raise inner from None
                raise
        out = ray.get(ref_list, timeout=10)
        return out[0] if single else out

    def start(self, prepare_timeout_s: float) -> list[dict[str, Any]]:
        """Build the segments (user errors surface here), then join the process group."""
        infos = self._get([a.prepare.remote() for a in self.actors], "prepare", prepare_timeout_s)
        self.infos: list[dict[str, Any]] = infos
        addr, port = self._get(self.actors[0].rendezvous_address.remote(), "rendezvous")
        self._get([a.init_dist.remote(addr, port) for a in self.actors], "init_dist")
        return infos

    def step(self, step: int) -> list[dict[str, Any]]:
        """One call per worker per step. The driver waits a little longer than a worker's own
        transfer timeout, so that a worker's error, which names its action, arrives first."""
        try:
            refs = [a.run_step.remote(step) for a in self.actors]
            return self._get(refs, f"step {step}", self.timeout_s * 1.5 + 10)
        except StageFailed as e:
            if e.step < 0:
                raise StageFailed(e.stage, e.device, step, e.action, e.cause) from e.__cause__
            raise

    def save_checkpoint(self, directory: str) -> list[dict[str, Any]]:
        return self._get([a.save_checkpoint.remote(directory) for a in self.actors], "save_checkpoint")

    def check_checkpoint(self, directory: str, files: list[str]) -> None:
        """Every stage can load this checkpoint (names, shapes); nothing is changed."""
        self._get([a.check_checkpoint.remote(directory, files) for a in self.actors], "check_checkpoint")

    def load_checkpoint(self, directory: str, files: list[str]) -> None:
        self._get([a.load_checkpoint.remote(directory, files) for a in self.actors], "load_checkpoint")

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

        try:
            ray.get([a.close.remote() for a in self.actors], timeout=10)
        except Exception:  # a dead or stuck worker is killed below
            pass
        for a in self.actors:
            ray.kill(a, no_restart=True)
        remove_placement_group(self.pg)
