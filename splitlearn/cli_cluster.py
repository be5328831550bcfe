"""Command-line commands for real clusters: node start/stop, cluster check, submit, jobs.

The logic lives in :mod:`cluster` (which knows nothing of models); this module defines their
arguments; :mod:`splitlearn.cluster_commands` carries them out.
"""

from __future__ import annotations

import argparse
import textwrap

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
