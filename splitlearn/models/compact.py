"""Frozen weights stored compactly: bf16/fp16, or int8 weight-only (torchao).

A frozen matmul weight needs no gradient and no optimizer state, and it may be stored in
fewer bytes than it is trained in. :func:`compact_frozen` replaces each frozen
``nn.Linear``, transformers ``Conv1D`` (GPT-2) and plain ``nn.Embedding`` of a module range
by a :class:`FrozenLinear` / :class:`FrozenEmbedding` that holds the weight

- in ``bf16``/``fp16``: the layer computes in that dtype and hands back fp32;
- in ``int8``: a torchao ``Int8Tensor`` (symmetric, one fp32 scale per output row).

The replacement keeps the attribute names (``weight``, ``bias``), so state-dict keys do not
change, and LoRA adapters wrapping the layer (peft's ``base_layer``) keep working on top.

Why a custom autograd function around torchao: torchao's int8 weight-only tensor is built
for inference. Under autograd its linear saves a dequantized fp32 copy of the weight for
the backward (measured: 16 MB saved by one 4096x1024 layer), so a frozen int8 layer would
hold more memory in training than an fp32 one. :class:`_Int8Linear` runs torchao's kernel
with autograd off and computes the input's gradient from the int8 weight itself, so
nothing but a reference to that weight is kept for the backward.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from partitioners.choices import FROZEN_DTYPES
from splitlearn.errors import ModelError
from splitlearn.models.families import set_path

COMPACT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - every supported transformers has it
        return None
    return Conv1D


@contextmanager
def quiet_torchao():
    """Import torchao quietly inside: on a CPU-only build it logs a warning for each optional
    CUDA extension it cannot load, and torch's pytree one deprecation per enum it registers.
    ``transformers.modeling_utils`` imports torchao too, when it is installed."""
    quiet = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree", "torchao.kernel.intmm")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, lv in zip(quiet, levels, strict=True):
            lg.setLevel(lv)


def _torchao_int8():
    """torchao's ``Int8Tensor`` and ``PerRow``, imported quietly."""
    try:
        with quiet_torchao():
            from torchao.quantization import Int8Tensor, PerRow
    except ImportError as e:
        raise ModelError(f"finetune.frozen_dtype: int8 needs torchao (pip install 'torchao>=0.18'): {e}") from e
    return Int8Tensor, PerRow


def quantize_int8(weight: torch.Tensor) -> torch.Tensor:
    """Per-row symmetric int8 (torchao ``Int8Tensor``) of a 2-D weight ``(rows, cols)``."""
    Int8Tensor, PerRow = _torchao_int8()
    return Int8Tensor.from_hp(weight.detach(), PerRow())


