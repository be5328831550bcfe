"""Cost model: the memory and time of a stage on a device, and the time of a link.

Memory of a stage in training (bytes), on the device and on its host:

- weights, gradients and optimizer state by precision (AdamW: two fp32 moments, plus an
  fp32 master copy when the weights themselves are 16-bit);
- activations saved for backward, per micro-batch, times the micro-batches in flight for
  the schedule (sequential: 1, GPipe: all M, 1F1B: at most the stages from this one to
  the last); with activation recompute (each chain layer of the stage checkpointed on its
  own) only each layer's input is held per micro-batch, plus one layer's saved activations
  while it is recomputed;
- the fine-tuning method of the stage (:class:`StageMethod`): ``frozen`` and ``lora``
  stages keep gradients and optimizer state only for what trains (nothing, or the LoRA
  adapters), save fewer activations (a frozen weight needs no saved input), and may store
  their frozen matmul weights compactly (bf16/fp16: 2 bytes; int8: 1 byte plus a scale per
  row). Their per-layer costs come from the profile's ``methods`` entries;
- transfer buffers: one activation in and out, one gradient in and out;
- ZeRO offload (:attr:`StageMethod.offload`): ``optimizer`` moves optimizer state and the
  fp32 gradient copy to host memory; ``params`` moves the weights too, keeping the largest
  layer's on the device while it runs. On a ``cpu`` device the host memory is the device's
  own RAM, so the planner counts both against ``memory_gb`` (offloading gains nothing there).

Time: a layer's measured forward/backward time on the profiling machine, scaled by the
ratio of that machine's calibrated FLOP/s to the device's; without a measurement, FLOPs
over the device's FLOP/s. A link costs latency plus bytes over bandwidth, per direction.

An offloaded stage's optimizer step runs on the host CPU (AdamW: ``ADAM_FLOPS_PER_PARAM``
per trainable parameter at ``Device.host_tflops``) after its gradients cross the host link
(``Device.host_link_gbps``) to the host; with ``optimizer`` offload the updated trainable
weights cross back once per step; with ``params`` offload every forward and every backward
of every micro-batch fetches the stage's weights from the host instead (no overlap with
compute is assumed: an upper bound). Every term is a sum over layers, so prefix sums of
per-layer costs stay exact. On a ``cpu`` device nothing crosses a link.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from cluster.topology import Device, Topology
from partitioners.choices import FROZEN_DTYPES, METHODS, OFFLOAD_MODES
from partitioners.profile import LayerProfile
from partitioners.schedule import SCHEDULES

# bytes per parameter: weight, gradient, fp32 master copy, optimizer moments
PRECISIONS: dict[str, tuple[int, int, int, int]] = {
    "fp32": (4, 4, 0, 8),
    "bf16": (4, 4, 0, 8),  # autocast: fp32 weights; 16-bit copies show up in saved activations
    "bf16-master": (2, 2, 4, 8),  # 16-bit weights and gradients, fp32 master and moments
    "bf16-pure": (2, 2, 0, 4),  # 16-bit weights, gradients and moments; no master copy
}
GB = 1e9

FROZEN_BYTES = {"bf16": 2, "fp16": 2, "int8": 1}  # per compact weight entry
INT8_ROW_BYTES = 5  # per output row of an int8 weight: an fp32 scale and an int8 zero point
OFFLOAD_LABELS = {"optimizer": "off-opt", "params": "off-params"}  # in StageMethod.label
ADAM_FLOPS_PER_PARAM = 12  # AdamW on the host: moments, bias correction, decay, update


@dataclass(frozen=True)
class StageMethod:
    """How one stage fine-tunes its layers.

    ``method``: ``full`` (every weight trains), ``frozen`` (none does; gradients still flow
    back through the stage), ``lora`` (LoRA adapters train, the base is frozen).
    ``recompute``: activation checkpointing of each chain layer. ``frozen_dtype``: how the
    frozen matmul weights are stored (``fp32`` as trained; ``bf16``/``fp16``; ``int8``
    weight-only); it has no effect on a ``full`` stage, which holds no frozen weights.
    ``offload``: DeepSpeed ZeRO offload of the stage (``none``; ``optimizer``: optimizer
    state and the fp32 gradient copy in host memory, the step on the host CPU; ``params``:
    the weights too).
    """

    method: str = "full"
    recompute: bool = False
    frozen_dtype: str = "fp32"
    offload: str = "none"

    def __post_init__(self) -> None:
        if self.offload not in OFFLOAD_MODES:
            raise ValueError(f"unknown offload '{self.offload}' (known: {', '.join(OFFLOAD_MODES)})")
        if self.method not in METHODS:
            raise ValueError(f"unknown fine-tuning method '{self.method}' (known: {', '.join(METHODS)})")
        if self.frozen_dtype not in FROZEN_DTYPES:
            raise ValueError(f"unknown frozen_dtype '{self.frozen_dtype}' (known: {', '.join(FROZEN_DTYPES)})")
        if self.method == "full" and self.frozen_dtype != "fp32":
            object.__setattr__(self, "frozen_dtype", "fp32")  # nothing frozen to store compactly

    @property
    def key(self) -> str:
        """The profile's ``methods`` key for this method's per-layer costs."""
        if self.method == "full":
            return "full"
        return self.method if self.frozen_dtype == "fp32" else f"{self.method}+{self.frozen_dtype}"

    @property
    def label(self) -> str:
        """Short form for tables: ``full``, ``lora+int8+rc``, ``full+off-opt``, ..."""
        off = f"+{OFFLOAD_LABELS[self.offload]}" if self.offload != "none" else ""
        return self.key + ("+rc" if self.recompute else "") + off

    @classmethod
    def parse(cls, label: str) -> StageMethod:
        parts = label.split("+")
        rc = "rc" in parts
        offload = next((m for m, tag in OFFLOAD_LABELS.items() if tag in parts), "none")
        parts = [p for p in parts if p != "rc" and p not in OFFLOAD_LABELS.values()]
        return cls(parts[0], rc, parts[1] if len(parts) > 1 else "fp32", offload)


@dataclass
class FinetunePolicy:
    """The configured method of each stage: a default, then by device tier, then by stage
    index (later wins). Overrides are partial: ``{"method": "lora"}`` keeps the rest."""

    default: StageMethod = field(default_factory=StageMethod)
    by_tier: dict[str, dict[str, Any]] = field(default_factory=dict)
    by_stage: dict[int, dict[str, Any]] = field(default_factory=dict)

    def for_stage(self, stage: int, tier: str) -> StageMethod:
        d = asdict(self.default)
        for over in (self.by_tier.get(tier), self.by_stage.get(stage)):
            if over:
                d.update({k: v for k, v in over.items() if v is not None})
        return StageMethod(**d)


def stage_options(base: StageMethod, allow: Sequence[str]) -> list[StageMethod]:
    """``base`` first, then every variant the planner may pick from ``allow``: another
    method (lora, frozen), recompute on, a compact frozen dtype (for lora/frozen only).
    Each keeps ``base.offload``; offload variants are added by :func:`with_offload`."""
    methods = [base.method, *[m for m in ("lora", "frozen") if m in allow and m != base.method]]
    recomputes = [base.recompute, *([True] if "recompute" in allow and not base.recompute else [])]
    dtypes = [base.frozen_dtype, *[d for d in ("bf16", "fp16", "int8") if d in allow and d != base.frozen_dtype]]
    out: list[StageMethod] = []
    for m in methods:
        for rc in recomputes:
            for dt in dtypes if m != "full" else ["fp32"]:
                opt = StageMethod(m, rc, dt, base.offload)
                if opt not in out:
                    out.append(opt)
    return out


# What the planner may pick by itself. ``params`` (ZeRO-3) is costed when configured but not
# picked: the runtime runs it only with one micro-batch in flight on the stage
# (splitlearn/zero.py: check_schedule), which the partitioners do not model.
PLANNED_OFFLOAD_MODES = ("none", "optimizer")


def with_offload(options: Sequence[StageMethod], modes: Sequence[str] = PLANNED_OFFLOAD_MODES) -> list[StageMethod]:
    """``options`` first, then each of them with every other offload mode in ``modes``."""
    out = list(options)
    for opt in options:
        for mode in modes:
            variant = replace(opt, offload=mode)
            if variant not in out:
                out.append(variant)
    return out


def effective_layer(layer: LayerProfile, method: StageMethod) -> LayerProfile:
    """The layer's costs under ``method``: the profile's entry for it (``lora+int8``, else
    ``lora`` with fp32 times), or for ``frozen`` without an entry the full costs with nothing
    trainable (an upper bound on activations and time)."""
    if method.method == "full":
        return layer
    cost = layer.methods.get(method.key) or layer.methods.get(method.method)
    if cost is None:
        if method.method == "frozen":
            return replace(layer, trainable_params=0, opt_ms=0.0, methods={})
        raise ValueError(
            f"layer '{layer.name}' has no '{method.method}' costs in its profile; profile again with the "
            f"run's finetune settings (splitlearn profile) or leave plan.profile unset"
        )
    return replace(
        layer,
        params=cost.params,
        trainable_params=cost.trainable_params,
        fwd_flops=cost.fwd_flops,
        bwd_flops=cost.bwd_flops,
        saved_bytes=cost.saved_bytes,
        fwd_ms=cost.fwd_ms,
        bwd_ms=cost.bwd_ms,
        opt_ms=cost.opt_ms,
        bwd_transient_bytes=cost.bwd_transient_bytes,
        max_trainable_params=cost.max_trainable_params,
        methods={},
    )


def weight_bytes(layer: LayerProfile, eff: LayerProfile, method: StageMethod, bytes_per_weight: int) -> float:
    """Bytes of a layer's weights under ``method`` (``eff`` = its effective costs): frozen
    matmul weights in the compact dtype, everything else at the precision's width."""
    if method.method == "full" or method.frozen_dtype == "fp32":
        return eff.params * bytes_per_weight
    frozen = eff.params - eff.trainable
    compact = min(layer.compact_params, frozen)
    out = compact * FROZEN_BYTES[method.frozen_dtype] + (eff.params - compact) * bytes_per_weight
    if method.frozen_dtype == "int8":
        out += layer.compact_rows * INT8_ROW_BYTES
    return out


