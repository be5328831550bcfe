"""``splitlearn export`` and ``splitlearn generate``: the fine-tuned model as one standard
Hugging Face directory, and text sampled from it.

Export places the run's workers again (on whichever nodes hold the stages, as training
did), has each load its stage of the newest whole checkpoint from its own node's disk, and
pulls each stage's tensors of the fine-tuned model (LoRA merged in) through Ray to this
process, which writes one directory that ``AutoModelForCausalLM`` and ``AutoTokenizer`` load:
sharded safetensors in the training dtype with their index, ``config.json``,
``generation_config.json`` and the tokenizer's files. It is written to a temporary directory
beside ``--out`` and renamed at the end, so a failure leaves nothing at ``--out``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from splitlearn.errors import ConfigError, OutputError

MAX_SHARD_SIZE = "2GB"


def load_run(run_dir: Path) -> tuple[Any, Any]:
    """The run's config (as its workers received it) and its plan."""
    from omegaconf import OmegaConf

    from partitioners.plan import Plan
    from splitlearn.config import config_from_container

    rec_path = run_dir / "run.json"
    if not rec_path.is_file() or not (run_dir / "plan.yaml").is_file():
        raise ConfigError(f"{run_dir} is not a run directory of this version (no run.json or plan.yaml)")
    rec = json.loads(rec_path.read_text())
    cfg = config_from_container(OmegaConf.create(rec["run"]), [], str(rec_path), Path(rec["base_dir"]))
    return cfg, Plan.from_yaml((run_dir / "plan.yaml").read_text())


def check_target(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputError(f"--out: {out} exists and is not empty; give a new or empty directory")


def gather_states(cfg: Any, plan: Any, run_dir: Path) -> tuple[list[dict[str, Any]], int]:
    """Each stage's tensors of the newest whole checkpoint, through the run's workers."""
    from cluster.ray_cluster import connect
    from splitlearn import checkpoint as ckpt
    from splitlearn import logs
    from splitlearn.trainer import _start_group

    ck = ckpt.latest(run_dir)
    if ck is None:
        raise ConfigError(f"{run_dir} has no whole checkpoint to export (train with runtime.checkpoint=true)")
    handle = connect(cfg.topology, cfg.run.ray.address, cfg.run.ray.num_cpus)
    logs.route_worker_output()  # the workers' warnings to the log, not the screen
    group = None
    try:
        cfg.run.runtime.run_name = f"{run_dir.name}-export"
        group = _start_group(cfg, plan, attempt=0)
        group.check_checkpoint(str(ck.path), ck.files)
        group.load_checkpoint(str(ck.path), ck.files)
        return group.model_states(), ck.step
    finally:
        if group is not None:
            group.shutdown()
        handle.shutdown()


def model_state(cfg: Any, states: list[dict[str, Any]]) -> tuple[Any, dict[str, torch.Tensor]]:
    """The transformers config and the whole state dict (a tied head weight once, as
    ``save_pretrained`` writes it)."""
    from splitlearn.models.build import meta_model
    from splitlearn.models.chain import hf_config, tied_parameter_names

    model = meta_model(cfg.run.model)
    state = {k: v.contiguous() for s in states for k, v in s["state"].items()}
    for emb, head in tied_parameter_names(model):
        if emb in state and head in state and emb != head:
            del state[head]
    config = hf_config(model)
    config.use_cache = True
    config.dtype = next(v.dtype for v in state.values() if v.is_floating_point())
    return config, state


def save_tokenizer(cfg: Any, directory: Path) -> Any:
    """The run's tokenizer in ``transformers``' format (None for the built-in byte tokenizer)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from splitlearn.data import FileTokenizer, HFTokenizer, make_tokenizer

    tok = make_tokenizer(cfg.run.data.tokenizer, cfg.resolve_path)
    if isinstance(tok, HFTokenizer):
        hf = AutoTokenizer.from_pretrained(str(tok.path), local_files_only=True)
    elif isinstance(tok, FileTokenizer):
        hf = PreTrainedTokenizerFast(tokenizer_object=tok.tok)
        hf.eos_token = tok.tok.id_to_token(tok.eos_id)
        hf.pad_token = tok.tok.id_to_token(tok.pad_id)
    else:
        return None
    hf.save_pretrained(str(directory))
    return hf


def write_hf_dir(cfg: Any, states: list[dict[str, Any]], directory: Path) -> dict[str, Any]:
    """config.json, sharded safetensors (and their index), generation_config.json, tokenizer."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    config, state = model_state(cfg, states)
    config.save_pretrained(str(directory))
    shards = split_torch_state_dict_into_shards(state, max_shard_size=MAX_SHARD_SIZE)
    for filename, names in shards.filename_to_tensors.items():
        save_file({n: state[n] for n in names}, str(directory / filename), metadata={"format": "pt"})
    if shards.is_sharded:
        index = {"metadata": shards.metadata, "weight_map": shards.tensor_to_filename}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    tok = save_tokenizer(cfg, directory)
    gen = GenerationConfig.from_model_config(config)
    if tok is not None:
        gen.eos_token_id, gen.pad_token_id = tok.eos_token_id, tok.pad_token_id
    gen.save_pretrained(str(directory))
    return {
        "tensors": len(state),
        "files": len(shards.filename_to_tensors),
        "dtype": str(config.dtype).removeprefix("torch."),
        "tokenizer": tok is not None,
    }


def export_run(run_dir: str | Path, out: str | Path) -> dict[str, Any]:
    """Export a run's newest whole checkpoint to ``out``; returns what was written."""
    run_dir, out = Path(run_dir), Path(out)
    check_target(out)
    cfg, plan = load_run(run_dir)
    states, step = gather_states(cfg, plan, run_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        info = write_hf_dir(cfg, states, partial)
        if out.exists():
            out.rmdir()  # empty: checked above
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return {"dir": str(out), "step": step, "lora_modules": sum(len(s["lora_modules"]) for s in states), **info}


def model_dir_of(path: Path) -> tuple[Path, bool]:
    """An exported directory, or a run directory's ``export/`` (exported first if missing);
    and whether it was exported now."""
    if (path / "config.json").is_file():
        return path, False
    if not (path / "run.json").is_file():
        raise ConfigError(f"{path} is neither an exported model (config.json) nor a run directory (run.json)")
    target = path / "export"
    if (target / "config.json").is_file():
        return target, False
    export_run(path, target)
    return target, True


def generate(
    path: str | Path, prompt: str, max_new_tokens: int = 32, temperature: float = 0.0, seed: int = 0, chat: bool = True
) -> str:
    """Text the fine-tuned model continues ``prompt`` with (a user turn of the chat template
    when the tokenizer has one and ``chat``); greedy at temperature 0."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens: must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ConfigError(f"--temperature: must be >= 0, got {temperature}")
    directory, _ = model_dir_of(Path(path))
    if not (directory / "tokenizer_config.json").is_file():
        raise ConfigError(f"{directory} has no tokenizer (the run used data.tokenizer=byte); generate needs one")
    tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(directory), local_files_only=True).eval()
    if chat and getattr(tok, "chat_template", None):
        turn = [{"role": "user", "content": prompt}]
        prompt = str(tok.apply_chat_template(turn, tokenize=False, add_generation_prompt=True))
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    torch.manual_seed(seed)
    sampling: dict[str, Any] = (
        {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    )
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            pad_token_id=tok.pad_token_id,
            **sampling,
        )
    return str(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
