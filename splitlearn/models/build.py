"""Building a run's causal LM: the one place that constructs a model.

- :func:`build_segment`: the model with only one segment's tensors real (what a stage worker
  builds): random init from a ``transformers`` config (``model.family`` + ``model.config``)
  or only the segment's keys read from a local checkpoint directory (``model.path``).
- :func:`build_model`: the whole model the same way (the unsplit reference), in fp32.
- :func:`meta_model`: the model on the meta device: structure and config, no memory, no
  weights read (for a directory only its ``config.json`` is).
- :func:`import_adapter_module`: the user's module that registers extra families.

Never touches the network. Cutting a model into segments is :mod:`splitlearn.models.chain`.
"""

from __future__ import annotations

import importlib
import logging
import math
import re
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import nn

from splitlearn.errors import ModelError
from splitlearn.models.compact import quiet_torchao
from splitlearn.models.families import check_family
from splitlearn.models.hf_checkpoint import load_segment
from splitlearn.models.materialize import check_coverage, move_real, num_chain, random_segment


def import_adapter_module(name: str | None) -> None:
    """Import the user's module that registers extra families (``model.adapter_module``)."""
    if not name:
        return
    try:
        importlib.import_module(name)
    except ImportError as e:
        raise ModelError(f"model.adapter_module: cannot import '{name}': {e}") from e


def _auto_classes() -> tuple[Any, Any]:
    """transformers' ``AutoConfig`` and ``AutoModelForCausalLM``, imported quietly: the
    modelling code imports torchao when it is installed (see ``compact.quiet_torchao``)."""
    with quiet_torchao():
        import transformers.modeling_utils  # noqa: F401  (the lazy import that loads torchao)
        from transformers import AutoConfig, AutoModelForCausalLM
    from splitlearn.logs import quiet_library_handlers

    quiet_library_handlers()  # transformers' notices to the run's log, not the screen
    return AutoConfig, AutoModelForCausalLM


log = logging.getLogger(__name__)

STAGE_FIELD = "{stage}"  # in model.path: each stage reads its own directory (see `splitlearn shard`)


def stage_path(path: str, stage: int) -> Path:
    """``model.path`` for one stage: ``{stage}`` replaced by its index (the driver, which reads
    only the config, uses stage 0's directory)."""
    return Path(path.replace(STAGE_FIELD, str(stage)))


def hf_config(model_cfg: Any) -> Any:
    """The transformers config of the run's model: ``model.family`` with ``model.config``'s
    keys, or a local directory's ``config.json`` with them as overrides. Reads no weights."""
    AutoConfig, _ = _auto_classes()
    import_adapter_module(model_cfg.adapter_module)
    overrides = dict(model_cfg.config or {})
    try:
        if model_cfg.path:
            path = stage_path(model_cfg.path, 0)
            if not (path / "config.json").is_file():
                raise ModelError(f"model.path: no config.json in '{path}' (expected a local checkpoint directory)")
            cfg = AutoConfig.from_pretrained(path, local_files_only=True, **overrides)
        else:
            _named_key("model.family", check_family, model_cfg.family)  # fail early with the list of families
            cfg = AutoConfig.for_model(model_cfg.family, **overrides)
    except ModelError:
        raise
    except Exception as e:
        if model_cfg.path and not _is_config_validation_error(e):
            line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelError(f"model.path: cannot read {stage_path(model_cfg.path, 0)}/config.json: {line}") from e
        if not isinstance(e, (OSError, ValueError, TypeError, KeyError)) and not _is_config_validation_error(e):
            raise
        raise ModelError(config_validation_line(e, overrides, _attribute_map(model_cfg.family))) from e
    key = "model.path" if model_cfg.path else "model.family"
    _named_key(key, check_family, cfg.model_type, cfg)
    check_config_values(cfg, overrides)
    return cfg


def _named_key(key: str, check: Any, *args: Any) -> None:
    """``check(*args)`` with its ModelError's line starting with ``key``."""
    try:
        check(*args)
    except ModelError as e:
        raise ModelError(f"{key}: {e}") from e


# model.config keys that count things (sizes, heads, layers): whole numbers >= 1
_COUNT_KEY = re.compile(r"^(num_|n_)\w+|\w+_(size|dim|heads|layers|positions|embeddings|ctx|embd|inner)$")
_ACTIVATION_KEYS = ("hidden_act", "activation_function", "hidden_activation")


