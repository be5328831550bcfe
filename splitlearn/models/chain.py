"""A causal LM as the chain ``embed, block_0…block_{n-1}, head``: segments, layer views, the loss.

Chain indices: ``0`` is the embedding layer, ``1…n`` are the transformer blocks, ``n+1``
is the head (final norm, LM head and the loss). A segment is any contiguous range
``[start, stop)`` of that chain. A segment keeps the Hugging Face model object with every
module it does not run removed, so its parameter names are the model's own
(``model.layers.3.mlp.up_proj.weight``): the union of all segments' state dicts is a state
dict the whole model loads.

Building the model is :mod:`splitlearn.models.build`; a layer view (:class:`LayerView`) is
what the profiler measures.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from splitlearn.errors import ModelError
from splitlearn.models.families import FamilyAdapter, adapter_of, get_path, set_path
from splitlearn.models.router import (
    RouterAux,
    aux_loss,
    collecting,
    empty_carry,
    layer_sums,
    pack,
    router_aux,
    unpack,
)

IGNORE_INDEX = -100

# the attribute :func:`record_compute_dtype` sets on a model and :func:`compute_dtype` reads
_COMPUTE_DTYPE_ATTR = "splitlearn_compute_dtype"


def hf_config(model: nn.Module) -> Any:
    """``model.config``, the transformers config of a Hugging Face model. Typed ``Any``:
    ``nn.Module.__getattr__`` is typed ``Tensor | Module``, and which fields a config has
    (``vocab_size``, ``tie_word_embeddings``, ...) depends on the model family."""
    return model.config


def num_blocks(model: nn.Module) -> int:
    return adapter_of(model).num_blocks(model)


def chain_names(num_blocks: int) -> list[str]:
    return ["embed", *[f"block_{i}" for i in range(num_blocks)], "head"]


def _param_ids(model: nn.Module, paths: tuple[str, ...]) -> dict[int, str]:
    out: dict[int, str] = {}
    for path in paths:
        mod = get_path(model, path)
        if mod is None:
            continue
        for name, p in mod.named_parameters(remove_duplicate=False):
            out.setdefault(id(p), f"{path}.{name}")
    return out


def tied_parameter_names(model: nn.Module) -> list[tuple[str, str]]:
    """(embed name, head name) of each parameter the embed and head layers share."""
    adapter = adapter_of(model)
    emb = _param_ids(model, adapter.embed_paths)
    head = _param_ids(model, adapter.head_paths)
    return [(emb[i], head[i]) for i in emb if i in head]


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype a model computes in: its parameters' dtype before any frozen weight was
    stored compactly (see :mod:`splitlearn.models.compact`)."""
    dt = getattr(model, _COMPUTE_DTYPE_ATTR, None)
    return dt if dt is not None else next(model.parameters()).dtype


def record_compute_dtype(model: nn.Module) -> None:
    """Fix :func:`compute_dtype` to the parameters' dtype now, unless already recorded: call
    it before any frozen weight is stored compactly."""
    if getattr(model, _COMPUTE_DTYPE_ATTR, None) is None:
        # setattr: nn.Module.__setattr__ is typed for tensor and module values only
        setattr(model, _COMPUTE_DTYPE_ATTR, next(model.parameters()).dtype)


