"""Device speed measured, not assumed (``plan.profile: on_cluster``).

Each device of the plan's pool times the run's layers in its own Ray worker, with the
runtime's own code: a segment holding only the embedding, one holding the first block and
one holding the head, each built in the run's dtype with the method that device's tier
trains with, compiled as the runtime compiles it, under the run's autocast; forward,
forward + backward, and the STEP (global-norm share, clipping, AdamW) over its trainable weights.
Every block takes the blocks' mean: on a CPU one block's times; on a GPU those of a segment
of up to ``GPU_BLOCKS`` blocks over their count, because there the host launches a call's
kernels while the device runs the previous ones, and a call of one block costs the host's
per-call work (the segment's wrapper, autocast, autograd) more than the device's: one block
alone measured 2.4 ms forward at 8x512 tokens and 2.1 ms at 4x512 on the H200, while a
16-block stage ran 1.4 ms a block (a segment of two blocks less one of one, tried before,
measures the host's marginal work instead, 0.72x). The planner then uses these
milliseconds for that device (``PlanRequest.device_layers``) instead of FLOPs over the
topology's ``tflops``.
On a CUDA device the bytes each segment keeps for its backward are measured too (the
allocator's count after a forward, less its output): a compiled block saves what its fused
graph needs, not what the eager layers would, and the plan's memory takes that figure.

Devices on one Ray node are timed one after another (a rehearsal's devices share one
host: timed together, each would see the others' load); devices on different nodes at once.

Each is timed in the stage workers' environment (:func:`splitlearn.runtime.worker_env`: glibc's
malloc maps each allocation of 128 KB and up on its own and returns it when freed, so a step
writes fresh pages, backed by huge pages where the kernel allows): on this project's 2-core
machine, before huge pages, that cost a CPU block 25% of its forward, 37% of its backward and
57% of its AdamW step, and a profile timed without it predicted two CPU stages 1.26x short.

Figures are cached by what they depend on (the device's fields, the model's config, the
micro-batch shape, the dtype, the method, the compile mode, the malloc and huge-page settings) under
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
GPU_BLOCKS = 4  # blocks in the segment a GPU times (their mean is a block's figure)
# of what a cached profile holds (2: saved bytes measured on CUDA; 3: GPU blocks' mean,
# clipping; 4: timed under the stage workers' malloc settings; 5: fused AdamW on CPUs;
# 6: huge pages and one malloc arena in the workers)
VERSION = 6


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "splitlearn" / "profiles"


def profile_key(run: Any, device: Any, method: StageMethod, env: dict[str, str]) -> str:
    """What a device's layer times depend on, hashed; ``env``: the stage workers' environment
    (:func:`splitlearn.runtime.worker_env`), which the times are taken in."""
    what = {
        "version": VERSION,
        "device": {k: getattr(device, k) for k in ("accelerator", "tflops", "cpu_threads", "gpus", "host_tflops")},
        "model": {"family": run.model.family, "path": run.model.path, "config": dict(run.model.config or {})},
        "shape": [run.train.batch_size // run.train.micro_batches, run.data.seq_len],
        "dtype": run.train.dtype,
        "method": method.key,
        "lora": [run.finetune.lora.r, list(run.finetune.lora.target_modules or [])]
        if method.method == "lora"
        else None,
        "compile": run.runtime.compile,
        "worker_env": env,
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


def _actions(
    seg: Any, x: Any, labels: Any, items: Any, opt: Any, autocast: Any, clip: bool
) -> tuple[Callable[[], Any], Callable[[Any], None], Callable[[], None]]:
    """``(fwd, bwd, step)`` of one segment on one input, as a stage runs them; ``clip``: the
    step scales the gradients by the clipping factor (``train.max_grad_norm``)."""
    import torch

    from partitioners.profile import sum_of_squares

    def fwd() -> Any:
        with autocast:
            return seg(x, None, labels, items)

    def bwd(y: Any) -> None:
        if y.requires_grad:
            y.backward(torch.ones_like(y) if y.dim() else None)

    def step() -> None:  # as a step runs it: the norm, the clipping, AdamW, the gradients zeroed for the next
        grads = [p.grad for p in seg.parameters() if p.grad is not None]
        sum_of_squares(grads)
        if clip:  # a fine-tuning step's gradient norm is mostly above the limit: the step pays the scaling
            for g in grads:  # one tensor at a time, as the runtime scales (a bf16 _foreach_mul_ rounds otherwise)
                g.mul_(0.5)
        opt.step()
        opt.zero_grad(set_to_none=False)

    return fwd, bwd, step


def _time_segment(
    seg: Any, x: Any, labels: Any, items: Any, opt: Any, autocast: Any, sync: Callable[[], None], clip: bool
) -> list[float]:
    """``[fwd_ms, bwd_ms, opt_ms]`` of one segment on one input (see :func:`_actions`)."""
    fwd, bwd, step = _actions(seg, x, labels, items, opt, autocast, clip)
    f = _median_ms(fwd, sync)
    fb = _median_ms(lambda: bwd(fwd()), sync)
    o = _median_ms(step, sync) if any(p.requires_grad for p in seg.parameters()) else 0.0
    return [f, max(0.0, fb - f), o]


def _saved_bytes(seg: Any, x: Any, labels: Any, items: Any, autocast: Any) -> int:
    """On CUDA: bytes a forward leaves allocated for the backward (its output left out)."""
    import torch

    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    with autocast:
        y = seg(x, None, labels, items)
    torch.cuda.synchronize()
    kept = torch.cuda.memory_allocated() - before
    out = y.numel() * y.element_size() if y.dim() else 0
    del y
    for p in seg.parameters():
        p.grad = None
    return max(0, kept - out)


class _Bench:
    """What timing a device's layers needs, in its worker: the run, the device's torch
    device and threads, an input of one micro-batch, the run's autocast."""

    def __init__(self, run_dict: dict[str, Any], device_name: str, method: dict[str, Any]) -> None:
        import torch

        from cluster.conf import to_typed
        from cluster.topology import topology_from_container
        from splitlearn.config import RunConfig
        from splitlearn.errors import ConfigError
        from splitlearn.models.build import hf_config, meta_model, weights_dtype
        from splitlearn.models.materialize import num_chain

        self.run = run = to_typed(RunConfig, run_dict, prefix="", source="run config", error=ConfigError)
        dev = topology_from_container(run.topology.inline, "run config").device(device_name)
        torch.set_num_threads(dev.cpu_threads)
        self.device = torch.device("cuda" if dev.accelerator == "cuda" and torch.cuda.is_available() else "cpu")
        self.sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        self.method = StageMethod(**method)
        self.wdtype = weights_dtype(run.train.dtype)
        self.chain = num_chain(meta_model(run.model))
        self.mb, self.seq = run.train.batch_size // run.train.micro_batches, run.data.seq_len
        self.hidden = hf_config(run.model).hidden_size
        self.ids = torch.randint(0, hf_config(run.model).vocab_size, (self.mb, self.seq), device=self.device)
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=run.train.dtype == "bf16")
        compile_mode = run.runtime.compile
        self.compile = compile_mode == "blocks" or (compile_mode == "auto" and self.device.type == "cuda")
        self.clip = run.train.max_grad_norm > 0

    def segment(self, kind: str, a: int, b: int) -> tuple[Any, ...]:
        """``(seg, x, labels, items, opt)``: the segment ``[a, b)`` built as a stage builds it
        (method, compilation, optimizer) and its input."""
        import torch

        from splitlearn.method_policy import lora_spec
        from splitlearn.models.build import build_segment
        from splitlearn.models.chain import Segment, count_items
        from splitlearn.models.methods import apply_methods
        from splitlearn.optim import make_optimizer

        run, device = self.run, self.device
        seg = Segment(build_segment(run.model, run.train.seed, a, b, dtype=self.wdtype, device=device), a, b)
        apply_methods(seg.model, [(a, b, self.method)], lora_spec(run), run.train.seed)
        seg.recompute = self.method.recompute
        seg.to(device).train()
        if self.compile:
            seg.compile_blocks()
        opt = make_optimizer(seg.parameters(), run.train)
        if kind == "embed":
            x = self.ids
        else:
            x = torch.randn(self.mb, self.seq, self.hidden, device=device, dtype=self.wdtype, requires_grad=True)
        labels = self.ids if kind == "head" else None
        items = count_items(self.ids) if labels is not None else None
        return seg, x, labels, items, opt


