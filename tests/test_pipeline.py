"""Tier 3: the pipelined runtime on a real local Ray cluster: GPipe and 1F1B give the
gradients of the whole batch, codecs keep training, a dead stage fails the step by name."""

import threading
import time

import pytest
import torch
from conftest import ROOT, inline_topology
from families import TINY

from splitlearn import codecs
from splitlearn.config import config_from_container
from splitlearn.data import BatchSource, load_dataset
from splitlearn.errors import StageFailed
from splitlearn.models import build_model
from splitlearn.models.chain import causal_lm_loss
from splitlearn.planning import make_plan
from splitlearn.runtime import StageGroup
from splitlearn.trainer import train


def cfg_for(tmp_path, schedule, m, **runtime):
    raw = {
        "name": "pipe",
        "model": {"family": "llama", "config": {**TINY["llama"], "vocab_size": 258}},
        "data": {"path": str(ROOT / "data" / "quickstart.txt"), "seq_len": 16, "packing": False},
        "topology": {"inline": inline_topology()},
        "train": {"steps": 1, "batch_size": 4, "micro_batches": m, "lr": 1e-2, "seed": 3, "max_grad_norm": 0.0},
        "plan": {"partitioner": "manual", "devices": ["edge-a", "mid-b", "cloud-c"], "cuts": [2, 4]},
        "runtime": {
            "schedule": schedule,
            "output_dir": str(tmp_path / "runs"),
            "progress": "none",
            "timeout_s": 30,
            **runtime,
        },
    }
    return config_from_container(raw, [], "test", tmp_path)


def whole_batch_reference(cfg):
    """Loss and gradients of the unsplit model on the whole batch at once: no pipeline,
    no micro-batches."""
    run = cfg.run
    model = build_model(run.model, run.train.seed)
    ds, _ = load_dataset(run.data)
    batch = BatchSource(ds, run.train.batch_size, run.train.seed).batch(0)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = causal_lm_loss(logits, batch["labels"])
    loss.backward()
    return float(loss.detach()), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.ray
@pytest.mark.parametrize(
    "schedule,m,prepost",
    [(s, m, True) for s in ("gpipe", "1f1b") for m in (1, 2, 4)] + [("1f1b", 4, False)],  # receives at their actions
)
def test_pipelined_step_equals_whole_batch(ray_cluster, tmp_path, schedule, m, prepost):
    cfg = cfg_for(tmp_path, schedule, m, prepost_receives=prepost)
    plan = make_plan(cfg)
    group = StageGroup(plan, cfg.topology, cfg.resolved_dict(), str(tmp_path), 30, 30)
    try:
        group.start(prepare_timeout_s=120)
        stages = group.step(0)
        grads = {k: v for g in group.gradients() for k, v in g.items()}
    finally:
        group.shutdown()
    ref_loss, ref_grads = whole_batch_reference(cfg)
    torch.testing.assert_close(torch.tensor(stages[-1]["loss"]), torch.tensor(ref_loss), rtol=1e-5, atol=1e-5)
    assert set(grads) == set(ref_grads)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-5, msg=lambda msg, n=name: f"{n}: {msg}")


@pytest.mark.ray
def test_trace_records_every_action_and_the_emulated_latency(ray_cluster, tmp_path):
    """``runtime.trace``: each stage reports its actions in schedule order with wall-clock
    spans that do not overlap, and every receive ends at least the emulated link's latency
    after its sender posted the transfer (the rehearsal's lower bound)."""
    from partitioners import schedule as S

    latency_ms = 40.0
    topo = inline_topology()
    topo["links"]["default"] = {"bandwidth_mbps": 1000, "latency_ms": latency_ms}
    cfg = cfg_for(tmp_path, "1f1b", 2, emulate_links=True, trace=True)
    cfg = config_from_container({**_raw(cfg), "topology": {"inline": topo}}, [], "test", tmp_path)
    plan = make_plan(cfg)
    group = StageGroup(plan, cfg.topology, cfg.resolved_dict(), str(tmp_path), 30, 30)
    try:
        group.start(prepare_timeout_s=120)
        stages = group.step(0)
    finally:
        group.shutdown()
    lists = S.build("1f1b", 3, 2)
    spans = {}
    for st in stages:
        trace = st["trace"]
        assert [(k, m) for k, m, _, _ in trace] == [(a.kind, a.mb) for a in lists[st["stage"]]]
        for (_, _, a0, a1), (_, _, b0, _) in zip(trace, trace[1:], strict=False):
            assert a0 <= a1 <= b0
        spans.update({(st["stage"], k, m): (t0, t1) for k, m, t0, t1 in trace})
    for s in range(3):
        for m in range(2):
            if s > 0:  # activation m from stage s-1
                assert spans[(s, S.RECV_ACT, m)][1] - spans[(s - 1, S.SEND_ACT, m)][0] >= latency_ms
            if s < 2:  # gradient m from stage s+1
                assert spans[(s, S.RECV_GRAD, m)][1] - spans[(s + 1, S.SEND_GRAD, m)][0] >= latency_ms


