"""Joining a machine to a splitlearn Ray cluster: the ``ray start`` command for a device of
the topology, and stopping Ray on this machine.

A node carries, for each device it holds, the custom resource ``splitlearn/device:<name>``
(what pins a stage to it), Ray node labels for the device's tier and zone (for ``ray list
nodes`` and label selectors), and ``--num-gpus`` from the device's ``gpus``. The command is
the real ``ray start``; ``--dry-run`` prints it for service files.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from cluster.errors import PlacementError, TopologyError
from cluster.topology import Device, Topology, device_resource

if TYPE_CHECKING:
    import psutil

LABEL_PREFIX = "splitlearn"
# Ray's rule for a label value (ray/_private/label_utils.py): 63 characters at most, letters,
# digits, '-', '_' and '.', starting and ending with a letter or digit.
_LABEL_VALUE = re.compile(r"[a-zA-Z0-9]([a-zA-Z0-9_.-]{0,61}[a-zA-Z0-9])?")
START_TIMEOUT_S = 180.0  # `ray start` without --block returns once the node is up


@dataclass
class NodeSpec:
    """What `splitlearn node start` was asked for."""

    devices: list[str]
    head: bool = False
    address: str | None = None  # GCS address of the head, for a joining node
    port: int | None = None  # the head's GCS port
    dashboard_port: int | None = None
    dashboard_host: str | None = None
    node_ip_address: str | None = None
    temp_dir: str | None = None
    num_cpus: int | None = None
    block: bool = False
    extra_args: list[str] = field(default_factory=list)  # passed to `ray start` as they are


def ray_executable() -> str:
    """The ``ray`` script of this Python environment (so a service file runs the right one)."""
    beside = Path(sys.executable).parent / "ray"
    if beside.is_file():
        return str(beside)
    found = shutil.which("ray")
    if not found:
        raise PlacementError("the 'ray' command was not found; install splitlearn's dependencies (ray[default])")
    return found


def node_devices(topology: Topology, names: list[str]) -> list[Device]:
    if not names:
        raise TopologyError(f"give --device NAME (devices of '{topology.name}': {', '.join(topology.device_names)})")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise TopologyError(f"--device {dupes[0]} is given twice")
    return [topology.device(n) for n in names]  # an unknown name raises, listing the devices


def node_labels(devices: list[Device]) -> dict[str, str]:
    """``splitlearn/tier`` and ``splitlearn/zone`` when the node's devices agree on them, and
    ``splitlearn/device`` when it holds one device."""
    labels: dict[str, str] = {}
    for key in ("tier", "zone"):
        values = {getattr(d, key) for d in devices}
        if len(values) == 1:
            labels[f"{LABEL_PREFIX}/{key}"] = values.pop()
    if len(devices) == 1:
        labels[f"{LABEL_PREFIX}/device"] = devices[0].name
    for key, value in labels.items():
        if not _LABEL_VALUE.fullmatch(value):
            raise TopologyError(
                f"{key.split('/')[1]} '{value}' cannot be a Ray node label value "
                "(63 characters at most: letters, digits, '-', '_', '.', starting and ending with a letter or digit)"
            )
    return labels


def ray_start_command(topology: Topology, spec: NodeSpec) -> list[str]:
    """The ``ray start`` argument list for ``spec``."""
    if spec.head == bool(spec.address):
        raise PlacementError("give --head (the first node) or --address HEAD:PORT (to join a running head), not both")
    if spec.port is not None and not spec.head:
        raise PlacementError("--port is the head's GCS port; a joining node takes --address HEAD:PORT")
    if not spec.head and (spec.dashboard_port is not None or spec.dashboard_host is not None):
        raise PlacementError("--dashboard-port and --dashboard-host apply to the head (--head) only")
    devices = node_devices(topology, spec.devices)
    resources = {device_resource(d.name): 1 for d in devices}
    labels = node_labels(devices)
    cmd = [ray_executable(), "start"]
    if spec.head:
        cmd += ["--head", "--port", str(spec.port if spec.port is not None else 6379)]
        if spec.dashboard_host is not None:
            cmd += ["--dashboard-host", spec.dashboard_host]
        if spec.dashboard_port is not None:
            cmd += ["--dashboard-port", str(spec.dashboard_port)]
    else:
        cmd += ["--address", str(spec.address)]
    if spec.node_ip_address:
        cmd += ["--node-ip-address", spec.node_ip_address]
    if spec.temp_dir:
        cmd += ["--temp-dir", str(Path(spec.temp_dir).expanduser().resolve())]
    if spec.num_cpus is not None:
        cmd += ["--num-cpus", str(spec.num_cpus)]
    cmd += ["--num-gpus", str(math.ceil(sum(d.gpus for d in devices)))]
    cmd += ["--resources", json.dumps(resources, separators=(",", ":"))]
    if labels:
        cmd += ["--labels", ",".join(f"{k}={v}" for k, v in labels.items())]
    cmd += ["--disable-usage-stats"]
    if spec.block:
        cmd += ["--block"]
    return cmd + list(spec.extra_args)


# Ray's fixed default ports of a node (the others it picks free itself), by `ray start` flag:
# ports other machines are told (a head's GCS and dashboard) are named when taken; a node's
# own agents' ports move to free ones (another Ray on the machine holds the defaults).
TOLD_PORTS = {"--port": 6379, "--dashboard-port": 8265}
AGENT_PORTS = {"--dashboard-agent-listen-port": 52365, "--ray-client-server-port": 10001}


def port_taken(port: int) -> bool:
    """Whether something on this machine listens on (or holds) TCP ``port``."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError:
            return True
    return False


