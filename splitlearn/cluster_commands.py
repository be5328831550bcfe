"""What the cluster commands do (node start/stop, cluster check, submit, jobs), once
:mod:`splitlearn.cli_cluster` has parsed their arguments.

The logic lives in :mod:`cluster` (which knows nothing of models); this module loads run
configs and plans where a command needs them, calls it, and prints.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from splitlearn.cli_cluster import GCS_ENV, JOBS_ENV


def run_cluster_command(args: argparse.Namespace) -> int:
    if args.command == "node":
        return _node_start(args) if args.node_command == "start" else _node_stop(args)
    if args.command == "cluster":
        return _cluster_check(args)
    if args.command == "submit":
        return _submit(args)
    if args.command == "jobs":
        return {"list": _jobs_list, "logs": _jobs_logs, "stop": _jobs_stop}[args.jobs_command](args)
    raise AssertionError(f"unknown cluster command {args.command}")


def _err(msg: str) -> None:
    print(f"splitlearn: {msg}", file=sys.stderr, flush=True)


def _node_start(args: argparse.Namespace) -> int:
    from cluster.node import NodeSpec, ray_start_command, run_ray, shell_line, with_free_ports
    from cluster.remote import parse_address
    from cluster.topology import load_topology

    topology = load_topology(args.topology)
    address = str(parse_address(args.address, dashboard=False)) if args.address else None
    spec = NodeSpec(
        devices=list(args.device),
        head=args.head,
        address=address,
        port=args.port,
        dashboard_port=args.dashboard_port,
        dashboard_host=args.dashboard_host,
        node_ip_address=args.node_ip_address,
        temp_dir=args.temp_dir,
        num_cpus=args.num_cpus,
        block=args.block,
        extra_args=list(args.ray_args),
    )
    cmd = ray_start_command(topology, spec)
    if args.dry_run:
        print(shell_line(cmd))
        return 0
    if address and not args.no_check:
        _refuse_present_devices(topology, spec.devices, address)
    cmd = with_free_ports(cmd, spec.head)  # another Ray on this machine holds Ray's default ports
    print(f"splitlearn: {shell_line(cmd)}", flush=True)
    rc = run_ray(cmd, block=args.block)
    if rc != 0:
        _err(f"error: ray start failed with exit code {rc} (its output is above)")
        return 1
    devices = ", ".join(spec.devices)
    if args.head:
        port = args.port if args.port is not None else 6379
        head = f"{args.node_ip_address or 'HEAD_IP'}:{port}"
        print(f"splitlearn: head node up with device(s) {devices}. Join each other device, on its machine:")
        print(f"  splitlearn node start --topology {shlex.quote(args.topology)} --device NAME --address {head}")
    else:
        print(f"splitlearn: node up with device(s) {devices}, joined {address}")
    return 0


def _refuse_present_devices(topology, devices: list[str], address: str) -> None:
    """A joining node must not bring a device the cluster already has (nor join a head that
    refuses it): both fail here in seconds instead of after `ray start`."""
    from cluster.errors import PlacementError
    from cluster.ray_cluster import devices_in_cluster
    from cluster.remote import cluster_nodes, parse_address

    present = devices_in_cluster(cluster_nodes(parse_address(address, dashboard=False)))
    for d in devices:
        if d in present:
            where = ", ".join(f"node {n['node_id'][:8]} ({n['address']})" for n in present[d])
            raise PlacementError(
                f"device '{d}' is already in the cluster at {address} on {where}; each device is started once "
                "(run `splitlearn node stop` on that machine first)"
            )


def _node_stop(args: argparse.Namespace) -> int:
    from cluster.node import ray_stop_command, run_ray, stop_nodes

    if args.temp_dir:
        n = stop_nodes(args.temp_dir, grace_s=0.0 if args.force else float(args.grace_period))
        print(f"splitlearn: stopped {n} Ray process(es) of the node(s) under {', '.join(args.temp_dir)}")
        return 0
    cmd = ray_stop_command(force=args.force, grace_period_s=args.grace_period)
    print(f"splitlearn: {shlex.join(cmd)}  (stops every Ray process on this machine)", flush=True)
    return 0 if run_ray(cmd, timeout_s=args.grace_period + 60) == 0 else 1


def _cluster_check(args: argparse.Namespace) -> int:
    from cluster.check import build_report, format_report
    from cluster.remote import address_from, cluster_nodes, parse_address

    topology, topology_file, needed = _check_target(args)
    addr = parse_address(address_from(args.address, GCS_ENV, "HOST:PORT"))
    nodes = cluster_nodes(addr, timeout_s=args.timeout)
    report = build_report(topology, nodes, needed, str(addr))
    head = None if addr.dashboard else addr.gcs
    print(format_report(report, topology, topology_file, head))
    return 0 if report.ok else 1


def _check_target(args: argparse.Namespace):
    """(topology, its file for hints, the needed devices or None for all)."""
    from cluster.topology import load_topology
    from splitlearn.errors import ConfigError

    needed = [d.strip() for d in args.plan_devices.split(",") if d.strip()] if args.plan_devices else None
    if args.topology:
        if args.overrides:
            raise ConfigError("key=value overrides apply to --config only")
        return load_topology(args.topology), args.topology, needed
    cfg = _load_and_plan(args.config, args.overrides)
    return cfg[0].topology, _topology_file(cfg[0]), needed or cfg[1].devices


def _load_and_plan(config: str, overrides: list[str]):
    from splitlearn.config import load_config
    from splitlearn.models.build import import_adapter_module
    from splitlearn.planning import make_plan

    cfg = load_config(config, overrides)
    import_adapter_module(cfg.run.model.adapter_module)
    return cfg, make_plan(cfg)


def _topology_file(cfg) -> str | None:
    if not cfg.run.topology.file:
        return None
    path = cfg.resolve_path(cfg.run.topology.file)
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def default_working_dir() -> Path:
    """The splitlearn checkout when the package runs from one (an editable install), else the
    current directory (then the cluster's nodes must have splitlearn installed)."""
    import splitlearn

    root = Path(splitlearn.__file__).resolve().parent.parent
    if (root / "pyproject.toml").is_file() and (root / "cluster").is_dir() and (root / "partitioners").is_dir():
        return root
    return Path.cwd()


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root)
        return True
    except ValueError:
        return False