def step_temporaries(layers: Sequence[LayerProfile], precision: str) -> float:
    """Bytes the optimizer allocates while it steps one tensor (the stage's largest trainable
    one). torch's fused AdamW (every precision but ``bf16-master``) allocates none; the
    master-weight step (:class:`splitlearn.optim.MasterAdamW`) holds the corrected root of
    the second moment and its quotient in fp32 (it upcasts the gradient first, freed before
    them)."""
    if precision != "bf16-master":
        return 0.0
    moment_bytes = PRECISIONS[precision][3] // 2
    return 2.0 * moment_bytes * max((layer.max_trainable_params for layer in layers), default=0)


def micro_batches_in_flight(schedule: str, stage: int, num_stages: int, num_micro_batches: int) -> int:
    """Most micro-batches whose activations a stage holds at once."""
    if schedule == "sequential":
        return 1
    if schedule == "gpipe":
        return num_micro_batches
    if schedule == "1f1b":
        return min(num_micro_batches, num_stages - stage)
    raise ValueError(f"unknown schedule '{schedule}' (known: {', '.join(SCHEDULES)})")


# Resident memory a CPU worker keeps from its first step on beyond what it allocates for
# the stage: oneDNN's primitive caches and the allocator's arenas. Measured in-process on a
# 50M-parameter Llama segment (bf16, LoRA): 29.5 MB left after a forward and backward with
# everything freed, 10.8 MB with oneDNN off; across bench/memory.py's CPU stages the median
# of held minus counted was 25 MB (docs/decisions.md, "CPU runtime bytes").
CPU_RUNTIME_BYTES = 25e6