def free_port() -> int:
    """A TCP port free on this machine now."""
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def _flag_value(cmd: list[str], flag: str) -> str | None:
    return cmd[cmd.index(flag) + 1] if flag in cmd[:-1] else None


def with_free_ports(cmd: list[str], head: bool) -> list[str]:
    """``cmd`` (a ``ray start`` list) for this machine as it is now, next to any other Ray on
    it: a head's GCS or dashboard port that is taken is named (a PlacementError: the other
    machines and ``submit`` are told those ports, so they are the user's to choose); the
    node's dashboard agent port (and a head's Ray client port), when Ray's default is taken,
    moves to a free one, so the node keeps its agent (``submit`` needs it)."""
    taken = []
    for flag, default in TOLD_PORTS.items() if head else ():
        port = int(_flag_value(cmd, flag) or default)
        if port_taken(port):
            taken.append(f"{port} ({flag})")
    if taken:
        raise PlacementError(
            f"port(s) {', '.join(taken)} already taken on this machine (another Ray, or another service); "
            f"give free ones, e.g. --port {free_port()} --dashboard-port {free_port()}"
        )
    extra: list[str] = []
    for flag, default in AGENT_PORTS.items():
        if (head or flag != "--ray-client-server-port") and flag not in cmd and port_taken(default):
            extra += [flag, str(free_port())]
    return cmd + extra


def shell_line(cmd: list[str], env: dict[str, str] | None = None) -> str:
    """``cmd`` as one shell-quoted line, with ``env`` assignments in front."""
    assigns = [f"{k}={shlex.quote(v)}" for k, v in (env or {}).items()]
    return " ".join([*assigns, shlex.join(cmd)])


def run_ray(cmd: list[str], block: bool = False, timeout_s: float = START_TIMEOUT_S) -> int:
    """Run a ``ray`` command with this terminal's output; bounded unless it is meant to block."""
    env = {**os.environ, "RAY_ADDRESS": ""}  # `ray start` must not read a driver's RAY_ADDRESS
    # The node's processes (and the shell that runs a job's entrypoint, `python -m splitlearn
    # ...`) find the Python environment that runs splitlearn first, activated or not.
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    try:
        return subprocess.run(cmd, env=env, timeout=None if block else timeout_s).returncode
    except subprocess.TimeoutExpired as e:
        raise PlacementError(f"'{shlex.join(cmd[:3])} ...' did not finish within {timeout_s:g} s") from e


# -- stopping ------------------------------------------------------------------------------


def ray_stop_command(force: bool = False, grace_period_s: int | None = None) -> list[str]:
    """``ray stop``: stops EVERY Ray process of this user on this machine, of any cluster."""
    cmd = [ray_executable(), "stop"]
    if force:
        cmd.append("--force")
    if grace_period_s is not None:
        cmd += ["--grace-period", str(grace_period_s)]
    return cmd


def _names(arg: str, root: str) -> bool:
    """Whether ``arg`` names ``root`` or a path under it (``/tmp/r1`` does not name ``/tmp/r10``)."""
    start = arg.find(root)
    while start >= 0:
        end = start + len(root)
        if end == len(arg) or arg[end] in "/ ,;:'\"":
            return True
        start = arg.find(root, start + 1)
    return False


def _mentions(proc: psutil.Process, roots: list[str]) -> bool:
    import psutil

    def under(path: str) -> bool:
        return any(path == r or path.startswith(r + os.sep) for r in roots)

    try:
        if any(_names(a, r) for a in proc.cmdline() for r in roots):
            return True
        return under(proc.cwd()) or any(under(f.path) for f in proc.open_files())
    except (psutil.Error, OSError):
        return False


def node_processes(temp_dirs: list[str]) -> list[psutil.Process]:
    """The processes of the Ray nodes started with one of ``temp_dirs`` (``--temp-dir``): those
    whose command line, working directory or open files are under it, and their descendants
    (workers and agents rename themselves ``ray::...`` but stay children of their raylet)."""
    import psutil

    roots = [str(Path(d).expanduser().resolve()) for d in temp_dirs]
    me = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    user = psutil.Process().username()
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["username"]):
        if proc.pid in me or proc.info.get("username") != user or not _alive(proc):
            continue
        if _mentions(proc, roots):
            found[proc.pid] = proc
            try:
                for child in proc.children(recursive=True):
                    if child.pid not in me:
                        found[child.pid] = child
            except psutil.Error:
                pass
    return list(found.values())


def _alive(proc: psutil.Process) -> bool:
    """Running and not a zombie (an orphan's zombie may never be reaped in a container)."""
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _wait_gone(procs: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout_s
    alive = [p for p in procs if _alive(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [p for p in alive if _alive(p)]
    return alive


def stop_nodes(temp_dirs: list[str], grace_s: float = 10.0) -> int:
    """Stop only the Ray nodes started with ``temp_dirs``: SIGTERM, then SIGKILL after
    ``grace_s``. Returns how many processes were stopped."""
    import psutil

    procs = node_processes(temp_dirs)
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    for p in _wait_gone(procs, grace_s):
        try:
            p.kill()
        except psutil.Error:
            pass
    _wait_gone(procs, 5.0)
    return len(procs)
