"""Tier 3: fine-tuning methods in the real runtime (Ray actors over gloo, real peft): LoRA,
frozen and int8 stages train like the unsplit model with the same methods, only adapters
change, and the adapters written at the end load with peft (and the merged model with
transformers) giving the trained model's logits."""

import pytest
import torch
from conftest import ROOT, inline_topology
from families import TINY
from safetensors.torch import load_file

from splitlearn.config import config_from_container
from splitlearn.data import BatchSource, load_dataset
from splitlearn.method_policy import apply_plan
from splitlearn.models import build_model
from splitlearn.models.methods import base_state_dict
from splitlearn.optim import make_optimizer, reference_step
from splitlearn.planning import make_plan
from splitlearn.trainer import train

pytestmark = pytest.mark.ray


def run_config(tmp_path, family, devices, cuts, by_stage, schedule, steps=3, merge=False):
    raw = {
        "name": f"ft-{family}",
        "model": {"family": family, "config": {**TINY[family], "vocab_size": 258}},
        "data": {"path": str(ROOT / "data" / "quickstart.txt"), "seq_len": 16, "packing": False},
        "topology": {"inline": inline_topology()},
        "train": {"steps": steps, "batch_size": 4, "micro_batches": 2, "lr": 1e-2, "seed": 7, "max_grad_norm": 0.5},
        "plan": {"partitioner": "manual", "devices": devices, "cuts": cuts},
        "finetune": {"lora": {"r": 4, "alpha": 8}, "by_stage": by_stage, "merge_adapters": merge},
        "runtime": {"schedule": schedule, "output_dir": str(tmp_path / "runs"), "progress": "none", "timeout_s": 60},
    }
    return config_from_container(raw, [], "test", tmp_path)


def reference(cfg, steps):
    """The unsplit model with every stage's method applied to its range, trained on one
    process: what split training must equal."""
    run = cfg.run
    model = build_model(run.model, run.train.seed)
    apply_plan(model, make_plan(cfg), run)
    model.train()
    opt = make_optimizer(model.parameters(), run.train)
    ds, _ = load_dataset(run.data)
    batches = BatchSource(ds, run.train.batch_size, run.train.seed)
    losses = [reference_step(model, batches.batch(s), run.train, opt, s)[0] for s in range(steps)]
    return model, losses


def final_shards(run_dir):
    """The stage files of the run's last checkpoint, merged by name."""
    files = [p for p in run_dir.rglob("stage_*.safetensors") if ".optim." not in p.name]
    last = max(p.parent for p in files)
    state = {}
    for p in files:
        if p.parent == last:
            state.update(load_file(p))
    return state


def sample_ids(cfg):
    ds, _ = load_dataset(cfg.run.data)
    b = BatchSource(ds, 4, 123).batch(0)
    return b["input_ids"], b["attention_mask"]


def test_lora_frozen_run_equals_single_process_and_adapters_load(ray_cluster, tmp_path):
    """GPT-2 (Conv1D layers, tied embeddings) on three stages: LoRA with recompute, frozen,
    LoRA. Losses equal the unsplit model's with the same methods; only adapters moved;
    adapter/ loads with peft onto the base model and merged/ with transformers, both
    giving the trained model's logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    steps = 3
    by_stage = {"0": {"method": "lora", "recompute": True}, "1": {"method": "frozen"}, "2": {"method": "lora"}}
    cfg = run_config(tmp_path, "gpt2", ["edge-a", "mid-b", "cloud-c"], [2, 4], by_stage, "gpipe", steps, merge=True)
    result = train(cfg, progress="none")
    ref_model, ref_losses = reference(cfg, steps)
    torch.testing.assert_close(torch.tensor(result.losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-5)
    assert result.losses[-1] < result.losses[0]

    init = build_model(cfg.run.model, cfg.run.train.seed).state_dict()
    state = final_shards(result.run_dir)
    base = {k: v for k, v in state.items() if not k.startswith("base_model.")}
    adapters = {k: v for k, v in state.items() if k.startswith("base_model.")}
    assert base and adapters and set(base) <= set(init)
    for k, v in base.items():  # every base weight, of every stage, is untouched
        assert torch.equal(v, init[k]), k
    for k, v in adapters.items():  # the adapters are the unsplit model's
        own = (
            k.removeprefix("base_model.model.")
            .replace(".lora_A.", ".lora_A.default.")
            .replace(".lora_B.", ".lora_B.default.")
        )
        torch.testing.assert_close(v, dict(ref_model.named_parameters())[own].detach(), rtol=1e-5, atol=1e-5)

    ids, mask = sample_ids(cfg)
    ref_model.eval()
    with torch.no_grad():
        want = ref_model(input_ids=ids, attention_mask=mask).logits
        peft_model = PeftModel.from_pretrained(
            build_model(cfg.run.model, cfg.run.train.seed), result.run_dir / "adapter"
        )
        got = peft_model.eval()(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        merged = AutoModelForCausalLM.from_pretrained(result.run_dir / "merged", local_files_only=True).eval()
        torch.testing.assert_close(merged(input_ids=ids, attention_mask=mask).logits, want, rtol=1e-4, atol=1e-4)
    # 2 LoRA stages x 1 block x (c_attn, attn.c_proj, mlp.c_proj)
    assert result.summary["exported"]["adapter"]["modules"] == 2 * 1 * 3


def test_int8_lora_edge_stage_with_a_full_cloud_stage(ray_cluster, tmp_path):
    """Llama on two stages under 1F1B: the edge stage trains LoRA on int8 frozen weights,
    the cloud stage trains fully. Losses equal the unsplit model's with the same methods;
    the edge's base is the int8 weights it started with, the cloud's weights moved."""
    steps = 3
    by_stage = {"0": {"method": "lora", "frozen_dtype": "int8"}}
    cfg = run_config(tmp_path, "llama", ["edge-a", "cloud-c"], [3], by_stage, "1f1b", steps)
    plan = make_plan(cfg)
    assert [s.method_label for s in plan.stages] == ["lora+int8", "full"]
    result = train(cfg, progress="none")
    ref_model, ref_losses = reference(cfg, steps)
    torch.testing.assert_close(torch.tensor(result.losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-5)

    state = final_shards(result.run_dir)
    ref = base_state_dict(ref_model)
    init = build_model(cfg.run.model, cfg.run.train.seed).state_dict()
    edge = [k for k in ref if k.startswith(("model.embed_tokens", "model.layers.0.", "model.layers.1."))]
    cloud = [k for k in ref if k.startswith(("model.layers.2.", "model.layers.3.", "lm_head", "model.norm"))]
    for k in edge:  # int8 weights dequantized: within a quantization step of the initial ones, and unchanged
        torch.testing.assert_close(state[k], ref[k], rtol=0, atol=0)
        assert (state[k] - init[k]).abs().max() <= init[k].abs().max() / 127 + 1e-6, k
    for k in cloud:
        torch.testing.assert_close(state[k], ref[k], rtol=1e-5, atol=1e-5)
    assert any(not torch.allclose(state[k], init[k]) for k in cloud)
