"""Tier 3: split training on a real local Ray cluster (gloo) equals single-process training."""

import json

import pytest
import torch
from conftest import ROOT, checkpoint_state, inline_topology
from families import TINY

from splitlearn.config import config_from_container
from splitlearn.data import BatchSource, load_dataset
from splitlearn.errors import PlacementError
from splitlearn.models import build_model
from splitlearn.models.build import weights_dtype
from splitlearn.optim import make_optimizer, reference_step
from splitlearn.replay import replay
from splitlearn.trainer import train

pytestmark = pytest.mark.ray


def run_config(tmp_path, family, devices, steps=3, cuts=None, packing=True, topology=None, runtime=None, **train_kw):
    raw = {
        "name": f"t-{family}",
        "model": {"family": family, "config": {**TINY[family], "vocab_size": 258}},
        "data": {"path": str(ROOT / "data" / "quickstart.txt"), "seq_len": 16, "packing": packing},
        "topology": {"inline": topology or inline_topology()},
        "train": {
            "steps": steps,
            "batch_size": 4,
            "micro_batches": 2,
            "lr": 1e-2,
            "seed": 7,
            "max_grad_norm": 0.5,
            **train_kw,
        },
        "plan": {"partitioner": "manual" if cuts else "uniform", "devices": devices, "cuts": cuts or []},
        "runtime": {"output_dir": str(tmp_path / "runs"), "progress": "none", "timeout_s": 60, **(runtime or {})},
    }
    return config_from_container(raw, [], "test", tmp_path)


def reference(cfg, steps):
    run = cfg.run
    model = build_model(run.model, run.train.seed).to(weights_dtype(run.train.dtype))
    model.train()
    opt = make_optimizer(model.parameters(), run.train)
    ds, _ = load_dataset(run.data)
    batches = BatchSource(ds, run.train.batch_size, run.train.seed)
    losses = [reference_step(model, batches.batch(s), run.train, opt, s)[0] for s in range(steps)]
    return model, losses


@pytest.mark.parametrize(
    "family,devices,cuts,packing",
    [
        ("gpt2", ["edge-a", "mid-b", "cloud-c"], None, True),  # tied embeddings across stages
        ("llama", ["edge-a", "mid-b", "cloud-c", "cloud-d"], [1, 3, 5], False),  # padded rows
    ],
)
def test_split_training_equals_single_process(ray_cluster, tmp_path, family, devices, cuts, packing):
    steps = 3
    cfg = run_config(tmp_path, family, devices, steps=steps, cuts=cuts, packing=packing)
    result = train(cfg, progress="none")
    ref_model, ref_losses = reference(cfg, steps)

    torch.testing.assert_close(torch.tensor(result.losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-5)
    state = checkpoint_state(result.run_dir, steps)
    ref_state = ref_model.state_dict()
    assert set(state) <= set(ref_state)
    covered = {k for k in ref_state if k in state}
    # every parameter of the model is in some shard (a tied weight under either name)
    assert {n for n, _ in ref_model.named_parameters()} <= covered | {"lm_head.weight"}
    for k in state:
        torch.testing.assert_close(state[k], ref_state[k], rtol=1e-5, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    # the parameters moved: equality is not the trivial one of an untrained model
    init = build_model(cfg.run.model, cfg.run.train.seed).state_dict()
    assert any(not torch.allclose(state[k], init[k]) for k in state)

    run_dir = result.run_dir
    for f in ("config.yaml", "plan.yaml", "metrics.jsonl", "summary.json", "checkpoints/step_00000003/manifest.json"):
        assert (run_dir / f).is_file(), f
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(steps))
    first = rows[0]
    assert len(first["stages"]) == len(devices)
    assert all(s["compute_s"] > 0 for s in first["stages"])
    # compute split into forwards and backwards (the rest is the STEP's own compute)
    m = cfg.run.train.micro_batches
    assert all(s["micro_batches"] == m and 0 < s["fwd_s"] and 0 < s["bwd_s"] for s in first["stages"])
    assert all(s["fwd_s"] + s["bwd_s"] <= s["compute_s"] for s in first["stages"])
    # the summary's replay: the simulator on this run's measured compute, the plan's links
    replayed, free = replay(result.plan, [r["stages"] for r in rows])
    assert result.summary["replayed_step_ms"] == pytest.approx(replayed)
    assert result.summary["replayed_free_links_step_ms"] == pytest.approx(free)
    assert free <= replayed
    assert first["bytes_sent"]["0->1"] > 0 and first["tokens_per_s"] > 0


def test_bf16_split_training_runs(ray_cluster, tmp_path):
    cfg = run_config(tmp_path, "llama", ["edge-a", "mid-b"], steps=2, dtype="bf16")
    result = train(cfg, progress="none")
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))


@pytest.mark.parametrize("dtype", ["bf16-master", "bf16-pure"])
def test_bf16_weights_split_equals_single_process(ray_cluster, tmp_path, dtype):
    """bf16 weights (with fp32 master weights and moments, or all bf16): the split run does the
    single process's arithmetic, so losses and weights agree to bf16's last bits; only what
    trains has optimizer state, and under bf16-master its master copy is the fp32 weight the
    bf16 one rounds."""
    from safetensors.torch import load_file

    from splitlearn.checkpoint import latest

    steps = 2
    cfg = run_config(tmp_path, "llama", ["edge-a", "mid-b"], steps=steps, dtype=dtype)
    result = train(cfg, progress="none")
    ref_model, ref_losses = reference(cfg, steps)
    torch.testing.assert_close(torch.tensor(result.losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-5)
    state = checkpoint_state(result.run_dir, steps)
    ref_state = ref_model.state_dict()
    assert all(v.dtype == torch.bfloat16 for v in state.values() if v.is_floating_point())
    for k in state:
        # bf16 has 8 bits of mantissa: one unit in the last place is 2**-8 of the value
        torch.testing.assert_close(state[k], ref_state[k], rtol=2**-7, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    init = build_model(cfg.run.model, cfg.run.train.seed).to(torch.bfloat16).state_dict()
    assert any(not torch.equal(state[k], init[k]) for k in state)
    ck = latest(result.run_dir)
    optim = {}
    for name in ck.files:
        if name.endswith(".optim.safetensors"):
            optim.update(load_file(ck.path / name))
    moments = {k for k in optim if k.endswith("/exp_avg")}
    assert moments and all(
        optim[k].dtype == (torch.float32 if dtype == "bf16-master" else torch.bfloat16) for k in moments
    )
    masters = {k[len("optim/") : -len("/master")]: v for k, v in optim.items() if k.endswith("/master")}
    if dtype == "bf16-master":
        assert set(masters) == {k[len("optim/") : -len("/exp_avg")] for k in moments}
        for k, m in masters.items():
            assert m.dtype == torch.float32 and torch.equal(m.to(torch.bfloat16), state[k])
    else:
        assert not masters


def test_device_missing_from_cluster(ray_cluster, tmp_path):
    """A topology device that no Ray node carries: one error naming it, and no run directory."""
    cfg = run_config(tmp_path, "llama", ["edge-a", "ghost"], topology=inline_topology(devices=["edge-a", "ghost"]))
    with pytest.raises(PlacementError) as e:
        train(cfg, progress="none")
    msg = str(e.value)
    assert "ghost" in msg and "splitlearn node start" in msg and "\n" not in msg
    assert not (tmp_path / "runs").exists()
