"""Profiler and cost model (tiers 1-2): counted FLOPs agree with the whole model's, memory
and time compose as documented, and `splitlearn profile` works from the command line."""

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, inline_topology
from families import TINY
from torch.utils.flop_counter import FlopCounterMode

from cluster.topology import Device
from partitioners.costmodel import micro_batches_in_flight, stage_memory, stage_time
from partitioners.profile import LayerProfile, ModelProfile, peak_allocated_bytes, profile_chain
from splitlearn.cli import main
from splitlearn.models import build_model
from splitlearn.models.chain import causal_lm_loss, layer_views


def cfg_for(family):
    return SimpleNamespace(
        family=family, path=None, config=TINY[family], adapter_module=None, attn_implementation="sdpa"
    )


@pytest.mark.parametrize("family", sorted(TINY))
def test_layer_flops_sum_to_the_whole_model(family):
    from partitioners.profile import register_cpu_attention_flops

    register_cpu_attention_flops()  # the same counter for the whole model as for its layers
    model = build_model(cfg_for(family), seed=0)
    ids = torch.randint(3, 96, (2, 16))
    with FlopCounterMode(display=False) as fc:
        loss = causal_lm_loss(model(input_ids=ids).logits, ids)
    whole_fwd = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        loss.backward()
    whole_bwd = fc.get_total_flops()
    profs = profile_chain(layer_views(model, None, ids), ids, measure_time=False)
    fwd, bwd = sum(p.fwd_flops for p in profs), sum(p.bwd_flops for p in profs)
    assert whole_fwd > 0 and whole_bwd > 0
    assert abs(fwd - whole_fwd) <= 0.01 * whole_fwd, (fwd, whole_fwd)
    assert abs(bwd - whole_bwd) <= 0.01 * whole_bwd, (bwd, whole_bwd)


def test_profile_fields():
    model = build_model(cfg_for("llama"), seed=0)
    ids = torch.randint(3, 96, (2, 16))
    profs = profile_chain(layer_views(model, None, ids), ids, repeats=2, warmup=1)
    names = [p.name for p in profs]
    assert len(profs) == 6
    hidden_bytes = 2 * 16 * 32 * 4
    assert profs[0].out_bytes == hidden_bytes and profs[1].in_bytes == hidden_bytes
    assert profs[-1].out_bytes == 0  # the head ends in a scalar loss: nothing crosses
    assert sum(p.params for p in profs) == sum(p.numel() for p in model.parameters())
    assert all(p.saved_bytes > 0 and p.fwd_ms > 0 and p.bwd_ms >= 0 for p in profs[1:]), names
    assert profs[1].bwd_transient_bytes > 0 and profs[1].opt_ms > 0
    again = ModelProfile.from_json(ModelProfile(profs, 2, 16).to_json())
    assert again.layers == profs


def test_peak_allocated_bytes_sees_a_known_allocation():
    def work():
        a = torch.empty(1_000_000, dtype=torch.float32)  # 4 MB
        b = torch.empty(500_000, dtype=torch.float32)  # 2 MB more while a lives
        del a, b

    peak = peak_allocated_bytes(work, torch.device("cpu"))
    assert 6_000_000 <= peak <= 6_100_000


def layer(saved=100, out=10, inp=10, params=1000, transient=5):
    return LayerProfile(
        "l",
        params=params,
        in_bytes=inp,
        out_bytes=out,
        saved_bytes=saved,
        bwd_transient_bytes=transient,
        fwd_ms=1.0,
        bwd_ms=2.0,
        opt_ms=0.5,
        fwd_flops=10**9,
        bwd_flops=2 * 10**9,
    )


def test_in_flight_micro_batches():
    assert micro_batches_in_flight("sequential", 0, 4, 8) == 1
    assert micro_batches_in_flight("gpipe", 3, 4, 8) == 8
    assert [micro_batches_in_flight("1f1b", s, 4, 8) for s in range(4)] == [4, 3, 2, 1]
    assert micro_batches_in_flight("1f1b", 0, 4, 2) == 2


