"""The failure policy: what to do when a stage fails, as a value. :func:`splitlearn.trainer.train`
carries the decision out, logs it and records it in the run directory's ``events.jsonl``.

A split-federated client (a replica of stage 0) that dies or stops answering is dropped
instead: the other clients redo the steps since the last checkpoint (the round's start when
``checkpoint.every_steps`` equals ``federation.rounds_every``) without it, and the client
rejoins at a later round's end, when its device is in the cluster, with the averaged front."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from cluster.ray_cluster import devices_in_cluster
from partitioners import Plan
from splitlearn import federation
from splitlearn.config import LoadedConfig
from splitlearn.errors import StageFailed, UserError
from splitlearn.planning import make_plan, plan_request


class Recovery(enum.Enum):
    """What to do after a failure; the value is what ``events.jsonl`` records as the kind."""

    RESTART = "restart"  # the same plan on the same devices, from the last checkpoint
    REPLAN = "replan"  # a new plan on the devices that remain, from the last checkpoint
    STOP = "stop"  # give up: the failure is raised
    DROP = "client_dropped"  # a federated client lost: the others redo the round, it rejoins later


@dataclass
class Decision:
    """What the failure policy decided, and why. ``plan``: the plan to continue on (the same
    one for a restart, the new one for a re-plan; None to stop)."""

    action: Recovery
    reason: str
    plan: Plan | None = None
    client: str | None = None  # the client a drop leaves out


def decide_on_failure(
    cfg: LoadedConfig, plan: Plan, error: Exception, restarts: int, clients: list[str] | None = None
) -> Decision:
    """Restart on the same devices when they are all still in the cluster; re-plan on the
    devices that remain when one is gone and ``runtime.replan_on_failure`` allows it;
    otherwise stop. Never more than ``runtime.max_restarts`` times. A federated client's
    failure drops that client while another one remains (not counted as a restart: each
    drop leaves one client fewer until the next round's end). ``clients``: the federated
    clients taking part now (default: the plan's)."""
    rt = cfg.run.runtime
    if isinstance(error, StageFailed) and federation.enabled(cfg.run) and error.stage == 0:
        clients = plan.stages[0].devices if clients is None else clients
        if error.device in clients and len(clients) > 1:
            others = [c for c in clients if c != error.device]
            return Decision(
                Recovery.DROP,
                f"client {error.device} dropped: {error}; {', '.join(others)} redo the round from the last "
                f"checkpoint without it; {error.device} rejoins at a later round's end with the averaged front",
                plan,
                client=error.device,
            )
    if restarts >= rt.max_restarts:
        return Decision(Recovery.STOP, f"{error}; runtime.max_restarts={rt.max_restarts} reached")
    present = devices_in_cluster()
    missing = sorted({d for d in plan.devices if d not in present})
    if not missing:
        return Decision(Recovery.RESTART, f"{error}; every device of the plan is still in the cluster", plan)
    if not rt.replan_on_failure:
        return Decision(
            Recovery.STOP,
            f"{error}; device(s) {', '.join(missing)} left the cluster "
            "(set runtime.replan_on_failure: true to continue on the others)",
        )
    return _replan(cfg, error, missing)


def _replan(cfg: LoadedConfig, error: Exception, missing: list[str]) -> Decision:
    """A plan on the devices that remain without ``missing``, or stop when there is none."""
    try:
        topo = cfg.topology.without(missing)
    except Exception as e:  # the data owner left: privacy forbids moving its stage
        return Decision(Recovery.STOP, f"{error}; without {', '.join(missing)} no plan is possible: {e}")
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
        return Decision(Recovery.STOP, f"{error}; no feasible plan without {', '.join(missing)}: {e}")
    return Decision(
        Recovery.REPLAN,
        f"{error}; device(s) {', '.join(missing)} left the cluster: re-planned with {partitioner} on "
        f"{', '.join(dict.fromkeys(new.devices))}",
        new,
    )
