"""Tier 2: a split model computes exactly what the whole model computes (fp32, CPU)."""

from types import SimpleNamespace

import pytest
import torch
from families import TINY

from splitlearn.errors import ModelError
from splitlearn.models import Segment, build_model, causal_lm_loss, chain_names, num_blocks, supported_families
from splitlearn.models.chain import count_items

CUTS = [[1], [3], [5], [2, 4], [1, 2, 3, 4, 5]]  # chain of 6: embed, 4 blocks, head


def model_cfg(family, **extra):
    return SimpleNamespace(
        family=family, path=None, config={**TINY[family], **extra}, adapter_module=None, attn_implementation="sdpa"
    )


def batch(padded: bool, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 96, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, 9:] = 0
        mask[2, 4:] = 0
    labels = ids.clone()
    labels[mask == 0] = -100
    return ids, (mask if padded else None), labels


def run_split(segments, ids, mask, labels):
    """Forward through the segments with detached hand-offs, backward in reverse, as the
    workers do, so no autograd edge crosses a cut."""
    acts, outs = [], []
    x = ids
    num_items = count_items(labels)
    for i, seg in enumerate(segments):
        inp = x if i == 0 else x.detach().requires_grad_(True)
        out = seg(inp, mask, labels if seg.has_head else None, num_items if seg.has_head else None)
        acts.append(inp)
        outs.append(out)
        x = out
    loss = outs[-1]
    loss.backward()
    for i in range(len(segments) - 2, -1, -1):
        outs[i].backward(acts[i + 1].grad)
    return loss


def grads_by_name(segments):
    """Gradients by the model's own parameter names; the copies of a tied weight add up."""
    out = {}
    for seg in segments:
        tied_to_embed = {h: e for e, h in seg.tied.items()}
        for name, p in seg.model.named_parameters():
            key = tied_to_embed.get(name, name)
            if p.grad is not None:
                out[key] = out[key] + p.grad if key in out else p.grad.clone()
    return out


@pytest.mark.parametrize("family", sorted(TINY))
@pytest.mark.parametrize("cuts", CUTS, ids=lambda c: "cuts" + "-".join(map(str, c)))
@pytest.mark.parametrize("padded", [False, True], ids=["packed", "padded"])
def test_split_equals_unsplit(family, cuts, padded):
    cfg = model_cfg(family)
    ids, mask, labels = batch(padded)
    whole = build_model(cfg, seed=0)
    whole.train()
    ref_loss = causal_lm_loss(whole(input_ids=ids, attention_mask=mask).logits, labels)
    ref_loss.backward()
    ref = {n: p.grad for n, p in whole.named_parameters()}

    n = num_blocks(whole) + 2
    bounds = [0, *cuts, n]
    segments = [Segment(build_model(cfg, seed=0), a, b).train() for a, b in zip(bounds, bounds[1:], strict=False)]
    loss = run_split(segments, ids, mask, labels)

    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    got = grads_by_name(segments)
    assert set(got) == set(ref), f"parameters differ: {set(got) ^ set(ref)}"
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_hf_loss_matches_ours():
    """Our loss is transformers' own causal-LM loss (the unsplit reference is not ours alone)."""
    cfg = model_cfg("llama")
    ids, mask, labels = batch(padded=True)
    whole = build_model(cfg, seed=0)
    out = whole(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(causal_lm_loss(out.logits, labels), out.loss, rtol=1e-6, atol=1e-6)


def test_mistral_sliding_window_is_active():
    """The tiny Mistral's window (5) is shorter than the sequence (12): cutting must keep it."""
    ids, _, labels = batch(padded=False)
    windowed = build_model(model_cfg("mistral"), seed=0)
    full = build_model(model_cfg("mistral", sliding_window=None), seed=0)
    a = windowed(input_ids=ids).logits
    b = full(input_ids=ids).logits
    assert not torch.allclose(a, b), "the window should change the result, else the test proves nothing"


def test_segments_hold_only_their_layers():
    cfg = model_cfg("llama")
    seg = Segment(build_model(cfg, seed=0), 2, 4)  # block_1, block_2
    names = {n for n, _ in seg.model.named_parameters()}
    assert names and all(n.startswith(("model.layers.1.", "model.layers.2.")) for n in names)
    assert seg.layer_names == ["block_1", "block_2"]
    assert chain_names(2) == ["embed", "block_0", "block_1", "head"]


def test_unsupported_family_lists_supported():
    cfg = SimpleNamespace(family="bert", path=None, config={}, adapter_module=None, attn_implementation="sdpa")
    with pytest.raises(ModelError) as e:
        build_model(cfg, seed=0)
    for fam in ("gpt2", "llama", "mistral", "qwen2", "opt", "gpt_neox"):
        assert fam in str(e.value)
    assert set(supported_families()) >= {"gpt2", "llama", "mistral", "qwen2", "opt", "gpt_neox"}


def test_user_registered_family():
    """A user adds a family by registering an adapter: Qwen3 shares the Llama layout."""
    from splitlearn.models import LlamaLikeAdapter, register_family

    register_family("qwen3", LlamaLikeAdapter())
    cfg = SimpleNamespace(
        family="qwen3",
        path=None,
        adapter_module=None,
        attn_implementation="sdpa",
        config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            vocab_size=96,
            max_position_embeddings=64,
        ),
    )
    ids, mask, labels = batch(padded=True)
    whole = build_model(cfg, seed=0)
    ref = causal_lm_loss(whole(input_ids=ids, attention_mask=mask).logits, labels)
    segs = [Segment(build_model(cfg, seed=0), a, b) for a, b in [(0, 2), (2, 4)]]
    torch.testing.assert_close(run_split(segs, ids, mask, labels), ref, rtol=1e-5, atol=1e-5)


