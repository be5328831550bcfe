"""Fine-tuning methods (tiers 1-2): LoRA per stage equals the unsplit peft model, recompute
changes memory not gradients, frozen stages pass gradients back, compact frozen weights,
adapters out in peft's format, the cost model and the planner's choice of methods."""

import hashlib
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, inline_topology
from families import TINY
from test_numerics import batch, model_cfg, run_split

from cluster.topology import topology_from_container
from partitioners import LayerProfile, Plan, PlanError, PlanRequest, partition
from partitioners.costmodel import FinetunePolicy, StageMethod, stage_memory, stage_options
from partitioners.profile import MethodCost
from splitlearn.config import config_from_container
from splitlearn.errors import ConfigError
from splitlearn.models import Segment, build_model, causal_lm_loss, num_blocks
from splitlearn.models.compact import FrozenEmbedding, FrozenLinear, compact_counts, compact_frozen
from splitlearn.models.methods import (
    LoraSpec,
    adapter_state_dict,
    apply_methods,
    base_state_dict,
    checkpoint_params,
    lora_target_names,
    merged_state_dict,
    seed_lora_init,
)
from splitlearn.optim import make_optimizer

LORA = LoraSpec(r=4, alpha=8.0)


def fill_lora_b(model, seed=5):
    """Give every ``lora_B`` (zero at init) values drawn by module name, the same in any
    model, so that ``lora_A`` gets non-zero gradients: a test of A's gradients at B = 0
    would compare zeros."""
    from peft.tuners.lora import LoraLayer

    for name, m in model.named_modules():
        if isinstance(m, LoraLayer):
            h = int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2**63 - 1)
            g = torch.Generator().manual_seed(h)
            w = m.lora_B["default"].weight
            with torch.no_grad():
                w.copy_(torch.randn(w.shape, generator=g) * 0.1)


def unsplit_peft(cfg, family):
    """The whole model under peft's own ``get_peft_model``, same LoRA settings (the family's
    default targets by peft's suffix rule), adapters drawn as the stages draw them."""
    from peft import LoraConfig, get_peft_model

    from splitlearn.models import adapter_for

    whole = build_model(cfg, seed=0)
    lc = LoraConfig(
        r=LORA.r,
        lora_alpha=LORA.alpha,
        lora_dropout=0.0,
        target_modules=list(adapter_for(family).lora_targets),
        fan_in_fan_out=family == "gpt2",
    )
    pm = get_peft_model(whole, lc)
    seed_lora_init(pm.base_model.model, seed=0)
    fill_lora_b(pm.base_model.model)
    return pm


def lora_segments(cfg, bounds, methods=None, recompute=False):
    segs = []
    for i, (a, b) in enumerate(zip(bounds, bounds[1:], strict=False)):
        seg = Segment(build_model(cfg, seed=0), a, b, recompute=recompute).train()
        method = (methods or {}).get(i, StageMethod("lora"))
        apply_methods(seg.model, [(a, b, method)], LORA, seed=0)
        fill_lora_b(seg.model)
        segs.append(seg)
    return segs


def lora_grads(segments):
    out = {}
    for seg in segments:
        for name, p in seg.model.named_parameters():
            if p.grad is not None:
                out[name.replace(".default.", ".")] = p.grad
    return out


