"""Tier 3: attach to an existing multi-node Ray cluster (one node per device) by address."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
from conftest import ROOT

pytestmark = pytest.mark.ray

SCRIPT = textwrap.dedent(
    """
    import json, os, subprocess, sys
    from ray.cluster_utils import Cluster
    from cluster.topology import device_resource

    devices = ["edge-phone", "home-server", "cloud-gpu"]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    nodes = {}
    for d in devices:
        nodes[d] = cluster.add_node(num_cpus=1, resources={device_resource(d): 1})
    cluster.wait_for_nodes()
    out = sys.argv[1]
    env = {**os.environ, "RAY_ADDRESS": ""}
    r = subprocess.run(
        [sys.executable, "-m", "splitlearn", "train", sys.argv[2], "train.steps=2", "runtime.progress=log",
         f"ray.address={cluster.address}", f"runtime.output_dir={out}", "runtime.run_name=mn", "-v"],
        capture_output=True, text=True, timeout=400, env=env,
    )
    print(json.dumps({"rc": r.returncode, "stdout": r.stdout, "stderr": r.stderr[-4000:],
                      "nodes": {d: n.node_id for d, n in nodes.items()}}))
    cluster.shutdown()
    """
)


def test_train_attaches_to_a_multi_node_cluster(tmp_path):
    r = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "runs"), str(ROOT / "configs" / "quickstart.yaml")],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={**os.environ, "RAY_ADDRESS": ""},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["rc"] == 0, res["stderr"]
    assert (tmp_path / "runs" / "mn" / "checkpoints" / "step_00000002" / "manifest.json").is_file()
    # each stage ran on the node that carries its device
    for stage, device in enumerate(["edge-phone", "home-server", "cloud-gpu"]):
        assert f"stage {stage} on {device}" in res["stderr"] + res["stdout"]
        assert f"node {res['nodes'][device]}" in res["stderr"] + res["stdout"], res["stderr"]