def time_layers(run_dict: dict[str, Any], device_name: str, method: dict[str, Any]) -> dict[str, Any]:
    """In the device's worker: ``[fwd_ms, bwd_ms, opt_ms]`` of the embedding, one block and
    the head, per micro-batch (the STEP once per step); on CUDA also ``saved``: each one's
    bytes kept for the backward."""
    import torch

    from splitlearn.runtime import WORKER_ENV_VARS

    bench = _Bench(run_dict, device_name, method)
    out: dict[str, Any] = {}
    saved: dict[str, int] = {}

    def measure(kind: str, a: int, b: int) -> None:
        """Times (and saved bytes) of the segment ``[a, b)``, per layer of it."""
        seg, x, labels, items, opt = bench.segment(kind, a, b)
        times = _time_segment(seg, x, labels, items, opt, bench.autocast, bench.sync, bench.clip)
        out[kind] = [t / (b - a) for t in times]
        if bench.device.type == "cuda" and not bench.method.recompute:
            saved[kind] = _saved_bytes(seg, x, labels, items, bench.autocast) // (b - a)

    n = bench.chain
    measure("embed", 0, 1)
    blocks = max(1, min(GPU_BLOCKS, n - 2)) if bench.device.type == "cuda" else 1
    try:
        measure("block", 1, 1 + blocks)
    except torch.cuda.OutOfMemoryError:  # a small GPU: one block, as on a CPU
        torch.cuda.empty_cache()
        measure("block", 1, 2)
    measure("head", n - 1, n)
    if saved:
        out["saved"] = saved
    out["env"] = {k: os.environ[k] for k in WORKER_ENV_VARS if k in os.environ}  # as the stage workers'
    return out


