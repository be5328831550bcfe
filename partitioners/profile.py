"""Layer profiles: what each layer of a chain costs, counted and measured.

Model-agnostic: the profiler takes a chain of modules, each mapping one tensor to one tensor
(the last one to a scalar loss), and a sample input for the first. Per layer it records
parameters, forward and backward FLOPs (torch's ``FlopCounterMode``), the bytes that would
cross a cut after the layer, the bytes autograd saves for backward (through saved-tensor
hooks, parameters excluded), and the median forward and backward time after a warm-up.

A layer's own fields describe full fine-tuning. ``methods`` holds the same costs under the
other ways a stage can train it (``frozen``, ``lora``, with frozen weights stored compactly:
``lora+int8``, ...), measured or counted by profiling the layer again with that method
applied; the cost model picks the entry a stage's method names.
"""

from __future__ import annotations

import contextlib
import functools
import json
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass
class MethodCost:
    """A layer's costs for one micro-batch when a stage trains it another way than ``full``."""

    params: int = 0  # parameters held, adapter parameters included
    trainable_params: int = 0  # what gets gradients and optimizer state (LoRA: the adapters)
    fwd_flops: int = 0
    bwd_flops: int = 0
    saved_bytes: int = 0
    fwd_ms: float = 0.0
    bwd_ms: float = 0.0
    opt_ms: float = 0.0
    bwd_transient_bytes: int = 0
    max_trainable_params: int = 0


@dataclass
class LayerProfile:
    """Costs of one chain layer for one micro-batch. Counts are exact; times are medians."""

    name: str
    params: int = 0  # parameters held by the layer (a tied weight counts at both ends)
    trainable_params: int | None = None  # None: all of them
    param_bytes: int = 0
    fwd_flops: int = 0
    bwd_flops: int = 0
    in_bytes: int = 0  # the activation that enters the layer
    out_bytes: int = 0  # the activation that would cross a cut after the layer
    saved_bytes: int = 0  # held for backward between this layer's forward and backward
    fwd_ms: float = 0.0
    bwd_ms: float = 0.0
    opt_ms: float = 0.0  # a STEP over the layer's trainable parameters: norm share, clipping, AdamW
    # peak live bytes while the layer runs forward and backward beyond its parameters, their
    # gradients, what it saves for backward and its output (e.g. a loss head's softmax)
    bwd_transient_bytes: int = 0
    max_trainable_params: int = 0  # entries of its largest trainable tensor (AdamW and accumulation temporaries)
    compact_params: int = 0  # parameters in matmul/embedding weights: what a compact frozen dtype shrinks
    compact_rows: int = 0  # output rows of those weights (int8 keeps one scale per row)
    methods: dict[str, MethodCost] = field(default_factory=dict)  # by method key: frozen, lora, lora+int8, ...

    @property
    def trainable(self) -> int:
        return self.params if self.trainable_params is None else self.trainable_params


@dataclass
class ModelProfile:
    layers: list[LayerProfile]
    micro_batch: int
    seq_len: int
    dtype: str = "fp32"
    device: str = "cpu"
    threads: int = 1
    host: str = field(default_factory=platform.node)
    calibrated_tflops: float | None = None  # this machine's measured FLOP/s (see calibrate)
    lora: dict[str, Any] | None = None  # the LoRA settings the ``lora`` method costs were taken with

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> ModelProfile:
        d = json.loads(text)
        layers = []
        for x in d["layers"]:
            x = dict(x)
            x["methods"] = {k: MethodCost(**v) for k, v in (x.get("methods") or {}).items()}
            layers.append(LayerProfile(**x))
        d["layers"] = layers
        return cls(**d)

    def totals(self) -> dict[str, float]:
        keys = ("params", "param_bytes", "fwd_flops", "bwd_flops", "saved_bytes", "fwd_ms", "bwd_ms", "opt_ms")
        return {k: sum(getattr(layer, k) for layer in self.layers) for k in keys}


def register_cpu_attention_flops() -> None:
    """torch's FlopCounterMode knows the CUDA fused-attention kernels but not the CPU one
    that ``scaled_dot_product_attention`` runs here; count it with the same formulas, so
    attention FLOPs are counted on every device (and on ``meta``) alike."""
    import torch
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    pairs = (
        ("_scaled_dot_product_flash_attention_for_cpu", fc.sdpa_flop),
        ("_scaled_dot_product_flash_attention_for_cpu_backward", fc.sdpa_backward_flop),
    )
    for name, formula in pairs:
        op = getattr(aten, name, None)
        if op is not None and op not in fc.flop_registry:
            fc.register_flop_formula(op, get_raw=True)(formula)  # formula is already shape-wrapped


