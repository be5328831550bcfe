"""Which fine-tuning method each stage uses, across a run: from the config to the planner,
from the plan to each stage, and the trained adapters out. (Applying a method to a model's
modules is :mod:`splitlearn.models.methods`.)

- The config's ``finetune`` section (a default, overrides by device tier and by stage) becomes
  the planner's :class:`~partitioners.costmodel.FinetunePolicy`; ``plan.allow`` lets it change
  edge stages. The plan records each stage's method, and that is what the stage applies.
- A tied embedding/LM-head weight trains only when every stage holding a copy trains fully;
  otherwise it is frozen at both ends (a LoRA or frozen edge stage cannot follow an update
  made on the cloud, and holding the weight trainable on the edge would defeat the point).
- At the end of a run with LoRA stages, ``<run>/adapter/`` holds the adapters in peft's
  format (``adapter_config.json``, ``adapter_model.safetensors``) for
  ``PeftModel.from_pretrained(base, path)``; with ``finetune.merge_adapters``,
  ``<run>/merged/`` holds the fine-tuned model (LoRA merged in) as a directory
  ``transformers`` loads, one shard per stage, written by the stages themselves.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from cluster.topology import TIERS
from partitioners.costmodel import FinetunePolicy, StageMethod, stage_options
from partitioners.plan import Plan, Stage
from splitlearn.errors import ConfigError
from splitlearn.fsio import atomic_write
from splitlearn.models.build import meta_model
from splitlearn.models.chain import hf_config, num_blocks, tied_parameter_names
from splitlearn.models.methods import LoraSpec, apply_methods, lora_config, lora_target_names

log = logging.getLogger("splitlearn")


def policy(run: Any) -> FinetunePolicy:
    """The planner's view of the config's ``finetune`` section."""
    f = run.finetune

    def over(o: Any) -> dict[str, Any]:
        keys = ("method", "recompute", "frozen_dtype", "offload")
        return {k: getattr(o, k) for k in keys if getattr(o, k) is not None}

    return FinetunePolicy(
        default=StageMethod(f.method, f.recompute, f.frozen_dtype, f.offload),
        by_tier={t: over(o) for t, o in f.by_tier.items()},
        by_stage={int(k): over(o) for k, o in f.by_stage.items()},
    )


def lora_spec(run: Any) -> LoraSpec:
    return LoraSpec.from_config(run.finetune.lora)


def stage_method(stage: Stage) -> StageMethod:
    return StageMethod(stage.method, stage.recompute, stage.frozen_dtype, stage.offload)


def variants(run: Any) -> list[StageMethod]:
    """The methods other than ``full`` that some stage may use (configured, or allowed on the
    edge): the ones a profile must cost. One per method and frozen dtype; recompute needs no
    profile of its own."""
    pol = policy(run)
    stages = [None, *pol.by_stage]
    out: dict[str, StageMethod] = {}
    for tier in TIERS:
        for s in stages:
            base = pol.for_stage(-1 if s is None else s, tier)
            for opt in stage_options(base, run.plan.allow) if tier == "edge" else [base]:
                if opt.method != "full":
                    out.setdefault(opt.key, StageMethod(opt.method, False, opt.frozen_dtype))
    return list(out.values())


def tied_trainable(plan: Plan) -> bool:
    """Whether a tied embedding/head weight trains: only when the stages holding it (the
    first and the last) both train fully."""
    return all(s.method == "full" for s in (plan.stages[0], plan.stages[-1]))


def prepare_segment(segment: Any, plan: Plan, stage: int, run: Any) -> list[str]:
    """Apply stage ``stage``'s method of ``plan`` to its segment: recompute, frozen or LoRA
    weights, compact frozen storage. Returns the module paths that got LoRA adapters."""
    spec = plan.stages[stage]
    method = stage_method(spec)
    segment.recompute = method.recompute
    if not tied_trainable(plan):
        for p in segment.tied_parameters().values():
            p.requires_grad_(False)
    return apply_methods(segment.model, [(spec.start, spec.stop, method)], lora_spec(run), run.train.seed)


def apply_plan(model: Any, plan: Plan, run: Any) -> list[str]:
    """Every stage's method on its range of the whole model: the unsplit model that split
    training with this plan is held to."""
    if not tied_trainable(plan):
        params = dict(model.named_parameters(remove_duplicate=False))
        for emb, head in tied_parameter_names(model):
            for name in (emb, head):
                if name in params:
                    params[name].requires_grad_(False)
    ranges = [(s.start, s.stop, stage_method(s)) for s in plan.stages]
    return apply_methods(model, ranges, lora_spec(run), run.train.seed)


def check_lora_targets(run: Any, model: Any = None) -> None:
    """``finetune.lora.target_modules`` must name some linear layer of the model when any
    stage may use LoRA."""
    if not any(v.method == "lora" for v in variants(run)):
        return
    model = model if model is not None else meta_model(run.model)
    spec = lora_spec(run)
    if not lora_target_names(model, 0, num_blocks(model) + 2, spec):
        raise ConfigError(
            f"finetune.lora.target_modules: {list(spec.targets(model))} matches no linear layer of this "
            f"'{model.config.model_type}' model"
        )


# -- the adapters out ----------------------------------------------------------------------


def needs_export(run: Any, plan: Plan) -> bool:
    return run.finetune.merge_adapters or any(s.method == "lora" for s in plan.stages)


def export_model(run: Any, group: Any, plan: Plan, run_dir: Path) -> dict[str, Any]:
    """Write ``<run>/adapter/`` (peft format) when a stage trained LoRA adapters, and with
    ``finetune.merge_adapters`` ``<run>/merged/`` (a ``transformers`` directory, one shard
    per stage written by that stage). Returns what was written."""
    from safetensors.torch import save_file

    merge = bool(run.finetune.merge_adapters)
    merged_dir = run_dir / "merged"
    parts = group.export(str(merged_dir), merge)
    model = meta_model(run.model)
    out: dict[str, Any] = {}
    names = [n for p in parts for n in p["lora_modules"]]
    if names:
        adir = run_dir / "adapter"
        adir.mkdir(parents=True, exist_ok=True)
        tensors = {k: v for p in parts for k, v in p["adapter"].items()}
        atomic_write(
            adir / "adapter_model.safetensors", lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"})
        )
        cfg = lora_config(
            model, names, lora_spec(run), task_type="CAUSAL_LM", base_model_name_or_path=run.model.path or None
        )
        save_pretrained_atomic(cfg, adir)
        out["adapter"] = {"dir": str(adir), "modules": len(names), "tensors": len(tensors)}
    if merge:
        import torch

        weight_map = {k: p["merged_file"] for p in parts for k in p["merged_keys"]}
        total = sum(p["merged_bytes"] for p in parts)
        config = hf_config(model)
        config.use_cache = True
        config.dtype = torch.float32
        save_pretrained_atomic(config, merged_dir)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        atomic_write(merged_dir / "model.safetensors.index.json", json.dumps(index, indent=2))
        out["merged"] = {"dir": str(merged_dir), "files": len(parts), "bytes": total}
    for what, info in out.items():
        log.info("%s written to %s", what, info["dir"])
    return out


def save_pretrained_atomic(obj: Any, directory: Path) -> None:
    """``obj.save_pretrained(directory)`` (a ``transformers`` or peft config), each file it
    writes put in place with :func:`~splitlearn.fsio.atomic_write`: the library writes into a
    scratch directory, so its own serialisation is kept byte for byte. Creates ``directory``
    as ``save_pretrained`` does."""
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="splitlearn-save-") as scratch:
        obj.save_pretrained(scratch)
        for f in sorted(Path(scratch).iterdir()):
            if f.is_file():
                atomic_write(directory / f.name, f.read_bytes())


# -- profiles ------------------------------------------------------------------------------


def lora_record(run: Any) -> dict[str, Any]:
    """The LoRA settings that change a profile's ``lora`` costs (rank and targets)."""
    spec = lora_spec(run)
    return {"r": spec.r, "target_modules": list(spec.target_modules) if spec.target_modules else None}


def check_profile(prof: Any, run: Any, path: Any) -> None:
    """A measured profile must cost every method this run may use, with its LoRA settings."""
    need = variants(run)
    missing = [v.key for v in need if not prof.layers or v.key not in prof.layers[0].methods]
    if missing:
        raise ConfigError(
            f"plan.profile: {path} has no costs for {', '.join(missing)} (finetune / plan.allow ask for them); "
            "profile again with this config"
        )
    if any(v.method == "lora" for v in need) and prof.lora != lora_record(run):
        raise ConfigError(
            f"plan.profile: {path} costs LoRA with {prof.lora}, this run has {lora_record(run)}; "
            "profile again with this config"
        )