@pytest.mark.parametrize("codec", ["fp16", "bf16", "int8"])
def test_codec_round_trip(codec):
    x = torch.randn(3, 5, 64) * 3
    parts = codecs.encode(x, codec)
    buffers = codecs.payload_like(list(x.shape), x.dtype, codec)
    assert [b.shape for b in buffers] == [p.shape for p in parts]
    assert [b.dtype for b in buffers] == [p.dtype for p in parts]
    # receive buffers are made where the data lands (a GPU's: no host buffer copied up)
    assert all(b.device.type == "meta" for b in codecs.payload_like(list(x.shape), x.dtype, codec, "meta"))
    y = codecs.decode(parts, x.dtype, codec)
    assert y.dtype == x.dtype
    tol = {"fp16": 2e-3, "bf16": 2e-2, "int8": 1.0 / 127}[codec]
    rel = (y - x).abs().amax(dim=-1) / x.abs().amax(dim=-1)
    assert rel.max() <= tol
    assert codecs.wire_bytes(parts) < x.numel() * 4 * (0.3 if codec == "int8" else 0.51)


@pytest.mark.ray
@pytest.mark.slow
def test_int8_codec_quickstart_still_learns(tmp_path):
    """The quickstart with int8 on every link (activations and gradients): the loss still
    falls by at least half, and the links carry about a quarter of the fp32 bytes."""
    from splitlearn.config import load_config

    cfg = load_config(
        ROOT / "configs" / "quickstart.yaml",
        [
            "plan.codec=int8",
            f"runtime.output_dir={tmp_path / 'runs'}",
            "runtime.progress=none",
            "topology.file=" + str(ROOT / "tests" / "data" / "test_devices.yaml"),
            "plan.devices=[edge-a,mid-b,cloud-c]",
            "runtime.schedule=1f1b",
        ],
    )
    result = train(cfg, progress="none")
    assert result.losses[-1] <= 0.5 * result.losses[0], result.losses
    import json

    first = json.loads((result.run_dir / "metrics.jsonl").read_text().splitlines()[0])
    fp32_bytes = 8 * 64 * 128 * 4  # one micro-batch of hidden states
    assert first["bytes_sent"]["0->1"] < 2 * 0.3 * fp32_bytes  # two micro-batches, int8 + scales + header


@pytest.mark.ray
def test_dead_stage_fails_the_step_by_name(ray_cluster, tmp_path):
    """Kill the middle stage while a step runs (slow emulated links keep it running): the
    step fails within the timeout with an error naming the stage, device and step."""
    import ray

    topo = inline_topology()
    topo["links"]["default"] = {"bandwidth_mbps": 0.05, "latency_ms": 300}  # ~1 s a transfer
    cfg = cfg_for(tmp_path, "1f1b", 2, emulate_links=True)
    cfg = config_from_container({**_raw(cfg), "topology": {"inline": topo}}, [], "test", tmp_path)
    plan = make_plan(cfg)
    group = StageGroup(plan, cfg.topology, cfg.resolved_dict(), str(tmp_path), 20, 30)
    try:
        group.start(prepare_timeout_s=120)
        error: list[BaseException] = []

        def run():
            try:
                group.step(0)
            except BaseException as e:  # noqa: BLE001 - handed to the test thread
                error.append(e)

        t = threading.Thread(target=run)
        t0 = time.monotonic()
        t.start()
        time.sleep(1.5)
        ray.kill(group.actors[1], no_restart=True)
        t.join(timeout=60)
        elapsed = time.monotonic() - t0
    finally:
        group.shutdown()
    assert not t.is_alive(), "the step hung"
    assert error and isinstance(error[0], StageFailed), error
    e = error[0]
    assert e.step == 0 and e.stage in (0, 1, 2), str(e)
    assert "mid-b" in str(e) or "stage 1" in str(e), str(e)
    assert elapsed < 20 * 1.5 + 10, elapsed


def _raw(cfg):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg.run))