def check_config_values(cfg: Any, overrides: dict[str, Any]) -> None:
    """What transformers' config accepts but its model cannot be built from, named by its key
    (``model.config.<key>``): counts below 1, non-finite numbers, activations transformers
    does not know, attention heads that do not split into key/value groups."""
    from transformers.activations import ACT2FN

    def fail(key: str, msg: str) -> NoReturn:
        raise ModelError(f"model.config.{key}: {msg}")

    for key, value in overrides.items():
        if isinstance(value, float) and not math.isfinite(value):
            fail(key, f"must be a finite number, got {value}")
        if _COUNT_KEY.match(key) and isinstance(value, int) and not isinstance(value, bool) and value < 1:
            fail(key, f"must be >= 1, got {value}")
    amap = getattr(cfg, "attribute_map", None) or {}
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value < 1:
            fail(_own_key(key, overrides, amap), f"must be >= 1, got {value}")
    for key in _ACTIVATION_KEYS:
        act = getattr(cfg, key, None)
        if isinstance(act, str) and act not in ACT2FN:
            fail(key, f"'{act}' is not an activation transformers knows (e.g. {', '.join(list(ACT2FN)[:6])})")
    heads, kv = getattr(cfg, "num_attention_heads", None), getattr(cfg, "num_key_value_heads", None)
    hidden = getattr(cfg, "hidden_size", None)
    explicit_head_dim = getattr(cfg, "head_dim", None) is not None  # else hidden_size is cut into the heads
    if isinstance(hidden, int) and isinstance(heads, int) and heads >= 1 and not explicit_head_dim and hidden % heads:
        fail(_own_key("num_attention_heads", overrides, amap), f"{heads} does not divide the hidden size {hidden}")
    if isinstance(heads, int) and isinstance(kv, int) and kv >= 1 and heads % kv:
        fail(_own_key("num_key_value_heads", overrides, amap), f"{kv} does not divide the {heads} attention heads")


def _own_key(standard: str, overrides: dict[str, Any], attribute_map: dict[str, str]) -> str:
    """The name the user gave a config field: the family's own (GPT-2's ``n_head``) or the standard one."""
    own = attribute_map.get(standard)
    return own if own in overrides else standard


def failure_key(message: str, overrides: dict[str, Any], attribute_map: dict[str, str]) -> str:
    """``model.config.<key>`` for a failure to build a model from its config: the attention
    heads when they do not divide, else the key (or the value) of ``model.config`` the message
    mentions; ``model.config`` when it names none."""
    low = message.lower()
    key = ""
    if "head" in low and ("multiple" in low or "divisible" in low):
        kv = "key" in low and "value" in low
        key = _own_key("num_key_value_heads" if kv else "num_attention_heads", overrides, attribute_map)
    key = key or next((k for k in overrides if k in message or k.replace("_", " ") in low), "")
    key = key or next((k for k, v in overrides.items() if re.search(rf"'{re.escape(str(v))}'", message)), "")
    return f"model.config.{key}" if key else "model.config"


def _is_config_validation_error(e: Exception) -> bool:
    """transformers 5 validates configs through huggingface_hub's strict dataclasses."""
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:
        return False
    return isinstance(e, StrictDataclassError)


def _attribute_map(family: str | None) -> dict[str, str]:
    """A family's standard config names -> its own (GPT-2: ``num_attention_heads`` -> ``n_head``)."""
    from transformers import CONFIG_MAPPING

    try:
        return dict(CONFIG_MAPPING[family].attribute_map) if family else {}
    except KeyError:
        return {}


