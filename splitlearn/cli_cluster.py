"""Command-line commands for real clusters: node start/stop, cluster check, submit, jobs.

The logic lives in :mod:`cluster` (which knows nothing of models); this module parses the
arguments, loads run configs and plans where a command needs them, and prints.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import textwrap
from pathlib import Path

CLUSTER_COMMANDS: tuple[str, ...] = ("node", "cluster", "submit", "jobs")

RAW = argparse.RawDescriptionHelpFormatter


def _desc(text: str) -> str:
    """A description wrapped for the terminal (the raw formatter keeps the epilogs' layout)."""
    return textwrap.fill(text, width=88)


GCS_ENV = ("RAY_ADDRESS",)
JOBS_ENV = ("RAY_API_SERVER_ADDRESS",)

NODE_START_EPILOG = """examples:
  # the head, in the cloud, holding the cloud GPU; dashboard open to job clients
  splitlearn node start --topology configs/topologies/home-lab.yaml --device a100-0 --head \\
      --dashboard-host 0.0.0.0
  # an edge device joins the head
  splitlearn node start --topology configs/topologies/home-lab.yaml --device pi5-0 --address 203.0.113.7:6379
  # print the command for a systemd unit (ExecStart=...) instead of running it
  splitlearn node start --topology home-lab.yaml --device pi5-0 --address 203.0.113.7:6379 --block --dry-run
  # extra `ray start` options go after --
  splitlearn node start --topology home-lab.yaml --device pi5-0 --address HEAD:6379 -- \\
      --min-worker-port 10002 --max-worker-port 10100

Token authentication: a cluster whose head has a token (~/.ray/auth_token) requires it.
Joining nodes and job clients then need RAY_AUTH_MODE=token and the same token in
RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token (see docs/deployment.md)."""

NODE_STOP_EPILOG = """examples:
  splitlearn node stop                            # ray stop: every Ray process on this machine
  splitlearn node stop --temp-dir /var/lib/splitlearn/ray   # only the node started with that --temp-dir

`ray stop` has no notion of "my cluster": it ends every Ray process of this user on this
machine, including local `splitlearn train` runs and other clusters. Start nodes with
--temp-dir and stop them with the same --temp-dir when the machine is shared."""

CHECK_EPILOG = """examples:
  splitlearn cluster check --topology configs/topologies/home-lab.yaml --address 203.0.113.7:6379
  splitlearn cluster check --topology home-lab.yaml --address http://203.0.113.7:8265 --plan-devices pi5-0,a100-0
  splitlearn cluster check --config run.yaml train.steps=10 --address 203.0.113.7:6379

exit codes: 0 every needed device is present once; 1 a needed device is missing or on two
nodes; 2 bad input or a cluster that does not answer."""

SUBMIT_EPILOG = """examples:
  splitlearn submit configs/quickstart.yaml --address http://203.0.113.7:8265 --follow
  splitlearn submit run.yaml train.steps=2000 --address http://HEAD:8265 --no-wait
  RAY_API_SERVER_ADDRESS=http://HEAD:8265 splitlearn submit run.yaml --exclude data/private/

What is uploaded: the working directory (default: the splitlearn checkout, which holds the
splitlearn, partitioners and cluster packages) minus .git, .venv, runs/, caches and any
--exclude. Ray unpacks it on every node that runs part of the job, data files included:
keep private data out with --exclude and give data.path as an absolute path that exists on
the data-owning device. The nodes need splitlearn's dependencies installed (same Python
environment as `ray start`); `python` must be that environment's interpreter on the head."""

JOBS_EPILOG = """examples:
  splitlearn jobs list --address http://HEAD:8265
  splitlearn jobs logs raysubmit_XYZ --address http://HEAD:8265 --follow
  splitlearn jobs stop raysubmit_XYZ --address http://HEAD:8265"""


def add_cluster_commands(sub, common: argparse.ArgumentParser) -> None:
    """Add the cluster subcommands to the ``splitlearn`` parser's subparsers."""
    _add_node(sub, common)
    _add_cluster(sub, common)
    _add_submit(sub, common)
    _add_jobs(sub, common)


def _add_node(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "node",
        help="start or stop Ray on this machine as a device of the topology",
        description=_desc(
            "Start Ray on this machine as one device of a topology (joining a head, or as the head), or stop it."
        ),
        epilog="examples:\n"
        "  splitlearn node start --topology home-lab.yaml --device a100-0 --head\n"
        "  splitlearn node start --topology home-lab.yaml --device pi5-0 --address 10.8.0.1:6379\n"
        "  splitlearn node stop\n"
        "Run 'splitlearn node start --help' or 'splitlearn node stop --help' for the options.",
        formatter_class=RAW,
        parents=[common],
    )
    nsub = p.add_subparsers(dest="node_command", metavar="{start,stop}", required=True)
    s = nsub.add_parser(
        "start",
        help="start Ray here with a device's resource and labels",
        description=_desc(
            "Run `ray start` on this machine for a device of the topology: the node carries the custom "
            "resource splitlearn/device:<name> (what places that device's stage here), Ray node labels "
            "splitlearn/tier, splitlearn/zone and splitlearn/device, and --num-gpus from the device's gpus. "
            "A joining node is first checked against the cluster: a device already present there is refused."
        ),
        epilog=NODE_START_EPILOG,
        formatter_class=RAW,
        parents=[common],
    )
    s.add_argument("--topology", required=True, metavar="FILE", help="topology YAML that names the device")
    s.add_argument(
        "--device",
        action="append",
        required=True,
        metavar="NAME",
        help="the device this machine is; repeat to put several devices on one node (a rehearsal on one machine)",
    )
    mode = s.add_mutually_exclusive_group(required=True)
    mode.add_argument("--head", action="store_true", help="start the head node (the first node of the cluster)")
    mode.add_argument("--address", metavar="HOST:PORT", help="join the cluster whose head GCS is at HOST:PORT")
    s.add_argument("--port", type=int, help="the head's GCS port (default 6379)")
    s.add_argument("--dashboard-host", help="head: interface for the dashboard and Jobs API (Ray's default: localhost)")
    s.add_argument("--dashboard-port", type=int, help="head: dashboard and Jobs API port (default 8265)")
    s.add_argument("--node-ip-address", metavar="IP", help="this node's address as the other nodes reach it")
    s.add_argument("--temp-dir", metavar="DIR", help="Ray's session and log directory for this node (default /tmp/ray)")
    s.add_argument("--num-cpus", type=int, help="CPUs this node offers Ray (default: all cores)")
    s.add_argument("--block", action="store_true", help="stay in the foreground (for service managers)")
    s.add_argument("--dry-run", action="store_true", help="print the `ray start` command and exit")
    s.add_argument("--no-check", action="store_true", help="joining: skip the check against the running cluster")
    s.add_argument("ray_args", nargs="*", metavar="-- RAY_START_ARG", help="further `ray start` options, after --")

    t = nsub.add_parser(
        "stop",
        help="stop Ray on this machine",
        description=_desc(
            "Stop the Ray node(s) of this machine: all of them (`ray stop`), or only those started with --temp-dir DIR."
        ),
        epilog=NODE_STOP_EPILOG,
        formatter_class=RAW,
        parents=[common],
    )
    t.add_argument(
        "--temp-dir",
        action="append",
        metavar="DIR",
        help="stop only the node started with this --temp-dir (repeatable); default: `ray stop`, all Ray here",
    )
    t.add_argument("--force", action="store_true", help="SIGKILL at once")
    t.add_argument("--grace-period", type=int, default=10, help="seconds before SIGKILL (default 10)")


def _add_cluster(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "cluster",
        help="inspect a running cluster",
        description=_desc("Inspect a running Ray cluster against a topology."),
        epilog="example:\n"
        "  splitlearn cluster check --topology home-lab.yaml --address 10.8.0.1:6379\n"
        "Run 'splitlearn cluster check --help' for the options.",
        formatter_class=RAW,
        parents=[common],
    )
    csub = p.add_subparsers(dest="cluster_command", metavar="{check}", required=True)
    c = csub.add_parser(
        "check",
        help="list each device of the topology as present or missing in the cluster",
        description=_desc(
            "List every device of the topology as present (with its node, address, CPUs, GPUs and Ray "
            "memory) or MISSING in the running cluster, and devices present on two nodes (TWICE). The "
            "address is the head's GCS (HOST:PORT, via a short-lived driver) or its dashboard "
            "(http://HOST:8265, via the State API); it must answer within seconds."
        ),
        epilog=CHECK_EPILOG,
        formatter_class=RAW,
        parents=[common],
    )
    src = c.add_mutually_exclusive_group(required=True)
    src.add_argument("--topology", metavar="FILE", help="topology YAML")
    src.add_argument("--config", metavar="FILE", help="a run config: its topology, and its plan's devices as needed")
    c.add_argument("overrides", nargs="*", metavar="key=value", help="with --config: config overrides")
    c.add_argument("--address", help="HOST:PORT (GCS) or http://HOST:8265 (dashboard); default $RAY_ADDRESS")
    c.add_argument(
        "--plan-devices", metavar="A,B,C", help="only these devices are needed (default: all, or the config's plan)"
    )
    c.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the cluster's answer (default 60)")


def _add_submit(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "submit",
        help="submit a run to a cluster as a Ray job",
        description=_desc(
            "Validate the config here (a config that fails is never submitted), plan it, check that every "
            "device of the plan is present in the cluster, then submit `python -m splitlearn train CONFIG "
            "[overrides]` as a Ray job with the working directory uploaded. Prints the job id; --follow "
            "streams its logs and exits 0 if it succeeds, 1 otherwise."
        ),
        epilog=SUBMIT_EPILOG,
        formatter_class=RAW,
        parents=[common],
    )
    p.add_argument("config", help="run config YAML, inside the working directory")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=10")
    p.add_argument("--address", help="the head's dashboard, http://HOST:8265 (default $RAY_API_SERVER_ADDRESS)")
    wait = p.add_mutually_exclusive_group()
    wait.add_argument("--follow", action="store_true", help="stream the job's logs until it ends")
    wait.add_argument("--no-wait", action="store_true", help="return once submitted (default: wait until it runs)")
    p.add_argument("--working-dir", metavar="DIR", help="directory uploaded with the job (default: the checkout)")
    p.add_argument(
        "--exclude", action="append", default=[], metavar="PATTERN", help="also leave out (gitignore syntax)"
    )
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment variable for the job")
    p.add_argument("--python", default="python", help="interpreter on the head that runs the job (default python)")
    p.add_argument("--job-id", help="submission id to use (default: generated)")
    p.add_argument("--start-timeout", type=float, default=300.0, help="seconds to wait for the job to start")


def _add_jobs(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "jobs",
        help="list, read or stop Ray jobs",
        description=_desc("List the cluster's jobs, print or follow one job's logs, or stop one."),
        epilog=JOBS_EPILOG,
        formatter_class=RAW,
        parents=[common],
    )
    jsub = p.add_subparsers(dest="jobs_command", metavar="{list,logs,stop}", required=True)
    addr_help = "the head's dashboard, http://HOST:8265 (default $RAY_API_SERVER_ADDRESS)"
    ls = jsub.add_parser(
        "list",
        help="list submitted jobs",
        description=_desc("List the jobs submitted to the cluster, oldest first."),
        epilog=JOBS_EPILOG,
        formatter_class=RAW,
        parents=[common],
    )
    ls.add_argument("--address", help=addr_help)
    ls.add_argument("--all", action="store_true", help="also list drivers that attached with ray.init")
    lg = jsub.add_parser(
        "logs",
        help="print a job's logs",
        description=_desc(
            "Print a job's logs so far, or with --follow stream them until it ends (exit 0 if it succeeded)."
        ),
        epilog=JOBS_EPILOG,
        formatter_class=RAW,
        parents=[common],
    )
    lg.add_argument("job_id", metavar="ID")
    lg.add_argument("--address", help=addr_help)
    lg.add_argument("--follow", action="store_true", help="stream until the job ends")
    st = jsub.add_parser(
        "stop",
        help="stop a job",
        description=_desc("Ask a job to stop and wait (up to --timeout) until it has."),
        epilog=JOBS_EPILOG,
        formatter_class=RAW,
        parents=[common],
    )
    st.add_argument("job_id", metavar="ID")
    st.add_argument("--address", help=addr_help)
    st.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for it to stop (default 30)")


# -- running ---------------------------------------------------------------------------------


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
    from cluster.node import NodeSpec, ray_start_command, run_ray, shell_line
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