@contextlib.contextmanager
def fused_attention_on_meta(cuda: bool = False) -> Any:
    """Within the block, ``scaled_dot_product_attention`` on meta tensors is counted as a
    fused kernel runs it, as CPU and CUDA do whenever one applies: autograd saves the query,
    key, value, output and one log-sum-exp per row (grouped key/value heads as they are), not
    the seq x seq probabilities of torch's math path, which meta otherwise takes. FLOPs are
    counted on the fused kernel's forward and backward (keys and values repeated per group,
    as those kernels compute). Other devices go to torch's own function.

    ``cuda``: count as CUDA would run it where it differs from the CPU: fp32 attention with
    grouped key/value heads takes the math path there (flash needs 16-bit inputs, the
    memory-efficient kernel takes no grouped heads; measured on an H200 with torch 2.11)."""
    import torch
    import torch.nn.functional as F

    aten = torch.ops.aten
    fwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    original = F.scaled_dot_product_attention

    class _Fused(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, mask, is_causal, scale):  # type: ignore[no-untyped-def]
            group = q.shape[-3] // k.shape[-3]
            kr, vr = k.repeat_interleave(group, dim=-3), v.repeat_interleave(group, dim=-3)
            out, lse = fwd(q, kr, vr, 0.0, is_causal, attn_mask=mask, scale=scale)
            ctx.save_for_backward(q, k, v, out, lse, *([] if mask is None else [mask]))  # as the kernel saves
            ctx.is_causal, ctx.scale, ctx.group = is_causal, scale, group
            return out

        @staticmethod
        def backward(ctx, grad):  # type: ignore[no-untyped-def]
            q, k, v, out, lse, *mask = ctx.saved_tensors
            kr, vr = k.repeat_interleave(ctx.group, dim=-3), v.repeat_interleave(ctx.group, dim=-3)
            mask = mask[0] if mask else None
            gq, gk, gv = bwd(grad, q, kr, vr, out, lse, 0.0, ctx.is_causal, attn_mask=mask, scale=ctx.scale)

            def fold(g: torch.Tensor) -> torch.Tensor:  # gradients of repeated heads summed per group
                return g.unflatten(-3, (k.shape[-3], ctx.group)).sum(-3)

            return gq, fold(gk), fold(gv), None, None, None

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):  # type: ignore[no-untyped-def]
        grouped = key.shape[-3] != query.shape[-3]
        math_on_cuda = cuda and grouped and query.dtype == torch.float32
        if fwd is None or bwd is None or query.device.type != "meta" or dropout_p or math_on_cuda:
            kw = {"enable_gqa": enable_gqa} if enable_gqa else {}
            return original(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, **kw)
        if attn_mask is not None and attn_mask.dtype == torch.bool:  # the fused kernels take an additive mask
            attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device)
        return _Fused.apply(query, key, value, attn_mask, is_causal, scale)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def _median_ms(fn: Callable[[], Any], warmup: int, repeats: int, sync: Callable[[], None]) -> float:
    for _ in range(warmup):
        fn()
    sync()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def peak_allocated_bytes(fn: Callable[[], Any], device: Any) -> int:
    """Peak bytes allocated by ``fn`` above what was allocated when it started, from torch's
    own accounting: the CUDA caching allocator's peak, or on CPU the allocation events that
    the profiler records (``profile_memory``), summed in order."""
    import torch

    if getattr(device, "type", device) == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return max(0, torch.cuda.max_memory_allocated() - base)
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    allocs: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            allocs.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    allocs.sort()
    cur = peak = 0
    for _, size in allocs:
        cur += size
        peak = max(peak, cur)
    return peak


class LiveBytes:
    """Peak bytes of the tensors created inside ``with LiveBytes(): ...`` and alive at once
    (forward and backward of one layer: saved activations, temporaries, gradients). Every
    operator's outputs are followed through torch's dispatch (a ``TorchDispatchMode``), each
    storage counted once and uncounted when it is freed, so it works on the meta device as on
    real ones and for any model, with no hooks on modules or parameters. The storages of
    ``existing`` (parameters, buffers, the input) are not counted, nor their views."""

    def __init__(self, existing: Sequence[Any] = ()) -> None:
        self.existing = list(existing)
        self.current = 0
        self.peak_bytes = 0
        self._mode: Any = None

    def __enter__(self) -> LiveBytes:
        import weakref

        import torch
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves
        from torch.utils.weak import WeakIdKeyDictionary

        tracker = self
        seen: WeakIdKeyDictionary = WeakIdKeyDictionary()
        for t in self.existing:
            for x in _inner(t):
                seen[x.untyped_storage()] = 0

        def freed(n: int) -> None:
            tracker.current -= n

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
                out = func(*args, **(kwargs or {}))
                for t in tree_leaves(out):
                    if isinstance(t, torch.Tensor):
                        for x in _inner(t):
                            st = x.untyped_storage()
                            if st not in seen:
                                n = st.nbytes()
                                seen[st] = n
                                tracker.current += n
                                weakref.finalize(st, freed, n)
                tracker.peak_bytes = max(tracker.peak_bytes, tracker.current)
                return out

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        mode, self._mode = self._mode, None
        mode.__exit__(*exc)

    def restart_peak(self) -> int:
        """The peak so far; from now on the peak counts from what is alive now."""
        peak, self.peak_bytes = self.peak_bytes, self.current
        return peak


