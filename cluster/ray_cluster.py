"""Ray start/attach, the device check and the placement of one worker per stage.

The embedded default starts a local Ray instance whose one node carries the custom resource
``splitlearn/device:<name>`` of every device in the topology, so a whole topology is
rehearsed on one machine. With an address (argument or ``$RAY_ADDRESS``) it attaches to a
running cluster instead, where each node carries the resources of its own devices.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from cluster.errors import PlacementError
from cluster.topology import RESOURCE_PREFIX, Topology, device_resource

log = logging.getLogger(__name__)


@dataclass
class ClusterHandle:
    address: str | None  # None: the embedded local cluster
    started_here: bool  # whether this process started Ray (and so should stop it)
    temp_dir: str | None = None  # the embedded cluster's own Ray directory, removed at shutdown

    def shutdown(self) -> None:
        import ray

        if self.started_here and ray.is_initialized():
            ray.shutdown()
        if self.temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)


def wait_reachable(address: str, timeout_s: float) -> None:
    """Return once the Ray head at ``address`` (``host:port``, or ``ray://host:port``) accepts
    a TCP connection, or raise a PlacementError naming it after ``timeout_s``: Ray itself
    keeps retrying an unreachable head for minutes. ``auto``/``local`` are looked up by Ray."""
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        return  # "auto", "local" or a bare host: Ray resolves it and fails fast itself
    deadline = time.monotonic() + timeout_s
    last: OSError | None = None
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            why = last.strerror if last is not None and last.strerror else str(last or "no answer")
            raise PlacementError(
                f"ray.address: cannot reach the Ray cluster at '{address}' within ray.connect_timeout_s="
                f"{timeout_s:g} s ({why}); start it (`splitlearn node start --head`) or fix the address"
            )
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=min(left, 2.0)).close()
            return
        except OSError as e:  # refused while the head starts, or no route: retry until the deadline
            last = e
            time.sleep(min(0.2, max(left, 0)))


def connect(
    topology: Topology,
    address: str | None = None,
    num_cpus: int | None = None,
    env_vars: dict[str, str] | None = None,
    timeout_s: float = 20.0,
) -> ClusterHandle:
    """Attach to the cluster at ``address`` (or ``$RAY_ADDRESS``), failing within
    ``timeout_s`` when it cannot be reached, or start an embedded one that carries every
    device of ``topology`` (:func:`start_embedded`). Reuses a Ray session already initialised
    in this process (as tests and Ray jobs do)."""
    import ray

    if ray.is_initialized():
        return ClusterHandle(address=None, started_here=False)
    address = address or os.environ.get("RAY_ADDRESS") or None
    runtime_env = {"env_vars": env_vars} if env_vars else None
    if address:
        wait_reachable(address, timeout_s)
        try:
            ray.init(address=address, log_to_driver=True, runtime_env=runtime_env, configure_logging=False)
        except Exception as e:  # ConnectionError, TimeoutError, ValueError from Ray
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise PlacementError(f"ray.address: cannot attach to the Ray cluster at '{address}': {first}") from e
        return ClusterHandle(address=address, started_here=True)
    return start_embedded(topology, num_cpus, runtime_env)


def start_embedded(topology: Topology, num_cpus: int | None, runtime_env: dict[str, Any] | None) -> ClusterHandle:
    """A new Ray instance of this process only, next to any other Ray on the machine: never
    the one ``ray start`` left for ``ray.init()`` to find (``address="local"``), in its own
    temporary directory (sessions, sockets, logs), on ports Ray picks free."""
    import ray

    resources = {device_resource(d.name): 1.0 for d in topology.devices}
    gpus = sum(d.gpus for d in topology.devices)
    temp_dir = tempfile.mkdtemp(prefix="splitlearn-ray-", dir="/tmp" if os.path.isdir("/tmp") else None)
    try:
        ray.init(
            address="local",
            num_cpus=num_cpus or os.cpu_count() or 1,
            num_gpus=0 if gpus == 0 else None,
            resources=resources,
            include_dashboard=False,
            log_to_driver=True,
            runtime_env=runtime_env,
            configure_logging=False,
            _temp_dir=temp_dir,  # short (Ray's socket paths are limited to 107 bytes)
        )
    except BaseException:
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    return ClusterHandle(address=None, started_here=True, temp_dir=temp_dir)


def devices_in_cluster(nodes: list[dict[str, Any]] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Device name -> the alive nodes that carry its resource (with their figures).

    ``nodes`` are records in the shape of ``ray.nodes()`` (default: this process's cluster);
    :mod:`cluster.remote` gets them from a cluster this process is not attached to."""
    if nodes is None:
        import ray

        nodes = ray.nodes()
    found: dict[str, list[dict[str, Any]]] = {}
    for node in nodes:
        if not node.get("Alive"):
            continue
        res = node.get("Resources", {})
        for key in res:
            if key.startswith(RESOURCE_PREFIX):
                found.setdefault(key[len(RESOURCE_PREFIX) :], []).append(
                    {
                        "node_id": node["NodeID"],
                        "address": node.get("NodeManagerAddress"),
                        "head": bool(node.get("IsHead")) or "node:__internal_head__" in res,
                        "cpus": res.get("CPU", 0),
                        "gpus": res.get("GPU", 0),
                        "memory_gb": res.get("memory", 0) / 1e9,
                        "labels": {k: v for k, v in (node.get("Labels") or {}).items() if not k.startswith("ray.io/")},
                    }
                )
    return found


def join_hint(device: str, topology: Topology, topology_file: str | None = None, head: str | None = None) -> str:
    """The command that adds ``device`` to the cluster, run on that device's machine."""
    topo = shlex.quote(topology_file) if topology_file else f"{topology.name}.yaml"
    return f"splitlearn node start --topology {topo} --device {device} --address {head or 'HEAD:6379'}"


def check_devices(
    topology: Topology,
    needed: list[str],
    present: dict[str, list[dict[str, Any]]] | None = None,
    topology_file: str | None = None,
    head: str | None = None,
) -> None:
    """Raise a PlacementError naming every device of ``needed`` that no alive node carries,
    with the command that would add it. ``present`` defaults to :func:`devices_in_cluster`;
    ``topology_file`` and ``head`` (the GCS address) make that command exact."""
    if present is None:
        present = devices_in_cluster()
    needed = list(dict.fromkeys(needed))  # a device may run two stages (U-shaped split)
    missing = [d for d in needed if d not in present]
    twice = [d for d in needed if len(present.get(d, [])) > 1]
    if missing:
        hints = "; ".join(f"on the machine of '{d}': {join_hint(d, topology, topology_file, head)}" for d in missing)
        raise PlacementError(
            f"devices missing from the Ray cluster: {', '.join(missing)} "
            f"(present: {', '.join(sorted(present)) or 'none'}); {hints}"
        )
    if twice:
        raise PlacementError(
            f"devices present on more than one node of the Ray cluster: {', '.join(twice)}; "
            "each device must be started once"
        )


def place_stages(topology: Topology, devices: list[str], timeout_s: float):
    """A placement group with one bundle per stage (its device's resource, and its GPUs),
    ready within ``timeout_s`` or a PlacementError that names the wait."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    bundles = []
    for name in devices:
        dev = topology.device(name)
        share = 1.0 / devices.count(name)  # a device may run two stages (U-shaped split)
        b: dict[str, float] = {device_resource(name): share}
        if dev.gpus:
            b["GPU"] = dev.gpus * share
        bundles.append(b)
    pg = placement_group(bundles, strategy="PACK", name="")
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError as e:
        remove_placement_group(pg)
        raise PlacementError(
            f"Ray could not place the stages on devices {', '.join(devices)} within "
            f"runtime.placement_timeout_s={timeout_s:g} s; check `ray status` for free resources"
        ) from e
    return pg


def actor_options(
    topology: Topology, device: str, pg, bundle_index: int, share: float = 1.0, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Ray options for the worker of the stage in bundle ``bundle_index`` on ``device``;
    ``env``: variables the worker process starts with."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    dev = topology.device(device)
    opts: dict[str, Any] = {
        "num_cpus": 0,  # the device resource holds the node; threads come from the device
        "resources": {device_resource(device): share},
        "scheduling_strategy": PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=bundle_index),
        "max_restarts": 0,
        "max_concurrency": 2,  # one step call plus control calls (metrics, abort)
    }
    if dev.gpus:
        opts["num_gpus"] = dev.gpus * share
    if env:
        opts["runtime_env"] = {"env_vars": dict(env)}
    return opts
