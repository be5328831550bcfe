"""Tier 3: workers build their segments from per-stage checkpoint directories on a real local
Ray cluster, and a stage that holds more than its device's memory stops with a named error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_ray_training import run_config

from splitlearn.cli import main
from splitlearn.errors import MemoryBudgetError
from splitlearn.models import build_model
from splitlearn.planning import make_plan
from splitlearn.trainer import train

pytestmark = pytest.mark.ray
DEVICES = ["edge-a", "mid-b", "cloud-c"]


def test_stage_directories_train_like_the_whole_checkpoint(ray_cluster, tmp_path):
    """`splitlearn shard` cuts a bf16 checkpoint by the plan; a run whose model.path names
    each stage's directory ({stage}) has the losses of a run on the whole checkpoint."""
    base = run_config(tmp_path, "llama", DEVICES, steps=2)
    ckpt = tmp_path / "ckpt"
    build_model(base.run.model, 0).to(torch.bfloat16).save_pretrained(ckpt)
    plan_path = tmp_path / "plan.yaml"
    plan_path.write_text(make_plan(base).to_yaml())
    assert main(["shard", str(ckpt), "--plan", str(plan_path), "--out", str(tmp_path / "stages")]) == 0
    losses = {}
    for name, path in (("whole", str(ckpt)), ("stages", str(tmp_path / "stages" / "stage_{stage}"))):
        cfg = run_config(tmp_path / name, "llama", DEVICES, steps=2)
        cfg.run.model.family, cfg.run.model.path, cfg.run.model.config = None, path, {}
        result = train(cfg)
        losses[name] = result.losses
        workers = result.summary["workers"]
        assert len(workers) == 3 and all(w["segment_bytes"] > 0 for w in workers)
        mem = result.summary["memory"]
        assert [m["stage"] for m in mem] == [0, 1, 2] and all(m["measured_gb"] > 0 for m in mem)
    assert losses["whole"] == losses["stages"]


def test_a_stage_directory_of_another_stage_is_refused(ray_cluster, tmp_path, capsys):
    cfg = run_config(tmp_path, "llama", DEVICES, steps=1)
    ckpt = tmp_path / "ckpt"
    build_model(cfg.run.model, 0).save_pretrained(ckpt)
    plan_path = tmp_path / "plan.yaml"
    plan_path.write_text(make_plan(cfg).to_yaml())
    assert main(["shard", str(ckpt), "--plan", str(plan_path), "--out", str(tmp_path / "stages")]) == 0
    cfg.run.model.family, cfg.run.model.path, cfg.run.model.config = None, str(tmp_path / "stages" / "stage_1"), {}
    config = tmp_path / "run.yaml"
    raw = json.loads(json.dumps(cfg.resolved_dict()))
    config.write_text(json.dumps(raw))  # JSON is YAML
    capsys.readouterr()  # what saving the checkpoint printed
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stage_1/splitlearn-stage.json" in err[0] and "holds chain layers [2, 4)" in err[0]
    assert not any(Path(cfg.run.runtime.output_dir).glob("*/metrics.jsonl"))


def test_a_stage_over_its_device_memory_stops_named(ray_cluster, tmp_path):
    """The plan fits (each device has 1 MB more than its stage is planned to need), but what a
    worker holds above its runtime is more: told that its CPU workers' libraries keep nothing
    (runtime.cpu_runtime_mb=0), the plan leaves out the ~18 MB a tiny model's workers hold."""

    def topo(gb):
        return {
            "devices": [
                {
                    "name": d,
                    "tier": "edge" if d.startswith("edge") else "cloud",
                    "memory_gb": gb,
                    "tflops": 0.02,
                    "owns_data": d == "edge-a",
                    "zone": "z",
                }
                for d in DEVICES
            ],
            "links": {"default": {"bandwidth_mbps": 1000, "latency_ms": 0.1}},
        }

    nothing = {"cpu_runtime_mb": 0.0}
    first = run_config(tmp_path, "llama", DEVICES, steps=2, topology=topo(1.0), runtime=nothing)
    budget = round(max(s.memory_gb for s in make_plan(first).stages) + 0.001, 6)
    cfg = run_config(tmp_path, "llama", DEVICES, steps=2, topology=topo(budget), runtime=nothing)
    assert all(s.memory_gb < budget for s in make_plan(cfg).stages)
    with pytest.raises(MemoryBudgetError, match=r"over the device's memory_gb=[0-9.]+ \(the plan predicted"):
        train(cfg)