@pytest.mark.parametrize("family", sorted(TINY))
def test_lora_split_equals_unsplit_peft_model(family):
    """Split model with LoRA rank r on every stage: loss and every adapter gradient equal
    those of the unsplit model under peft's get_peft_model (fp32, 1e-5)."""
    cfg = model_cfg(family)
    ids, mask, labels = batch(padded=True)
    pm = unsplit_peft(cfg, family)
    pm.train()
    ref_loss = causal_lm_loss(pm(input_ids=ids, attention_mask=mask).logits, labels)
    ref_loss.backward()
    ref = {
        n.removeprefix("base_model.model.").replace(".default.", "."): p.grad
        for n, p in pm.named_parameters()
        if p.requires_grad
    }
    assert ref and all(".lora_" in n for n in ref)

    n = num_blocks(pm.base_model.model) + 2
    segments = lora_segments(cfg, [0, 2, 4, n])
    loss = run_split(segments, ids, mask, labels)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    got = lora_grads(segments)
    assert set(got) == set(ref)
    for name, g in ref.items():
        assert g.abs().sum() > 0, name  # B was filled: A's gradients are not trivially zero
        torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    # adapter init is peft's distribution: |A| <= 1/sqrt(fan_in)
    for seg in segments:
        for name, p in seg.model.named_parameters():
            if ".lora_A." in name:
                assert p.abs().max() <= 1 / math.sqrt(p.shape[1]) + 1e-7


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("method", ["full", "lora"])
def test_recompute_gives_the_same_gradients(family, method):
    cfg = model_cfg(family)
    ids, mask, labels = batch(padded=True)
    n = num_blocks(build_model(cfg, seed=0)) + 2
    bounds = [0, 3, n]
    m = {0: StageMethod(method), 1: StageMethod(method)}
    plain = lora_segments(cfg, bounds, m, recompute=False)
    rc = lora_segments(cfg, bounds, m, recompute=True)
    torch.testing.assert_close(run_split(rc, ids, mask, labels), run_split(plain, ids, mask, labels), rtol=0, atol=1e-6)
    for a, b in zip(plain, rc, strict=True):
        ga = {k: p.grad for k, p in a.named_parameters() if p.grad is not None}
        gb = {k: p.grad for k, p in b.named_parameters() if p.grad is not None}
        assert ga.keys() == gb.keys() and ga
        for k in ga:
            torch.testing.assert_close(gb[k], ga[k], rtol=1e-6, atol=1e-6, msg=lambda msg, k=k: f"{k}: {msg}")


