"""What a plan is asked for: the model's layers, the topology, the schedule and the
choices a partitioner may make; the names and groups shared by every search."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cluster.errors import UserError
from cluster.topology import Device, Topology
from partitioners.choices import ALLOW_OPTIONS, OFFLOAD_PRECISIONS
from partitioners.costmodel import (
    FinetunePolicy,
    StageMemory,
    StageMethod,
    stage_memory,
    stage_options,
    with_offload,
)
from partitioners.profile import LayerProfile

GB = 1e9


class PlanError(UserError):
    """No valid plan for this model on this topology."""


CODEC_BYTES = {"none": 1.0, "fp16": 0.5, "bf16": 0.5, "int8": 0.25}  # of fp32 activation bytes


@dataclass
class PlanRequest:
    layers: list[LayerProfile]
    topology: Topology
    num_micro_batches: int = 1
    schedule: str = "sequential"
    devices: list[str] | None = None  # the order (uniform, balanced, manual) or the candidates
    cuts: list[int] | None = None  # manual only
    label_privacy: bool = False
    precision: str = "fp32"
    calibrated_tflops: float | None = None
    codec: str = "none"
    finetune: FinetunePolicy | None = None  # None: every stage full
    allow: tuple[str, ...] = ()  # options the planner may pick for edge stages
    replicate: bool = True  # optimal may replicate its bottleneck stage on free identical devices
    search_seconds: float = 10.0  # optimal's time budget (then it stops with a proven bound)
    # the layers as a device runs them, where that differs from ``layers``: counted as a CPU
    # runs them (``layers`` then count attention as CUDA runs it), or timed on the device
    device_layers: dict[str, list[LayerProfile]] | None = None
    measured_on: frozenset[str] = frozenset()  # devices whose ``device_layers`` times were measured there
    # devices not measured that take a measured one's times (``device_layers``) scaled by
    # the ratio of their ``tflops``: the prior, at the efficiency the measured device achieved
    measured_like: dict[str, str] = field(default_factory=dict)
    # per step, what the runtime spends outside every stage's actions (the driver's call to
    # each worker and back, the worker's memory readings): measured with ``measured_on``
    step_overhead_ms: float = 0.0
    # hosts whose devices ask for more threads than it has CPUs, or whose CPU devices were
    # timed slower side by side (measured with ``measured_on``): ``{"cpus": n, "threads":
    # {device: cpu_threads}}`` each, with ``"side_by_side": {device: {kind: k}}`` where measured
    # (splitlearn.device_profile.side_by_side); the simulated step shares their cores and memory
    shared_cpus: list[dict[str, Any]] = field(default_factory=list)
    # counted on every CPU stage besides its tensors: what the workers' libraries keep
    # (splitlearn's runtime: costmodel.CPU_RUNTIME_BYTES)
    cpu_runtime_bytes: float = 0.0
    # privacy (splitlearn.privacy measures it): with more than one stage, the data owner's
    # first stage holds at least this many chain layers (1: the embedding), and under
    # ``label_privacy`` its last stage at least ``min_owner_tail`` (1: the head)
    min_owner_front: int = 1
    min_owner_tail: int = 1
    privacy_why: str = ""  # which bound set them, for error lines ("privacy.max_token_recovery=0.05")
    # split-federated: the data-owning clients whose replicas make the first stage (each its own
    # data, heterogeneous devices allowed; the stage's costs are its slowest client's)
    clients: tuple[str, ...] = ()
    rounds_every: int = 1  # FedAvg every this many steps (the plan table's round time)

    @property
    def n(self) -> int:
        return len(self.layers)

    @property
    def pool(self) -> list[str]:
        """The candidate devices: ``devices`` (groups ``a+b`` taken apart) or the topology's."""
        return [d for entry in (self.devices or self.topology.device_names) for d in entry.split(REPLICA_SEP)]

    def __post_init__(self) -> None:
        bad = [a for a in self.allow if a not in ALLOW_OPTIONS]
        if bad:
            raise PlanError(f"plan.allow: '{bad[0]}' is not one of {', '.join(ALLOW_OPTIONS)}")
        self.allow = tuple(self.allow)

    def layers_on(self, device: str) -> list[LayerProfile]:
        """The layers' costs as ``device`` runs them (``device_layers``, else ``layers``)."""
        return (self.device_layers or {}).get(device, self.layers)

    def calibrated_for(self, device: str) -> float | None:
        """The FLOP/s the layers' times were measured at, as seen from ``device``: its own
        ``tflops`` where they were measured on it (the times count as they are), the measured
        device's it takes its times from (``measured_like``)."""
        if device in self.measured_on:
            return self.topology.device(device).tflops
        if device in self.measured_like:
            return self.topology.device(self.measured_like[device]).tflops
        return self.calibrated_tflops

    def runtime_bytes(self, device: str) -> float:
        """What a worker on ``device`` keeps besides its stage's tensors."""
        return self.cpu_runtime_bytes if self.topology.device(device).accelerator == "cpu" else 0.0

    def stage_memory(
        self, a: int, b: int, stage: int, num_stages: int, method: StageMethod, device: str
    ) -> StageMemory:
        """:func:`~partitioners.costmodel.stage_memory` of layers ``a..b-1`` as stage ``stage``
        of ``num_stages`` on ``device`` under this request's schedule, micro-batches and precision."""
        return stage_memory(
            self.layers_on(device)[a:b],
            runtime_bytes=self.runtime_bytes(device),
            stage=stage,
            num_stages=num_stages,
            schedule=self.schedule,
            num_micro_batches=self.num_micro_batches,
            precision=self.precision,
            method=method,
        )

    def options(self, stage: int, device: str) -> list[StageMethod]:
        """The methods stage ``stage`` may use on ``device``: the configured one first, then
        ``allow``'s variants (edge devices), then each with every offload mode (cuda devices)
        unless the config sets the stage's offload itself (a configured offload is kept) or the
        precision keeps bf16 weights, which offload does not run with."""
        dev = self.topology.device(device)
        base = (self.finetune or FinetunePolicy()).for_stage(stage, dev.tier)
        opts = stage_options(base, self.allow) if dev.tier == "edge" else [base]
        offer = dev.accelerator == "cuda" and base.offload == "none" and self.precision in OFFLOAD_PRECISIONS
        return with_offload(opts) if offer else opts