def measured_layers(layers: list[LayerProfile], times: dict[str, Any], method: StageMethod) -> list[LayerProfile]:
    """``layers`` (the meta profile) with the times (and, where measured, the saved bytes)
    of one device, on the entry the planner reads for ``method`` (the layer itself for full
    training, else its method's)."""
    out = []
    saved: dict[str, int] = times.get("saved") or {}
    for i, layer in enumerate(layers):
        kind = "embed" if i == 0 else "head" if i == len(layers) - 1 else "block"
        f, b, o = times[kind]
        found: dict[str, Any] = {"fwd_ms": f, "bwd_ms": b, "opt_ms": o}
        if kind in saved:
            found["saved_bytes"] = saved[kind]
        if method.method == "full":
            out.append(replace(layer, **found))
            continue
        key = method.key if method.key in layer.methods else method.method
        methods = dict(layer.methods)
        if key in methods:
            methods[key] = replace(methods[key], **found)
        out.append(replace(layer, methods=methods))
    return out


def profile_keys(cfg: Any, pool: list[str], env: dict[str, str]) -> dict[str, tuple[str, StageMethod]]:
    """Each pool device's profile cache key (:func:`profile_key`; ``env``: the stage workers'
    environment) and the method it is timed with (its tier's, without offload)."""
    from splitlearn.method_policy import policy

    run = cfg.run
    fin = policy(run)
    keys: dict[str, tuple[str, StageMethod]] = {}
    for name in pool:
        dev = cfg.topology.device(name)
        method = replace(fin.for_stage(0 if dev.owns_data else 1, dev.tier), offload="none")
        keys[name] = (profile_key(run, dev, method, env), method)
    return keys


