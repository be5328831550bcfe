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
import re
from pathlib import Path
from typing import Any

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
            check_family(model_cfg.family)  # fail early with the list of families
            cfg = AutoConfig.for_model(model_cfg.family, **overrides)
    except ModelError:
        raise
    except (OSError, ValueError, TypeError, KeyError) as e:
        line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"model: cannot read the model's config: {line}") from e
    except Exception as e:
        if not _is_config_validation_error(e):
            raise
        raise ModelError(config_validation_line(e)) from e
    check_family(cfg.model_type, cfg)
    return cfg


def _is_config_validation_error(e: Exception) -> bool:
    """transformers 5 validates configs through huggingface_hub's strict dataclasses."""
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:
        return False
    return isinstance(e, StrictDataclassError)


def config_validation_line(e: Exception) -> str:
    """One line from a config validation error: the key (``model.config.<field>`` when the
    error names a field) and the reason transformers gives, e.g. ``hidden size (128) is not a
    multiple of the number of attention heads (3)``."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    field = re.search(r"for field '([^']+)'", lines[0]) if lines else None
    key = f"model.config.{field.group(1)}" if field else "model.config"
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
    except (OSError, ValueError, TypeError, KeyError) as e:
        line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"model: cannot build the model: {line}") from e
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
