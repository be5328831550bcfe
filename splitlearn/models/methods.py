"""Fine-tuning methods applied to a model's modules: full, frozen, LoRA (peft) on ranges of
the layer chain, with frozen weights stored compactly; and the state dicts a trained model
exports. Which method each stage uses is decided run-wide in :mod:`splitlearn.method_policy`;
what a method costs per layer is :mod:`splitlearn.models.costs`.

:func:`apply_methods` changes a model in place for one or more chain ranges (a stage's
segment, or every stage's range of the unsplit reference model):

- ``frozen``: every parameter of the range stops requiring gradients; gradients still flow
  back through it to earlier stages (the activations keep requiring them).
- ``lora``: peft's ``inject_adapter_in_model`` wraps the range's target layers in place, so
  module paths (``model.layers.3.self_attn.q_proj``) stay what the family adapters call;
  the base weights are frozen, only ``lora_A``/``lora_B`` train. Every ``lora_A`` is
  initialised as peft does (Kaiming-uniform, ``B = 0``) but from a generator seeded by the
  run's seed and the module's name, so a stage built on its own process gets the adapter
  the unsplit model gets.
- ``frozen_dtype``: the range's frozen matmul weights are stored as bf16/fp16/int8
  (:mod:`splitlearn.models.compact`); LoRA adapters stay in the model's dtype.

Exports use the model's own parameter names (a stage shard joins the others into a state
dict ``transformers`` loads) and peft's adapter names (``base_model.model.<module>.lora_A.weight``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from partitioners.costmodel import StageMethod
from splitlearn.models.chain import compute_dtype, hf_config, record_compute_dtype
from splitlearn.models.compact import FrozenEmbedding, FrozenLinear, _conv1d_type, compact_frozen, is_compactable
from splitlearn.models.families import adapter_of, get_path

if TYPE_CHECKING:
    from peft.tuners.lora import LoraLayer

ADAPTER = "default"  # peft's adapter name inside the model; dropped from saved keys


@dataclass(frozen=True)
class LoraSpec:
    """LoRA hyper-parameters, one set for the whole model (so the adapters of all stages
    form one peft adapter)."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None  # None: the family's default

    @classmethod
    def from_config(cls, cfg: Any) -> LoraSpec:
        targets = getattr(cfg, "target_modules", None)
        return cls(int(cfg.r), float(cfg.alpha), float(cfg.dropout), tuple(targets) if targets else None)

    def targets(self, model: nn.Module) -> tuple[str, ...]:
        return self.target_modules or adapter_of(model).lora_targets


def chain_module_names(model: nn.Module, start: int, stop: int) -> list[str]:
    """Paths of the modules that chain layers ``[start, stop)`` run (absent ones skipped)."""
    ad = adapter_of(model)
    n = ad.num_blocks(model)
    names: list[str] = []
    if start == 0:
        names += [p for p in ad.embed_paths if get_path(model, p) is not None]
    names += [f"{ad.blocks_path}.{i}" for i in range(max(start, 1) - 1, min(stop, n + 1) - 1)]
    if stop == n + 2:
        names += [p for p in ad.head_paths if get_path(model, p) is not None]
    return names


def _walk(model: nn.Module, roots: Sequence[str]):
    for root in roots:
        for sub, m in model.get_submodule(root).named_modules():
            yield (f"{root}.{sub}" if sub else root), m


def lora_target_names(model: nn.Module, start: int, stop: int, spec: LoraSpec) -> list[str]:
    """The linear layers of chain layers ``[start, stop)`` whose names end in one of the
    LoRA targets (peft's rule: equal, or ending in ``.<target>``)."""
    targets = spec.targets(model)
    conv1d = _conv1d_type()
    out = []
    for name, m in _walk(model, chain_module_names(model, start, stop)):
        linear = isinstance(m, nn.Linear) or (conv1d is not None and isinstance(m, conv1d))
        if linear and any(name == t or name.endswith("." + t) for t in targets):
            out.append(name)
    return out


def _name_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2**63 - 1)


def seed_lora_init(model: nn.Module, seed: int) -> int:
    """Re-draw every ``lora_A`` of ``model`` as peft draws it (Kaiming-uniform with
    ``a=sqrt(5)``), from a CPU generator seeded by ``seed`` and the module's path in
    ``model``: the same adapter wherever and with whatever else the layer is built.
    Returns how many were drawn."""
    from peft.tuners.lora import LoraLayer

    count = 0
    for name, m in model.named_modules():
        if not isinstance(m, LoraLayer):
            continue
        for adapter, lin in m.lora_A.items():
            weight = lin.weight  # lora_A's layers are nn.Linear (or convolutions): a Parameter
            assert isinstance(weight, torch.Tensor), f"{name}.lora_A.{adapter}.weight is not a tensor"
            g = torch.Generator().manual_seed(_name_seed(seed, f"{name}.lora_A.{adapter}"))
            w = torch.empty(weight.shape, dtype=torch.float32)
            nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=g)
            with torch.no_grad():
                weight.copy_(w)
            count += 1
    return count


