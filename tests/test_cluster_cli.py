"""Real clusters from the command line: `node start` (dry run and real), `cluster check`,
`submit` as a Ray job, `jobs`, `node stop`.

The first tests need no Ray. The ``ray``-marked ones start a real three-node cluster on this
machine with `splitlearn node start` (one raylet per device, each with its own --temp-dir and
non-default ports), with token authentication on through a token made for the test
(RAY_AUTH_MODE=token, RAY_AUTH_TOKEN), and stop it with `splitlearn node stop --temp-dir`,
which ends only that cluster's processes. (Plain `splitlearn node stop` runs `ray stop`, which
ends EVERY Ray process on the machine, other test sessions' included: not used here.)
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from cluster.check import MISSING, PRESENT, TWICE, build_report, format_report
from cluster.errors import PlacementError
from cluster.remote import parse_address
from cluster.topology import load_topology
from splitlearn.cli import main

SPLITLEARN = [sys.executable, "-m", "splitlearn"]
LAPTOP = ROOT / "configs" / "topologies" / "laptop.yaml"
HOME_LAB = ROOT / "configs" / "topologies" / "home-lab.yaml"
QUICKSTART = ROOT / "configs" / "quickstart.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_line_error(capsys, code: int, needle: str) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("splitlearn: error:") and "\n" not in err and needle in err, err
    return err


def dry_run(capsys, *args: str) -> list[str]:
    code = main(["node", "start", "--dry-run", *args])
    out = capsys.readouterr().out.strip()
    assert code == 0, out
    assert "\n" not in out
    return shlex.split(out)


def opt(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


# -- no Ray --------------------------------------------------------------------------------


def test_node_start_dry_run_head(capsys):
    argv = dry_run(capsys, "--topology", str(LAPTOP), "--device", "cloud-gpu", "--head", "--port", "6390")
    assert Path(argv[0]).name == "ray" and argv[1:4] == ["start", "--head", "--port"] and opt(argv, "--port") == "6390"
    assert json.loads(opt(argv, "--resources")) == {"splitlearn/device:cloud-gpu": 1}
    assert opt(argv, "--labels").split(",") == [
        "splitlearn/tier=cloud",
        "splitlearn/zone=cloud",
        "splitlearn/device=cloud-gpu",
    ]
    assert opt(argv, "--num-gpus") == "0"
    assert "--address" not in argv


def test_node_start_dry_run_join_gpus_and_passthrough(capsys):
    argv = dry_run(
        capsys,
        "--topology",
        str(HOME_LAB),
        "--device",
        "a100-0",
        "--address",
        "10.0.0.1:6379",
        "--temp-dir",
        "/srv/ray",
        "--block",
        "--",
        "--min-worker-port",
        "10002",
        "--max-worker-port",
        "10100",
    )
    assert opt(argv, "--address") == "10.0.0.1:6379" and "--head" not in argv
    assert opt(argv, "--num-gpus") == "1"  # the device's gpus
    assert json.loads(opt(argv, "--resources")) == {"splitlearn/device:a100-0": 1}
    assert opt(argv, "--temp-dir") == "/srv/ray" and "--block" in argv
    assert argv[-4:] == ["--min-worker-port", "10002", "--max-worker-port", "10100"]


def test_node_start_dry_run_several_devices_on_one_node(capsys):
    argv = dry_run(
        capsys, "--topology", str(LAPTOP), "--device", "edge-phone", "--device", "home-server", "--address", "h:1"
    )
    assert json.loads(opt(argv, "--resources")) == {
        "splitlearn/device:edge-phone": 1,
        "splitlearn/device:home-server": 1,
    }
    # both devices are edge/home: those labels stay; a node of two devices has no device label
    assert opt(argv, "--labels") == "splitlearn/tier=edge,splitlearn/zone=home"


def test_node_start_unknown_device_lists_the_devices(capsys):
    code = main(["node", "start", "--topology", str(LAPTOP), "--device", "tablet", "--head", "--dry-run"])
    one_line_error(
        capsys, code, "device 'tablet' is not in topology 'laptop' (devices: edge-phone, home-server, cloud-gpu)"
    )


def test_node_start_port_is_for_the_head(capsys):
    code = main(
        ["node", "start", "--topology", str(LAPTOP), "--device", "edge-phone", "--address", "h:1", "--port", "1"]
    )
    one_line_error(capsys, code, "--port is the head's GCS port")


def test_node_start_missing_topology(capsys):
    code = main(["node", "start", "--topology", "nope.yaml", "--device", "x", "--head", "--dry-run"])
    one_line_error(capsys, code, "topology file not found: nope.yaml")


def test_cluster_check_address_that_does_not_answer(capsys):
    port = free_port()  # nothing listens there: refused at once
    t0 = time.monotonic()
    code = main(["cluster", "check", "--topology", str(LAPTOP), "--address", f"127.0.0.1:{port}"])
    one_line_error(capsys, code, f"cannot reach the Ray GCS at 127.0.0.1:{port}")
    assert time.monotonic() - t0 < 10


def test_submit_validates_before_it_contacts_anyone(capsys):
    port = free_port()
    code = main(["submit", str(QUICKSTART), "train.steps=0", "--address", f"http://127.0.0.1:{port}"])
    one_line_error(capsys, code, "train.steps: must be >= 1, got 0")
    code = main(["submit", str(QUICKSTART), "train.steps=1", "--address", f"http://127.0.0.1:{port}"])
    one_line_error(capsys, code, f"cannot reach the Ray dashboard at http://127.0.0.1:{port}")


def test_submit_config_outside_the_working_dir(capsys, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        QUICKSTART.read_text()
        .replace("topologies/laptop.yaml", str(LAPTOP))
        .replace("../data/quickstart.txt", str(ROOT / "data" / "quickstart.txt"))
    )
    code = main(["submit", str(cfg), "--address", f"http://127.0.0.1:{free_port()}"])
    one_line_error(capsys, code, "outside the working directory uploaded with the job")


def test_addresses():
    assert parse_address("10.0.0.1").gcs == "10.0.0.1:6379"
    assert parse_address("10.0.0.1", dashboard=True).url == "http://10.0.0.1:8265"
    a = parse_address("http://head:8266")
    assert a.dashboard and a.url == "http://head:8266"
    with pytest.raises(PlacementError, match="not a URL"):
        parse_address("http://head:8265", dashboard=False)
    with pytest.raises(PlacementError, match="bad port"):
        parse_address("head:http")


def node(node_id: str, devices: list[str], head: bool = False, labels: dict | None = None, alive: bool = True):
    """A record in the shape `ray.nodes()` returns."""
    res = {"CPU": 4.0, "GPU": 1.0, "memory": 8e9, **{f"splitlearn/device:{d}": 1.0 for d in devices}}
    if head:
        res["node:__internal_head__"] = 1.0
    return {
        "NodeID": node_id,
        "Alive": alive,
        "NodeManagerAddress": f"10.0.0.{len(node_id)}",
        "Resources": res,
        "Labels": labels or {},
    }


def test_check_report_present_missing_twice_and_labels():
    topo = load_topology(HOME_LAB)
    nodes = [
        node("aaaa1111", ["a100-0"], head=True, labels={"splitlearn/zone": "cloud"}),
        node("bbbb2222", ["pi5-0"], labels={"splitlearn/zone": "office"}),
        node("cccc3333", ["orin-nano-0"]),
        node("dddd4444", ["orin-nano-0", "stray"]),
        node("eeee5555", ["orin-agx-0"], alive=False),
    ]
    report = build_report(topo, nodes, None, "10.0.0.1:6379")
    status = {(r.device, r.node_id): r.status for r in report.rows}
    assert status[("a100-0", "aaaa1111")] == PRESENT
    assert status[("orin-nano-0", "cccc3333")] == status[("orin-nano-0", "dddd4444")] == TWICE
    assert status[("orin-agx-0", "")] == MISSING  # its only node is dead
    assert report.missing == ["orin-agx-0"] and report.twice == ["orin-nano-0"] and not report.ok
    assert report.other_devices == ["stray"]
    text = format_report(report, topo, "configs/topologies/home-lab.yaml", "10.0.0.1:6379")
    assert "label zone=office (topology: home)" in text
    assert (
        "splitlearn node start --topology configs/topologies/home-lab.yaml --device orin-agx-0 --address 10.0.0.1:6379"
        in text
    )
    assert "aaaa1111 (head)" in text and text.endswith("not ok: see above")
    # only the plan's devices are needed: a missing other device does not fail the check
    assert build_report(topo, nodes[:2], ["a100-0", "pi5-0"], "x").ok


# -- a real cluster ------------------------------------------------------------------------


class LocalCluster:
    """Three `splitlearn node start` nodes on this machine: the head holds cloud-gpu (as a
    cloud head would), edge-phone and home-server join it."""

    def __init__(self, root: Path):
        self.root = root
        self.port, self.dash = free_port(), free_port()
        self.gcs = f"127.0.0.1:{self.port}"
        self.url = f"http://127.0.0.1:{self.dash}"
        self.temp_dirs: list[Path] = []
        self.env = {
            **os.environ,
            "RAY_ADDRESS": "",
            "RAY_API_SERVER_ADDRESS": "",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(32),
            "RAY_USAGE_STATS_ENABLED": "0",
        }

    def cli(self, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*SPLITLEARN, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=self.env
        )

    def _node_args(self, device: str, *mode: str) -> list[str]:
        tmp = self.root / device
        self.temp_dirs.append(tmp)
        return [
            "node",
            "start",
            "--topology",
            str(LAPTOP),
            "--device",
            device,
            *mode,
            "--node-ip-address",
            "127.0.0.1",
            "--temp-dir",
            str(tmp),
            "--num-cpus",
            "1",
            "--",
            "--dashboard-agent-listen-port",
            str(free_port()),
        ]

    def start(self) -> None:
        head = self._node_args("cloud-gpu", "--head", "--port", str(self.port), "--dashboard-port", str(self.dash)) + [
            "--ray-client-server-port",
            str(free_port()),
        ]
        r = self.cli(*head)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        assert "head node up with device(s) cloud-gpu" in r.stdout
        joins = [
            subprocess.Popen(
                [*SPLITLEARN, *self._node_args(d, "--address", self.gcs)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=ROOT,
                env=self.env,
            )
            for d in ("edge-phone", "home-server")
        ]
        for p in joins:
            out, err = p.communicate(timeout=240)
            assert p.returncode == 0, out[-2000:] + err[-3000:]
            assert "node up with device(s)" in out

    def stop(self) -> None:
        if self.temp_dirs:
            args = [a for d in self.temp_dirs for a in ("--temp-dir", str(d))]
            self.cli("node", "stop", *args, "--grace-period", "3", timeout=120)


@pytest.fixture(scope="module")
def local_cluster():
    # Ray's socket paths must stay short (108 bytes): a short directory under /tmp.
    root = Path(tempfile.mkdtemp(prefix="slc", dir="/tmp"))
    c = LocalCluster(root)
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.mark.ray
def test_cluster_check_lists_every_device(local_cluster):
    for address in (local_cluster.gcs, local_cluster.url):
        r = local_cluster.cli("cluster", "check", "--topology", str(LAPTOP), "--address", address)
        assert r.returncode == 0, r.stdout + r.stderr
        lines = r.stdout.splitlines()
        for device in ("edge-phone", "home-server", "cloud-gpu"):
            row = next(ln for ln in lines if ln.startswith(device))
            assert " present " in row, r.stdout
        assert next(ln for ln in lines if ln.startswith("cloud-gpu")).count("(head)") == 1
        assert "3 of 3 device(s) present" in lines[0] and lines[-1].startswith("ok:")
    # the devices a run config's plan needs
    r = local_cluster.cli("cluster", "check", "--config", str(QUICKSTART), "--address", local_cluster.gcs)
    assert r.returncode == 0 and "3 of 3 device(s) present" in r.stdout, r.stdout + r.stderr
    # a device of another topology is missing: exit 1, with the command that adds it
    r = local_cluster.cli(
        "cluster", "check", "--topology", str(HOME_LAB), "--address", local_cluster.gcs, "--plan-devices", "pi5-0"
    )
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"--device pi5-0 --address {local_cluster.gcs}" in r.stdout


@pytest.mark.ray
def test_nodes_carry_device_labels(local_cluster):
    script = (
        "import json, sys; from cluster.remote import nodes_via_dashboard, parse_address; "
        "print(json.dumps(nodes_via_dashboard(parse_address(sys.argv[1]))))"
    )
    r = subprocess.run(
        [sys.executable, "-c", script, local_cluster.url],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=local_cluster.env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    labels = {n["Labels"].get("splitlearn/device"): n["Labels"] for n in json.loads(r.stdout) if n["Alive"]}
    assert labels["edge-phone"]["splitlearn/tier"] == "edge" and labels["edge-phone"]["splitlearn/zone"] == "home"
    assert labels["cloud-gpu"]["splitlearn/zone"] == "cloud"


@pytest.mark.ray
def test_joining_a_device_twice_is_refused(local_cluster):
    r = local_cluster.cli(
        "node", "start", "--topology", str(LAPTOP), "--device", "edge-phone", "--address", local_cluster.gcs
    )
    assert r.returncode == 2, r.stdout + r.stderr
    assert "device 'edge-phone' is already in the cluster" in r.stderr


@pytest.mark.ray
def test_submit_follow_runs_the_quickstart(local_cluster, tmp_path):
    out = tmp_path / "runs"
    r = local_cluster.cli(
        "submit",
        str(QUICKSTART),
        "train.steps=3",
        "runtime.progress=log",
        f"runtime.output_dir={out}",
        "runtime.run_name=job",
        "--address",
        local_cluster.url,
        "--follow",
        timeout=400,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
    assert "step 3/3 loss=" in r.stdout, r.stdout[-4000:]
    job_id = r.stdout.split("submitted job ", 1)[1].split()[0]
    assert f"job {job_id}: SUCCEEDED" in r.stdout
    assert (out / "job" / "checkpoints" / "step_00000003" / "manifest.json").is_file()

    listed = local_cluster.cli("jobs", "list", "--address", local_cluster.url)
    assert listed.returncode == 0 and job_id in listed.stdout and "SUCCEEDED" in listed.stdout, listed.stdout
    logs = local_cluster.cli("jobs", "logs", job_id, "--address", local_cluster.url)
    assert logs.returncode == 0 and "step 3/3 loss=" in logs.stdout
    unknown = local_cluster.cli("jobs", "logs", "raysubmit_nope", "--address", local_cluster.url)
    assert unknown.returncode == 2 and "raysubmit_nope" in unknown.stderr


@pytest.mark.ray
def test_submit_fails_fast_on_a_device_missing_from_the_cluster(local_cluster, tmp_path):
    topo = yaml.safe_load(LAPTOP.read_text())
    topo["devices"].append({**topo["devices"][1], "name": "tablet"})
    (tmp_path / "four.yaml").write_text(yaml.safe_dump(topo))
    t0 = time.monotonic()
    r = local_cluster.cli(
        "submit",
        str(QUICKSTART),
        "train.steps=3",
        f"topology.file={tmp_path / 'four.yaml'}",
        "plan.devices=[edge-phone,tablet,cloud-gpu]",
        "--address",
        local_cluster.url,
        "--follow",
    )
    assert r.returncode == 2, r.stdout + r.stderr
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("splitlearn: error:")]
    assert len(err) == 1 and "devices missing from the Ray cluster: tablet" in err[0], r.stderr
    assert f"--topology {tmp_path / 'four.yaml'} --device tablet" in err[0]
    assert "submitted job" not in r.stdout
    assert time.monotonic() - t0 < 60
