"""Issue 20's hostile conditions: every error that crosses a Ray boundary pickles, an
unreachable Ray address fails within ``ray.connect_timeout_s`` naming it, and library notices
never reach the screen before the one error line."""

from __future__ import annotations

import pickle
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, inline_topology
from families import TINY

from cluster.errors import PlacementError, UserError
from cluster.ray_cluster import wait_reachable
from partitioners.schedule import ScheduleError
from splitlearn.errors import StageFailed


def _error_types() -> list[type[BaseException]]:
    """Every error type of the product, found as subclasses once their modules are imported."""
    import cluster.jobs  # noqa: F401  (each defines an error type)
    import partitioners.simulator  # noqa: F401
    import splitlearn.checkpoint  # noqa: F401
    import splitlearn.zero  # noqa: F401

    seen: list[type[BaseException]] = []
    todo: list[type[BaseException]] = [UserError, StageFailed, ScheduleError]
    while todo:
        cls = todo.pop()
        if cls not in seen:
            seen.append(cls)
            todo.extend(cls.__subclasses__())
    return sorted(seen, key=lambda c: c.__name__)


SAMPLE_ARGS = {StageFailed: (2, "cloud-c", 7, "RECV(3)", "no answer within 5 s (runtime.timeout_s)")}


@pytest.mark.parametrize("cls", _error_types(), ids=lambda c: c.__name__)
def test_every_error_pickles_across_a_ray_boundary(cls):
    """A worker's error reaches the driver pickled inside Ray's task error; the driver's
    restart path (``runtime._unwrap``) must find it whole (a ``StageFailed`` with its stage)."""
    import ray.cloudpickle as cloudpickle
    from ray.exceptions import RayTaskError

    from splitlearn.runtime import _unwrap

    err = cls(*SAMPLE_ARGS.get(cls, ("what is wrong, named",)))
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is cls and str(back) == str(err)
    assert vars(back) == vars(err)
    wrapped = cloudpickle.loads(cloudpickle.dumps(RayTaskError("run_step", "Traceback ...", err).as_instanceof_cause()))
    if issubclass(cls, (UserError, StageFailed)):
        inner = _unwrap(wrapped)
        assert type(inner) is cls and str(inner) == str(err) and vars(inner) == vars(err)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_address_fails_within_the_timeout():
    address = f"127.0.0.1:{_closed_port()}"
    t0 = time.monotonic()
    with pytest.raises(PlacementError, match=f"'{address}' within ray.connect_timeout_s=0.5 s"):
        wait_reachable(address, 0.5)
    assert time.monotonic() - t0 < 5  # the bound itself: Ray alone retries for minutes