def device_profiles(
    cfg: Any,
    layers: dict[str, list[LayerProfile]],
    keys: dict[str, tuple[str, StageMethod]],
    env: dict[str, str],
    log: Callable[[str], None] = print,
) -> dict[str, list[LayerProfile]]:
    """Each pool device's (``keys``: :func:`profile_keys`) ``layers`` (as counted for it) with
    the times measured there, in the stage workers' environment ``env`` (cached); a device no
    live Ray node holds, and whose kind is not cached, is left out (the caller gives it a
    measured device's times, :func:`measured_like`). Ray must be up."""
    import ray

    from cluster.topology import device_resource

    resolved = cfg.resolved_dict()
    pool = list(keys)
    found: dict[str, dict[str, Any]] = {}  # by key
    for key, _ in keys.values():
        path = cache_dir() / f"{key}.json"
        if key not in found and path.is_file():
            found[key] = json.loads(path.read_text())["times"]
    node_of = _node_of(pool)
    todo = {key: (name, method) for name, (key, method) in keys.items() if key not in found and name in node_of}
    absent = [name for name, (key, _) in keys.items() if key not in found and name not in node_of]
    if absent:
        log(f"not on the cluster, not timed: {', '.join(absent)}")
    if todo:
        log(f"profiling the layers on {', '.join(n for n, _ in todo.values())} (in each device's own worker; cached)")
        task = ray.remote(time_layers)
        for wave in _waves([name for name, _ in todo.values()], node_of):
            refs = {}
            for name in wave:
                key, method = keys[name]
                dev = cfg.topology.device(name)
                opts: dict[str, Any] = {"num_cpus": 0, "resources": {device_resource(name): 0.001}}
                if env:  # the stage workers' malloc and huge-page settings: a CPU step's speed depends on them
                    opts["runtime_env"] = {"env_vars": env}
                if dev.gpus:
                    opts["num_gpus"] = min(1.0, dev.gpus)
                m = {"method": method.method, "recompute": method.recompute, "frozen_dtype": method.frozen_dtype}
                refs[key] = task.options(**opts).remote(resolved, name, m)
            for key, ref in refs.items():
                found[key] = ray.get(ref)
                path = cache_dir() / f"{key}.json"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps({"device": todo[key][0], "times": found[key]}))
    return {
        name: measured_layers(layers[name], found[key], method) for name, (key, method) in keys.items() if key in found
    }


def measured_like(topology: Any, measured: list[str], names: list[str]) -> dict[str, str]:
    """For each of ``names`` not measured, the measured device whose times it takes (scaled
    by the ratio of their ``tflops``): one of the same accelerator, of the same tier where
    there is one, the nearest ``tflops``; none where no device of its accelerator was measured."""
    out = {}
    for name in names:
        if name in measured:
            continue
        dev = topology.device(name)
        alike = [topology.device(m) for m in measured if topology.device(m).accelerator == dev.accelerator]
        if alike:
            best = min(alike, key=lambda m: (m.tier != dev.tier, abs(m.tflops - dev.tflops), m.name))
            out[name] = best.name
    return out


def _node_of(pool: list[str]) -> dict[str, str]:
    """The Ray node that holds each device (by its custom resource); Ray must be up."""
    import ray

    from cluster.topology import device_resource

    where: dict[str, str] = {}
    for node in ray.nodes():
        if node.get("Alive"):
            for name in pool:
                if device_resource(name) in (node.get("Resources") or {}):
                    where.setdefault(name, node["NodeID"])
    return where


def shared_hosts(pool: list[str], threads: dict[str, int]) -> list[tuple[list[str], int, int]]:
    """The Ray nodes that hold more than one pool device: ``(devices, threads, cpus)`` each
    (``threads``: the sum of the devices' ``cpu_threads``). Their devices are timed one at a
    time but compute at once in a run: where they ask more threads than the node has CPUs
    they share the cores, and CPU devices share the memory and caches (:func:`side_by_side`).
    Ray must be up."""
    import ray

    node_of = _node_of(pool)
    cpus = {n["NodeID"]: int((n.get("Resources") or {}).get("CPU", 0)) for n in ray.nodes() if n.get("Alive")}
    out = []
    for node, count in cpus.items():
        devs = [d for d in dict.fromkeys(pool) if node_of.get(d) == node]
        if len(devs) > 1 and count:
            out.append((devs, sum(threads[d] for d in devs), count))
    return out


def _waves(names: list[str], node_of: dict[str, str]) -> list[list[str]]:
    """``names`` in waves with at most one device per node in each: devices that share a
    host are timed one after another."""
    queues: dict[str, list[str]] = {}
    for name in names:
        queues.setdefault(node_of.get(name, name), []).append(name)
    waves = []
    while any(queues.values()):
        waves.append([q.pop(0) for q in queues.values() if q])
    return waves


KINDS = ("F", "B", "STEP")
SIDE_MIN_ROUNDS = 3  # iterations a device's block runs alone, at the least
SIDE_ALONE_S = 2.0  # ... and for at least this long
SIDE_MAX = 4  # devices of one host timed side by side, at the most
SIDE_ROUNDS = 5  # the side-by-side window lasts this many of the slowest device's iterations (stretched)


