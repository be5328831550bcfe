"""Building a run's causal LM: the one place that constructs a model.

- :func:`build_model`: the whole model with real tensors, random init from a
  ``transformers`` config (``model.family`` + ``model.config``) or read from a local
  checkpoint directory (``model.path``, ``local_files_only``), in fp32.
- :func:`meta_model`: the same model on the meta device: structure and config, no memory,
  no weights read (for a directory only its ``config.json`` is).
- :func:`import_adapter_module`: the user's module that registers extra families.

Never touches the network. Cutting a model into segments is :mod:`splitlearn.models.chain`.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from splitlearn.errors import ModelError
from splitlearn.models.compact import quiet_torchao
from splitlearn.models.families import adapter_for


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


def build_model(model_cfg: Any, seed: int) -> nn.Module:
    """Build the full causal LM from a transformers config (random init) or a local directory.

    Never touches the network: a local directory is read with ``local_files_only``.
    """
    AutoConfig, AutoModelForCausalLM = _auto_classes()

    import_adapter_module(model_cfg.adapter_module)
    overrides = dict(model_cfg.config or {})
    attn = model_cfg.attn_implementation
    torch.manual_seed(seed)
    try:
        if model_cfg.path:
            path = Path(model_cfg.path)
            if not (path / "config.json").is_file():
                raise ModelError(f"model.path: no config.json in '{path}' (expected a local checkpoint directory)")
            hf_cfg = AutoConfig.from_pretrained(path, local_files_only=True, **overrides)
            adapter_for(hf_cfg.model_type)  # fail early with the list of families
            model = AutoModelForCausalLM.from_pretrained(
                path,
                config=hf_cfg,
                local_files_only=True,
                dtype=torch.float32,
                attn_implementation=attn,
            )
        else:
            family = model_cfg.family
            adapter_for(family)
            hf_cfg = AutoConfig.for_model(family, **overrides)
            model = AutoModelForCausalLM.from_config(hf_cfg, attn_implementation=attn)
    except ModelError:
        raise
    except (OSError, ValueError, TypeError, KeyError) as e:
        line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"model: cannot build the model: {line}") from e
    model.float()
    model.config.use_cache = False
    return model


def meta_model(model_cfg: Any, seed: int = 0) -> nn.Module:
    """The model on the meta device: structure and config, no memory. From a config it is
    :func:`build_model` under the meta device; from a directory only ``config.json`` is read
    (``from_config``), never the weights."""
    with torch.device("meta"):
        return build_model(model_cfg, seed) if not model_cfg.path else _meta_from_dir(model_cfg)


def _meta_from_dir(model_cfg: Any) -> nn.Module:
    """The model of a local checkpoint directory, built from its config alone (to be called
    under ``torch.device("meta")``)."""
    AutoConfig, AutoModelForCausalLM = _auto_classes()

    try:
        hf_cfg = AutoConfig.from_pretrained(model_cfg.path, local_files_only=True, **dict(model_cfg.config or {}))
    except (OSError, ValueError) as e:
        raise ModelError(f"model.path: cannot read the config in '{model_cfg.path}': {str(e).splitlines()[0]}") from e
    adapter_for(hf_cfg.model_type)
    return AutoModelForCausalLM.from_config(hf_cfg)