def test_train_against_a_dead_address_is_one_quiet_line(tmp_path: Path):
    """The command line end to end: a GPT-2 whose token ids transformers warns about (a
    library notice that must go to the log, not the screen), then a dead ``RAY_ADDRESS``:
    exit 2 within the timeout, stderr exactly the one error line naming the address, no run
    directory."""
    address = f"127.0.0.1:{_closed_port()}"
    gpt2 = {"family": "gpt2", "config": {**TINY["gpt2"], "vocab_size": 258}}  # bos/eos 50256: warned
    cfg = {
        "name": "dead",
        "model": gpt2,
        "data": {"path": str(ROOT / "data" / "quickstart.txt"), "seq_len": 16},
        "topology": {"inline": inline_topology()},
        "train": {"steps": 2, "batch_size": 4, "micro_batches": 2},
        "plan": {"devices": ["edge-a", "mid-b"]},
        "runtime": {"output_dir": str(tmp_path / "runs"), "progress": "none"},
        "ray": {"connect_timeout_s": 1.0},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    r = subprocess.run(
        [sys.executable, "-m", "splitlearn", "train", str(tmp_path / "run.yaml")],
        capture_output=True,
        text=True,
        timeout=180,
        env={"RAY_ADDRESS": address, "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(ROOT)},
        cwd=tmp_path,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.splitlines() == [r.stderr.strip()] and r.stderr.startswith("splitlearn: error: ray.address:")
    assert f"'{address}'" in r.stderr and "ray.connect_timeout_s=1 s" in r.stderr
    assert not (tmp_path / "runs").exists()


def test_sigterm_stops_a_waiting_train(tmp_path: Path):
    """SIGTERM while ``train`` waits for an unreachable cluster: stopped at once (not after
    the timeout), one line, exit 143, nothing written."""
    import signal

    address = f"127.0.0.1:{_closed_port()}"
    cfg = {
        "name": "term",
        "model": {"family": "llama", "config": {**TINY["llama"], "vocab_size": 258}},
        "data": {"path": str(ROOT / "data" / "quickstart.txt"), "seq_len": 16},
        "topology": {"inline": inline_topology()},
        "train": {"steps": 2, "batch_size": 4, "micro_batches": 2},
        "plan": {"devices": ["edge-a", "mid-b"]},
        "runtime": {"output_dir": str(tmp_path / "runs"), "progress": "none"},
        "ray": {"address": address, "connect_timeout_s": 120.0},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    p = subprocess.Popen(
        [sys.executable, "-m", "splitlearn", "train", str(tmp_path / "run.yaml")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(ROOT)},
        cwd=tmp_path,
    )
    try:
        assert p.stdout is not None
        for line in p.stdout:  # the plan is printed just before the driver attaches to Ray
            if line.startswith("predicted step"):
                break
        time.sleep(0.5)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=20)
    finally:
        p.kill()
    assert p.returncode == 143 and err.strip() == "splitlearn: terminated", err[-2000:]
    assert not (tmp_path / "runs").exists()


def test_a_stopped_worker_is_named_and_the_run_restarts(ray_cluster, tmp_path: Path):
    """SIGSTOP a stage's worker mid-run (a hung process, not a dead one): its peer's receive
    times out, the driver finds which worker stopped answering, names it in events.jsonl,
    kills it and restarts from the last checkpoint like after a killed worker."""
    import json
    import os
    import signal
    import threading

    import ray

    from splitlearn.config import config_from_container
    from splitlearn.trainer import train

    topo = inline_topology()
    topo["links"]["default"]["latency_ms"] = 60
    raw = {
        "name": "stop",
        "model": {"family": "gpt2", "config": {**TINY["gpt2"], "vocab_size": 258}},
        "data": {"path": str(ROOT / "data" / "quickstart.txt"), "seq_len": 16},
        "topology": {"inline": topo},
        "train": {"steps": 6, "batch_size": 4, "micro_batches": 2, "seed": 3},
        "plan": {"devices": ["edge-a", "mid-b"]},
        "checkpoint": {"every_steps": 2},
        "runtime": {
            "output_dir": str(tmp_path / "runs"),
            "run_name": "stopped",
            "progress": "none",
            "timeout_s": 3,
            "placement_timeout_s": 30,
            "emulate_links": True,
        },
    }
    out: dict = {}
    cfg = config_from_container(raw, [], "test", tmp_path)
    t = threading.Thread(target=lambda: out.update(result=train(cfg, progress="none")))
    t.start()
    metrics = tmp_path / "runs" / "stopped" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    pid = ray.get(ray.get_actor("stopped:a0:stage1", namespace="splitlearn").ping.remote(), timeout=10)
    os.kill(pid, signal.SIGSTOP)
    t.join(timeout=120)
    assert not t.is_alive()
    summary = json.loads((tmp_path / "runs" / "stopped" / "summary.json").read_text())
    assert summary["restarts"] == 1 and summary["steps"] == 6, summary
    events = [json.loads(line) for line in (tmp_path / "runs" / "stopped" / "events.jsonl").read_text().splitlines()]
    restart = [e for e in events if e["kind"] == "restart"]
    assert restart and "stage 1 on device 'mid-b'" in restart[0]["reason"], events
    assert "stopped answering" in restart[0]["reason"] and restart[0]["step"] >= 3, events
    attempts = [json.loads(line)["attempt"] for line in metrics.read_text().splitlines()]
    assert summary["steps_redone"] == attempts.count(0) - (6 - attempts.count(1)), (summary, attempts)
    assert summary["time_lost_s"] >= 3  # the peer's wait of runtime.timeout_s that found the failure
    assert not _alive(pid)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_node_start_moves_taken_agent_ports_and_names_taken_head_ports(monkeypatch):
    """Next to another Ray: a taken GCS port is named, a taken agent port moves to a free one."""
    from cluster import node

    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        with pytest.raises(PlacementError, match=f"{taken} \\(--port\\) already taken"):
            node.with_free_ports(["ray", "start", "--head", "--port", str(taken)], head=True)
        monkeypatch.setattr(node, "TOLD_PORTS", {"--port": node.free_port()})
        monkeypatch.setattr(node, "AGENT_PORTS", {"--dashboard-agent-listen-port": taken})
        cmd = node.with_free_ports(["ray", "start", "--head"], head=True)
    flag = cmd.index("--dashboard-agent-listen-port")
    assert cmd[:3] == ["ray", "start", "--head"] and int(cmd[flag + 1]) != taken


EMBEDDED = """
import json, sys
import ray
from ray._private.services import canonicalize_bootstrap_address
sys.path.insert(0, sys.argv[1])
from cluster.ray_cluster import connect, devices_in_cluster
from cluster.topology import topology_from_container
topo = topology_from_container(json.loads(sys.argv[2]))
found = canonicalize_bootstrap_address(None)  # what a plain ray.init() attaches to
handle = connect(topo, None, 1, timeout_s=5)
print(json.dumps({"found": found, "gcs": ray.get_runtime_context().gcs_address,
                  "devices": sorted(devices_in_cluster()), "temp_dir": handle.temp_dir}))
handle.shutdown()
"""


@pytest.mark.ray
@pytest.mark.slow
def test_embedded_cluster_starts_its_own_next_to_a_ray_start_head(tmp_path: Path):
    """A head that `ray start` left on the machine (the one a plain ``ray.init()`` would attach
    to, with "num_cpus must not be provided"): the embedded cluster starts its own beside it."""
    import json
    import os
    import shutil
    import tempfile

    from cluster.node import free_port, ray_executable, stop_nodes

    root = tempfile.mkdtemp(prefix="slh", dir="/tmp")  # Ray's socket paths must stay short
    env = {**os.environ, "RAY_TMPDIR": root, "RAY_ADDRESS": ""}
    port = free_port()
    head = [ray_executable(), "start", "--head", "--port", str(port), "--num-cpus", "1"]
    try:
        up = subprocess.run(
            [*head, "--include-dashboard=false", "--disable-usage-stats"], env=env, capture_output=True, timeout=120
        )
        assert up.returncode == 0, up.stderr[-2000:]
        r = subprocess.run(
            [sys.executable, "-c", EMBEDDED, str(ROOT), json.dumps(inline_topology(["edge-a", "mid-b"]))],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        stop_nodes([root], grace_s=1.0)
        shutil.rmtree(root, ignore_errors=True)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["found"].endswith(f":{port}")  # the other Ray is there to be found
    assert not out["gcs"].endswith(f":{port}") and out["devices"] == ["edge-a", "mid-b"], out
    assert not Path(out["temp_dir"]).exists()


def test_worker_output_goes_to_the_run_log(tmp_path: Path, capsys):
    """What Ray forwards from a worker's stderr (a library warning, DeepSpeed's accelerator
    note) lands in the run's log.txt, not on the screen."""
    from ray._private.worker import global_worker_stdstream_dispatcher as dispatcher

    from splitlearn import logs

    logs.setup(verbose=False)
    try:
        logs.route_worker_output()
        assert [name for name, _ in dispatcher.handlers] == ["splitlearn_worker_output"]
        logs.attach_run_log(tmp_path)
        line = "[WARNING] [real_accelerator.py:212:get_accelerator] Setting accelerator to CPU."
        dispatcher.emit({"lines": [line], "is_err": True, "pid": 4242, "actor_name": "StageWorker"})
    finally:
        dispatcher.remove_handler("splitlearn_worker_output")
    assert "StageWorker pid=4242: " + line in (tmp_path / "log.txt").read_text()
    captured = capsys.readouterr()
    assert "accelerator" not in captured.err + captured.out


def test_steps_redone_after_a_failure_in_a_save_and_on_resume(tmp_path: Path):
    """Steps counted as redone are those done since the checkpoint resumed from: 4 done, a
    failure while saving step 4's checkpoint, back to step 2: 2 redone (not 1); a resumed run
    counts those its metrics.jsonl holds past the checkpoint."""
    import json

    from partitioners import Plan
    from splitlearn.run_checkpoints import _redone
    from splitlearn.run_record import RunResult

    plan = Plan.__new__(Plan)
    live = RunResult(run_dir=tmp_path, plan=plan, steps_done=4)
    assert _redone(live, 2) == "; 2 step(s) to redo" and live.steps_redone == 2 and live.steps_done == 2
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in (0, 1, 2, 3, 2, 3, 4)))
    resumed = RunResult(run_dir=tmp_path, plan=plan)
    _redone(resumed, 2)
    assert resumed.steps_redone == 3  # steps 2, 3 and 4 were done before the run stopped