class _Int8Linear(torch.autograd.Function):
    """``x @ W.T`` with ``W`` a frozen torchao ``Int8Tensor``: the forward is torchao's
    weight-only kernel; the backward gives only the input's gradient, ``(g * scale) @ q``,
    with ``W = scale * q`` per row (symmetric: no zero point)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.weight = weight  # the frozen parameter itself: no copy is kept
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        w = ctx.weight
        g = grad * w.scale.reshape(-1).to(grad.dtype)
        return g @ w.qdata.to(grad.dtype), None


class FrozenLinear(nn.Module):
    """A frozen linear layer with its weight stored as ``bf16``/``fp16``/``int8``.

    ``weight`` is kept as ``(out, in)``; ``transposed`` records that the replaced layer
    stored it as ``(in, out)`` (transformers' ``Conv1D``), so :meth:`export_weight` gives
    the original layout back. The bias stays in the model's dtype and is added after."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, storage: str, transposed: bool):
        super().__init__()
        self.storage, self.transposed = storage, transposed
        self.out_dtype = weight.dtype
        self.out_features, self.in_features = weight.shape
        w = quantize_int8(weight) if storage == "int8" else weight.detach().to(COMPACT_DTYPES[storage])
        self.weight = nn.Parameter(w, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.storage == "int8":
            y = _Int8Linear.apply(x, self.weight)
        else:
            y = F.linear(x.to(self.weight.dtype), self.weight).to(x.dtype)
        return y if self.bias is None else y + self.bias

    def export_weight(self) -> torch.Tensor:
        """The weight in the replaced layer's layout: int8 dequantized to the model's dtype,
        16-bit kept as stored."""
        w = self.weight.dequantize() if self.storage == "int8" else self.weight.detach()
        return (w.t() if self.transposed else w).contiguous()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, storage={self.storage}"


class FrozenEmbedding(nn.Module):
    """A frozen embedding with its table stored as ``bf16``/``fp16``/``int8`` (one scale per
    token row); looks up rows and hands back the model's dtype."""

    def __init__(self, weight: torch.Tensor, storage: str):
        super().__init__()
        self.storage, self.out_dtype = storage, weight.dtype
        self.num_embeddings, self.embedding_dim = weight.shape
        w = quantize_int8(weight) if storage == "int8" else weight.detach().to(COMPACT_DTYPES[storage])
        self.weight = nn.Parameter(w, requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.storage == "int8":
            # a torchao Int8Tensor inside the Parameter: torch's stubs know no qdata/scale
            w: Any = self.weight
            return F.embedding(ids, w.qdata).to(self.out_dtype) * F.embedding(ids, w.scale.to(self.out_dtype))
        return F.embedding(ids, self.weight).to(self.out_dtype)

    def export_weight(self) -> torch.Tensor:
        return self.weight.dequantize() if self.storage == "int8" else self.weight.detach()

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, storage={self.storage}"


def is_compactable(module: nn.Module) -> bool:
    """Layers whose weight a compact dtype can hold: exactly ``nn.Linear``, ``nn.Embedding``
    (subclasses with their own forward, e.g. OPT's learned positions, are left alone) and
    transformers' ``Conv1D``."""
    conv1d = _conv1d_type()
    return type(module) in (nn.Linear, nn.Embedding) or (conv1d is not None and type(module) is conv1d)


def _weight(layer: nn.Module) -> torch.Tensor:
    """The ``weight`` parameter of a compactable layer (``nn.Module.__getattr__`` is typed
    ``Tensor | Module``; ``Conv1D`` has no stubs)."""
    weight = layer.weight
    assert isinstance(weight, torch.Tensor), f"{type(layer).__name__}.weight is not a tensor"
    return weight


def _bias(layer: nn.Module) -> torch.Tensor | None:
    """The ``bias`` parameter of a compactable linear layer, None when it has none."""
    bias = layer.bias
    assert bias is None or isinstance(bias, torch.Tensor), f"{type(layer).__name__}.bias is not a tensor"
    return bias


def compact_counts(modules: Iterable[nn.Module]) -> tuple[int, int]:
    """(weight entries, output rows) of the compactable layers among ``modules`` and their
    children, each weight once: what the cost model's ``compact_params``/``compact_rows``
    count."""
    seen: set[int] = set()
    params = rows = 0
    for root in modules:
        for m in root.modules():
            if not is_compactable(m):
                continue
            weight = _weight(m)
            if id(weight) in seen:
                continue
            seen.add(id(weight))
            params += weight.numel()
            if isinstance(m, nn.Embedding):
                rows += weight.shape[0]
            elif isinstance(m, nn.Linear):
                rows += m.out_features
            else:  # Conv1D: weight (in, out)
                rows += weight.shape[1]
    return params, rows


def compact_frozen(root: nn.Module, names: Iterable[str], storage: str) -> int:
    """Replace each frozen compactable layer named in ``names`` (module paths from ``root``)
    by its compact form; returns how many were replaced. A weight shared by two layers
    (tied embeddings on one stage) is converted once and stays shared."""
    if storage == "fp32":
        return 0
    if storage not in FROZEN_DTYPES:
        raise ModelError(f"finetune.frozen_dtype: '{storage}' is not one of {', '.join(FROZEN_DTYPES)}")
    conv1d = _conv1d_type()
    shared: dict[int, nn.Parameter] = {}
    count = 0
    for name in names:
        m = root.get_submodule(name)
        if not is_compactable(m) or any(p.requires_grad for p in m.parameters()):
            continue
        weight = _weight(m)
        key = id(weight)
        new: FrozenEmbedding | FrozenLinear
        if isinstance(m, nn.Embedding):
            new = FrozenEmbedding(weight, storage)
        else:
            transposed = conv1d is not None and isinstance(m, conv1d)
            w = weight.t() if transposed else weight
            new = FrozenLinear(w, _bias(m), storage, transposed)
            if transposed:
                key = -key  # the same tensor in another layout is not shareable
        if key in shared:
            new.weight = shared[key]
        else:
            shared[key] = new.weight
        set_path(root, name, new)
        count += 1
    return count