def saved_bytes(fn):
    seen = {}

    def pack(t):
        seen[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def test_recompute_keeps_only_layer_inputs():
    cfg = model_cfg("llama")
    x = torch.randn(3, 12, 32, requires_grad=True)
    plain = Segment(build_model(cfg, seed=0), 1, 5)
    rc = Segment(build_model(cfg, seed=0), 1, 5, recompute=True)
    _, full_saved = saved_bytes(lambda: plain(x))
    _, rc_saved = saved_bytes(lambda: rc(x))
    assert rc_saved <= 4 * x.numel() * 4  # one hidden state per block at most
    assert rc_saved < full_saved / 5


def test_lora_stage_trains_only_adapters_and_frozen_stage_passes_gradients():
    """Three stages: LoRA, frozen, full. After optimizer steps the LoRA stage's base weights
    and the frozen stage's weights are bit-for-bit unchanged, the adapters and the full
    stage moved, and the first stage's adapters got gradients through the frozen one."""
    cfg = model_cfg("llama")
    ids, mask, labels = batch(padded=False)
    n = num_blocks(build_model(cfg, seed=0)) + 2
    segs = lora_segments(cfg, [0, 2, 4, n], {0: StageMethod("lora"), 1: StageMethod("frozen"), 2: StageMethod()})
    before = [{k: v.clone() for k, v in s.model.state_dict().items()} for s in segs]
    train = SimpleNamespace(lr=1e-2, weight_decay=0.0, dtype="fp32")
    opts = [make_optimizer(s.parameters(), train) for s in segs]
    assert sum(len(g["params"]) for g in opts[1].param_groups) == 0  # frozen: nothing to step
    for _ in range(3):
        for o in opts:
            o.zero_grad()
        run_split(segs, ids, mask, labels)
        for o in opts:
            o.step()
    assert all(p.grad is None for p in segs[1].parameters())
    assert opts[0].state and all(".lora_" in n for n, p in segs[0].model.named_parameters() if p in opts[0].state)
    for i, seg in enumerate(segs[:2]):
        for k, v in seg.model.state_dict().items():
            moved = not torch.equal(v, before[i][k])
            if ".lora_" in k:  # every adapter moved: its gradient came back through the frozen stage
                assert moved, f"stage {i}: adapter {k} did not move"
            else:
                assert not moved, f"stage {i}: frozen {k} changed"
    assert all(not torch.equal(v, before[2][k]) for k, v in segs[2].model.state_dict().items())


def test_frozen_first_stage_has_nothing_to_differentiate():
    cfg = model_cfg("llama")
    seg = Segment(build_model(cfg, seed=0), 0, 2)
    apply_methods(seg.model, [(0, 2, StageMethod("frozen"))], LORA, seed=0)
    ids, _, _ = batch(padded=False)
    assert not seg(ids).requires_grad  # the worker skips this stage's backward


# -- compact frozen weights ----------------------------------------------------------------


@pytest.mark.parametrize("storage", ["int8", "bf16"])
def test_frozen_linear_matches_its_dequantized_weight(storage):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    lin.requires_grad_(False)
    root = torch.nn.Sequential(lin)
    compact_frozen(root, ["0"], storage)
    fl = root[0]
    assert isinstance(fl, FrozenLinear)
    w = fl.export_weight().float()
    x = torch.randn(5, 64, requires_grad=True)
    y = fl(x)
    g = torch.randn_like(y)
    y.backward(g)
    xr = x.detach().clone().requires_grad_(True)
    yr = torch.nn.functional.linear(xr, w, fl.bias)
    yr.backward(g)
    tol = 1e-5 if storage == "int8" else 2e-2
    torch.testing.assert_close(y, yr, rtol=tol, atol=tol)
    torch.testing.assert_close(x.grad, xr.grad, rtol=tol, atol=tol)
    err = (w - lin.weight).abs().amax(dim=1)
    bound = lin.weight.abs().amax(dim=1) / (127 if storage == "int8" else 64)
    assert (err <= bound).all()  # half a step per row for int8; bf16 keeps 8 bits of mantissa


def test_int8_linear_saves_no_weight_copy():
    """torchao's int8 weight-only linear saves a dequantized fp32 weight for backward; ours
    saves nothing but the layer's input-independent reference."""
    lin = torch.nn.Linear(256, 512, bias=False).requires_grad_(False)
    root = torch.nn.Sequential(lin)
    compact_frozen(root, ["0"], "int8")
    x = torch.randn(4, 256, requires_grad=True)
    _, nbytes = saved_bytes(lambda: root(x))
    assert nbytes == 0


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("storage", ["int8", "bf16"])
def test_compact_lora_stage(family, storage):
    """LoRA on int8/bf16 frozen weights: the stage computes close to fp32, holds about
    1 or 2 bytes per frozen matmul weight, exports the model's own names and layouts."""
    cfg = model_cfg(family)
    ids, mask, labels = batch(padded=True)
    n = num_blocks(build_model(cfg, seed=0)) + 2
    ref = Segment(build_model(cfg, seed=0), 0, n)
    apply_methods(ref.model, [(0, n, StageMethod("lora"))], LORA, seed=0)
    seg = Segment(build_model(cfg, seed=0), 0, n)
    apply_methods(seg.model, [(0, n, StageMethod("lora", frozen_dtype=storage))], LORA, seed=0)
    assert any(isinstance(m, FrozenEmbedding) for m in seg.modules())
    loss, ref_loss = seg(ids, mask, labels), ref(ids, mask, labels)
    assert abs(float(loss) - float(ref_loss)) < 0.02 * float(ref_loss)
    loss.backward()
    assert all(p.grad is not None for n_, p in seg.named_parameters() if ".lora_" in n_)
    base = base_state_dict(seg.model)
    want = base_state_dict(ref.model)
    assert base.keys() == want.keys()
    for k in want:
        assert base[k].shape == want[k].shape, k
        torch.testing.assert_close(base[k].float(), want[k].float(), rtol=0, atol=0.02)
    params = sum(p.numel() for p in build_model(cfg, seed=0).parameters())
    compact, rows = compact_counts([build_model(cfg, seed=0)])
    nbytes = sum(sum(x.numel() * x.element_size() for x in _inner(p)) for p in seg.model.parameters())
    lora_bytes = sum(p.numel() * 4 for k, p in seg.model.named_parameters() if ".lora_" in k)
    per = {"int8": 1, "bf16": 2}[storage]
    expect = compact * per + (params - compact) * 4 + lora_bytes + (rows * 5 if storage == "int8" else 0)
    # a tied embedding is counted at both ends in compact_counts but stored once
    assert nbytes <= expect and nbytes >= 0.7 * expect
    assert set(checkpoint_params(seg.model)) >= {k for k in adapter_state_dict(seg.model)}


def _inner(t):
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(t):
        return [getattr(t, n) for n in t.__tensor_flatten__()[0]]
    return [t]


# -- adapters out --------------------------------------------------------------------------


def test_saved_adapters_load_with_peft_and_merged_with_transformers(tmp_path):
    """A split LoRA model's adapters, written as the driver writes them, load onto the
    base model with peft and give the split model's logits; the merged state dict loads
    into the plain transformers model and gives them too."""
    from peft import PeftModel
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from splitlearn.models.methods import lora_config

    family = "gpt2"  # Conv1D layers (fan_in_fan_out) and tied embeddings
    cfg = model_cfg(family)
    ids, mask, labels = batch(padded=True)
    n = num_blocks(build_model(cfg, seed=0)) + 2
    bounds = [0, 3, n]
    segs = lora_segments(cfg, bounds)
    names = [
        x for a, b in zip(bounds, bounds[1:], strict=False) for x in lora_target_names(build_model(cfg, 0), a, b, LORA)
    ]
    with torch.no_grad():
        logits = segs[1].adapter.head(segs[1].model, _hidden(segs[1], segs[0](ids, mask), mask))

    adir = tmp_path / "adapter"
    adir.mkdir()
    save_file(
        {k: v for s in segs for k, v in adapter_state_dict(s.model).items()}, str(adir / "adapter_model.safetensors")
    )
    lora_config(build_model(cfg, seed=0), names, LORA, task_type="CAUSAL_LM").save_pretrained(str(adir))
    loaded = PeftModel.from_pretrained(build_model(cfg, seed=0), str(adir)).eval()
    with torch.no_grad():
        got = loaded(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, logits, rtol=1e-5, atol=1e-5)

    merged = {k: v for s in segs for k, v in merged_state_dict(s.model).items()}
    mdir = tmp_path / "merged"
    plain = build_model(cfg, seed=0)
    plain.config.save_pretrained(str(mdir))
    save_file(merged, str(mdir / "model.safetensors"), metadata={"format": "pt"})
    hf = AutoModelForCausalLM.from_pretrained(str(mdir), local_files_only=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids, attention_mask=mask).logits, logits, rtol=1e-4, atol=1e-4)