def config_validation_line(e: Exception, overrides: dict[str, Any], attribute_map: dict[str, str]) -> str:
    """One line from a config validation error: the key (``model.config.<field>`` when the
    error names a field, else the key it is about, see :func:`failure_key`) and the reason
    transformers gives, e.g. ``hidden size (128) is not a multiple of the number of attention heads (3)``."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    field = re.search(r"for field '([^']+)'", lines[0]) if lines else None
    key = f"model.config.{field.group(1)}" if field else failure_key(str(e), overrides, attribute_map)
    reason = lines[-1] if lines else type(e).__name__
    reason = re.sub(r"^\w+Error: ", "", reason)
    return f"{key}: {reason}"


def meta_model(model_cfg: Any) -> nn.Module:
    """The run's model on the meta device, in fp32: structure and config, no memory, no weights
    read (from a directory, only its ``config.json``)."""
    _, AutoModelForCausalLM = _auto_classes()
    cfg = hf_config(model_cfg)
    try:
        with torch.device("meta"):
            model = _from_config(AutoModelForCausalLM, cfg, model_cfg.attn_implementation)
    except (OSError, ValueError, TypeError, KeyError, RuntimeError, AssertionError, IndexError) as e:
        # the config's values are all there is to a model on meta: one of them is wrong
        line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        key = failure_key(line, dict(model_cfg.config or {}), getattr(cfg, "attribute_map", None) or {})
        raise ModelError(f"{key}: {cfg.model_type} cannot be built from this config: {line}") from e
    model.config.use_cache = False
    return model


def _from_config(auto: Any, cfg: Any, attn_implementation: str) -> Any:
    """The model from its config; a family without SDPA attention (Gemma-2, BLOOM) gets
    eager attention when SDPA, the default, was asked for."""
    try:
        return auto.from_config(cfg, dtype=torch.float32, attn_implementation=attn_implementation)
    except ValueError as e:
        if attn_implementation != "sdpa" or "does not support an attention implementation" not in str(e):
            raise
        log.info("model: %s has no SDPA attention; using eager attention", cfg.model_type)
        return auto.from_config(cfg, dtype=torch.float32, attn_implementation="eager")


def build_segment(
    model_cfg: Any,
    seed: int,
    start: int,
    stop: int | None,
    stage: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    meta: nn.Module | None = None,
) -> nn.Module:
    """The run's model with only chain layers ``[start, stop)`` real, on ``device``, in ``dtype``;
    every other tensor stays on the meta device (:class:`~splitlearn.models.chain.Segment`
    drops those modules). From a local checkpoint (stage ``stage``'s directory when
    ``model.path`` holds ``{stage}``) only the segment's keys are read; random
    init gives the values the whole model has for this seed (see
    :mod:`splitlearn.models.materialize`). ``stop=None``: to the end of the chain. ``meta``:
    the run's model already built on the meta device (:func:`meta_model`), materialised in
    place. Leaves the global RNG seeded with ``seed``."""
    model = meta if meta is not None else meta_model(model_cfg)
    stop = num_chain(model) if stop is None else stop
    check_coverage(model)
    torch.manual_seed(seed)
    if model_cfg.path:
        load_segment(model, stage_path(model_cfg.path, stage), start, stop, dtype, device)
    else:
        if dtype != torch.float32:
            model.to(dtype)
        random_segment(model, seed, start, stop)  # on the CPU: its generators fix the values
        move_real(model, device)
    return model


POSITION_KEYS = ("n_positions", "max_position_embeddings", "n_ctx")  # config keys that bound learned positions


def learned_positions(model: nn.Module) -> tuple[str, int] | None:
    """The config key and number of positions a model's learned position embedding holds
    (GPT-2's ``wpe``, OPT's offset table), or None when positions are computed (rotary,
    ALiBi) and any length runs: an embedding table other than the tokens' whose size, less
    its offset, is one of :data:`POSITION_KEYS`."""
    tokens: Any = model.get_input_embeddings()  # type: ignore[operator]  # a PreTrainedModel method
    config = model.config
    for module in model.modules():
        if isinstance(module, nn.Embedding) and module is not tokens:
            limit = module.num_embeddings - int(getattr(module, "offset", 0) or 0)
            for key in POSITION_KEYS:
                if getattr(config, key, None) == limit:
                    return key, limit
    return None


def weights_dtype(precision: str) -> torch.dtype:
    """The dtype a run keeps its weights in: bf16 under ``bf16-master`` and ``bf16-pure``,
    fp32 otherwise (``bf16`` autocasts over fp32 weights)."""
    return torch.bfloat16 if precision in ("bf16-master", "bf16-pure") else torch.float32


def build_model(model_cfg: Any, seed: int) -> nn.Module:
    """The whole causal LM in fp32: :func:`build_segment` over every chain layer."""
    return build_segment(model_cfg, seed, 0, None)
