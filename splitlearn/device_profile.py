"""Device speed measured, not assumed (``plan.profile: on_cluster``).

Each device of the plan's pool times the run's layers in its own Ray worker, with the
runtime's own code: a segment holding only the embedding, one holding the first block and
one holding the head, each built in the run's dtype with the method that device's tier
trains with, compiled as the runtime compiles it, under the run's autocast; forward,
forward + backward, and the STEP (global-norm share, AdamW) over its trainable weights.
Every block takes the first block's times. The planner then uses these milliseconds for
that device (``PlanRequest.device_layers``) instead of FLOPs over the topology's ``tflops``.

Figures are cached by what they depend on (the device's fields, the model's config, the
micro-batch shape, the dtype, the method, the compile mode) under
``$XDG_CACHE_HOME/splitlearn/profiles`` (default ``~/.cache``), so a run measures each
device once.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from partitioners.costmodel import StageMethod
from partitioners.profile import LayerProfile

REPEATS, WARMUP = 5, 2
KINDS = ("embed", "block", "head")


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "splitlearn" / "profiles"


def profile_key(run: Any, device: Any, method: StageMethod) -> str:
    """What a device's layer times depend on, hashed."""
    what = {
        "device": {k: getattr(device, k) for k in ("accelerator", "tflops", "cpu_threads", "gpus", "host_tflops")},
        "model": {"family": run.model.family, "path": run.model.path, "config": dict(run.model.config or {})},
        "shape": [run.train.batch_size // run.train.micro_batches, run.data.seq_len],
        "dtype": run.train.dtype,
        "method": method.key,
        "lora": [run.finetune.lora.r, list(run.finetune.lora.target_modules or [])]
        if method.method == "lora"
        else None,
        "compile": run.runtime.compile,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _median_ms(fn: Callable[[], Any], sync: Callable[[], None]) -> float:
    """Milliseconds per call of ``fn``, ``REPEATS`` calls back to back between syncs (the
    median of 3 such rounds): on a GPU the host launches the next call while the device runs
    this one, as in a step, so the host's launch time is not added to the device's."""
    for _ in range(WARMUP):
        fn()
    sync()
    rounds = []
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(REPEATS):
            fn()
        sync()
        rounds.append((time.perf_counter() - t) * 1e3 / REPEATS)
    return statistics.median(rounds)


def _time_segment(
    seg: Any, x: Any, labels: Any, items: Any, opt: Any, autocast: Any, sync: Callable[[], None]
) -> list[float]:
    """``[fwd_ms, bwd_ms, opt_ms]`` of one segment on one input."""
    import torch

    from partitioners.profile import sum_of_squares

    def fwd() -> Any:
        with autocast:
            return seg(x, None, labels, items)

    def fwd_bwd() -> None:
        y = fwd()
        if y.requires_grad:
            y.backward(torch.ones_like(y) if y.dim() else None)

    def step() -> None:
        sum_of_squares(p.grad for p in seg.parameters() if p.grad is not None)
        opt.step()

    f = _median_ms(fwd, sync)
    fb = _median_ms(fwd_bwd, sync)
    o = _median_ms(step, sync) if any(p.requires_grad for p in seg.parameters()) else 0.0
    return [f, max(0.0, fb - f), o]


def time_layers(run_dict: dict[str, Any], device_name: str, method: dict[str, Any]) -> dict[str, list[float]]:
    """In the device's worker: ``[fwd_ms, bwd_ms, opt_ms]`` of the embedding, one block and
    the head, per micro-batch (the STEP once per step)."""
    import torch

    from cluster.conf import to_typed
    from cluster.topology import topology_from_container
    from splitlearn.config import RunConfig
    from splitlearn.errors import ConfigError
    from splitlearn.method_policy import lora_spec
    from splitlearn.models.build import build_segment, hf_config, meta_model, weights_dtype
    from splitlearn.models.chain import Segment, count_items
    from splitlearn.models.materialize import num_chain
    from splitlearn.models.methods import apply_methods
    from splitlearn.optim import make_optimizer

    run = to_typed(RunConfig, run_dict, prefix="", source="run config", error=ConfigError)
    dev = topology_from_container(run.topology.inline, "run config").device(device_name)
    torch.set_num_threads(dev.cpu_threads)
    device = torch.device("cuda" if dev.accelerator == "cuda" and torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    stage_method = StageMethod(**method)
    wdtype = weights_dtype(run.train.dtype)
    meta = meta_model(run.model)
    n = num_chain(meta)
    mb, seq = run.train.batch_size // run.train.micro_batches, run.data.seq_len
    cfg = hf_config(run.model)
    ids = torch.randint(0, cfg.vocab_size, (mb, seq), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=run.train.dtype == "bf16")
    compile_here = run.runtime.compile == "blocks" or (run.runtime.compile == "auto" and device.type == "cuda")
    out: dict[str, list[float]] = {}
    for kind, (a, b) in zip(KINDS, [(0, 1), (1, 2), (n - 1, n)], strict=True):
        seg = Segment(build_segment(run.model, run.train.seed, a, b, dtype=wdtype, device=device), a, b)
        apply_methods(seg.model, [(a, b, stage_method)], lora_spec(run), run.train.seed)
        seg.recompute = stage_method.recompute
        seg.to(device).train()
        if compile_here:
            seg.compile_blocks()
        opt = make_optimizer(seg.parameters(), run.train)
        if kind == "embed":
            x = ids
        else:
            x = torch.randn(mb, seq, cfg.hidden_size, device=device, dtype=wdtype, requires_grad=True)
        labels = ids if kind == "head" else None
        out[kind] = _time_segment(seg, x, labels, count_items(ids) if labels is not None else None, opt, autocast, sync)
    return out


def measured_layers(
    layers: list[LayerProfile], times: dict[str, list[float]], method: StageMethod
) -> list[LayerProfile]:
    """``layers`` (the meta profile) with the times measured on one device, on the entry the
    planner reads for ``method`` (the layer itself for full training, else its method's)."""
    out = []
    for i, layer in enumerate(layers):
        kind = "embed" if i == 0 else "head" if i == len(layers) - 1 else "block"
        f, b, o = times[kind]
        if method.method == "full":
            out.append(replace(layer, fwd_ms=f, bwd_ms=b, opt_ms=o))
            continue
        key = method.key if method.key in layer.methods else method.method
        methods = dict(layer.methods)
        if key in methods:
            methods[key] = replace(methods[key], fwd_ms=f, bwd_ms=b, opt_ms=o)
        out.append(replace(layer, methods=methods))
    return out


def device_profiles(
    cfg: Any, layers: dict[str, list[LayerProfile]], pool: list[str], log: Callable[[str], None] = print
) -> dict[str, list[LayerProfile]]:
    """Each pool device's ``layers`` (as counted for it) with the times measured there
    (cached); Ray must be up."""
    import ray

    from cluster.topology import device_resource
    from splitlearn.method_policy import policy

    run = cfg.run
    fin = policy(run)
    keys: dict[str, tuple[str, StageMethod]] = {}
    for name in pool:
        dev = cfg.topology.device(name)
        method = replace(fin.for_stage(0 if dev.owns_data else 1, dev.tier), offload="none")
        keys[name] = (profile_key(run, dev, method), method)
    found: dict[str, dict[str, list[float]]] = {}  # by key
    for key, _ in keys.values():
        path = cache_dir() / f"{key}.json"
        if key not in found and path.is_file():
            found[key] = json.loads(path.read_text())["times"]
    todo = {key: (name, method) for name, (key, method) in keys.items() if key not in found}
    if todo:
        log(f"profiling the layers on {', '.join(n for n, _ in todo.values())} (in each device's own worker; cached)")
        task = ray.remote(time_layers)
        refs = {}
        for key, (name, method) in todo.items():
            dev = cfg.topology.device(name)
            opts: dict[str, Any] = {"num_cpus": 0, "resources": {device_resource(name): 0.001}}
            if dev.gpus:
                opts["num_gpus"] = min(1.0, dev.gpus)
            m = {"method": method.method, "recompute": method.recompute, "frozen_dtype": method.frozen_dtype}
            refs[key] = task.options(**opts).remote(cfg.resolved_dict(), name, m)
        for key, ref in refs.items():
            found[key] = ray.get(ref)
            path = cache_dir() / f"{key}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"device": todo[key][0], "times": found[key]}))
    return {name: measured_layers(layers[name], found[key], method) for name, (key, method) in keys.items()}
