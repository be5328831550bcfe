"""Tier 3: the transport audit over real runs: plain, U-shaped, replicated and offloaded plans."""

import os

import pytest
from conftest import ROOT, inline_topology
from families import TINY

from splitlearn.config import config_from_container
from splitlearn.privacy.audit import summary, transfers, violations
from splitlearn.trainer import train

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def audited_run(tmp_path, name, family, plan, schedule="sequential", **finetune):
    raw = {
        "name": name,
        "model": {"family": family, "config": {**TINY[family], "vocab_size": 258}},
        "data": {"path": str(ROOT / "data" / "quickstart.txt"), "seq_len": 16},
        "topology": {"inline": inline_topology()},
        "train": {"steps": 2, "batch_size": 4, "micro_batches": 2, "seed": 3},
        "plan": plan,
        "finetune": finetune,
        "privacy": {"measure": "off"},
        "runtime": {
            "schedule": schedule,
            "output_dir": str(tmp_path),
            "run_name": name,
            "progress": "none",
            "checkpoint": False,
            "audit_transport": True,
            "timeout_s": 60,
            "placement_timeout_s": 30,
        },
    }
    cfg = config_from_container(raw, [], "test", tmp_path)
    result = train(cfg, progress="none")
    return result, transfers(result.stage_metrics), cfg.topology


@pytest.mark.ray
@pytest.mark.deepspeed
def test_replicated_offloaded_plan_sends_no_ids_and_labels_only_to_the_loss_stage(ray_cluster, tmp_path):
    plan = {"devices": ["edge-a", "cloud-c+cloud-d", "mid-b"]}
    result, sent, topo = audited_run(tmp_path, "plain", "llama", plan, "1f1b", by_stage={"1": {"offload": "optimizer"}})
    assert [len(s.devices) for s in result.plan.stages] == [1, 2, 1] and result.plan.stages[1].offload == "optimizer"
    assert violations(result.plan, topo, sent) == []
    kinds = summary(sent)
    assert kinds["labels edge-a->mid-b"] == 2  # the head is remote: the labels (the text) go there
    assert kinds["activation edge-a->cloud-c"] == kinds["activation edge-a->cloud-d"] == 2  # a micro-batch each
    assert all(t["dtype"] == "float32" for t in sent if t["kind"] in ("activation", "gradient"))


@pytest.mark.ray
def test_u_shaped_plan_keeps_labels_on_the_owner(ray_cluster, tmp_path):
    plan = {"devices": ["edge-a", "cloud-c"], "label_privacy": True}
    result, sent, topo = audited_run(tmp_path, "u", "llama", plan)
    assert [s.device for s in result.plan.stages] == ["edge-a", "cloud-c", "edge-a"]
    assert violations(result.plan, topo, sent) == []
    kinds = summary(sent)
    # the owner runs the loss: labels go from its first stage to its last, never off the device
    assert {k for k in kinds if k.startswith("labels")} <= {"labels edge-a->edge-a"}
    assert kinds["gradient edge-a->cloud-c"] == 4  # the U's tail sends gradients back (attack c), 2 steps x 2