def _hidden(seg, h, mask):
    """The last segment's hidden state before its head."""
    model, ad = seg.model, seg.adapter
    probe = torch.empty(h.shape[0], h.shape[1], 1)
    ctx = ad.context(model, probe, mask)
    for i in seg.block_ids:
        h = seg._block(h, i, ctx)
    return h


# -- cost model and planner ----------------------------------------------------------------


def test_stage_memory_by_method():
    layer = LayerProfile(
        "b",
        params=1000,
        in_bytes=10,
        out_bytes=10,
        saved_bytes=100,
        compact_params=900,
        compact_rows=30,
        methods={
            "lora": MethodCost(params=1040, trainable_params=40, saved_bytes=60),
            "frozen": MethodCost(params=1000, trainable_params=0, saved_bytes=50),
        },
    )
    full = stage_memory([layer])
    assert (full.weights, full.grads, full.optimizer, full.activations) == (4000, 4000, 8000, 110)
    lora = stage_memory([layer], method=StageMethod("lora"))
    assert (lora.weights, lora.grads, lora.optimizer, lora.activations) == (1040 * 4, 160, 320, 70)
    int8 = stage_memory([layer], method=StageMethod("lora", frozen_dtype="int8"))
    assert int8.weights == 900 * 1 + (1040 - 900) * 4 + 30 * 5
    bf16 = stage_memory([layer], method=StageMethod("frozen", frozen_dtype="bf16"))
    assert bf16.weights == 900 * 2 + 100 * 4 and bf16.grads == 0 and bf16.optimizer == 0
    rc = stage_memory([layer, layer], method=StageMethod("lora", recompute=True), schedule="gpipe", num_micro_batches=4)
    assert rc.activations == 4 * (10 + 10 + 10) + 60
    with pytest.raises(ValueError, match="no 'lora' costs"):
        stage_memory([LayerProfile("x", params=10)], method=StageMethod("lora"))
    assert StageMethod("full", frozen_dtype="int8").frozen_dtype == "fp32"
    assert StageMethod.parse("lora+int8+rc") == StageMethod("lora", True, "int8")


