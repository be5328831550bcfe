"""How each Hugging Face causal-LM family turns into the chain ``embed, block_0…, head``.

An adapter knows three things about a family: where its modules live (so a segment can
drop the ones it does not run), how to rebuild the per-forward context (position ids, the
attention mask in the form the blocks expect, rotary embeddings) from nothing but the
shape of the hidden state and the 2-D padding mask, and how to call one block. It mirrors
the family's own ``forward`` exactly, so that a split model computes what the whole model
computes; the numerics tests hold every adapter to that.

To add a family, subclass :class:`FamilyAdapter` (or :class:`LlamaLikeAdapter`, which fits
most decoder-only models of the Llama lineage) and call :func:`register_family`. Put the
call in a module and name it in ``model.adapter_module`` so every worker imports it too.
"""

from __future__ import annotations

import functools
import inspect
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from splitlearn.errors import ModelError


@dataclass
class Context:
    """What every block of one forward needs besides the hidden state."""

    attention_mask: torch.Tensor | None  # the 2-D padding mask (batch, seq), or None
    position_ids: torch.Tensor
    masks: dict[str, Any]  # attention masks by layer type, as the blocks expect them
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None


class FamilyAdapter:
    """Base adapter. Paths are dotted attribute paths from the ``*ForCausalLM`` object."""

    model_types: ClassVar[tuple[str, ...]] = ()
    blocks_path: ClassVar[str]
    embed_paths: ClassVar[tuple[str, ...]]  # modules run by the embed layer
    head_paths: ClassVar[tuple[str, ...]]  # modules run by the head layer
    shared_paths: ClassVar[tuple[str, ...]] = ()  # parameter-free helpers every segment keeps
    meta_native: ClassVar[bool] = False  # builds its context on the meta device itself (else: on CPU, moved)
    # default LoRA targets (module-name suffixes, as peft matches them): the attention projections
    lora_targets: ClassVar[tuple[str, ...]] = ("q_proj", "k_proj", "v_proj", "o_proj")

    # -- structure ------------------------------------------------------------------------
    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return get_path(model, self.blocks_path)

    def num_blocks(self, model: nn.Module) -> int:
        return len(self.blocks(model))

    # -- forward pieces -------------------------------------------------------------------
    def embed(self, model: nn.Module, input_ids: torch.Tensor, ctx: Context) -> torch.Tensor:
        raise NotImplementedError

    def context(self, model: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> Context:
        raise NotImplementedError

    def block(self, model: nn.Module, index: int, hidden: torch.Tensor, ctx: Context) -> torch.Tensor:
        raise NotImplementedError

    def head(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def prepare(
        self,
        model: nn.Module,
        x: torch.Tensor,
        attention_mask: torch.Tensor | None,
        embed: bool,
        dtype: torch.dtype,
        last: int | None = None,
    ) -> tuple[Context, torch.Tensor]:
        """The context of one forward and the hidden state entering the first block: the
        embedding of ``x`` when ``embed`` (``x`` the token ids), else ``x``. ``dtype``: the
        dtype the model computes in; ``last``: the last block the forward will run."""
        probe = torch.empty(x.shape[0], x.shape[1], 1, dtype=dtype, device=x.device)
        ctx = self.context(model, probe, attention_mask)
        return ctx, (self.embed(model, x, ctx) if embed else x)

    def stub(self, module: nn.Module) -> nn.Module | None:
        """What replaces an embed-layer module in a segment without the embed layer."""
        return None

    # -- helpers shared by adapters -------------------------------------------------------
    @staticmethod
    def arange_positions(hidden: torch.Tensor) -> torch.Tensor:
        return torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)

    @staticmethod
    def causal_mask(model: nn.Module, hidden: torch.Tensor, attention_mask, position_ids, sliding=False):
        from transformers import masking_utils

        fn = masking_utils.create_sliding_window_causal_mask if sliding else masking_utils.create_causal_mask
        return fn(
            config=model.config,
            inputs_embeds=hidden,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **no_cache(fn),
        )


@functools.lru_cache(maxsize=64)
def _cache_keyword(fn: Callable[..., Any]) -> str:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def no_cache(fn: Callable[..., Any]) -> dict[str, None]:
    """The keyword that tells a transformers call to use no KV cache: ``cache`` in the
    transformers releases that renamed it, ``past_key_values`` before (passing the old name
    to a new release prints a deprecation warning on every call)."""
    return {_cache_keyword(fn): None}


class LlamaLikeAdapter(FamilyAdapter):
    """Llama, Mistral, Qwen2 and the many families that share their layout."""

    model_types = ("llama", "mistral", "qwen2")
    blocks_path = "model.layers"
    embed_paths = ("model.embed_tokens",)
    head_paths = ("model.norm", "lm_head")
    shared_paths = ("model.rotary_emb",)

    def embed(self, model, input_ids, ctx):
        return model.model.embed_tokens(input_ids)

    def context(self, model, hidden, attention_mask):
        cfg = model.config
        pos = self.arange_positions(hidden)
        masks: dict[str, Any] = {}
        layer_types = getattr(cfg, "layer_types", None)
        kinds = set(layer_types) if layer_types else set()
        if not kinds:
            # Mistral-style: one mask for all layers, sliding when a window is configured.
            sliding = getattr(cfg, "sliding_window", None) is not None
            masks["*"] = self.causal_mask(model, hidden, attention_mask, pos, sliding=sliding)
        else:
            if "full_attention" in kinds:
                masks["full_attention"] = self.causal_mask(model, hidden, attention_mask, pos)
            if "sliding_attention" in kinds:
                masks["sliding_attention"] = self.causal_mask(model, hidden, attention_mask, pos, sliding=True)
        rotary = model.model.rotary_emb(hidden, position_ids=pos)
        return Context(attention_mask, pos, masks, rotary)

    def _mask_for(self, model, index, ctx):
        if "*" in ctx.masks:
            return ctx.masks["*"]
        return ctx.masks[model.config.layer_types[index]]

    def block(self, model, index, hidden, ctx):
        layer = model.model.layers[index]
        return layer(
            hidden,
            attention_mask=self._mask_for(model, index, ctx),
            position_ids=ctx.position_ids,
            position_embeddings=ctx.position_embeddings,
            use_cache=False,
            **no_cache(type(layer).forward),
        )

    def head(self, model, hidden):
        return model.lm_head(model.model.norm(hidden))


class GPT2Adapter(FamilyAdapter):
    model_types = ("gpt2",)
    blocks_path = "transformer.h"
    embed_paths = ("transformer.wte", "transformer.wpe", "transformer.drop")
    head_paths = ("transformer.ln_f", "lm_head")
    lora_targets = ("c_attn", "c_proj")  # c_proj: the attention's and the MLP's output projections

    def embed(self, model, input_ids, ctx):
        t = model.transformer
        return t.drop(t.wte(input_ids) + t.wpe(ctx.position_ids))

    def context(self, model, hidden, attention_mask):
        pos = self.arange_positions(hidden)
        return Context(attention_mask, pos, {"*": self.causal_mask(model, hidden, attention_mask, pos)})

    def block(self, model, index, hidden, ctx):
        return model.transformer.h[index](hidden, None, ctx.masks["*"], use_cache=False, position_ids=ctx.position_ids)

    def head(self, model, hidden):
        return model.lm_head(model.transformer.ln_f(hidden))


class OPTAdapter(FamilyAdapter):
    model_types = ("opt",)
    blocks_path = "model.decoder.layers"
    embed_paths = ("model.decoder.embed_tokens", "model.decoder.embed_positions", "model.decoder.project_in")
    head_paths = ("model.decoder.final_layer_norm", "model.decoder.project_out", "lm_head")
    lora_targets = ("q_proj", "k_proj", "v_proj", "out_proj")

    def context(self, model, hidden, attention_mask):
        # OPT numbers positions by counting real (unpadded) tokens.
        pmask = attention_mask
        if pmask is None:
            pmask = torch.ones(hidden.shape[0], hidden.shape[1], device=hidden.device)
        pos = (torch.cumsum(pmask, dim=1) * pmask - 1).long()
        mask = self.causal_mask(model, hidden, attention_mask, None)
        return Context(attention_mask, pos, {"*": mask, "_pmask": pmask})

    def embed(self, model, input_ids, ctx):
        dec = model.model.decoder
        x = dec.embed_tokens(input_ids)
        pos_embeds = dec.embed_positions(ctx.masks["_pmask"], 0, position_ids=ctx.position_ids)
        if dec.project_in is not None:
            x = dec.project_in(x)
        return x + pos_embeds

    def block(self, model, index, hidden, ctx):
        if model.training and model.config.layerdrop > 0:
            raise ModelError("OPT layerdrop > 0 is not supported in split training; set it to 0")
        layer = model.model.decoder.layers[index]
        return layer(
            hidden,
            attention_mask=ctx.masks["*"],
            position_ids=ctx.position_ids,
            use_cache=False,
            **no_cache(type(layer).forward),
        )

    def head(self, model, hidden):
        dec = model.model.decoder
        if dec.final_layer_norm is not None:
            hidden = dec.final_layer_norm(hidden)
        if dec.project_out is not None:
            hidden = dec.project_out(hidden)
        return model.lm_head(hidden)


class GPTNeoXAdapter(FamilyAdapter):
    model_types = ("gpt_neox",)
    blocks_path = "gpt_neox.layers"
    embed_paths = ("gpt_neox.embed_in", "gpt_neox.emb_dropout")
    head_paths = ("gpt_neox.final_layer_norm", "lm_head")
    shared_paths = ("gpt_neox.rotary_emb",)
    lora_targets = ("query_key_value", "dense")  # attention.dense (the MLP's are dense_h_to_4h, ...)

    def embed(self, model, input_ids, ctx):
        g = model.gpt_neox
        return g.emb_dropout(g.embed_in(input_ids))

    def context(self, model, hidden, attention_mask):
        pos = self.arange_positions(hidden)
        mask = self.causal_mask(model, hidden, attention_mask, pos)
        rotary = model.gpt_neox.rotary_emb(hidden, position_ids=pos)
        return Context(attention_mask, pos, {"*": mask}, rotary)

    def block(self, model, index, hidden, ctx):
        return model.gpt_neox.layers[index](
            hidden,
            attention_mask=ctx.masks["*"],
            position_ids=ctx.position_ids,
            layer_past=None,
            use_cache=False,
            position_embeddings=ctx.position_embeddings,
        )

    def head(self, model, hidden):
        return model.lm_head(model.gpt_neox.final_layer_norm(hidden))


_REGISTRY: dict[str, FamilyAdapter] = {}


def register_family(model_type: str, adapter: FamilyAdapter) -> None:
    """Make ``model_type`` (a transformers ``config.model_type``) splittable with ``adapter``."""
    _REGISTRY[model_type] = adapter


def supported_families() -> list[str]:
    return sorted(_REGISTRY)


def adapter_for(model_type: str) -> FamilyAdapter:
    """The adapter registered for ``model_type`` (a hand-written one); see :func:`adapter_of`
    for any model."""
    try:
        return _REGISTRY[model_type]
    except KeyError:
        raise ModelError(
            f"model family '{model_type}' has no registered adapter; registered: "
            f"{', '.join(supported_families())} (add one with "
            "splitlearn.models.register_family, see the README)"
        ) from None


def check_family(model_type: str, config: Any = None) -> None:
    """Fail unless ``model_type`` can be split: a registered family, or a family with a
    causal-LM class in transformers (run by the generic adapter). With ``config``, also
    refuse an encoder (BERT's ``is_decoder=False``) and an encoder-decoder."""
    if model_type in _REGISTRY:
        return
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    cls = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    # an encoder's LM head (BERT's BertLMHeadModel) is causal only with is_decoder=True
    encoder = cls is not None and not cls.endswith("ForCausalLM") and getattr(config, "is_decoder", None) is False
    if cls is None or encoder or getattr(config, "is_encoder_decoder", False):
        raise ModelError(
            f"model family '{model_type}' is not supported: not a decoder-only causal LM of transformers; any "
            f"family with a causal-LM class splits, such as {', '.join(supported_families())} (add one with "
            "splitlearn.models.register_family, see the README)"
        )


_ADAPTERS: weakref.WeakKeyDictionary[nn.Module, FamilyAdapter] = weakref.WeakKeyDictionary()


def adapter_of(model: nn.Module) -> FamilyAdapter:
    """The adapter of a causal LM: the one registered for its family, else the generic one,
    which runs the family's own forward (:mod:`splitlearn.models.generic`), found once per
    model object."""
    model_type = getattr(model, "config").model_type  # noqa: B009  (typed Any: configs differ by family)
    if model_type in _REGISTRY:
        return _REGISTRY[model_type]
    if model not in _ADAPTERS:
        from splitlearn.models.generic import generic_adapter

        _ADAPTERS[model] = generic_adapter(model)
    return _ADAPTERS[model]


def get_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def set_path(obj: Any, path: str, value: Any) -> None:
    parent, _, leaf = path.rpartition(".")
    target = get_path(obj, parent) if parent else obj
    setattr(target, leaf, value)


for _adapter in (LlamaLikeAdapter(), GPT2Adapter(), OPTAdapter(), GPTNeoXAdapter()):
    for _t in _adapter.model_types:
        register_family(_t, _adapter)
