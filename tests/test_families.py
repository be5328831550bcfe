"""Tier 2: twenty-odd Hugging Face families, split, compute exactly what the whole model
computes (loss and every gradient, fp32, packed and padded rows, two cut lists each), run
by the generic adapter (the family's own forward); the router auxiliary loss of MoE families
crosses the cuts; a wrong adapter is stopped by ``check-model`` and ``validate``."""

import copy
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch
from test_cli import one_line_error, write_config
from test_numerics import batch, grads_by_name, run_split

from splitlearn.cli import main
from splitlearn.models import Segment, build_model, causal_lm_loss, families, num_blocks
from splitlearn.models.check import check_model
from splitlearn.models.costs import meta_profile
from splitlearn.models.families import adapter_of
from splitlearn.models.generic import GenericAdapter

BASE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, vocab_size=96)
GQA = dict(BASE, num_key_value_heads=2)
MOE = dict(output_router_logits=True, router_aux_loss_coef=0.5, num_experts_per_tok=2)

# family name in the test id -> (model_type, config): every multiplier, cap and dropout the
# family has is set away from its neutral value, so a split that skips one cannot pass
FAMILIES = {
    "gemma2": ("gemma2", dict(GQA, head_dim=8, sliding_window=5, final_logit_softcapping=0.05)),
    "gemma3": (
        "gemma3_text",
        dict(
            GQA,
            head_dim=8,
            sliding_window=5,
            layer_types=["sliding_attention", "full_attention"] * 2,
            final_logit_softcapping=0.05,
        ),
    ),
    "cohere": ("cohere", dict(GQA, logit_scale=0.25)),
    "granite": (
        "granite",
        dict(GQA, embedding_multiplier=6.0, residual_multiplier=0.3, logits_scaling=4.0, attention_multiplier=0.2),
    ),
    "phi": ("phi", dict(BASE, partial_rotary_factor=0.5, resid_pdrop=0.1, embd_pdrop=0.1)),
    "phi3": ("phi3", dict(GQA, pad_token_id=0)),
    "falcon-old": ("falcon", dict(BASE, new_decoder_architecture=False, multi_query=True, parallel_attn=True)),
    "falcon-new": ("falcon", dict(BASE, new_decoder_architecture=True, num_kv_heads=2)),
    "bloom": ("bloom", dict(hidden_size=32, n_layer=4, n_head=4, vocab_size=96)),
    "gpt_bigcode": ("gpt_bigcode", dict(n_embd=32, n_layer=4, n_head=4, n_positions=64, vocab_size=96)),
    "gptj": ("gptj", dict(n_embd=32, n_layer=4, n_head=4, n_positions=64, vocab_size=96, rotary_dim=4)),
    "stablelm": ("stablelm", dict(GQA, partial_rotary_factor=0.25)),
    "starcoder2": ("starcoder2", dict(GQA, embedding_dropout=0.2, sliding_window=5)),
    "olmo": ("olmo", dict(GQA, pad_token_id=0, clip_qkv=0.5)),
    "olmo2": ("olmo2", dict(GQA, pad_token_id=0)),
    "qwen3": ("qwen3", dict(GQA, head_dim=8)),
    "mixtral": ("mixtral", dict(GQA, **MOE, num_local_experts=4)),
    "qwen2_moe": (
        "qwen2_moe",
        dict(GQA, **MOE, num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=32),
    ),
    "qwen3_moe": ("qwen3_moe", dict(GQA, **MOE, head_dim=8, num_experts=4, moe_intermediate_size=32)),
    # the built-in families, through the generic adapter instead of their hand-written ones
    "llama": ("llama", GQA),
    "mistral": ("mistral", dict(GQA, sliding_window=5)),
    "qwen2": ("qwen2", dict(GQA, tie_word_embeddings=True)),
    "gpt2": ("gpt2", dict(n_embd=32, n_layer=4, n_head=4, n_positions=64, vocab_size=96)),
    "opt": ("opt", dict(BASE, ffn_dim=64, max_position_embeddings=64, word_embed_proj_dim=16, pad_token_id=1)),
    "gpt_neox": ("gpt_neox", dict(BASE, rotary_pct=0.5)),
}
CUT_LISTS = [[2], [1, 3, 5]]  # chain of 6: embed, 4 blocks, head


def model_cfg(name, **extra):
    family, config = FAMILIES[name]
    return SimpleNamespace(
        family=family, path=None, config={**config, **extra}, adapter_module=None, attn_implementation="sdpa"
    )


@pytest.fixture
def generic_only(monkeypatch):
    """No hand-written adapter registered: every family runs the generic one."""
    monkeypatch.setattr(families, "_REGISTRY", {})