def lora_config(model: nn.Module, names: Sequence[str], spec: LoraSpec, **extra: Any):
    """peft's ``LoraConfig`` for exactly the layers ``names`` (full module paths)."""
    from peft import LoraConfig

    conv1d = _conv1d_type()
    fan_in_fan_out = conv1d is not None and any(isinstance(model.get_submodule(n), conv1d) for n in names)
    return LoraConfig(
        r=spec.r,
        # peft annotates lora_alpha as int but only divides by it (scaling = alpha / r): a
        # fractional alpha is passed on as it is
        lora_alpha=cast(int, spec.alpha),
        lora_dropout=spec.dropout,
        target_modules=sorted(names),
        fan_in_fan_out=fan_in_fan_out,
        bias="none",
        **extra,
    )


def apply_methods(
    model: nn.Module, ranges: Sequence[tuple[int, int, StageMethod]], lora: LoraSpec, seed: int
) -> list[str]:
    """Apply each ``(start, stop, method)`` to its chain range of ``model`` in place (one
    call per model: the LoRA layers of every range form one adapter). Returns the module
    paths that received LoRA adapters."""
    lora_names: list[str] = []
    for start, stop, method in ranges:
        if method.method == "full":
            continue
        for name in chain_module_names(model, start, stop):
            model.get_submodule(name).requires_grad_(False)
        if method.method == "lora":
            lora_names += lora_target_names(model, start, stop, lora)
    if lora_names:
        from peft import inject_adapter_in_model

        trainable = {id(p): p.requires_grad for p in model.parameters()}
        # peft looks for weights tied to the input embedding, which a segment without the
        # embed layer lacks; the adapters never target the embedding or the head, so the
        # tie is of no concern to it here
        tie = getattr(hf_config(model), "tie_word_embeddings", None)
        hf_config(model).tie_word_embeddings = False
        try:
            inject_adapter_in_model(lora_config(model, lora_names, lora), model, adapter_name=ADAPTER)
        finally:
            hf_config(model).tie_word_embeddings = tie
        for p in model.parameters():  # peft freezes the whole model; restore the other ranges
            if id(p) in trainable:
                p.requires_grad_(trainable[id(p)])
        seed_lora_init(model, seed)
    for start, stop, method in ranges:
        if method.method != "full" and method.frozen_dtype != "fp32":
            record_compute_dtype(model)
            names = [
                n
                for n, m in _walk(model, chain_module_names(model, start, stop))
                if is_compactable(m) and ".lora_" not in n
            ]
            compact_frozen(model, names, method.frozen_dtype)
    return lora_names


# -- exports -------------------------------------------------------------------------------


def _own_name(key: str) -> str:
    return key.replace(".base_layer.", ".")


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors under its own names (LoRA bases unwrapped, adapters left out),
    each shared tensor once, on CPU: int8 weights dequantized, 16-bit ones as stored."""
    compact = {n: m for n, m in model.named_modules() if isinstance(m, (FrozenLinear, FrozenEmbedding))}
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, t in model.state_dict(keep_vars=True).items():
        if ".lora_" in key:
            continue
        if id(t) in seen:
            continue
        seen.add(id(t))
        mod, _, leaf = key.rpartition(".")
        value = compact[mod].export_weight() if mod in compact and leaf == "weight" else t.detach()
        out[_own_name(key)] = value.cpu().contiguous().clone()
    return out


def adapter_key(name: str) -> str | None:
    """peft's saved name of a LoRA parameter of the model (``...q_proj.lora_A.default.weight``
    -> ``base_model.model....q_proj.lora_A.weight``), or None for any other parameter."""
    if f".{ADAPTER}." in name and ".lora_" in name:
        return "base_model.model." + name.replace(f".{ADAPTER}.", ".")
    return None


def checkpoint_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a stage checkpoint holds: :func:`base_state_dict` plus the adapters under peft's
    names (their optimizer state is keyed by the same names: :func:`checkpoint_params`)."""
    return {**base_state_dict(model), **adapter_state_dict(model)}


def checkpoint_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters a checkpoint restores, by their checkpoint names: the model's own
    names (LoRA bases unwrapped), peft's names for adapters. Weights stored compactly are
    left out: they are frozen and rebuilt from the model's source exactly as before."""
    compact = {id(p) for m in model.modules() if isinstance(m, (FrozenLinear, FrozenEmbedding)) for p in m.parameters()}
    out = {}
    for name, p in model.named_parameters():
        if id(p) not in compact:
            out[adapter_key(name) or _own_name(name)] = p
    return out


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    """The LoRA-wrapped layers of ``model`` by module path."""
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer) and ADAPTER in m.lora_A}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA adapters in peft's saved format: ``base_model.model.<module>.lora_A.weight``."""
    out = {}
    for name, p in model.named_parameters():
        key = adapter_key(name)
        if key is not None:
            out[key] = p.detach().cpu().contiguous().clone()
    return out


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's own names with each LoRA delta ``scale * B @ A`` added to its base
    weight, every tensor in the model's compute dtype: a state dict of the fine-tuned model
    that needs no peft."""
    dtype = compute_dtype(model)
    out = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in base_state_dict(model).items()}
    for name, layer in lora_layers(model).items():
        # each of peft's LoRA layer classes (lora.Linear, lora.Embedding, ...) defines
        # get_delta_weight; their common base LoraLayer does not declare it
        wrapped: Any = layer
        key = f"{name}.weight"
        out[key] = (out[key] + wrapped.get_delta_weight(ADAPTER).detach().cpu().to(dtype)).contiguous()
    return out