def _check_uploaded_paths(cfg, config_path: Path, wd: Path) -> list[str]:
    """Files the run reads by a relative path must travel with the job: inside the working
    directory. Returns notes for the user; raises for a relative path outside it."""
    from splitlearn.errors import ConfigError

    notes: list[str] = []
    run = cfg.run
    named = [("topology.file", run.topology.file), ("data.path", run.data.path)]
    if run.data.tokenizer != "byte":
        named.append(("data.tokenizer", run.data.tokenizer))
    for key, value in named:
        if not value:
            continue
        if Path(value).expanduser().is_absolute():
            notes.append(f"{key}={value} is absolute: it must exist at that path on the cluster's nodes")
            continue
        resolved = cfg.resolve_path(value)
        if not _inside(resolved, wd):
            raise ConfigError(
                f"{config_path}: {key}: {resolved} is outside the working directory uploaded with the job ({wd}); "
                "move it inside, pass --working-dir, or give an absolute path that exists on the cluster"
            )
        if key == "data.path":
            notes.append(
                f"data.path={value} is uploaded with the working directory to every node of the job; "
                "for private data use --exclude and an absolute data.path on the data-owning device"
            )
    if run.model.path and not _inside(Path(run.model.path), wd):
        notes.append(f"model.path={run.model.path} must exist at that path on the cluster's nodes")
    if not Path(run.runtime.output_dir).expanduser().is_absolute():
        notes.append(
            f"runtime.output_dir={run.runtime.output_dir} is relative: the run directory goes to the job's "
            "temporary working directory on the head; give an absolute path to keep it"
        )
    return notes