REPLICA_SEP = "+"  # a plan.devices entry "cloud-c+cloud-d": one stage replicated on both


IDENTICAL_FIELDS = ("accelerator", "memory_gb", "host_budget_gb", "tflops", "cpu_threads", "tier")


def identical(a: Device, b: Device) -> bool:
    """Whether ``a`` and ``b`` may hold replicas of one stage: the same kind, memory, host
    memory, speed and threads (their zones and links may differ)."""
    return all(getattr(a, f) == getattr(b, f) for f in IDENTICAL_FIELDS)


def difference(a: Device, b: Device) -> str:
    f = next(f for f in IDENTICAL_FIELDS if getattr(a, f) != getattr(b, f))
    return f"{f} {getattr(a, f)} vs {getattr(b, f)}"


Groups = list[tuple[str, ...]]  # per stage: its device, or its replicas' devices


def groups_of(seq: list[str], groups: Groups | None) -> Groups:
    return list(groups) if groups else [(d,) for d in seq]


def group_name(group: tuple[str, ...]) -> str:
    return REPLICA_SEP.join(group)


def default_device_order(topology: Topology) -> list[str]:
    """The data owner first, then the other devices as the topology lists them."""
    owner = topology.data_owner.name
    return [owner] + [n for n in topology.device_names if n != owner]


def owner_layers_check(req: PlanRequest, bounds: list[int]) -> str | None:
    """Why these stage bounds keep fewer chain layers on the data owner than the privacy
    minimums ask (:attr:`PlanRequest.min_owner_front`, :attr:`PlanRequest.min_owner_tail`), or None."""
    if len(bounds) <= 2:
        return None  # one stage: nothing leaves the owner
    why = f" ({req.privacy_why})" if req.privacy_why else ""
    if bounds[1] < req.min_owner_front:
        return (
            f"privacy: the data owner's first stage must hold at least {req.min_owner_front} chain layers "
            f"({req.layers[0].name}..{req.layers[req.min_owner_front - 1].name}){why}, got {bounds[1]}"
        )
    if req.label_privacy and bounds[-1] - bounds[-2] < req.min_owner_tail:
        return (
            f"privacy: the data owner's last stage must hold at least {req.min_owner_tail} chain layers "
            f"({req.layers[req.n - req.min_owner_tail].name}..{req.layers[-1].name}){why}, "
            f"got {bounds[-1] - bounds[-2]}"
        )
    return None


def closed_sequence(req: PlanRequest, devices: list[str]) -> list[str]:
    return [*devices, devices[0]] if req.label_privacy else list(devices)


def uniform_cuts(num_layers: int, num_stages: int) -> list[int]:
    """Start index of stages 1..k-1 so that layer counts differ by at most one (earlier
    stages take the extra layers)."""
    base, extra = divmod(num_layers, num_stages)
    cuts, pos = [], 0
    for s in range(num_stages - 1):
        pos += base + (1 if s < extra else 0)
        cuts.append(pos)
    return cuts
