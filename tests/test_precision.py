"""Precision a user chooses: bf16 weights with fp32 master weights and moments (bf16-master),
or everything in bf16 (bf16-pure); what the cost model charges for each; frozen weights never
get an fp32 copy."""

import pytest
import torch
from conftest import ROOT
from families import TINY

from partitioners.costmodel import StageMethod, stage_memory
from partitioners.profile import LayerProfile, MethodCost
from splitlearn.config import load_config
from splitlearn.errors import ConfigError
from splitlearn.models.build import build_segment, meta_model, weights_dtype
from splitlearn.optim import MasterAdamW, make_optimizer

QUICKSTART = ROOT / "configs" / "quickstart.yaml"


class Train:
    lr, weight_decay = 1e-2, 0.1

    def __init__(self, dtype):
        self.dtype = dtype


def steps_with(opt_params, grads_per_step, opt):
    for grads in grads_per_step:
        for p, g in zip(opt_params, grads, strict=True):
            p.grad = g.to(p.dtype).clone()
        opt.step()


def test_master_adamw_on_fp32_weights_is_torch_adamw():
    """On fp32 weights the master-weight optimizer does torch.optim.AdamW's arithmetic."""
    g = torch.Generator().manual_seed(0)
    shapes = [(8, 5), (5,), (3, 3)]
    init = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) * 10.0**-k for s in shapes] for k in range(4)]
    a = [torch.nn.Parameter(t.clone()) for t in init]
    b = [torch.nn.Parameter(t.clone()) for t in init]
    steps_with(a, grads, MasterAdamW(a, lr=1e-2, weight_decay=0.1))
    steps_with(b, grads, torch.optim.AdamW(b, lr=1e-2, weight_decay=0.1, foreach=False))
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
        assert not torch.equal(x, torch.zeros_like(x))


def test_master_adamw_keeps_an_fp32_master_of_bf16_weights():
    """A bf16 weight is its fp32 master rounded; the master follows what fp32 AdamW does on
    the same gradients, where stepping the bf16 weight directly loses updates below its ulp."""
    g = torch.Generator().manual_seed(1)
    w0 = torch.randn(64, 64, generator=g)
    grads = [[torch.randn(64, 64, generator=g)] for _ in range(20)]
    bf = torch.nn.Parameter(w0.to(torch.bfloat16))
    opt = MasterAdamW([bf], lr=1e-4, weight_decay=0.0)
    steps_with([bf], grads, opt)
    st = opt.state[bf]
    assert st["master"].dtype == torch.float32 and st["exp_avg"].dtype == torch.float32
    assert torch.equal(st["master"].to(torch.bfloat16), bf.detach())
    ref = torch.nn.Parameter(w0.to(torch.bfloat16).float())  # the same start, in fp32
    steps_with(
        [ref], [[gr[0].to(torch.bfloat16).float()] for gr in grads], torch.optim.AdamW([ref], lr=1e-4, weight_decay=0.0)
    )
    torch.testing.assert_close(st["master"], ref.detach(), rtol=1e-6, atol=1e-7)
    # the comparison above is not trivial: pure bf16 steps lose most of these small updates
    pure = torch.nn.Parameter(w0.to(torch.bfloat16))
    steps_with([pure], grads, torch.optim.AdamW([pure], lr=1e-4, weight_decay=0.0, foreach=False))
    assert (pure.detach().float() - ref.detach()).abs().max() > 10 * (st["master"] - ref.detach()).abs().max()


def test_only_trainable_weights_get_state_and_a_master():
    w = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    frozen = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16), requires_grad=False)
    adapter = torch.nn.Parameter(torch.ones(4))  # fp32 (peft keeps LoRA adapters fp32): its own master
    opt = make_optimizer([w, frozen, adapter], Train("bf16-master"))
    assert isinstance(opt, MasterAdamW)
    for p in (w, adapter):
        p.grad = torch.ones_like(p)
    opt.step()
    assert set(opt.state) == {w, adapter}
    assert "master" in opt.state[w] and "master" not in opt.state[adapter]
    assert isinstance(make_optimizer([w], Train("bf16-pure")), torch.optim.AdamW)


@pytest.mark.parametrize("dtype", ["bf16-master", "bf16-pure"])
def test_a_segment_is_built_in_bf16_without_an_fp32_copy(dtype):
    cfg = load_config(QUICKSTART, ["model.family=llama", f"train.dtype={dtype}"])
    cfg.run.model.config = {**TINY["llama"], "vocab_size": 258}
    model = build_segment(cfg.run.model, 0, 1, 3, dtype=weights_dtype(dtype), meta=meta_model(cfg.run.model))
    real = [p for p in model.parameters() if p.device.type != "meta"]
    assert real and all(p.dtype == torch.bfloat16 for p in real)


def test_cost_model_charges_each_precision():
    layer = LayerProfile(name="l", params=1000)
    per_param = {}
    for precision in ("fp32", "bf16", "bf16-master", "bf16-pure"):
        m = stage_memory([layer], precision=precision)
        per_param[precision] = (m.weights + m.grads + m.optimizer) / 1000
    # fp32 weights+grads+moments; bf16 weights+grads, fp32 master+moments; all bf16
    assert per_param == {"fp32": 16, "bf16": 16, "bf16-master": 16, "bf16-pure": 8}
    lora = StageMethod(method="lora")
    frozen_layer = LayerProfile(name="l", params=1000, methods={lora.key: MethodCost(params=1010, trainable_params=10)})
    m = stage_memory([frozen_layer], precision="bf16-master", method=lora)
    assert m.weights == 1010 * 2 and m.optimizer == 10 * 12  # frozen weights: bf16, no master


def test_bf16_weights_with_offload_is_one_line():
    with pytest.raises(ConfigError) as e:
        load_config(QUICKSTART, ["train.dtype=bf16-master", "finetune.offload=optimizer"])
    msg = str(e.value)
    assert "train.dtype=bf16-master" in msg and "offload" in msg and "\n" not in msg


@pytest.mark.parametrize("dtype, master", [("fp32", False), ("bf16-master", True), ("bf16-pure", False)])
def test_plan_names_its_precision_and_charges_it(dtype, master):
    """The plan carries the precision its memory is for; bf16 weights halve what a frozen-free
    stage's weights cost and the footer says what each weight costs."""
    from splitlearn.planning import make_plan

    plans = {}
    for d in ("fp32", dtype):
        cfg = load_config(QUICKSTART, [f"train.dtype={d}", "plan.partitioner=uniform"])
        plans[d] = make_plan(cfg)
    plan = plans[dtype]
    assert plan.precision == dtype and f"precision={dtype} (per trained weight" in plan.table()
    assert ("fp32 master" in plan.table()) == master
    ratio = plan.stages[1].memory["weights"] / plans["fp32"].stages[1].memory["weights"]
    assert ratio == pytest.approx(1.0 if dtype == "fp32" else 0.5)
