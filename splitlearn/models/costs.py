"""What each chain layer of a model costs, for the planner: per fine-tuning method, measured
on a real model (``splitlearn profile``) or counted on the meta device (no profile given).

The measuring itself is model-agnostic (:func:`partitioners.profile.profile_chain` over
:func:`~splitlearn.models.chain.layer_views`); this module builds the views, applies a
method (:mod:`splitlearn.models.methods`) to a fresh model and turns the layer profiles
into :class:`~partitioners.profile.MethodCost` entries.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from partitioners.costmodel import StageMethod
from partitioners.profile import LayerProfile, MethodCost, profile_chain
from splitlearn.models.build import meta_model
from splitlearn.models.chain import chain_names, hf_config, layer_views, num_blocks
from splitlearn.models.compact import compact_counts
from splitlearn.models.methods import LoraSpec, apply_methods


def _active_experts_forward(
    self: Any, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """A mixture of experts on the meta device, where which expert a token goes to is
    unknown: every token through ``top_k`` experts (one expert's weights stand for each), so
    the FLOPs and saved activations are those of the parameters active per token, as the
    real routing computes them."""
    import torch.nn.functional as F

    def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, weight.transpose(-2, -1) if self.is_transposed else weight, bias)

    up_w = self.gate_up_proj if self.has_gate else self.up_proj
    up_b = getattr(self, "gate_up_proj_bias" if self.has_gate else "up_proj_bias", None) if self.has_bias else None
    down_b = self.down_proj_bias if self.has_bias else None
    out = torch.zeros_like(hidden_states)
    for k in range(top_k_index.shape[-1]):
        h = linear(hidden_states, up_w[k % up_w.shape[0]], None if up_b is None else up_b[0])
        h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
        h = linear(h, self.down_proj[k % self.down_proj.shape[0]], None if down_b is None else down_b[0])
        out = out + h * top_k_weights[:, k, None].to(h.dtype)
    return out


def count_active_experts(model: nn.Module) -> nn.Module:
    """A meta model whose mixture-of-experts layers run :func:`_active_experts_forward`
    (transformers' expert kernels need token counts, which meta tensors do not have): the
    planner costs experts by their parameters active per token, top-k of the experts. Every
    experts module transformers builds with ``use_experts_implementation`` qualifies; any other
    data-dependent experts module cannot be counted on meta (measure it: ``splitlearn profile``)."""
    import types

    for module in model.modules():
        if hasattr(module, "has_gate") and hasattr(module, "down_proj") and hasattr(module, "_apply_gate"):
            module.forward = types.MethodType(_active_experts_forward, module)  # type: ignore[method-assign]
    return model


def layer_compact_counts(model: nn.Module) -> list[tuple[int, int]]:
    """(compactable weight entries, their output rows) of each chain layer of a whole model."""
    return [compact_counts(view.owned) for view in layer_views(model)]


def method_costs(
    model: nn.Module,
    method: StageMethod,
    lora: LoraSpec,
    seed: int,
    ids: torch.Tensor,
    span: range | None = None,
    **profile_kw: Any,
) -> list[MethodCost]:
    """Each chain layer's costs (in ``span``) with ``method`` applied to the whole chain of
    ``model`` (a fresh model: it is changed in place), measured like ``profile_chain``
    measures the full method (or counted, on the meta device)."""
    n = num_blocks(model) + 2
    span = span if span is not None else range(n)
    apply_methods(model, [(0, n, method)], lora, seed)
    model.train()
    views = layer_views(model, None, ids)
    x = ids
    with torch.no_grad():
        for i in range(span.start):
            x = views[i](x)
    names = chain_names(n - 2)
    profs = profile_chain([views[i] for i in span], x, [names[i] for i in span], **profile_kw)
    return [
        MethodCost(
            params=p.params,
            trainable_params=p.trainable,
            fwd_flops=p.fwd_flops,
            bwd_flops=p.bwd_flops,
            saved_bytes=p.saved_bytes,
            fwd_ms=p.fwd_ms,
            bwd_ms=p.bwd_ms,
            opt_ms=p.opt_ms,
            bwd_transient_bytes=p.bwd_transient_bytes,
            max_trainable_params=p.max_trainable_params,
        )
        for p in profs
    ]


def meta_profile(
    model_cfg: Any,
    micro_batch: int,
    seq_len: int,
    seed: int = 0,
    variants: Sequence[StageMethod] = (),
    lora: LoraSpec | None = None,
    dtype: torch.dtype = torch.float32,
    cuda_kernels: bool = False,
) -> list[LayerProfile]:
    """Counted costs of each chain layer (parameters, FLOPs, cut and saved bytes; no times)
    from the model built on the meta device: no memory, no weights read, seconds even for a
    7B model. Attention kernels differ on meta, so saved bytes there are estimates; a
    measured profile (``splitlearn profile``) is exact. ``variants`` (fine-tuning methods
    other than full, with the ``lora`` settings, default :class:`LoraSpec`) are counted too,
    into each layer's ``methods``. ``dtype``: the weights' (bf16 weights save bf16 activations).
    ``cuda_kernels``: count attention as CUDA runs it where that costs more than on a CPU
    (:func:`partitioners.profile.fused_attention_on_meta`); for a topology with a GPU."""
    model = count_active_experts(meta_model(model_cfg).to(dtype))
    vocab = hf_config(model).vocab_size
    ids = torch.zeros(micro_batch, seq_len, dtype=torch.long, device="meta").clamp_(0, vocab - 1)
    names = chain_names(num_blocks(model))
    layers = profile_chain(layer_views(model, None, ids), ids, names, measure_time=False, cuda_kernels=cuda_kernels)
    if variants:
        spec = lora if lora is not None else LoraSpec()  # read by a "lora" variant only
        for layer, (params, rows) in zip(layers, layer_compact_counts(model), strict=True):
            layer.compact_params, layer.compact_rows = params, rows
        for v in variants:
            costs = method_costs(
                count_active_experts(meta_model(model_cfg).to(dtype)),
                v,
                spec,
                seed,
                ids,
                measure_time=False,
                cuda_kernels=cuda_kernels,
            )
            for layer, cost in zip(layers, costs, strict=True):
                layer.methods[v.key] = cost
    return layers