def _inner(t) -> list:
    """The plain tensors that hold ``t``'s data: itself, or the inner tensors of a tensor
    subclass (e.g. a quantized weight: int8 data and scales)."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        return [x for n in names for x in _inner(getattr(t, n))]
    return [t]


def _nbytes(t) -> int:
    return sum(x.numel() * x.element_size() for x in _inner(t))


def _storage_ids(t) -> list[int]:
    return [x.untyped_storage()._cdata for x in _inner(t)]


_Autocast = Callable[[], contextlib.AbstractContextManager[Any]]  # a fresh autocast context, or a null one


def profile_chain(
    layers: Sequence[Any],
    sample: Any,
    names: Sequence[str] | None = None,
    *,
    warmup: int = 2,
    repeats: int = 5,
    measure_time: bool = True,
    autocast_dtype: Any = None,
    cuda_kernels: bool = False,
) -> list[LayerProfile]:
    """Profile each module of ``layers`` on the output of the one before it.

    ``layers[i](x)`` must return one tensor; the last returns a scalar loss. ``sample`` is
    the first layer's input (e.g. token ids). Time is measured on whatever device the
    modules and the sample live on. On the meta device attention is counted as the fused
    kernels run it (as CUDA runs it with ``cuda_kernels``: :func:`fused_attention_on_meta`).
    """
    import torch

    register_cpu_attention_flops()
    device = sample.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    names = list(names) if names is not None else [f"layer_{i}" for i in range(len(layers))]
    out: list[LayerProfile] = []
    x = sample
    autocast: _Autocast = (
        (lambda: torch.autocast(device.type, dtype=autocast_dtype))
        if autocast_dtype is not None
        else contextlib.nullcontext
    )

    def median(fn: Callable[[], Any]) -> float:
        return _median_ms(fn, warmup, repeats, sync)

    for name, layer in zip(names, layers, strict=True):
        params = list(layer.parameters())
        inp = x.detach().requires_grad_(x.is_floating_point())
        with fused_attention_on_meta(cuda_kernels) if device.type == "meta" else contextlib.nullcontext():
            prof, y, grad_out = _count_layer(name, layer, params, inp, autocast)
        if measure_time:
            _time_layer(prof, layer, inp, grad_out, y.requires_grad, autocast, median, device)
            trainable = [p for p in params if p.requires_grad]
            if trainable:
                prof.opt_ms = _time_optimizer_step(trainable, median)
            for p in params:
                p.grad = None
        out.append(prof)
        x = y.detach()
    return out


def _count_layer(
    name: str, layer: torch.nn.Module, params: list[torch.nn.Parameter], inp: torch.Tensor, autocast: _Autocast
) -> tuple[LayerProfile, torch.Tensor, torch.Tensor | None]:
    """One forward and one backward of ``layer`` on ``inp``, counted: parameters, FLOPs, the
    bytes in and out and those autograd saves for backward. Returns the profile, the layer's
    output and the gradient its backward was given (None for a scalar loss)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    # storages are told apart by their C++ identity, which works on meta tensors too
    param_ids = {i for p in params for i in _storage_ids(p)}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        for x in _inner(t):
            storage = x.untyped_storage()
            if storage._cdata not in param_ids:
                saved[storage._cdata] = max(saved.get(storage._cdata, 0), storage.nbytes())
        return t

    with LiveBytes([*params, *layer.buffers(), inp]) as live:
        with FlopCounterMode(display=False) as fc, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with autocast():
                y = layer(inp)
        fwd_flops = fc.get_total_flops()
        fwd_peak = live.restart_peak()
        grad_out = None if y.dim() == 0 else torch.randn_like(y)
        bwd_flops = 0
        # nothing to differentiate: e.g. a frozen embedding on token ids (no backward runs)
        if y.requires_grad:
            with FlopCounterMode(display=False) as fc:
                y.backward(grad_out)
            bwd_flops = fc.get_total_flops()
    for p in params:
        p.grad = None
    prof = LayerProfile(
        name=name,
        params=sum(p.numel() for p in params),
        trainable_params=sum(p.numel() for p in params if p.requires_grad),
        param_bytes=sum(_nbytes(p) for p in params),
        fwd_flops=int(fwd_flops),
        bwd_flops=int(bwd_flops),
        in_bytes=_nbytes(inp),
        out_bytes=0 if y.dim() == 0 else _nbytes(y),
        saved_bytes=sum(saved.values()),
        max_trainable_params=max((p.numel() for p in params if p.requires_grad), default=0),
    )
    # beyond what the cost model counts on its own: in the forward, what is saved and the
    # output; in the backward, also the gradient that comes back and the parameters' gradients
    grads = sum(_nbytes(p) for p in params if p.requires_grad)
    fwd_extra = fwd_peak - prof.saved_bytes - prof.out_bytes
    bwd_extra = live.peak_bytes - prof.saved_bytes - 2 * prof.out_bytes - grads
    prof.bwd_transient_bytes = max(0, fwd_extra, bwd_extra)
    return prof, y, grad_out