class Segment(nn.Module):
    """The layers ``[start, stop)`` of the chain, owning only their own modules.

    With ``recompute`` set, each block and the head run under activation checkpointing
    (``torch.utils.checkpoint``, non-reentrant): between a micro-batch's forward and its
    backward only each layer's input is kept, and the backward runs the layer's forward
    again first."""

    def __init__(self, model: nn.Module, start: int, stop: int, recompute: bool = False):
        super().__init__()
        self.recompute = recompute
        self.adapter: FamilyAdapter = adapter_of(model)
        n = self.adapter.num_blocks(model)
        if not (0 <= start < stop <= n + 2):
            raise ModelError(f"segment [{start}, {stop}) is outside the chain of {n + 2} layers")
        self.start, self.stop, self.num_chain = start, stop, n + 2
        self.has_embed = start == 0
        self.has_head = stop == n + 2
        self.block_ids = list(range(max(start, 1) - 1, min(stop, n + 1) - 1))
        # Parameters shared by embed and head (tied embeddings): the copy here is kept in
        # sync with the other stage's by summing gradients (see StageWorker).
        self.tied = {e: h for e, h in tied_parameter_names(model)}
        blocks = self.adapter.blocks(model)
        keep = set(self.block_ids)
        for i in range(n):
            if i not in keep:
                blocks[i] = nn.Identity()
        if not self.has_embed:
            for path in self.adapter.embed_paths:
                mod = get_path(model, path)
                set_path(model, path, None if mod is None else self.adapter.stub(mod))
        if not self.has_head:
            for path in self.adapter.head_paths:
                set_path(model, path, None)
        self.model = model
        self.router_aux = router_aux(model)

    def compile_blocks(self) -> int:
        """Compile each of this segment's blocks in place (``torch.compile``, inductor): the
        blocks hold the FLOPs, and each compiles to the same graph. A block that Dynamo
        cannot trace runs eagerly (``suppress_errors``). Returns how many were compiled."""
        import torch._dynamo

        torch._dynamo.config.suppress_errors = True
        # one graph per block; every block of a segment has the same code
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        blocks = self.adapter.blocks(self.model)
        for i in self.block_ids:
            blocks[i].compile()
        return len(self.block_ids)

    @property
    def layer_names(self) -> list[str]:
        return chain_names(self.num_chain - 2)[self.start : self.stop]

    def tied_parameters(self) -> dict[str, nn.Parameter]:
        """Shared embed/head parameters present here, keyed by the embed-side name."""
        out = {}
        params = dict(self.model.named_parameters(remove_duplicate=False))
        for emb_name, head_name in self.tied.items():
            for name in (emb_name, head_name):
                if name in params:
                    out[emb_name] = params[name]
                    break
        return out

    def forward(
        self,
        x: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        num_items: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """Input ids (first segment) or hidden state in; hidden state or loss out. With a
        router auxiliary loss (:mod:`splitlearn.models.router`) the hidden state between
        segments carries its sums in a few extra channels, and the loss includes it."""
        model, ad, aux = self.model, self.adapter, self.router_aux
        carry = None
        if aux is not None:
            x, carry = (x, empty_carry(aux, x.shape[0], x.device)) if self.has_embed else unpack(aux, x)
        ctx, h = None, x
        if self.has_embed or self.block_ids:  # the head alone needs no context
            last = self.block_ids[-1] if self.block_ids else 0
            ctx, h = ad.prepare(model, x, attention_mask, self.has_embed, compute_dtype(model), last)
        if aux is None or carry is None:
            for i in self.block_ids:
                h = self._run(self._block, h, i, ctx)
        else:
            h, carry = self._blocks_with_router(aux, h, ctx, carry, attention_mask)
        if not self.has_head:
            return h if aux is None or carry is None else pack(aux, h, carry)
        if labels is None:
            raise ValueError("the last segment needs labels to compute the loss")
        loss = self._run(self._head, h, labels, num_items)
        if aux is None or carry is None:
            return loss
        share = 1.0 if num_items is None else count_items(labels) / num_items  # this micro-batch's share of the step
        return loss + aux.coef * share * aux_loss(aux, carry)

    def _blocks_with_router(
        self, aux: RouterAux, h: torch.Tensor, ctx: Any, carry: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The blocks, with their routers' sums added to the carry."""
        blocks = self.adapter.blocks(self.model)
        with collecting(aux, [blocks[i] for i in self.block_ids]) as logits:
            for i in self.block_ids:
                h = self._run(self._block, h, i, ctx)
        if logits:
            carry = carry + layer_sums(aux, logits, h.shape[0], h.shape[1], attention_mask)
        return h, carry

    def _run(self, fn, *args):
        if self.recompute and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def _block(self, h: torch.Tensor, i: int, ctx) -> torch.Tensor:
        out = self.adapter.block(self.model, i, h, ctx)
        return out[0] if isinstance(out, tuple) else out

    def _head(self, h: torch.Tensor, labels: torch.Tensor, num_items) -> torch.Tensor:
        return causal_lm_loss(self.adapter.head(self.model, h), labels, num_items)


def causal_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, num_items: torch.Tensor | int | None = None
) -> torch.Tensor:
    """Next-token cross entropy, summed and divided by ``num_items`` (default: the valid
    tokens of this batch), so that micro-batch losses add up to the whole batch's mean."""
    logits = logits.float()
    shift_labels = labels[:, 1:]
    shift_logits = logits[:, :-1, :]
    total = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    if num_items is None:
        num_items = count_items(labels)
    return total / num_items


def count_items(labels: torch.Tensor) -> int:
    """Tokens that carry a loss: every label after the first position that is not ignored."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def cut(model: nn.Module, start: int, stop: int) -> Segment:
    return Segment(model, start, stop)


class LayerView(nn.Module):
    """Chain layer ``index`` of a whole model as a one-tensor-in, one-tensor-out module: the
    profiler's view. Its ``parameters()`` are the layer's own; the model is shared, not cut.
    The head returns the loss over ``labels``."""

    def __init__(self, model: nn.Module, index: int, attention_mask=None, labels=None):
        super().__init__()
        adapter = adapter_of(model)
        n = adapter.num_blocks(model)
        self.index, self.n = index, n
        if index == 0:
            mods = [get_path(model, p) for p in adapter.embed_paths]
        elif index == n + 1:
            mods = [get_path(model, p) for p in adapter.head_paths]
        else:
            mods = [adapter.blocks(model)[index - 1]]
        self.owned = nn.ModuleList([m for m in mods if m is not None])
        self._model = [model]  # a list: keep it out of this module's parameters
        self.adapter, self.attention_mask, self.labels = adapter, attention_mask, labels
        self._ctx: dict = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        model, ad = self._model[0], self.adapter
        key = (x.shape[0], x.shape[1], x.device)
        if key not in self._ctx:  # built once per shape: a segment builds it once per micro-batch
            dtype = compute_dtype(model)
            with torch.no_grad():
                if x.device.type == "meta" and not ad.meta_native:
                    ctx = _meta_context(model, ad, x, dtype, self.attention_mask)
                else:
                    probe = torch.empty(x.shape[0], x.shape[1], 1, dtype=dtype, device=x.device)
                    ctx = ad.context(model, probe, self.attention_mask)
            self._ctx = {key: ctx}
        ctx = self._ctx[key]
        if self.index == 0:
            return ad.embed(model, x, ctx)
        if self.index == self.n + 1:
            labels = self.labels
            num_items = labels[:, 1:].numel() if labels.device.type == "meta" else None
            return causal_lm_loss(ad.head(model, x), labels, num_items)
        h = ad.block(model, self.index - 1, x, ctx)
        return h[0] if isinstance(h, tuple) else h


def _meta_context(model: nn.Module, ad: FamilyAdapter, x: torch.Tensor, dtype, attention_mask):
    """The context of a model on the meta device (for counting without memory): built on
    CPU, where the mask code may inspect values, from empty copies of the parameter-free
    shared modules, then moved to meta. Only shapes matter there."""
    import copy
    from dataclasses import fields

    saved = {}
    for path in ad.shared_paths:
        mod = get_path(model, path)
        saved[path] = mod
        set_path(model, path, copy.deepcopy(mod).to_empty(device="cpu"))
    try:
        probe = torch.zeros(x.shape[0], x.shape[1], 1, dtype=dtype)
        mask = None if attention_mask is None else torch.ones(attention_mask.shape, dtype=torch.long)
        ctx = ad.context(model, probe, mask)
    finally:
        for path, mod in saved.items():
            set_path(model, path, mod)

    def to_meta(v):
        if torch.is_tensor(v):
            return v.to("meta")
        if isinstance(v, tuple):
            return tuple(to_meta(t) for t in v)
        if isinstance(v, dict):
            return {k: to_meta(t) for k, t in v.items()}
        return v

    for f in fields(ctx):
        setattr(ctx, f.name, to_meta(getattr(ctx, f.name)))
    return ctx


def layer_views(model: nn.Module, attention_mask=None, labels=None) -> list[LayerView]:
    return [LayerView(model, i, attention_mask, labels) for i in range(num_blocks(model) + 2)]