def test_local_checkpoint_directory(tmp_path):
    """model.path loads a local directory (local_files_only) with the same weights."""
    cfg = model_cfg("gpt2")
    whole = build_model(cfg, seed=3)
    whole.save_pretrained(tmp_path / "ckpt")
    loaded = build_model(
        SimpleNamespace(
            family=None, path=str(tmp_path / "ckpt"), config={}, adapter_module=None, attn_implementation="sdpa"
        ),
        seed=0,
    )
    for (n1, p1), (n2, p2) in zip(whole.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert n1 == n2
        torch.testing.assert_close(p1, p2, rtol=0, atol=0)


def test_missing_checkpoint_directory_is_a_model_error(tmp_path):
    cfg = SimpleNamespace(family=None, path=str(tmp_path), config={}, adapter_module=None, attn_implementation="sdpa")
    with pytest.raises(ModelError, match="no config.json"):
        build_model(cfg, seed=0)


def test_split_equals_unsplit_with_compiled_blocks():
    """``runtime.compile``: each segment's blocks compiled by inductor still give the unsplit
    model's loss and every gradient."""
    cfg = model_cfg("llama")
    ids, mask, labels = batch(padded=True)
    whole = build_model(cfg, seed=0)
    whole.train()
    ref_loss = causal_lm_loss(whole(input_ids=ids, attention_mask=mask).logits, labels)
    ref_loss.backward()
    ref = {n: p.grad for n, p in whole.named_parameters()}
    n = num_blocks(whole) + 2
    bounds = [0, 2, n]
    segments = [Segment(build_model(cfg, seed=0), a, b).train() for a, b in zip(bounds, bounds[1:], strict=False)]
    torch._dynamo.utils.counters.clear()  # count only this test's graphs
    assert [seg.compile_blocks() for seg in segments] == [1, n - 3]
    loss = run_split(segments, ids, mask, labels)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    got = grads_by_name(segments)
    assert set(got) == set(ref)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert frames >= 1  # inductor compiled something: the blocks did not all fall back to eager
