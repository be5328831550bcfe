"""The router auxiliary (load-balancing) loss of a mixture-of-experts model, carried across cuts.

With ``output_router_logits=True`` a Mixtral-, Qwen2-MoE- or Qwen3-MoE-style ``*ForCausalLM``
adds ``router_aux_loss_coef * aux`` to its loss, where ``aux`` is the Switch Transformer
load-balancing loss over the router logits of *every* MoE layer (transformers'
``load_balancing_loss_func``):

    aux = num_experts * sum_e (C_e / R) * (P_e / R)

``C_e``: how many times expert ``e`` is in a token's top-k, ``P_e``: the sum of its routing
probability, ``R``: the tokens counted, each summed over every MoE layer and every
(unpadded) token. ``aux`` is not a sum over layers, so no stage can compute its share alone;
but ``C``, ``P`` and ``R`` are. Each segment adds its layers' sums, per row of the batch, to
a small **carry** of ``2 * num_experts + 1`` numbers per row that travels with the hidden
state, packed as a few extra channels (:func:`pack`, :func:`unpack`); the segment with the
head computes ``aux`` from it. ``P`` keeps its autograd graph, so the gradient of the aux
loss flows back through the cuts to every router.

Which modules are routers, and at which output index their logits are, is what the family
declares for transformers' own output recording (``_can_record_outputs["router_logits"]``).

A micro-batch's aux loss is weighted by its share of the step's label tokens, so the
micro-batch losses add up to the step's loss as the cross-entropy terms do; with one
micro-batch the total equals the unsplit model's loss.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class RouterAux:
    """How a model's router auxiliary loss is made."""

    router_class: type[nn.Module]
    index: int  # where the router logits are in the router's output
    num_experts: int
    top_k: int
    coef: float

    @property
    def width(self) -> int:
        """Numbers carried per row: expert counts, expert probability sums, tokens."""
        return 2 * self.num_experts + 1

    def channels(self, seq_len: int) -> int:
        """Extra channels of the hidden state that hold the carry."""
        return math.ceil(self.width / seq_len)


def router_aux(model: nn.Module) -> RouterAux | None:
    """The model's router auxiliary loss, or None when it has none or it is off."""
    config: Any = model.config
    if not getattr(config, "output_router_logits", False):
        return None
    base = getattr(model, "base_model", model)
    spec = (getattr(type(base), "_can_record_outputs", None) or {}).get("router_logits")
    if spec is None:
        return None
    cls, index = (spec, 0) if isinstance(spec, type) else (getattr(spec, "target_class", None), spec.index)
    num_experts = getattr(model, "num_experts", None)
    top_k = getattr(model, "num_experts_per_tok", None)
    coef = getattr(model, "router_aux_loss_coef", None)
    if cls is None or num_experts is None or top_k is None or coef is None:
        return None
    return RouterAux(cls, int(index), int(num_experts), int(top_k), float(coef))


def empty_carry(aux: RouterAux, batch: int, device: torch.device) -> torch.Tensor:
    return torch.zeros(batch, aux.width, dtype=torch.float32, device=device)


def pack(aux: RouterAux, hidden: torch.Tensor, carry: torch.Tensor) -> torch.Tensor:
    """The hidden state with the carry appended as :meth:`RouterAux.channels` channels."""
    batch, seq = hidden.shape[0], hidden.shape[1]
    c = aux.channels(seq)
    flat = torch.nn.functional.pad(carry, (0, seq * c - aux.width))
    return torch.cat([hidden, flat.reshape(batch, seq, c).to(hidden.dtype)], dim=-1)


def unpack(aux: RouterAux, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden state, carry) from what :func:`pack` made."""
    batch, seq = x.shape[0], x.shape[1]
    c = aux.channels(seq)
    carry = x[..., -c:].reshape(batch, seq * c)[:, : aux.width].float()
    return x[..., :-c], carry


@contextmanager
def collecting(aux: RouterAux, blocks: list[nn.Module]) -> Iterator[list[torch.Tensor]]:
    """The router logits the given blocks produce while the context is open, in call order.
    Only the logits are kept (no computation in the hook), so a block that recomputes its
    forward under activation checkpointing saves the same tensors both times."""
    logits: list[torch.Tensor] = []
    active = [True]

    def hook(module: nn.Module, args: Any, out: Any) -> None:
        if active[0]:
            logits.append(out[aux.index] if isinstance(out, tuple | list) else out)

    handles = [m.register_forward_hook(hook) for b in blocks for m in b.modules() if isinstance(m, aux.router_class)]
    try:
        yield logits
    finally:
        active[0] = False
        for h in handles:
            h.remove()


def layer_sums(
    aux: RouterAux, logits: list[torch.Tensor], batch: int, seq: int, mask: torch.Tensor | None
) -> torch.Tensor:
    """Per row, the expert counts, probability sums and tokens of the given layers' router
    logits (each ``(batch * seq, num_experts)``), as ``load_balancing_loss_func`` counts them."""
    e, k = aux.num_experts, aux.top_k
    out = torch.zeros(batch, aux.width, dtype=torch.float32, device=logits[0].device if logits else None)
    if not logits:
        return out
    m = torch.ones(batch, seq, device=out.device) if mask is None else mask.to(out.device, torch.float32)
    flat = m.reshape(-1, 1)
    for layer in logits:
        probs = torch.softmax(layer, dim=-1)
        with torch.no_grad():
            _, chosen = torch.topk(probs, k, dim=-1)
            counts = torch.zeros(batch * seq, e, device=out.device).scatter_add_(1, chosen, flat.expand(-1, k))
        sums = torch.cat(
            [
                counts.reshape(batch, seq, e).sum(1),
                (probs.float() * flat).reshape(batch, seq, e).sum(1),
                m.sum(1, True),
            ],
            dim=-1,
        )
        out = out + sums
    return out


def aux_loss(aux: RouterAux, carry: torch.Tensor) -> torch.Tensor:
    """``load_balancing_loss_func`` from the summed carry of every MoE layer."""
    e = aux.num_experts
    total = carry.sum(0)
    rows = total[-1]
    return e * torch.sum((total[:e] / rows) * (total[e : 2 * e] / rows))