def test_stage_options_and_policy():
    pol = FinetunePolicy(StageMethod(), by_tier={"edge": {"method": "lora"}}, by_stage={2: {"recompute": True}})
    assert pol.for_stage(0, "edge") == StageMethod("lora")
    assert pol.for_stage(2, "edge") == StageMethod("lora", True)
    assert pol.for_stage(1, "cloud") == StageMethod()
    opts = stage_options(StageMethod(), ["lora", "recompute", "int8"])
    assert opts[0] == StageMethod() and StageMethod("lora", True, "int8") in opts and len(opts) == 6


def chain_with_methods(n_blocks=4, params=200_000):
    def mk(name, p, saved, flops):
        return LayerProfile(
            name,
            params=p,
            in_bytes=40_000,
            out_bytes=40_000,
            saved_bytes=saved,
            fwd_flops=flops,
            bwd_flops=2 * flops,
            compact_params=int(p * 0.95),
            compact_rows=p // 500,
            methods={
                "lora": MethodCost(
                    params=p + p // 50,
                    trainable_params=p // 50,
                    saved_bytes=saved // 2,
                    fwd_flops=flops,
                    bwd_flops=flops,
                ),
                "lora+int8": MethodCost(
                    params=p + p // 50,
                    trainable_params=p // 50,
                    saved_bytes=saved // 2,
                    fwd_flops=flops,
                    bwd_flops=flops,
                ),
            },
        )

    return [
        mk("embed", params // 4, 0, 0),
        *[mk(f"block_{i}", params, 400_000, 10**9) for i in range(n_blocks)],
        mk("head", params // 4, 100_000, 10**8),
    ]


def test_planner_picks_lora_for_an_edge_stage_only_when_allowed():
    """A memory-tight edge device: without plan.allow no plan fits; with it, the planner
    trains the edge stage with LoRA (+recompute/int8 where needed), and the cloud stage
    stays full. The table shows the method."""
    topo = topology_from_container(inline_topology(["edge-a", "cloud-c"]))
    topo.device("edge-a").memory_gb = 0.006
    topo.device("cloud-c").memory_gb = 0.008
    layers = chain_with_methods()
    base = dict(layers=layers, topology=topo, devices=["edge-a", "cloud-c"], schedule="1f1b", num_micro_batches=4)
    with pytest.raises(PlanError, match="plan.allow"):
        partition("optimal", PlanRequest(**base))
    plan = partition("optimal", PlanRequest(**base, allow=("lora", "recompute", "int8")))
    edge, cloud = plan.stages[0], plan.stages[-1]
    assert edge.device == "edge-a" and edge.method == "lora"
    assert cloud.method == "full" and not cloud.recompute
    assert edge.trainable_params < edge.params / 10
    assert edge.method_label in plan.table()
    assert Plan.from_yaml(plan.to_yaml()) == plan
    # the same request evaluated by hand: every stage's memory from the cost model fits
    for s in plan.stages:
        m = stage_memory(
            layers[s.start : s.stop],
            stage=s.index,
            num_stages=plan.num_stages,
            schedule="1f1b",
            num_micro_batches=4,
            method=StageMethod(s.method, s.recompute, s.frozen_dtype),
        )
        assert m.device_total <= topo.device(s.device).memory_gb * 1e9
        assert s.memory_gb == pytest.approx(m.device_total / 1e9, abs=1e-6)


def test_planner_keeps_the_configured_method_when_nothing_is_gained():
    """Recompute only costs time: allowed but not needed, the planner leaves it off."""
    topo = topology_from_container(inline_topology(["edge-a", "cloud-c"]))
    plan = partition(
        "optimal",
        PlanRequest(layers=chain_with_methods(), topology=topo, devices=["edge-a", "cloud-c"], allow=("recompute",)),
    )
    assert all(not s.recompute and s.method == "full" for s in plan.stages)


def test_optimal_equals_exhaustive_with_method_options():
    """With options on edge stages (and a policy), optimal still equals exhaustive."""
    import random

    from test_partitioners import random_instance

    rng = random.Random(99)
    checked = changed = 0
    while checked < 60:
        r = random_instance(rng)
        for layer in r.layers:
            p = layer.params
            layer.compact_params, layer.compact_rows = int(p * 0.9), p // 100
            layer.methods = {
                key: MethodCost(
                    params=p + p // 40,
                    trainable_params=p // 40,
                    saved_bytes=layer.saved_bytes // 2,
                    fwd_flops=layer.fwd_flops,
                    bwd_flops=layer.bwd_flops // 2 + rng.randint(0, layer.bwd_flops // 2),
                )
                for key in ("lora", "lora+int8", "frozen")
            }
        r.allow = tuple(rng.sample(["lora", "recompute", "int8", "frozen"], rng.randint(1, 3)))
        r.finetune = FinetunePolicy(StageMethod(), by_stage={0: {"recompute": rng.random() < 0.3}})
        if r.n > 7 or len(r.topology.devices) > 3:  # exhaustive tries every option of every stage
            continue
        try:
            ref = partition("exhaustive", r)
        except PlanError:
            with pytest.raises(PlanError):
                partition("optimal", r)
            continue
        got = partition("optimal", r)
        assert got.step_ms == pytest.approx(ref.step_ms, rel=1e-6, abs=1e-9), (got.table(), ref.table())
        for name in ("uniform", "balanced", "optimal", "exhaustive"):
            try:
                p = partition(name, r)
            except PlanError:
                continue
            assert p.step_ms >= got.step_ms * (1 - 1e-9)
            for s in p.stages:  # every stage's memory, from the cost model, fits its device
                opt = StageMethod(s.method, s.recompute, s.frozen_dtype)
                assert opt in r.options(s.index, s.device)
        assert_valid_methods(got, r)
        changed += any(s.method != "full" or s.recompute for s in got.stages)
        checked += 1
    assert changed >= 10, changed  # the options were used, not only offered


def assert_valid_methods(plan, r):
    used = {}
    for s in plan.stages:
        m = stage_memory(
            r.layers[s.start : s.stop],
            stage=s.index,
            num_stages=plan.num_stages,
            schedule=r.schedule,
            num_micro_batches=r.num_micro_batches,
            precision=r.precision,
            method=StageMethod(s.method, s.recompute, s.frozen_dtype, s.offload),  # offload as planned
        )
        used[s.device] = used.get(s.device, 0.0) + m.device_total
    for dev, need in used.items():
        assert need <= r.topology.device(dev).memory_gb * 1e9 * (1 + 1e-9)


# -- config --------------------------------------------------------------------------------


def raw_config(**finetune):
    return {
        "model": {"family": "llama", "config": {**TINY["llama"], "vocab_size": 258}},
        "data": {"path": str(ROOT / "data" / "quickstart.txt"), "seq_len": 16},
        "topology": {"inline": inline_topology()},
        "plan": {"devices": ["edge-a", "mid-b", "cloud-c"]},
        "finetune": finetune,
    }


def test_finetune_config_resolves_by_tier_then_stage(tmp_path):
    from omegaconf import OmegaConf

    from splitlearn.method_policy import policy, variants

    raw = OmegaConf.create(
        "finetune: {by_tier: {edge: {method: lora, recompute: true}}, by_stage: {1: {method: frozen}}}"
    )
    cfg = config_from_container(OmegaConf.merge(OmegaConf.create(raw_config()), raw), [], "t", tmp_path)
    pol = policy(cfg.run)
    assert pol.for_stage(0, "edge") == StageMethod("lora", True)
    assert pol.for_stage(1, "edge") == StageMethod("frozen", True)
    assert pol.for_stage(2, "cloud") == StageMethod()
    cfg = config_from_container(raw_config(), ["finetune.by_stage.2.method=lora", "plan.allow=[int8]"], "t", tmp_path)
    assert {v.key for v in variants(cfg.run)} == {"lora", "lora+int8"}
    from splitlearn.planning import make_plan

    plan = make_plan(cfg)
    assert [s.method for s in plan.stages] == ["full", "full", "lora"]
    assert "lora" in plan.table()


@pytest.mark.parametrize(
    "override,needle",
    [
        ("finetune.method=qlora", "finetune.method: 'qlora' is not one of full, frozen, lora"),
        ("finetune.frozen_dtype=int4", "finetune.frozen_dtype: 'int4'"),
        ("finetune.by_tier.fog.method=lora", "finetune.by_tier.fog: 'fog' is not a device tier"),
        ("finetune.by_stage.x.method=lora", "finetune.by_stage.x: keys are stage indices"),
        ("finetune.by_stage.5.method=lora", "finetune.by_stage.5: the plan has 3 stages"),
        ("finetune.by_tier.edge.frozen_dtype=fp8", "finetune.by_tier.edge.frozen_dtype: 'fp8'"),
        ("finetune.by_stage.0.metod=lora", "metod"),
        ("finetune.lora.r=0", "finetune.lora.r: must be >= 1"),
        ("finetune.lora.dropout=1.5", "finetune.lora.dropout"),
        ("plan.allow=[lora,zip]", "plan.allow[1]: 'zip' is not one of"),
    ],
)
def test_finetune_config_errors_name_the_key(tmp_path, override, needle):
    with pytest.raises(ConfigError) as e:
        config_from_container(raw_config(), [override], "t", tmp_path)
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_lora_targets_that_match_nothing(tmp_path):
    from splitlearn.planning import make_plan

    cfg = config_from_container(raw_config(method="lora", lora={"target_modules": ["qproj"]}), [], "t", tmp_path)
    with pytest.raises(ConfigError, match=r"finetune.lora.target_modules: \['qproj'\] matches no linear layer"):
        make_plan(cfg)


def test_tied_weight_trains_only_when_both_ends_train_fully():
    """GPT-2 ties the embedding and the LM head: with a LoRA edge stage and a full cloud
    stage the tied weight is frozen at both ends (the reference model too)."""
    from splitlearn.method_policy import apply_plan, tied_trainable

    def plan(*methods):
        stages = [
            {"index": i, "start": a, "stop": b, "devices": [d], "method": m}
            for i, ((a, b), d, m) in enumerate(zip([(0, 3), (3, 6)], ["edge-a", "cloud-c"], methods, strict=True))
        ]
        return Plan.from_dict({"stages": stages, "partitioner": "manual"})

    run = SimpleNamespace(
        finetune=SimpleNamespace(lora=SimpleNamespace(r=4, alpha=8, dropout=0.0, target_modules=None))
    )
    run.train = SimpleNamespace(seed=0)
    assert tied_trainable(plan("full", "full")) and not tied_trainable(plan("lora", "full"))
    model = build_model(model_cfg("gpt2"), seed=0)
    apply_plan(model, plan("lora", "full"), run)
    assert not model.lm_head.weight.requires_grad and model.lm_head.weight is model.transformer.wte.weight
    assert all(p.requires_grad for n, p in model.named_parameters() if n.startswith("transformer.h.3."))