def test_stage_memory_by_hand():
    ls = [layer(), layer()]
    m = stage_memory(ls, stage=1, num_stages=4, schedule="gpipe", num_micro_batches=4)
    assert m.weights == 2000 * 4 and m.grads == 2000 * 4 and m.optimizer == 2000 * 8
    assert m.activations == 4 * (200 + 10)  # 4 in flight: saved + the held output
    assert m.buffers == 10 + 10 + 5
    one = stage_memory(ls, stage=1, num_stages=4, schedule="1f1b", num_micro_batches=4)
    assert one.activations == 3 * (200 + 10)
    rec = stage_memory(ls, stage=1, num_stages=4, schedule="gpipe", num_micro_batches=4, recompute=True)
    # each layer checkpointed: both layers' inputs and the output held per micro-batch, one
    # layer's saved activations while it is recomputed
    assert rec.activations == 4 * (10 + 10 + 10) + 100
    mixed = stage_memory(ls, precision="bf16-master")
    assert (mixed.weights, mixed.grads, mixed.optimizer) == (2000 * 2, 2000 * 2, 2000 * 12)
    off = stage_memory(ls, offload="optimizer")
    assert off.optimizer == 0 and off.host == 2000 * 8 + 2000 * 4 and off.weights == 8000
    p3 = stage_memory(ls, offload="params")
    assert p3.weights == 1000 * 4 and p3.host == 2000 * 8 + 2000 * 4 + 2000 * 4
    frozen = stage_memory([LayerProfile("f", params=1000, trainable_params=0)])
    assert frozen.grads == 0 and frozen.optimizer == 0 and frozen.weights == 4000


def test_stage_time_scales_with_device_speed():
    ls = [layer(), layer()]
    fast = Device(name="fast", memory_gb=1, tflops=2.0)
    slow = Device(name="slow", memory_gb=1, tflops=0.5)
    t_fast = stage_time(ls, fast, calibrated_tflops=1.0)
    t_slow = stage_time(ls, slow, calibrated_tflops=1.0)
    assert t_fast.fwd_ms == pytest.approx(1.0) and t_slow.fwd_ms == pytest.approx(4.0)
    assert t_fast.step_ms(4) == pytest.approx(4 * (1.0 + 2.0) + 0.5)
    # no calibration: FLOPs over the device's FLOP/s (2 GFLOP at 2 TFLOP/s = 1 ms)
    assert stage_time(ls, fast).fwd_ms == pytest.approx(1.0)
    assert stage_time(ls, fast, calibrated_tflops=1.0, recompute=True).bwd_ms == pytest.approx(3.0)


