"""Tier 3: checkpoints, resume and surviving a lost worker or device, on real Ray.

Every run here trains the same model for the same steps with the same seed; an
interrupted run must end with exactly the parameters of the uninterrupted one."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, checkpoint_state, inline_topology
from families import TINY

from splitlearn.checkpoint import latest
from splitlearn.config import config_from_container, load_config
from splitlearn.trainer import train

pytestmark = pytest.mark.ray
STEPS = 6


def raw_config(tmp_path: Path, run_name: str, latency_ms: float = 0.1, **runtime) -> dict:
    topo = inline_topology()
    topo["links"]["default"]["latency_ms"] = latency_ms
    return {
        "name": "resil",
        "model": {"family": "gpt2", "config": {**TINY["gpt2"], "vocab_size": 258}},
        "data": {"path": str(ROOT / "data" / "quickstart.txt"), "seq_len": 16},
        "topology": {"inline": topo},
        "train": {"steps": STEPS, "batch_size": 4, "micro_batches": 2, "lr": 1e-2, "seed": 11},
        "plan": {"devices": ["edge-a", "mid-b", "cloud-c"]},
        "checkpoint": {"every_steps": 2, "keep": 3},
        "runtime": {
            "schedule": "1f1b",
            "output_dir": str(tmp_path / "runs"),
            "run_name": run_name,
            "progress": "none",
            "timeout_s": 30,
            "placement_timeout_s": 30,
            "emulate_links": latency_ms > 1,
            **runtime,
        },
    }


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    return checkpoint_state(run_dir, STEPS)


def assert_same_params(a: dict, b: dict):
    assert set(a) == set(b) and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


@pytest.fixture(scope="module")
def reference(ray_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    result = train(config_from_container(raw_config(tmp, "ref"), [], "test", tmp), progress="none")
    return result.run_dir, final_state(result.run_dir), result.losses


def test_checkpoints_are_whole_and_kept(reference):
    run_dir, _, losses = reference
    steps = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert steps == ["step_00000002", "step_00000004", "step_00000006"]
    ck = latest(run_dir)
    assert {f for f in ck.files} >= {"stage_0.safetensors", "stage_0.optim.safetensors"}
    assert len(losses) == STEPS


def test_resume_after_a_stage_is_killed(ray_cluster, tmp_path, reference):
    """ray.kill a stage's worker mid-run: the run restarts it, resumes from the last
    checkpoint by itself, and ends with the uninterrupted run's parameters."""
    import ray

    cfg = config_from_container(raw_config(tmp_path, "killed", latency_ms=60), [], "test", tmp_path)
    out: dict = {}
    t = threading.Thread(target=lambda: out.update(result=train(cfg, progress="none")))
    t.start()
    metrics = tmp_path / "runs" / "killed" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    ray.kill(ray.get_actor("killed:a0:stage1", namespace="splitlearn"), no_restart=True)
    t.join(timeout=300)
    assert not t.is_alive()
    result = out["result"]
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["restarts"] == 1 and summary["steps_redone"] >= 1, summary
    assert any(e["kind"] == "restart" and "stage 1" in e["reason"] for e in summary["events"]), summary["events"]
    assert_same_params(final_state(result.run_dir), reference[1])
    torch.testing.assert_close(torch.tensor(result.losses), torch.tensor(reference[2]), rtol=1e-5, atol=1e-6)


def test_truncated_shard_falls_back_to_the_previous_checkpoint(ray_cluster, tmp_path, reference):
    run_dir = tmp_path / "runs" / "ref"
    shutil.copytree(reference[0], run_dir)
    shard = run_dir / "checkpoints" / "step_00000006" / "stage_1.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])  # truncated
    (run_dir / "summary.json").unlink()
    cfg = config_from_container(raw_config(tmp_path, "ref"), [], "test", tmp_path)
    result = train(cfg, progress="none", resume=str(run_dir))
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    skipped = [e for e in events if e["kind"] == "checkpoint_skipped" or "truncated" in e["reason"]]
    resumed = [e for e in events if e["kind"] == "resume"]
    assert resumed and "step_00000004" in resumed[-1]["reason"], events
    assert skipped and "stage_1.safetensors" in skipped[0]["reason"], events
    assert_same_params(final_state(result.run_dir), reference[1])


@pytest.mark.slow
def test_crash_during_a_checkpoint_write_keeps_the_previous_one(ray_cluster, tmp_path, reference):
    """The driver process is killed (SIGKILL) after the stages wrote step 4's files and
    before its manifest: step 4 is not whole, step 2 is intact, and a resumed run uses it
    and ends with the uninterrupted run's parameters."""
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(raw_config(tmp_path, "crash")))
    env = {**os.environ, "SPLITLEARN_FAULT": "kill-before-manifest:4", "RAY_ADDRESS": ""}
    r = subprocess.run(
        [sys.executable, "-m", "splitlearn", "train", str(cfg_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert r.returncode == -9, r.stderr[-2000:]
    run_dir = tmp_path / "runs" / "crash"
    assert (run_dir / "checkpoints" / "step_00000004" / "stage_0.safetensors").is_file()
    assert not (run_dir / "checkpoints" / "step_00000004" / "manifest.json").exists()
    assert latest(run_dir).step == 2
    result = train(load_config(cfg_path), progress="none", resume=str(run_dir))
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert any(e["kind"] == "resume" and "step_00000002" in e["reason"] for e in events), events
    assert_same_params(final_state(result.run_dir), reference[1])


REPLAN = textwrap.dedent(
    """
    import json, sys, threading, time
    from pathlib import Path
    import ray
    from ray.cluster_utils import Cluster
    sys.path.insert(0, sys.argv[3])
    from cluster.topology import device_resource
    from splitlearn.config import config_from_container
    from splitlearn.trainer import train

    raw = json.loads(Path(sys.argv[1]).read_text())
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    nodes = {d: cluster.add_node(num_cpus=1, resources={device_resource(d): 1})
             for d in ("edge-a", "mid-b", "cloud-c", "cloud-d")}
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    cfg = config_from_container(raw, [], "test", Path(sys.argv[2]))
    out = {}
    t = threading.Thread(target=lambda: out.update(r=train(cfg, progress="none")))
    t.start()
    metrics = Path(raw["runtime"]["output_dir"]) / "replan" / "metrics.jsonl"
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    cluster.remove_node(nodes["cloud-c"])
    t.join(timeout=300)
    r = out["r"]
    print(json.dumps({"summary": r.summary, "devices": r.plan.devices}))
    ray.shutdown()
    cluster.shutdown()
    """
)


def test_device_lost_for_good_replans(tmp_path):
    raw = raw_config(tmp_path, "replan", latency_ms=60, replan_on_failure=True)
    raw["plan"]["devices"] = ["edge-a", "mid-b", "cloud-c"]
    (tmp_path / "cfg.json").write_text(json.dumps(raw))
    r = subprocess.run(
        [sys.executable, "-c", REPLAN, str(tmp_path / "cfg.json"), str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "RAY_ADDRESS": ""},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    summary = res["summary"]
    assert summary["replans"] == 1 and summary["steps"] == STEPS, summary
    assert "cloud-c" not in res["devices"]
    assert any(e["kind"] == "replan" and "cloud-c" in e["reason"] for e in summary["events"]), summary["events"]