def reference_loss(model, ids, mask, labels):
    """The unsplit model's own loss: with the router auxiliary loss when it has one."""
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    if getattr(model.config, "output_router_logits", False):
        assert out.aux_loss is not None and out.aux_loss.item() > 0
        return out.loss
    return causal_lm_loss(out.logits, labels)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_split_equals_unsplit(name, generic_only):
    model = build_model(model_cfg(name), seed=0).train()
    assert isinstance(adapter_of(model), GenericAdapter)
    n = num_blocks(model) + 2
    for padded in (False, True):
        ids, mask, labels = batch(padded)
        whole = copy.deepcopy(model)
        torch.manual_seed(0)  # dropout: the split draws the same masks, in the same order
        ref_loss = reference_loss(whole, ids, mask, labels)
        ref_loss.backward()
        ref = {k: p.grad for k, p in whole.named_parameters() if p.grad is not None}
        for cuts in CUT_LISTS:
            bounds = [0, *cuts, n]
            segments = [Segment(copy.deepcopy(model), a, b).train() for a, b in zip(bounds, bounds[1:], strict=False)]
            torch.manual_seed(0)
            loss = run_split(segments, ids, mask, labels)
            torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
            got = grads_by_name(segments)
            assert set(got) == set(ref), f"{cuts}: parameters differ: {set(got) ^ set(ref)}"
            for k in ref:
                torch.testing.assert_close(
                    got[k], ref[k], rtol=1e-5, atol=1e-5, msg=lambda m, k=k, c=cuts: f"{c} {k}: {m}"
                )


def test_settings_under_test_change_the_model(generic_only):
    """The multipliers, caps and dropout set above are live: without them the loss moves, so
    the exactness above covers them."""
    ids, mask, labels = batch(padded=True)
    for name, neutral in [
        ("granite", dict(embedding_multiplier=1.0, residual_multiplier=1.0, logits_scaling=1.0)),
        ("cohere", dict(logit_scale=1.0)),
        ("gemma2", dict(final_logit_softcapping=None)),
        ("starcoder2", dict(embedding_dropout=0.0)),
    ]:
        losses = []
        for extra in ({}, neutral):
            torch.manual_seed(0)
            losses.append(reference_loss(build_model(model_cfg(name, **extra), seed=0).train(), ids, mask, labels))
        assert abs(losses[0].item() - losses[1].item()) > 1e-4, name


def test_router_aux_loss_crosses_every_cut(generic_only):
    """Mixtral with the router loss weighted heavily: one segment per layer still gives the
    unsplit model's total loss, and the routers of the first stage get their gradient from it."""
    cfg = model_cfg("mixtral", router_aux_loss_coef=5.0)
    model = build_model(cfg, seed=0).train()
    ids, mask, labels = batch(padded=True)
    whole = copy.deepcopy(model)
    ref_loss = reference_loss(whole, ids, mask, labels)
    ref_loss.backward()
    n = num_blocks(model) + 2
    segments = [Segment(copy.deepcopy(model), i, i + 1).train() for i in range(n)]
    torch.testing.assert_close(run_split(segments, ids, mask, labels), ref_loss, rtol=1e-5, atol=1e-5)
    gate = "model.layers.0.mlp.gate.weight"
    got = dict(segments[1].model.named_parameters())[gate].grad
    torch.testing.assert_close(got, dict(whole.named_parameters())[gate].grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_moe_meta_profile_counts_active_experts(name):
    """MoE shapes profile on the meta device (the planner's default), and an expert costs
    FLOPs only for the tokens routed to it: twice the experts, the same active ones, the same
    block FLOPs but for the router's."""
    family, config = FAMILIES[name]
    key = "num_local_experts" if family == "mixtral" else "num_experts"
    flops, params = [], []
    for experts in (4, 8):
        cfg = SimpleNamespace(
            family=family,
            path=None,
            config={**config, key: experts},
            adapter_module=None,
            attn_implementation="sdpa",
        )
        layers = meta_profile(cfg, micro_batch=2, seq_len=16)
        flops.append(layers[1].fwd_flops)
        params.append(layers[1].params)
    router = 2 * (2 * 16) * 32 * 4  # tokens x hidden x the 4 more experts, 2 FLOPs a multiply-add
    assert params[1] > params[0]
    assert flops[1] - flops[0] == router


def test_check_model_reports_every_cut(generic_only):
    adapter, checks = check_model(model_cfg("cohere"))
    assert adapter == "GenericAdapter"
    assert len(checks) == 6 and all(c.exact for c in checks), [c.line() for c in checks]
    assert {c.padded for c in checks} == {False, True}


def _wrong_adapter_module(tmp_path, monkeypatch, name):
    """A module registering the Llama adapter for Granite: it ignores Granite's multipliers."""
    (tmp_path / f"{name}.py").write_text(
        "from splitlearn.models import LlamaLikeAdapter, register_family\n"
        "register_family('granite', LlamaLikeAdapter())\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(families, "_REGISTRY", dict(families._REGISTRY))  # undone after the test
    monkeypatch.delitem(sys.modules, name, raising=False)


@pytest.mark.parametrize("command", ["check-model", "validate"])
def test_wrong_adapter_is_stopped(command, tmp_path, monkeypatch, capsys):
    module = f"wrong_granite_{command.replace('-', '_')}"
    _wrong_adapter_module(tmp_path, monkeypatch, module)
    granite = {**FAMILIES["granite"][1], "vocab_size": 258}
    cfg = write_config(tmp_path, model={"family": "granite", "config": granite, "adapter_module": module})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main([command, str(cfg)])
    one_line_error(capsys, code, "split with LlamaLikeAdapter does not compute what the model computes")
    assert not caught, [str(w.message) for w in caught]


def test_check_model_command_passes(tmp_path, capsys):
    cfg = write_config(tmp_path, model={"family": "olmo2", "config": {**FAMILIES["olmo2"][1], "vocab_size": 258}})
    assert main(["check-model", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "adapter GenericAdapter" in out and out.count(": exact (") == 6