class _SideBySide:
    """One CPU device's first block (forward, backward, STEP, as :func:`time_layers` builds it)
    in a loop on its node, alone and while the host's other devices loop theirs: what the
    host's memory and caches cost a device when its neighbours compute at once."""

    def prepare(self, run_dict: dict[str, Any], device_name: str, method: dict[str, Any]) -> None:
        bench = _Bench(run_dict, device_name, method)
        seg, x, labels, items, opt = bench.segment("block", 1, 2)
        self.fwd, self.bwd, self.step = _actions(seg, x, labels, items, opt, bench.autocast, bench.clip)
        for _ in range(WARMUP):
            self._iteration()

    def _iteration(self) -> tuple[float, float, float]:
        t0 = time.perf_counter()
        y = self.fwd()
        t1 = time.perf_counter()
        self.bwd(y)
        t2 = time.perf_counter()
        self.step()
        return t1 - t0, t2 - t1, time.perf_counter() - t2

    def loop(self, start_at: float, until: float, min_rounds: int = 1) -> dict[str, float]:
        """Median ms per action of the iterations that start at ``start_at`` (wall clock, the
        node's) and end by ``until`` (at least ``min_rounds`` of them), and ``iteration``: an
        iteration's median ms."""
        while time.time() < start_at:
            time.sleep(0.001)
        samples: list[tuple[float, float, float]] = []
        while True:
            got = self._iteration()
            late = time.time() > until
            if not late or len(samples) < min_rounds:
                samples.append(got)
            if late and len(samples) >= min_rounds:
                break
        out = {k: statistics.median(s[i] for s in samples) * 1e3 for i, k in enumerate(KINDS)}
        out["iteration"] = statistics.median(sum(s) for s in samples) * 1e3
        out["rounds"] = len(samples)
        return out


def side_by_side(
    cfg: Any,
    hosts: list[tuple[list[str], int, int]],
    keys: dict[str, tuple[str, StageMethod]],
    env: dict[str, str],
    log: Callable[[str], None] = print,
) -> dict[str, dict[str, float]]:
    """For each CPU device that shares its Ray node (``hosts``: :func:`shared_hosts`) with
    another CPU device: ``{kind: k}`` per action kind (``F``, ``B``, ``STEP``), the fraction its
    action runs longer per thread the host's other devices compute beside it, besides their
    share of the cores (``(together / alone) / core share - 1`` over the others' threads, each
    device's first block looped alone, then all at once; at least 0). A GPU device's compute
    is on its GPU: not measured, not counted. Cached per set of devices of a node (``keys``:
    each device's profile key and method, :func:`profile_keys`). Ray must be up."""
    import ray

    from cluster.topology import device_resource
    from partitioners.planner.assemble import core_share

    resolved = cfg.resolved_dict()
    out: dict[str, dict[str, float]] = {}
    for devices, _, cpus in hosts:
        here = [d for d in devices if cfg.topology.device(d).accelerator == "cpu"]
        # one of each kind of device first, up to SIDE_MAX: a k is per neighbour thread
        firsts = [d for i, d in enumerate(here) if all(keys[e][0] != keys[d][0] for e in here[:i])]
        devs = list(dict.fromkeys([*firsts, *here]))[:SIDE_MAX]
        if len(devs) < 2:
            continue
        threads = {d: cfg.topology.device(d).cpu_threads for d in devs}
        load = sum(threads.values())
        what = {"version": VERSION, "side_by_side": sorted([keys[d][0], threads[d]] for d in devs), "cpus": cpus}
        path = cache_dir() / f"side-{hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:20]}.json"
        by_key: dict[str, dict[str, float]]
        if path.is_file():
            by_key = json.loads(path.read_text())["by_key"]
        else:
            log(f"timing {', '.join(devs)} alone and side by side on their host (cached)")
            actors: dict[str, Any] = {}
            for d in devs:
                opts: dict[str, Any] = {"num_cpus": 0, "resources": {device_resource(d): 0.001}}
                if env:
                    opts["runtime_env"] = {"env_vars": env}
                actors[d] = ray.remote(_SideBySide).options(**opts).remote()
            try:
                methods = {d: keys[d][1] for d in devs}
                ray.get(
                    [a.prepare.remote(resolved, d, {"method": methods[d].method, "recompute": methods[d].recompute,
                                                    "frozen_dtype": methods[d].frozen_dtype})
                     for d, a in actors.items()],
                    timeout=600,
                )  # fmt: skip
                alone: dict[str, Any] = {}
                for d, a in actors.items():
                    now = time.time()
                    alone[d] = ray.get(a.loop.remote(now, now + SIDE_ALONE_S, SIDE_MIN_ROUNDS), timeout=600)
                window = SIDE_ROUNDS * max(r["iteration"] for r in alone.values()) / 1e3 * max(1.0, load / cpus)
                start = time.time() + 0.5  # one node: one clock
                runs = ray.get([a.loop.remote(start, start + window) for a in actors.values()], timeout=600)
                together: dict[str, Any] = dict(zip(actors, runs, strict=True))
            finally:
                for a in actors.values():
                    ray.kill(a)
            found: dict[str, list[dict[str, float]]] = {}
            for d in devs:  # devices of one kind on one host: the mean of theirs
                share = core_share(threads[d], load, cpus)
                k = {kind: max(0.0, together[d][kind] / max(alone[d][kind], 1e-9) / share - 1) / (load - threads[d])
                     for kind in KINDS}  # fmt: skip
                found.setdefault(keys[d][0], []).append(k)
            by_key = {key: {kind: statistics.mean(k[kind] for k in ks) for kind in KINDS} for key, ks in found.items()}
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"devices": devs, "cpus": cpus, "by_key": by_key}))
        for d in here:  # a device of a kind not measured (past SIDE_MAX) is not stretched
            if keys[d][0] in by_key:
                out[d] = {kind: round(v, 4) for kind, v in by_key[keys[d][0]].items()}
    return out