@dataclass
class StageMemory:
    """Bytes of a stage, on its device and on its host."""

    weights: float = 0.0
    grads: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0
    buffers: float = 0.0
    step: float = 0.0  # the optimizer step's temporaries (activations are freed by then)
    host: float = 0.0  # offloaded state in host memory
    runtime: float = 0.0  # what the worker's kernel libraries keep once it has run (CPU_RUNTIME_BYTES)

    @property
    def device_total(self) -> float:
        return (
            self.weights + self.grads + self.optimizer + max(self.activations + self.buffers, self.step) + self.runtime
        )

    def as_gb(self) -> dict[str, float]:
        d = {k: v / GB for k, v in asdict(self).items()}
        d["device_total"] = self.device_total / GB
        return d


def stage_memory(
    layers: Sequence[LayerProfile],
    *,
    stage: int = 0,
    num_stages: int = 1,
    schedule: str = "sequential",
    num_micro_batches: int = 1,
    precision: str = "fp32",
    offload: str = "none",
    recompute: bool = False,
    method: StageMethod | None = None,
    runtime_bytes: float = 0.0,
) -> StageMemory:
    """Bytes a stage holds at its peak; ``runtime_bytes``: what its worker's libraries keep
    besides (:data:`CPU_RUNTIME_BYTES` on a CPU)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision '{precision}' (known: {', '.join(PRECISIONS)})")
    if offload not in OFFLOAD_MODES:
        raise ValueError(f"unknown offload '{offload}' (known: {', '.join(OFFLOAD_MODES)})")
    method = method or StageMethod()
    recompute = recompute or method.recompute
    offload = offload if offload != "none" else method.offload
    w, g, master, moments = PRECISIONS[precision]
    base = list(layers)
    layers = [effective_layer(layer, method) for layer in base]
    trainable = sum(layer.trainable for layer in layers)
    mem = StageMemory(
        weights=sum(weight_bytes(b, e, method, w) for b, e in zip(base, layers, strict=True)),
        grads=trainable * g,
        optimizer=trainable * (master + moments),
        runtime=runtime_bytes,
    )
    inflight = micro_batches_in_flight(schedule, stage, num_stages, num_micro_batches)
    if layers:
        # each micro-batch in flight also keeps its output until its backward
        out = layers[-1].out_bytes
        if recompute:
            # each layer is checkpointed: its input is held; its saved activations exist
            # only while it is recomputed for its backward
            held = sum(layer.in_bytes for layer in layers)
            mem.activations = inflight * (held + out) + max(layer.saved_bytes for layer in layers)
        else:
            mem.activations = inflight * (sum(layer.saved_bytes for layer in layers) + out)
        # during a backward: the incoming and outgoing gradient, and the layer's temporaries
        mem.buffers = layers[0].in_bytes + out + max(layer.bwd_transient_bytes for layer in layers)
        if num_micro_batches > 1:  # a later micro-batch's gradient of a tensor, before it is added in
            mem.buffers += g * max(layer.max_trainable_params for layer in layers)
        mem.step = step_temporaries(layers, precision)
    if offload in ("optimizer", "params"):
        mem.host += mem.optimizer + trainable * 4  # fp32 gradient copy for the CPU step
        mem.optimizer = 0.0
        mem.step = 0.0  # the step runs on the host
    if offload == "params":
        mem.host += mem.weights
        mem.weights = max((layer.params for layer in layers), default=0) * w
    return mem


@dataclass
class StageTime:
    """Milliseconds of one stage for one step, computing alone (no waiting)."""

    fwd_ms: float  # per micro-batch
    bwd_ms: float  # per micro-batch (with recompute: includes the extra forward)
    opt_ms: float  # once per step

    def step_ms(self, num_micro_batches: int) -> float:
        return num_micro_batches * (self.fwd_ms + self.bwd_ms) + self.opt_ms


def device_scale(device: Device, calibrated_tflops: float | None) -> float | None:
    """Factor from a time measured on the profiling machine to the same work on ``device``."""
    if not calibrated_tflops:
        return None
    return calibrated_tflops / device.tflops


def host_link_ms(device: Device, num_bytes: float) -> float:
    """Bytes between ``device`` and its host RAM; nothing to move on a cpu device."""
    if device.accelerator == "cpu":
        return 0.0
    return num_bytes * 8 / (device.host_link_gbps * 1e9) * 1e3


def stage_time(
    layers: Sequence[LayerProfile],
    device: Device,
    calibrated_tflops: float | None = None,
    *,
    recompute: bool = False,
    offload: str = "none",
    host_tflops: float | None = None,
    method: StageMethod | None = None,
    precision: str = "fp32",
) -> StageTime:
    """Compute time of a stage on ``device`` (see the module notes for offload).

    ``offload`` (default: ``method.offload``) and ``host_tflops`` (default: the device's)
    override the method's and the device's figures."""
    method = method or StageMethod()
    recompute = recompute or method.recompute
    offload = offload if offload != "none" else method.offload
    w = PRECISIONS[precision][0]
    g = PRECISIONS[precision][1]
    base = list(layers)
    layers = [effective_layer(layer, method) for layer in base]
    scale = device_scale(device, calibrated_tflops)
    if scale is not None and any(layer.fwd_ms > 0 for layer in layers):
        fwd = sum(layer.fwd_ms for layer in layers) * scale
        bwd = sum(layer.bwd_ms for layer in layers) * scale
        opt = sum(layer.opt_ms for layer in layers) * scale
    else:
        flops_per_ms = device.tflops * 1e9
        fwd = sum(layer.fwd_flops for layer in layers) / flops_per_ms
        bwd = sum(layer.bwd_flops for layer in layers) / flops_per_ms
        # AdamW is memory-bound, not a matmul: on a CPU device at its host rate (an embedding's
        # step there can outlast its forward and backward), on an accelerator at its peak
        adam_rate = device.host_tflops if device.accelerator == "cpu" else device.tflops
        opt = ADAM_FLOPS_PER_PARAM * sum(layer.trainable for layer in layers) / (adam_rate * 1e9)
    if recompute:
        bwd += fwd
    if offload != "none":
        trainable = sum(layer.trainable for layer in layers)
        # gradients to the host, the AdamW step on the host CPU ...
        opt = host_link_ms(device, trainable * g)
        opt += ADAM_FLOPS_PER_PARAM * trainable / ((host_tflops or device.host_tflops) * 1e9)
        if offload == "optimizer":  # ... and the updated weights back to the device
            opt += host_link_ms(device, trainable * w)
        else:  # params: the weights live on the host; each forward and backward fetches them
            fetch = host_link_ms(device, sum(weight_bytes(b, e, method, w) for b, e in zip(base, layers, strict=True)))
            fwd += fetch
            bwd += fetch
    return StageTime(fwd, bwd, opt)


def link_ms(topology: Topology, src: str, dst: str, num_bytes: float) -> float:
    """One transfer of ``num_bytes`` from ``src`` to ``dst``: latency + bytes / bandwidth."""
    return topology.transfer_ms(src, dst, num_bytes)


def ring_allreduce_ms(topology: Topology, devices: Sequence[str], num_bytes: float) -> float:
    """A ring all-reduce of ``num_bytes`` over the replicas ``devices``: ``2 (R-1)`` steps,
    each one latency plus ``num_bytes / R`` over the link between the first two replicas
    (every replica sends and receives ``2 (R-1) / R`` of the bytes). Zero for one replica."""
    R = len(devices)
    if R < 2:
        return 0.0
    link = topology.link(devices[0], devices[1])
    return 2 * (R - 1) * (link.latency_ms + num_bytes / R * 8 / (link.bandwidth_mbps * 1e6) * 1e3)