def test_profile_command(tmp_path, capsys):
    out = tmp_path / "profile.json"
    code = main(["profile", str(ROOT / "configs" / "quickstart.yaml"), "--out", str(out), "--repeats", "2"])
    assert code == 0
    text = capsys.readouterr().out
    assert "block_3" in text and "total" in text and "fwd ms" in text
    data = json.loads(out.read_text())
    assert [x["name"] for x in data["layers"]][:2] == ["embed", "block_0"] and data["micro_batch"] == 8
    code = main(
        [
            "profile",
            str(ROOT / "configs" / "quickstart.yaml"),
            "--layers",
            "1:3",
            "--out",
            str(out),
            "--repeats",
            "1",
            "--calibrate",
        ]
    )
    assert code == 0
    data = json.loads(out.read_text())
    assert [x["name"] for x in data["layers"]] == ["block_0", "block_1"] and data["calibrated_tflops"] > 0


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--layers", "2:40"], "--layers: 2:40 is outside the model's chain of 6 layers"),
        (["--layers", "x"], "not a range"),
        (["--micro-batch", "0"], "--micro-batch: must be >= 1"),
        (["--seq-len", "0"], "--seq-len: must be >= 2"),
        (["data.seq_len=0"], "data.seq_len: must be >= 2"),
        (["topology.file=" + str(ROOT / "tests" / "data" / "no_speed.yaml")], "devices[0].tflops"),
    ],
)
def test_profile_bad_input(tmp_path, capsys, extra, needle):
    code = main(["profile", str(ROOT / "configs" / "quickstart.yaml"), "--out", str(tmp_path / "p.json"), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and needle in err and "\n" not in err, err
    assert not (tmp_path / "p.json").exists()


@pytest.mark.parametrize("family", sorted(TINY))
def test_meta_profile_counts_what_the_cpu_run_saves(family):
    """The plan's profile (counted on the meta device, no weights) saves what a real CPU
    forward saves, attention included (a fused kernel's output and log-sum-exp, not the math
    path's probabilities, where the real run takes a fused kernel), with the same FLOPs."""
    from splitlearn.models.costs import meta_profile

    meta = meta_profile(cfg_for(family), 2, 32)
    model = build_model(cfg_for(family), seed=0)
    model.train()
    ids = torch.randint(3, 96, (2, 32))
    real = profile_chain(layer_views(model, None, ids), ids, measure_time=False)
    for m, r in zip(meta, real, strict=True):
        assert (m.saved_bytes, m.fwd_flops, m.bwd_flops) == (r.saved_bytes, r.fwd_flops, r.bwd_flops), m.name
        assert (m.in_bytes, m.out_bytes, m.max_trainable_params) == (r.in_bytes, r.out_bytes, r.max_trainable_params)
    assert any(m.bwd_transient_bytes > 0 for m in meta)  # the head's logits and softmax, at least


def test_meta_profile_counts_attention_as_cuda_runs_it():
    """fp32 attention with grouped key/value heads takes CUDA's math path (its probabilities
    saved); in bf16, or without grouped heads, CUDA runs a fused kernel as the CPU does."""
    from splitlearn.models.costs import meta_profile

    def saved(family, dtype, cuda):
        return sum(layer.saved_bytes for layer in meta_profile(cfg_for(family), 2, 32, dtype=dtype, cuda_kernels=cuda))

    probabilities = 4 * 2 * TINY["llama"]["num_attention_heads"] * 32 * 32  # fp32, per block
    blocks = TINY["llama"]["num_hidden_layers"]
    assert saved("llama", torch.float32, True) - saved("llama", torch.float32, False) >= blocks * probabilities
    assert saved("llama", torch.bfloat16, True) == saved("llama", torch.bfloat16, False)
    assert saved("gpt2", torch.float32, True) == saved("gpt2", torch.float32, False)  # no grouped heads


def test_a_cpu_stage_is_planned_as_a_cpu_runs_it(tmp_path):
    """In a topology with a CPU and a GPU, the CPU stage's memory counts attention as the
    CPU runs it (not CUDA's fp32 math path) and the CPU runtime's bytes; the GPU stage
    counts CUDA's path and no runtime bytes."""
    from test_cli import write_config

    from partitioners import partition
    from partitioners.costmodel import CPU_RUNTIME_BYTES
    from splitlearn.config import load_config
    from splitlearn.models.costs import meta_profile
    from splitlearn.planning import plan_request

    topo = inline_topology(["edge-a", "cloud-c"])
    topo["devices"][1].update(accelerator="cuda", gpus=1.0)
    path = write_config(tmp_path, topology={"inline": topo}, plan={"devices": ["edge-a", "cloud-c"]})
    cfg = load_config(path, ["plan.partitioner=manual", "plan.cuts=[2]"])
    req = plan_request(cfg)
    assert req.device_layers is not None and set(req.device_layers) == {"edge-a"}  # the CPU device
    assert req.cpu_runtime_bytes == CPU_RUNTIME_BYTES and not req.measured_on
    model = cfg.run.model
    cpu, cuda = meta_profile(model, 2, 16), meta_profile(model, 2, 16, cuda_kernels=True)
    assert [x.saved_bytes for x in req.device_layers["edge-a"]] == [x.saved_bytes for x in cpu]
    assert [x.saved_bytes for x in req.layers] == [x.saved_bytes for x in cuda]
    assert sum(x.saved_bytes for x in cuda[:2]) > sum(x.saved_bytes for x in cpu[:2])  # block_0 differs
    plan = partition("manual", req)
    common = {"schedule": req.schedule, "num_micro_batches": 2, "num_stages": 2}
    edge = stage_memory(cpu[:2], stage=0, runtime_bytes=CPU_RUNTIME_BYTES, **common).device_total
    gpu = stage_memory(cuda[2:], stage=1, **common).device_total
    assert plan.stages[0].memory_gb == pytest.approx(edge / 1e9, abs=1e-6)
    assert plan.stages[1].memory_gb == pytest.approx(gpu / 1e9, abs=1e-6)
    # the search's memory tables count the same as the plan's stages
    from partitioners.planner.tables import CostTables

    tables = CostTables(req)
    assert tables.dev_mem("edge-a", 0, 2, 0, 2) == pytest.approx(edge)
    assert tables.dev_mem("cloud-c", 2, len(cuda), 1, 2) == pytest.approx(gpu)