LINK_REPEATS = 5
LINK_MIN_BYTES = 8 << 20  # a bandwidth is measured on at least this many bytes (a tiny cut's time is all latency)
LINK_ROW = 1024  # values per row of the measured tensor (int8 packs one scale per row)


class _LinkEnd:
    """One end of a link measurement: a process on a device's node that joins a two-rank
    gloo group and ping-pongs a tensor with the other end through the stage workers' own
    transport (:class:`splitlearn.stage.transport.Transport`: its header, and on a CUDA end
    the copy between the GPU and the host on either side of gloo)."""

    def endpoint(self) -> tuple[str, int]:
        import socket

        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def run(self, rank: int, ip: str, port: int, nbytes: int, cuda: bool, codec: str) -> dict[str, float]:
        """Seconds of one transfer (half a round trip) from this end's device to the
        other's, packed with ``codec`` (its encoding and decoding in the time): ``small`` (4
        bytes) and ``big`` (``nbytes`` of fp32, rows of ``LINK_ROW`` values)."""
        from datetime import timedelta

        import torch

        from splitlearn.stage.fabric import Group, store_for
        from splitlearn.stage.transport import Transport

        timeout = timedelta(seconds=120)
        group = Group(store_for(ip, port, rank, 2, timeout), "link", [0, 1], rank, timeout)
        device = torch.device("cuda" if cuda and torch.cuda.is_available() else "cpu")
        transport = Transport(device, None)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        rows = max(1, nbytes // 4 // LINK_ROW)
        tensors = {"small": torch.zeros(1, device=device), "big": torch.randn(rows, LINK_ROW, device=device)}

        def ping_pong(t: torch.Tensor) -> None:
            if rank == 0:
                transport.send(t, 1, group, codec)
                transport.wait_sends()
                transport.recv(1, group)
            else:
                got, _ = transport.recv(0, group)
                transport.send(got, 0, group, codec)
                transport.wait_sends()
            sync()

        out = {}
        for name, t in tensors.items():
            ping_pong(t)  # warm-up: connections, buffers
            runs = []
            for _ in range(LINK_REPEATS):
                start = time.perf_counter()
                ping_pong(t)
                runs.append((time.perf_counter() - start) / 2)
            out[name] = statistics.median(runs)
        return out


def measure_links(
    pool: list[str],
    nbytes: int,
    cuda: set[str] | None = None,
    codec: str = "none",
    log: Callable[[str], None] = print,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """``{"src->dst": Link}`` for the ordered pairs of ``pool`` devices the runtime connects
    over gloo (at least one end off the GPU; ``cuda``: the devices that compute on one): what
    one transfer of ``nbytes`` (a cut's activation; at least ``LINK_MIN_BYTES``) takes from one
    device's tensor to the other's, once per pair of nodes and kinds of end (a rehearsal's
    devices share one host: its loopback). With a ``codec`` the transfer is packed as a run
    packs it, and the bandwidth is over the packed bytes (what the plan divides by it), so
    the encoding and decoding are in the figure. Two CUDA devices exchange over NCCL, which
    this does not measure: their declared link stands. ``env``: the stage workers' environment
    variables (their malloc settings: a receive into fresh pages costs more). Ray must be up."""
    import ray

    from cluster.topology import Link
    from partitioners.planner.request import CODEC_BYTES

    cuda = cuda or set()
    node_of = _node_of(pool)
    names = [n for n in pool if n in node_of]

    def kind(d: str) -> tuple[str, bool]:
        return node_of[d], d in cuda

    pairs: dict[tuple, tuple[str, str]] = {}  # (node, on GPU) of both ends, sorted -> a device at each
    for a in names:
        for b in names:
            if a != b and not (a in cuda and b in cuda):
                pairs.setdefault(tuple(sorted((kind(a), kind(b)))), (a, b))
    if not pairs:
        return {}
    nbytes = max(nbytes, LINK_MIN_BYTES)
    log(f"measuring the transport between {len(pairs)} pair(s) of nodes ({nbytes / 1e6:.3g} MB per transfer)")
    found: dict[tuple, Any] = {}
    for key, (a, b) in pairs.items():
        ends = [_beside(_LinkEnd, d, d in cuda, env) for d in (a, b)]
        try:
            ip, port = ray.get(ends[0].endpoint.remote(), timeout=120)
            refs = [ends[i].run.remote(i, ip, port, nbytes, d in cuda, codec) for i, d in enumerate((a, b))]
            results = ray.get(refs, timeout=300)
            latency_s, per_s = max(r["small"] for r in results), max(r["big"] for r in results)
            mbps = nbytes * CODEC_BYTES[codec] * 8 / 1e6 / max(per_s - latency_s, 1e-9)
            found[key] = Link(bandwidth_mbps=mbps, latency_ms=latency_s * 1e3)
        finally:
            for e in ends:
                ray.kill(e)
    return {
        f"{a}->{b}": found[tuple(sorted((kind(a), kind(b))))]
        for a in names
        for b in names
        if a != b and not (a in cuda and b in cuda)
    }


def _beside(cls: type, device: str, gpu: bool, env: dict[str, str] | None) -> Any:
    """An actor of ``cls`` where ``device``'s worker runs: on its node, with a sliver of a GPU
    where the worker has one (so CUDA is visible), in the workers' environment."""
    import ray

    from cluster.topology import device_resource

    opts: dict[str, Any] = {"num_cpus": 0, "resources": {device_resource(device): 0.001}}
    if gpu:
        opts["num_gpus"] = 0.01
    if env:
        opts["runtime_env"] = {"env_vars": env}
    return ray.remote(cls).options(**opts).remote()


class _Probe:
    """A stage worker's step call without its actions: the call through Ray and the
    worker's memory readings around the step (:meth:`splitlearn.stage.worker.StageWorker.run_step`)."""

    def step(self) -> int:
        import torch

        from splitlearn.rss import PeakRSS

        with PeakRSS() as rss:
            pass
        if torch.cuda.is_available() and torch.cuda.device_count():
            torch.cuda.max_memory_allocated()
            torch.cuda.max_memory_reserved()
        return rss.peak_bytes


CALL_REPEATS = 20


def measure_call_ms(pool: list[str], cuda: set[str] | None = None, env: dict[str, str] | None = None) -> float:
    """Milliseconds a step costs the runtime outside the stages' actions: the driver calls
    every worker at once and waits for all of them (median of ``CALL_REPEATS`` steps, one
    probe per pool device on the cluster, placed as its worker is). Ray must be up."""
    import ray

    cuda = cuda or set()
    node_of = _node_of(pool)
    probes = [_beside(_Probe, d, d in cuda, env) for d in pool if d in node_of]
    if not probes:
        return 0.0
    try:
        ray.get([p.step.remote() for p in probes], timeout=120)  # started, CUDA up
        runs = []
        for _ in range(CALL_REPEATS):
            start = time.perf_counter()
            ray.get([p.step.remote() for p in probes], timeout=60)
            runs.append((time.perf_counter() - start) * 1e3)
        return statistics.median(runs)
    finally:
        for p in probes:
            ray.kill(p)