def _time_layer(
    prof: LayerProfile,
    layer: torch.nn.Module,
    inp: torch.Tensor,
    grad_out: torch.Tensor | None,
    has_bwd: bool,
    autocast: _Autocast,
    median: Callable[[Callable[[], Any]], float],
    device: torch.device,
) -> None:
    """Set ``prof``'s forward and backward times (medians) and the extra memory a backward
    allocates; the backward runs leave the parameters' gradients in place."""

    def fwd() -> None:
        with autocast():
            layer(inp)  # with autograd on, as in training; the graph is dropped

    def fwd_bwd() -> None:
        with autocast():
            layer(inp).backward(grad_out)

    prof.fwd_ms = median(fwd)
    if has_bwd:
        both = median(fwd_bwd)
        prof.bwd_ms = max(both - prof.fwd_ms, 0.0)
        # extra memory of a backward, with the parameter gradients already allocated
        # (they persist between steps), so only temporaries count
        with autocast():
            y2 = layer(inp)
        measured = peak_allocated_bytes(functools.partial(y2.backward, grad_out), device)
        prof.bwd_transient_bytes = max(prof.bwd_transient_bytes, measured)
        del y2


def sum_of_squares(grads: Any) -> Any:
    """Sum of squared gradient entries, as a float64 CPU scalar (grads may be on a GPU): each
    tensor's norm in fp32 (``torch._foreach_norm``: one fused reduction per device, no
    temporaries the size of a gradient), squared and summed in float64, with one copy to the
    host per device, not one per tensor."""
    import torch

    by_device: dict[Any, list[Any]] = {}
    for g in grads:
        if g is not None and g.numel():
            by_device.setdefault(g.device, []).append(g.detach())
    total = torch.zeros((), dtype=torch.float64)
    for tensors in by_device.values():
        norms = torch._foreach_norm(tensors, 2, dtype=torch.float32)
        total += torch.stack(norms).double().pow(2).sum().cpu()
    return total


def _time_optimizer_step(trainable: list[torch.nn.Parameter], median: Callable[[Callable[[], Any]], float]) -> float:
    """Median milliseconds of what a worker's STEP computes over ``trainable`` (with the
    gradients they hold): its share of the global gradient norm, the clipping, AdamW, and
    the gradients zeroed for the next step (before its first action)."""
    import torch

    opt = torch.optim.AdamW(trainable, lr=1e-9, foreach=False)
    grads = [p.grad for p in trainable if p.grad is not None]

    def step() -> None:
        sum_of_squares(grads)  # the worker's share of the global norm
        for g in grads:
            g.mul_(1.0)  # the clipping's cost; its factor does not change it
        opt.step()
        for g in grads:
            g.mul_(1.0)  # about what zeroing costs; zeroing would lose the gradients the next call needs

    ms = median(step)
    opt.zero_grad(set_to_none=True)
    return ms


def calibrate_tflops(device: str = "cpu", size: int = 1024, repeats: int = 5, dtype: Any = None) -> float:
    """This machine's effective dense matmul throughput in TFLOP/s, with the current torch
    thread count: the scale on which topology ``tflops`` and measured layer times meet."""
    import torch

    dtype = dtype or torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    ms = _median_ms(lambda: a @ b, 2, repeats, sync)
    return 2 * size**3 / (ms * 1e-3) / 1e12
