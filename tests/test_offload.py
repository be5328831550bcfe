"""Tier 3: DeepSpeed ZeRO offload of a stage (real DeepSpeed on CPU, gloo) and data-parallel
replicas of a stage, on a real local Ray cluster.

- an offloaded middle stage trains like the same run without offload (AdamW both ways);
- a stage on 2 replicas gives the parameters of 1 replica on the whole batch;
- a run with an offloaded stage resumes from its checkpoint exactly;
- the DeepSpeed config is a pure function of the run config, and bad input is one line.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, checkpoint_state, inline_topology
from families import TINY
from safetensors.torch import load_file

from splitlearn.checkpoint import latest
from splitlearn.config import config_from_container
from splitlearn.errors import ConfigError
from splitlearn.trainer import train
from splitlearn.zero import bucket_elements, ds_config

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def raw_config(tmp_path: Path, name: str, *, family="llama", devices=None, steps=20, micro_batches=2, **extra) -> dict:
    raw = {
        "name": "offload",
        "model": {"family": family, "config": {**TINY[family], "vocab_size": 258}},
        "data": {"path": str(ROOT / "data" / "quickstart.txt"), "seq_len": 16},
        "topology": {"inline": inline_topology()},
        "train": {"steps": steps, "batch_size": 4, "micro_batches": micro_batches, "lr": 1e-2, "seed": 5},
        "plan": {"devices": devices or ["edge-a", "cloud-c", "mid-b"]},
        "runtime": {
            "schedule": "1f1b",
            "output_dir": str(tmp_path / "runs"),
            "run_name": name,
            "progress": "none",
            "timeout_s": 60,
            "placement_timeout_s": 30,
        },
    }
    for key, value in extra.items():
        section, _, sub = key.partition("__")
        raw.setdefault(section, {})
        if sub:
            raw[section][sub] = value
        else:
            raw[section] = value
    return raw


def run(tmp_path: Path, raw: dict, resume=None):
    cfg = config_from_container(raw, [], "test", tmp_path)
    return train(cfg, progress="none", resume=resume)


def assert_same(a: dict, b: dict, rtol=1e-5, atol=1e-5):
    assert set(a) == set(b) and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


# -- the DeepSpeed config -------------------------------------------------------------------


def stage_ds_config(offload="optimizer", rows=1, per_replica=1, replicas=1, trainable=1, on_cuda=False, user=None):
    cfg = config_from_container(raw_config(Path("."), "x"), [], "test", ROOT / "tests")
    return ds_config(
        cfg.run.train,
        offload=offload,
        rows_per_micro_batch=rows,
        micro_batches_per_replica=per_replica,
        replicas=replicas,
        trainable_params=trainable,
        on_cuda=on_cuda,
        user=user,
    )


def test_ds_config_is_derived_from_the_run():
    ds = stage_ds_config(rows=2, per_replica=3, replicas=2, trainable=10_000_000)
    assert ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 12
    assert ds["gradient_clipping"] == 0.0  # clipping is global, by the worker
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": False}
    assert "offload_param" not in ds["zero_optimization"]
    assert ds["zero_optimization"]["reduce_bucket_size"] == 2_500_000
    assert ds["optimizer"] == {
        "type": "AdamW",
        "params": {"lr": 1e-2, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0},
    }
    assert bucket_elements(10) == 1_000_000 and bucket_elements(10**9) == 50_000_000


def test_ds_config_merges_the_users_section():
    user = {"zero_optimization": {"reduce_bucket_size": 123, "offload_optimizer": {"pin_memory": True}}}
    ds = stage_ds_config(user=user)
    assert ds["zero_optimization"]["reduce_bucket_size"] == 123
    assert ds["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert ds["zero_optimization"]["stage"] == 2  # kept: the merge is deep
    ds3 = stage_ds_config(offload="params", on_cuda=True)
    assert ds3["zero_optimization"]["stage"] == 3
    assert ds3["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": True}


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            {"finetune__offload": "params", "deepspeed": {"zero_optimization": {"stage": 2}}},
            "deepspeed.zero_optimization.stage=2: offload: params needs ZeRO stage 3",
        ),
        (
            {"finetune__offload": "optimizer", "deepspeed": {"zero_optimization": {"stage": 3}}},
            "deepspeed.zero_optimization.stage=3: offload: optimizer runs ZeRO stage 2",
        ),
        (
            {"finetune__offload": "optimizer", "deepspeed": {"gradient_clipping": 1.0}},
            "deepspeed.gradient_clipping: set by splitlearn from train.max_grad_norm",
        ),
        ({"finetune__offload": "disk"}, "finetune.offload: 'disk' is not one of none, optimizer, params"),
    ],
)
def test_bad_offload_config_is_one_line(tmp_path, extra, message):
    raw = raw_config(tmp_path, "bad", **extra)
    with pytest.raises(ConfigError) as e:
        config_from_container(raw, [], "test", tmp_path)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_params_offload_with_several_micro_batches_in_flight_is_refused(tmp_path):
    """ZeRO-3 loses gradients when a second forward runs before the first backward: a
    params-offloaded stage under GPipe (or 1F1B's warm-up) is refused when planned."""
    from splitlearn.planning import make_plan

    raw = raw_config(tmp_path, "z3", finetune__by_stage={"1": {"offload": "params"}}, runtime__schedule="gpipe")
    with pytest.raises(ConfigError) as e:
        make_plan(config_from_container(raw, [], "test", tmp_path))
    assert "stage 1: offload: params (ZeRO-3) needs one micro-batch in flight" in str(e.value)
    assert "runtime.schedule=gpipe holds 2" in str(e.value) and "\n" not in str(e.value)
    raw["runtime"]["schedule"] = "sequential"  # one at a time: accepted
    assert make_plan(config_from_container(raw, [], "test", tmp_path)).stages[1].offload == "params"


def test_bad_offload_config_from_the_cli_exits_2(tmp_path):
    raw = raw_config(tmp_path, "bad", finetune__offload="params", deepspeed={"zero_optimization": {"stage": 1}})
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = subprocess.run(
        [sys.executable, "-m", "splitlearn.cli", "validate", str(path)], capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 2
    lines = [line for line in out.stderr.strip().splitlines() if line]
    assert len(lines) == 1 and "offload: params needs ZeRO stage 3" in lines[0], out.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.deepspeed
def test_a_deepspeed_op_that_cannot_be_built_is_named(tmp_path, monkeypatch):
    """An empty extensions cache and no working compiler: one line naming the op and the
    device (the worker raises it at prepare, before any process group or file exists)."""
    from splitlearn.zero import DeepSpeedOpError, ensure_ops

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.setenv("CXX", "/bin/false")
    monkeypatch.setenv("CC", "/bin/false")
    with pytest.raises(DeepSpeedOpError) as e:
        ensure_ops("cloud-c", on_cuda=False)
    assert "device 'cloud-c': DeepSpeed op 'cpu_adam' cannot be built" in str(e.value)
    assert "\n" not in str(e.value)


# -- training with an offloaded stage --------------------------------------------------------


@pytest.fixture(scope="module")
def plain_run(ray_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plain")
    result = run(tmp, raw_config(tmp, "plain"))
    return result, checkpoint_state(result.run_dir, 20)


@pytest.mark.ray
@pytest.mark.deepspeed
def test_offloaded_middle_stage_tracks_the_plain_run(plain_run, tmp_path):
    plain, plain_state = plain_run
    raw = raw_config(tmp_path, "off", finetune__by_stage={"1": {"offload": "optimizer"}})
    result = run(tmp_path, raw)
    assert [s.offload for s in result.plan.stages] == ["none", "optimizer", "none"]
    assert len(result.losses) == len(plain.losses) == 20
    assert plain.losses[-1] < plain.losses[0] * 0.7  # it trains
    for step, (a, b) in enumerate(zip(result.losses, plain.losses, strict=True)):
        assert abs(a - b) <= 1e-3 * abs(b), f"step {step}: offload {a} vs plain {b}"
    assert_same(checkpoint_state(result.run_dir, 20), plain_state, rtol=1e-3, atol=1e-4)


@pytest.mark.ray
@pytest.mark.deepspeed
def test_offloaded_stage_on_two_replicas(plain_run, tmp_path):
    """DeepSpeed reduces the two replicas' gradients over their group and partitions the
    optimizer state between them; the run still tracks the plain one."""
    plain, plain_state = plain_run
    raw = raw_config(
        tmp_path,
        "off2",
        devices=["edge-a", "cloud-c+cloud-d", "mid-b"],
        finetune__by_stage={"1": {"offload": "optimizer"}},
    )
    result = run(tmp_path, raw)
    assert result.plan.stages[1].devices == ["cloud-c", "cloud-d"]
    for step, (a, b) in enumerate(zip(result.losses, plain.losses, strict=True)):
        assert abs(a - b) <= 1e-3 * abs(b), f"step {step}: offload x2 {a} vs plain {b}"
    assert_same(checkpoint_state(result.run_dir, 20), plain_state, rtol=1e-3, atol=1e-4)


@pytest.mark.ray
@pytest.mark.deepspeed
@pytest.mark.parametrize(
    "devices, schedule",
    [
        pytest.param(["edge-a", "cloud-c", "mid-b"], "sequential", marks=pytest.mark.slow),  # one micro-batch at a time
        (["edge-a", "cloud-c+cloud-d", "mid-b"], "1f1b"),  # one micro-batch per replica
    ],
)
def test_params_offloaded_middle_stage_tracks_the_plain_run(ray_cluster, tmp_path, devices, schedule):
    """ZeRO-3 with the weights in host memory, inside the pipeline: DeepSpeed's world is the
    stage's replica group (the pipeline's groups are standalone)."""
    common = {"steps": 6, "runtime__schedule": schedule}
    plain = run(tmp_path, raw_config(tmp_path, "plain3", devices=[d.split("+")[0] for d in devices], **common))
    z3 = run(
        tmp_path, raw_config(tmp_path, "z3", devices=devices, finetune__by_stage={"1": {"offload": "params"}}, **common)
    )
    assert z3.plan.stages[1].offload == "params"
    for step, (a, b) in enumerate(zip(z3.losses, plain.losses, strict=True)):
        assert abs(a - b) <= 1e-3 * abs(b), f"step {step}: params offload {a} vs plain {b}"
    assert_same(checkpoint_state(z3.run_dir, 6), checkpoint_state(plain.run_dir, 6), rtol=1e-3, atol=1e-4)


@pytest.mark.ray
@pytest.mark.deepspeed
@pytest.mark.parametrize(
    "offload, schedule", [("optimizer", "1f1b"), pytest.param("params", "sequential", marks=pytest.mark.slow)]
)
def test_offloaded_run_resumes_exactly(ray_cluster, tmp_path, offload, schedule):
    off = {"finetune__by_stage": {"1": {"offload": offload}}, "runtime__schedule": schedule}
    whole = run(tmp_path, raw_config(tmp_path, "whole", steps=8, checkpoint={"every_steps": 4, "keep": 3}, **off))
    first = run(tmp_path, raw_config(tmp_path, "part", steps=4, **off))
    assert latest(first.run_dir).step == 4
    resumed = run(tmp_path, raw_config(tmp_path, "part", steps=8, **off), resume=str(first.run_dir))
    assert [e["reason"] for e in resumed.events if e["kind"] == "resume"] == ["continuing from step_00000004 (step 4)"]
    assert resumed.losses[4:] == pytest.approx(whole.losses[4:], rel=1e-6, abs=0)
    assert_same(checkpoint_state(resumed.run_dir, 8), checkpoint_state(whole.run_dir, 8), rtol=0, atol=1e-7)
    optim = load_file(latest(resumed.run_dir).path / "stage_1.optim.safetensors")
    assert (
        any(k.endswith("/exp_avg_sq") for k in optim)
        and float(optim[next(k for k in optim if k.endswith("/step"))]) == 8
    )


# -- replicas of a plain stage ---------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.parametrize(
    "family, devices, schedule, mbs",
    [
        pytest.param(
            "llama", ["edge-a", "cloud-c+cloud-d", "mid-b"], "1f1b", 4, marks=pytest.mark.slow
        ),  # a middle stage
        ("gpt2", ["edge-a", "mid-b", "cloud-c+cloud-d"], "gpipe", 2),  # the loss stage, with a tied head
    ],
)
def test_two_replicas_equal_one_on_the_whole_batch(ray_cluster, tmp_path, family, devices, schedule, mbs):
    """Replicas promise the whole batch's gradient. Checked where it is well conditioned: the
    first step's gradients (AdamW's first moment after one step is exactly ``(1 - beta1) g``)
    and the losses of both steps (the second is computed on the weights the first step left).
    The weights after AdamW are not compared entry by entry: its first update is
    ``lr * g / (|g| + eps)``, whose slope at ``|g| ~ eps = 1e-8`` is ``lr / eps``, so summing the
    same four micro-batch gradients in another (equally correct) order moves such an entry by
    more than 1e-5 (measured: 1 of 2048 entries by 1.3e-5; docs/decisions.md)."""
    single = [d.split("+")[0] for d in devices]
    common = {"family": family, "steps": 2, "micro_batches": mbs, "checkpoint": {"every_steps": 1, "keep": 2}}
    one = run(tmp_path, raw_config(tmp_path, "one", devices=single, **common, runtime__schedule=schedule))
    two = run(tmp_path, raw_config(tmp_path, "two", devices=devices, **common, runtime__schedule=schedule))
    replicated = [s for s in two.plan.stages if len(s.devices) == 2]
    assert len(replicated) == 1
    assert two.losses == pytest.approx(one.losses, rel=1e-5)
    grads_one, grads_two = first_step_gradients(one.run_dir), first_step_gradients(two.run_dir)
    # every weight the run trains has its gradient here, and the gradients are not all zero
    assert set(grads_one) == set(checkpoint_state(one.run_dir, 2))
    assert all(float(g.abs().max()) > 0 for g in grads_one.values())
    assert_same(grads_two, grads_one)


def first_step_gradients(run_dir: Path) -> dict:
    """Every trainable parameter's gradient at step 1, from the AdamW first moment the step-1
    checkpoint holds (``exp_avg = (1 - 0.9) * g`` after one step from zero)."""
    from splitlearn.checkpoint import step_dir

    grads = {}
    for f in sorted(step_dir(run_dir, 1).glob("stage_*.optim.safetensors")):
        for k, v in load_file(f).items():
            if k.endswith("/exp_avg"):
                grads[k[len("optim/") : -len("/exp_avg")]] = v / (1 - 0.9)
    return grads


def test_offload_on_a_device_with_too_little_host_memory_is_one_line(tmp_path):
    """cloud-c (cuda) fits stage 1 only with offload, and its host cannot hold what offload
    moves there: the plan fails with one line naming the device and its host memory."""
    from splitlearn.errors import PlanError
    from splitlearn.planning import make_plan

    raw = raw_config(tmp_path, "host", finetune__by_stage={"1": {"offload": "optimizer"}})
    cloud = next(d for d in raw["topology"]["inline"]["devices"] if d["name"] == "cloud-c")
    cloud.update(accelerator="cuda", host_memory_gb=1.0)
    stage = make_plan(config_from_container(raw, [], "test", tmp_path)).stages[1]
    assert stage.offload == "optimizer" and stage.host_memory_gb > 0
    cloud.update(memory_gb=stage.memory_gb * 1.01, host_memory_gb=stage.host_memory_gb / 2)
    with pytest.raises(PlanError) as e:
        make_plan(config_from_container(raw, [], "test", tmp_path))
    msg = str(e.value)
    assert "device 'cloud-c'" in msg and "host memory" in msg and "host_memory_gb=" in msg and "\n" not in msg


BF16_PROBE = r"""
import os, sys, torch, deepspeed
from splitlearn.zero import ds_config
import types
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
torch.distributed.init_process_group("gloo", rank=0, world_size=1)
train = types.SimpleNamespace(dtype=sys.argv[1], lr=1e-3, weight_decay=0.0)
cfg = ds_config(train, offload="optimizer", rows_per_micro_batch=2, micro_batches_per_replica=1, replicas=1,
                trainable_params=64, on_cuda=False)
module = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
seen = []
module[1].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
engine, *_ = deepspeed.initialize(model=module, model_parameters=list(module.parameters()), config=cfg,
                                  dist_init_required=False)
out = engine(torch.randn(2, 8))  # as the worker calls it: no autocast of its own around the engine
engine.backward(out.float().sum())
engine.step()
print("DTYPES", seen[0], next(module.parameters()).dtype)
"""


@pytest.mark.deepspeed
def test_an_offloaded_bf16_stage_computes_in_bf16(tmp_path):
    """DeepSpeed switches an outer autocast off inside its engine (on CUDA); the stage's
    DeepSpeed config carries the run's bf16 autocast, so the offloaded stage's matmuls run in
    bf16 (its weights stay fp32) with the engine called as the worker calls it, and an fp32
    run stays fp32."""
    script = tmp_path / "probe.py"
    script.write_text(BF16_PROBE)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
    found = {}
    for dtype, port in (("bf16", "29731"), ("fp32", "29732")):
        r = subprocess.run([sys.executable, str(script), dtype, port], env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        found[dtype] = r.stdout.split("DTYPES", 1)[1].split()
    assert found["bf16"] == ["torch.bfloat16", "torch.float32"]
    assert found["fp32"] == ["torch.float32", "torch.float32"]