def _submit(args: argparse.Namespace) -> int:
    from cluster.jobs import DEFAULT_EXCLUDES, JobRequest, follow, job_client, submit, wait_status
    from cluster.ray_cluster import check_devices, devices_in_cluster
    from cluster.remote import address_from, nodes_via_dashboard, parse_address
    from splitlearn.errors import ConfigError

    addr = parse_address(address_from(args.address, JOBS_ENV, "http://HOST:8265"), dashboard=True)
    cfg, plan = _load_and_plan(args.config, args.overrides)
    wd = Path(args.working_dir).expanduser().resolve() if args.working_dir else default_working_dir()
    if not wd.is_dir():
        raise ConfigError(f"--working-dir {wd}: not a directory")
    config_path = Path(args.config).expanduser().resolve()
    if not _inside(config_path, wd):
        raise ConfigError(
            f"{args.config}: the config is outside the working directory uploaded with the job ({wd}); "
            "move it inside or pass --working-dir"
        )
    env_vars = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--env {item}: expected KEY=VALUE")
        env_vars[key] = value
    notes = _check_uploaded_paths(cfg, Path(args.config), wd)

    nodes = nodes_via_dashboard(addr)
    head_ip = next((n["NodeManagerAddress"] for n in nodes if n.get("IsHead")), addr.host)
    check_devices(cfg.topology, plan.devices, devices_in_cluster(nodes), _topology_file(cfg), f"{head_ip}:6379")

    rel_config = config_path.relative_to(wd).as_posix()
    entrypoint = shlex.join([args.python, "-m", "splitlearn", "train", rel_config, *args.overrides])
    req = JobRequest(
        entrypoint=entrypoint,
        working_dir=wd,
        excludes=[*DEFAULT_EXCLUDES, *args.exclude],
        env_vars=env_vars,
        metadata={"splitlearn.config": rel_config, "splitlearn.devices": ",".join(plan.devices)},
        submission_id=args.job_id,
    )
    for note in notes:
        _err(f"note: {note}")
    client = job_client(addr, verbose=bool(getattr(args, "verbose", False)))
    job_id = submit(client, req)
    print(f"submitted job {job_id} to {addr.url}: {entrypoint}", flush=True)
    print(f"  devices: {', '.join(dict.fromkeys(plan.devices))}; uploaded: {wd}", flush=True)
    print(
        f"  follow: splitlearn jobs logs {job_id} --address {addr.url} --follow  |  "
        f"stop: splitlearn jobs stop {job_id} --address {addr.url}",
        flush=True,
    )
    if args.no_wait:
        return 0
    if args.follow:
        return _finish(client, job_id, follow(client, job_id))
    state = wait_status(client, job_id, ("RUNNING",), args.start_timeout)
    print(f"job {job_id}: {state}", flush=True)
    if state in ("FAILED", "STOPPED"):
        return _finish(client, job_id, state)
    return 0


def _finish(client, job_id: str, state: str) -> int:
    from cluster.jobs import info

    msg = ""
    if state != "SUCCEEDED":
        text = (info(client, job_id).message or "").strip()
        msg = text.splitlines()[0].split(", last available logs")[0] if text else ""
    print(f"job {job_id}: {state}" + (f" ({msg})" if msg else ""), flush=True)
    return 0 if state == "SUCCEEDED" else 1


def _jobs_client(args: argparse.Namespace):
    from cluster.jobs import job_client
    from cluster.remote import address_from, parse_address

    addr = parse_address(address_from(args.address, JOBS_ENV, "http://HOST:8265"), dashboard=True)
    return job_client(addr, verbose=bool(getattr(args, "verbose", False)))


def _jobs_list(args: argparse.Namespace) -> int:
    from cluster.jobs import format_jobs, list_jobs

    print(format_jobs(list_jobs(_jobs_client(args), drivers=args.all)))
    return 0


def _jobs_logs(args: argparse.Namespace) -> int:
    from cluster.jobs import follow, logs, status

    client = _jobs_client(args)
    if args.follow:
        return _finish(client, args.job_id, follow(client, args.job_id))
    status(client, args.job_id)  # an unknown id: one line, exit 2
    sys.stdout.write(logs(client, args.job_id))
    return 0


def _jobs_stop(args: argparse.Namespace) -> int:
    from cluster.jobs import stop

    state = stop(_jobs_client(args), args.job_id, args.timeout)
    print(f"job {args.job_id}: {state}")
    return 0 if state in ("STOPPED", "SUCCEEDED", "FAILED") else 1
