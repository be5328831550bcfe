"""Is the split model the model? A scaled-down copy of the run's family, split and unsplit.

:func:`check_model` builds the configured family (or a local checkpoint's ``config.json``)
with tiny sizes (:func:`tiny_config`: 4 layers, 4 heads of 16, 128 tokens, at most 4 experts
of which 2 active; every multiplier, cap, dropout, window and layer pattern as configured),
random weights, and compares the loss and every parameter's gradient of the unsplit model
with those of the same model cut into segments (detached hand-offs, backward in reverse, as
the stage workers run them), for several cut lists, with and without padding, in fp32.
``splitlearn check-model`` prints a verdict per cut list; :func:`require_exact` (run by
``validate`` and ``train`` before planning) stops with one line when a cut differs.

The split runs in one process, after the same seed as the unsplit model, so dropout draws
the same masks when the segments consume random numbers in the model's order (the generic
adapter does; see :mod:`splitlearn.models.generic`).
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from splitlearn.errors import ModelError

TINY_LAYERS = 4
TINY_HEADS = 4
TINY_HEAD_DIM = 16
TINY_VOCAB = 128
TINY_FFN = 128
TINY_EXPERTS = 4
TINY_ACTIVE = 2
TINY_WINDOW = 6  # shorter than the check's sequences, so a sliding window is exercised
SEQ_LEN, BATCH = 12, 3
TOLERANCE = 1e-5
CUT_LISTS = ((2,), (1, 3, 5), (5,))  # chain of 6: embed, 4 blocks, head; (5,) cuts before the head
QUICK_CUTS = ((1, 2, 3, 4, 5),)  # every layer its own segment


@dataclass
class CutCheck:
    """The split model at one cut list against the unsplit model."""

    cuts: tuple[int, ...]
    padded: bool
    loss: float
    ref_loss: float
    grad_diff: float  # the largest |split - unsplit| over every gradient entry
    worst: str  # the parameter where it is
    missing: list[str] = field(default_factory=list)  # parameters with a gradient in one and not the other
    tolerance: float = TOLERANCE

    @property
    def loss_diff(self) -> float:
        return abs(self.loss - self.ref_loss)

    @property
    def exact(self) -> bool:
        bound = self.tolerance * (1 + abs(self.ref_loss))
        return not self.missing and self.loss_diff <= bound and self.grad_diff <= self.tolerance * 10

    def line(self) -> str:
        inputs = "padded" if self.padded else "packed"
        if self.missing:
            return f"cuts {list(self.cuts)} {inputs}: WRONG, gradients missing for {', '.join(self.missing[:3])}"
        verdict = "exact" if self.exact else "WRONG"
        grads = (
            "gradients identical" if self.grad_diff == 0 else f"gradients within {self.grad_diff:.1e} ({self.worst})"
        )
        return f"cuts {list(self.cuts)} {inputs}: {verdict} (loss {self.loss:.6f} vs {self.ref_loss:.6f}, {grads})"


def _key(config: Any, name: str) -> str:
    return getattr(config, "attribute_map", {}).get(name, name)


def _has_list_rope(d: dict[str, Any]) -> bool:
    """Rope parameters with per-dimension factors (Phi-3's longrope): the head size must stay."""
    for key in ("rope_parameters", "rope_scaling"):
        rope = d.get(key)
        if isinstance(rope, dict) and any(isinstance(v, list) for v in rope.values()):
            return True
    return False


def _shrink_attention(d: dict[str, Any], config: Any) -> None:
    heads0 = int(getattr(config, "num_attention_heads", TINY_HEADS) or TINY_HEADS)
    hidden0 = int(getattr(config, "hidden_size", heads0 * TINY_HEAD_DIM))
    head_dim0 = int(d.get("head_dim") or hidden0 // heads0)
    head_dim = head_dim0 if _has_list_rope(d) else TINY_HEAD_DIM
    d[_key(config, "num_attention_heads")] = TINY_HEADS
    d[_key(config, "hidden_size")] = TINY_HEADS * head_dim
    if d.get("head_dim"):
        d["head_dim"] = head_dim
    for kv_key in ("num_key_value_heads", "num_kv_heads"):
        kv0 = d.get(kv_key)
        if isinstance(kv0, int) and kv0 > 0:
            d[kv_key] = TINY_HEADS if kv0 == heads0 else (1 if kv0 == 1 else 2)
    if isinstance(d.get("rotary_dim"), int):  # GPT-J, CodeGen: the same share of each head
        d["rotary_dim"] = max(2, (head_dim * d["rotary_dim"] // head_dim0) // 2 * 2)


def _shrink_layers(d: dict[str, Any], config: Any) -> None:
    n = TINY_LAYERS
    d[_key(config, "num_hidden_layers")] = n
    types = d.get("layer_types")
    if isinstance(types, list) and types:
        kinds = list(dict.fromkeys(types))  # every kind of layer, in turn
        d["layer_types"] = [kinds[i % len(kinds)] for i in range(n)]
    if isinstance(d.get("mlp_only_layers"), list):
        d["mlp_only_layers"] = [i for i in d["mlp_only_layers"] if i < n]
    if isinstance(d.get("sliding_window"), int):
        d["sliding_window"] = min(d["sliding_window"], TINY_WINDOW)


def _shrink_sizes(d: dict[str, Any], config: Any) -> None:
    for k in ("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size"):
        if isinstance(d.get(k), int) and d[k] > 0:
            d[k] = TINY_FFN
    for k in ("moe_intermediate_size", "shared_expert_intermediate_size"):
        if isinstance(d.get(k), int) and d[k] > 0:
            d[k] = TINY_FFN // 4
    for k in ("num_local_experts", "num_experts", "n_routed_experts"):
        if isinstance(d.get(k), int) and d[k] > 0:
            d[k] = min(d[k], TINY_EXPERTS)
    if isinstance(d.get("num_experts_per_tok"), int):
        d["num_experts_per_tok"] = min(d["num_experts_per_tok"], TINY_ACTIVE)
    d[_key(config, "vocab_size")] = TINY_VOCAB
    for k, v in list(d.items()):  # special tokens inside the small vocabulary
        if k.endswith("token_id") and isinstance(v, int) and v >= TINY_VOCAB:
            d[k] = TINY_VOCAB - 1
        elif k.endswith("token_id") and isinstance(v, list):
            d[k] = [min(x, TINY_VOCAB - 1) if isinstance(x, int) else x for x in v]


def tiny_config(config: Any) -> Any:
    """A scaled-down copy of a transformers config: tiny sizes, the family's every other
    setting (multipliers, caps, dropout, windows, layer pattern, rotary share) kept."""
    d = config.to_dict()
    _shrink_attention(d, config)
    _shrink_layers(d, config)
    _shrink_sizes(d, config)
    d["use_cache"] = False
    try:
        return type(config).from_dict(d)
    except Exception as e:  # transformers validates configs with its own error types
        line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"check-model: cannot scale the '{config.model_type}' config down: {line}") from e


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' own warnings off while the check builds and runs its tiny models."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    quiet = logging.getLogger("splitlearn.models.build")
    old = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        quiet.setLevel(old)


def build_tiny(model_cfg: Any, seed: int = 0) -> Any:
    """The tiny copy of the run's model, random weights, fp32, in training mode."""
    from splitlearn.models.build import _auto_classes, _from_config, hf_config

    _, auto = _auto_classes()
    with quiet_transformers():
        config = tiny_config(hf_config(model_cfg))
        torch.manual_seed(seed)
        model = _from_config(auto, config, getattr(model_cfg, "attn_implementation", "sdpa"))
    model.config.use_cache = False
    return model.train()


def sample_batch(vocab: int, padded: bool, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Token ids, the padding mask (None: no padding) and labels (padding ignored)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (BATCH, SEQ_LEN), generator=g)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, SEQ_LEN - 3 :] = 0
        mask[2, 4:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return ids, (mask if padded else None), labels


def run_split(
    segments: Sequence[Any], ids: torch.Tensor, mask: torch.Tensor | None, labels: torch.Tensor
) -> torch.Tensor:
    """Forward through the segments with detached hand-offs, backward in reverse, as the
    stage workers run them: no autograd edge crosses a cut. Returns the loss."""
    from splitlearn.models.chain import count_items

    inputs, outputs = [], []
    x = ids
    num_items = count_items(labels)
    for i, seg in enumerate(segments):
        inp = x if i == 0 else x.detach().requires_grad_(True)
        out = seg(inp, mask, labels if seg.has_head else None, num_items if seg.has_head else None)
        inputs.append(inp)
        outputs.append(out)
        x = out
    loss = outputs[-1]
    loss.backward()
    for i in range(len(segments) - 2, -1, -1):
        outputs[i].backward(inputs[i + 1].grad)
    return loss


def split_gradients(segments: Sequence[Any]) -> dict[str, torch.Tensor]:
    """Gradients by the model's own parameter names; the copies of a tied weight add up."""
    out: dict[str, torch.Tensor] = {}
    for seg in segments:
        head_to_embed = {h: e for e, h in seg.tied.items()}
        for name, p in seg.model.named_parameters():
            key = head_to_embed.get(name, name)
            if p.grad is not None:
                out[key] = out[key] + p.grad if key in out else p.grad.clone()
    return out


def reference(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None, labels: torch.Tensor) -> Any:
    """The unsplit model's loss (its own, router auxiliary loss included) and gradients."""
    from splitlearn.models.chain import causal_lm_loss

    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    loss = out.loss if getattr(model.config, "output_router_logits", False) else causal_lm_loss(out.logits, labels)
    loss.backward()
    return loss, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def check_cuts(model: nn.Module, cuts: tuple[int, ...], padded: bool, seed: int = 0) -> CutCheck:
    """One cut list of a fresh model (left unchanged) against the unsplit model."""
    from splitlearn.models.chain import Segment, hf_config, num_blocks

    ids, mask, labels = sample_batch(int(hf_config(model).vocab_size), padded)
    whole = copy.deepcopy(model)
    torch.manual_seed(seed)
    ref_loss, ref = reference(whole, ids, mask, labels)
    bounds = [0, *cuts, num_blocks(model) + 2]
    segments = [Segment(copy.deepcopy(model), a, b).train() for a, b in zip(bounds, bounds[1:], strict=False)]
    torch.manual_seed(seed)
    loss = run_split(segments, ids, mask, labels)
    got = split_gradients(segments)
    missing = sorted(set(got) ^ set(ref))
    worst, diff = "-", 0.0
    for name in set(got) & set(ref):
        d = float((got[name] - ref[name]).abs().max()) if got[name].numel() else 0.0
        if d > diff or worst == "-":
            worst, diff = name, d
    return CutCheck(cuts, padded, loss.item(), ref_loss.item(), diff, worst, missing)


def check_model(
    model_cfg: Any, cut_lists: Sequence[tuple[int, ...]] = CUT_LISTS, paddings: Sequence[bool] = (False, True)
) -> tuple[str, list[CutCheck]]:
    """The adapter the run's family uses (its name) and a :class:`CutCheck` per cut list and
    padding, on a tiny copy of the run's model (:func:`build_tiny`)."""
    from splitlearn.models.families import adapter_of

    model = build_tiny(model_cfg)
    adapter = type(adapter_of(model)).__name__
    with quiet_transformers():
        return adapter, [check_cuts(model, cuts, padded) for cuts in cut_lists for padded in paddings]


_PASSED: set[str] = set()


def require_exact(model_cfg: Any, quick: bool = True) -> None:
    """Raise a one-line :class:`ModelError` unless the split tiny model is exact (every layer
    its own segment, padded, when ``quick``); once per process for a given model config."""
    from splitlearn.models.build import hf_config

    config = hf_config(model_cfg)
    key = json.dumps([config.to_dict(), getattr(model_cfg, "attn_implementation", None)], sort_keys=True, default=str)
    if key in _PASSED:
        return
    adapter, checks = check_model(model_cfg, QUICK_CUTS if quick else CUT_LISTS, (True,) if quick else (False, True))
    bad = next((c for c in checks if not c.exact), None)
    if bad is not None:
        raise ModelError(wrong_split_line(config.model_type, adapter, bad))
    _PASSED.add(key)


def wrong_split_line(family: str, adapter: str, bad: CutCheck) -> str:
    what = (
        f"gradients missing for {bad.missing[0]}"
        if bad.missing
        else f"loss {bad.loss:.6f} vs {bad.ref_loss:.6f}, gradient of {bad.worst} off by {bad.grad_diff:.1e}"
    )
    fix = (
        "remove its register_family call (model.adapter_module) to use the generic adapter, or fix the adapter"
        if adapter != "GenericAdapter"
        else "register a FamilyAdapter for it (see the README, 'Model families')"
    )
    return (
        f"model: family '{family}' split with {adapter} does not compute what the model computes "
        f"(tiny copy cut at {list(bad.cuts)}, {'padded' if bad.padded else 'packed'}: {what}); {fix}"
    )
