"""Cost model: the memory and time of a stage on a device, and the time of a link.

Memory of a stage in training (bytes), on the device and on its host:

- weights, gradients and optimizer state by precision (AdamW: two fp32 moments, plus an
  fp32 master copy when the weights themselves are 16-bit);
- activations saved for backward, per micro-batch, times the micro-batches in flight for
  the schedule (sequential: 1, GPipe: all M, 1F1B: at most the stages from this one to
  the last); with activation recompute only each micro-batch's input is held, plus one
  layer's saved activations while it is recomputed;
- transfer buffers: one activation in and out, one gradient in and out;
- ZeRO offload: ``optimizer`` moves optimizer state and the fp32 gradient copy to host
  memory; ``params`` moves the weights too, keeping the largest layer's on the device
  while it runs.

Time: a layer's measured forward/backward time on the profiling machine, scaled by the
ratio of that machine's calibrated FLOP/s to the device's; without a measurement, FLOPs
over the device's FLOP/s. A link costs latency plus bytes over bandwidth, per direction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from cluster.topology import Device, Topology
from partitioners.profile import LayerProfile

# bytes per parameter: weight, gradient, fp32 master copy, optimizer moments
PRECISIONS: dict[str, tuple[int, int, int, int]] = {
    "fp32": (4, 4, 0, 8),
    "bf16": (4, 4, 0, 8),  # autocast: fp32 weights; 16-bit copies show up in saved activations
    "bf16-master": (2, 2, 4, 8),  # 16-bit weights and gradients, fp32 master and moments
}
SCHEDULE_NAMES = ("sequential", "gpipe", "1f1b")
OFFLOAD_MODES = ("none", "optimizer", "params")
GB = 1e9


def micro_batches_in_flight(schedule: str, stage: int, num_stages: int, num_micro_batches: int) -> int:
    """Most micro-batches whose activations a stage holds at once."""
    if schedule == "sequential":
        return 1
    if schedule == "gpipe":
        return num_micro_batches
    if schedule == "1f1b":
        return min(num_micro_batches, num_stages - stage)
    raise ValueError(f"unknown schedule '{schedule}' (known: {', '.join(SCHEDULE_NAMES)})")


@dataclass
class StageMemory:
    """Bytes of a stage, on its device and on its host."""

    weights: float = 0.0
    grads: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0
    buffers: float = 0.0
    host: float = 0.0  # offloaded state in host memory

    @property
    def device_total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations + self.buffers

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
) -> StageMemory:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision '{precision}' (known: {', '.join(PRECISIONS)})")
    if offload not in OFFLOAD_MODES:
        raise ValueError(f"unknown offload '{offload}' (known: {', '.join(OFFLOAD_MODES)})")
    w, g, master, moments = PRECISIONS[precision]
    params = sum(layer.params for layer in layers)
    trainable = sum(layer.trainable for layer in layers)
    mem = StageMemory(
        weights=params * w,
        grads=trainable * g,
        optimizer=trainable * (master + moments),
    )
    inflight = micro_batches_in_flight(schedule, stage, num_stages, num_micro_batches)
    if layers:
        # each micro-batch in flight also keeps its output until its backward
        out = layers[-1].out_bytes
        if recompute:
            held = layers[0].in_bytes
            mem.activations = inflight * (held + out) + max(layer.saved_bytes for layer in layers)
        else:
            mem.activations = inflight * (sum(layer.saved_bytes for layer in layers) + out)
        # during a backward: the incoming and outgoing gradient, and the layer's temporaries
        mem.buffers = layers[0].in_bytes + out + max(layer.bwd_transient_bytes for layer in layers)
    if offload in ("optimizer", "params"):
        mem.host += mem.optimizer + trainable * 4  # fp32 gradient copy for the CPU step
        mem.optimizer = 0.0
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


def stage_time(
    layers: Sequence[LayerProfile],
    device: Device,
    calibrated_tflops: float | None = None,
    *,
    recompute: bool = False,
    offload: str = "none",
    host_tflops: float | None = None,
) -> StageTime:
    scale = device_scale(device, calibrated_tflops)
    measured = scale is not None and any(layer.fwd_ms > 0 for layer in layers)
    if measured:
        fwd = sum(layer.fwd_ms for layer in layers) * scale
        bwd = sum(layer.bwd_ms for layer in layers) * scale
        opt = sum(layer.opt_ms for layer in layers) * scale
    else:
        flops_per_ms = device.tflops * 1e9
        fwd = sum(layer.fwd_flops for layer in layers) / flops_per_ms
        bwd = sum(layer.bwd_flops for layer in layers) / flops_per_ms
        opt = 0.0
    if recompute:
        bwd += fwd
    if offload != "none" and host_tflops:
        # the optimizer step runs on the host CPU: AdamW is ~12 flops per parameter
        opt = 12 * sum(layer.trainable for layer in layers) / (host_tflops * 1e9)
    return StageTime(fwd, bwd, opt)


def link_ms(topology: Topology, src: str, dst: str, num_bytes: float) -> float:
    """One transfer of ``num_bytes`` from ``src`` to ``dst``: latency + bytes / bandwidth."""
    return topology.transfer_ms(src, dst, num_bytes)
