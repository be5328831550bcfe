"""The plan: which device runs which contiguous range of the layer chain.

Plain data with a YAML round-trip and a printed table. Made by a pure function of the
layer costs and the topology (see :mod:`partitioners.planner`); cutting the model is a
separate step that belongs to the product layer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import yaml

from cluster.tables import render_table
from partitioners.schedule import Schedule
from partitioners.schedule import build as build_schedule

DEVICES_WIDTH = 28  # widest "a+b" in the table's device column before "a xR"


@dataclass
class Stage:
    index: int
    start: int  # first chain index (inclusive)
    stop: int  # last chain index (exclusive)
    # one device, or several identical ones as data-parallel replicas: replica r runs
    # micro-batches m with m % len(devices) == r and all-reduces gradients before its STEP
    devices: list[str]
    layer_names: list[str] = field(default_factory=list)
    offload: str = "none"  # DeepSpeed ZeRO offload: none | optimizer | params
    codec: str = "none"
    params: int = 0
    memory_gb: float = 0.0  # predicted peak on the device (each replica's; see costmodel.stage_memory)
    host_memory_gb: float = 0.0  # predicted host RAM for the offloaded state (each replica's)
    fwd_ms: float = 0.0  # predicted, per micro-batch, on this stage's device
    bwd_ms: float = 0.0
    opt_ms: float = 0.0  # predicted optimizer step, once per step (offload: on the host, with transfers)
    allreduce_ms: float = 0.0  # predicted gradient all-reduce among the replicas, before each step
    memory: dict[str, float] = field(default_factory=dict)  # GB by kind: weights, grads, ...
    link_act_ms: float = 0.0  # one activation to the next stage
    link_grad_ms: float = 0.0  # one gradient back from the next stage
    cut_bytes: int = 0  # bytes of one activation (after the codec) sent to the next stage
    method: str = "full"  # how the stage fine-tunes: full | frozen | lora
    recompute: bool = False  # activation checkpointing of each chain layer
    frozen_dtype: str = "fp32"  # storage of the frozen weights: fp32 | bf16 | fp16 | int8
    trainable_params: int | None = None  # what gets gradients and optimizer state (None: all)
    # measured share of the private tokens an attack recovers from what this stage sends to
    # another device (activations at its cut, or, the U's last stage, gradients): None unmeasured
    leak: float | None = None

    @property
    def device(self) -> str:
        return self.devices[0]

    @property
    def num_replicas(self) -> int:
        return len(self.devices)

    @property
    def devices_label(self) -> str:
        """``cloud-c``, ``cloud-c+cloud-d``, or ``cloud-c x4`` when the names get long."""
        joined = "+".join(self.devices)
        return joined if len(joined) <= DEVICES_WIDTH else f"{self.devices[0]} x{len(self.devices)}"

    @property
    def num_layers(self) -> int:
        return self.stop - self.start

    @property
    def method_label(self) -> str:
        """``full``, ``lora``, ``lora+int8+rc``, ...: the method, the compact frozen dtype
        and ``rc`` for recompute."""
        label = (
            self.method
            if self.method == "full" or self.frozen_dtype == "fp32"
            else f"{self.method}+{self.frozen_dtype}"
        )
        return label + ("+rc" if self.recompute else "")


def precision_note(precision: str) -> str:
    """What ``precision`` costs per weight, from the cost model's table, for the plan's footer."""
    from partitioners.costmodel import PRECISIONS

    if precision not in PRECISIONS:
        return ""
    w, g, master, moments = PRECISIONS[precision]
    master_part = f" + {master} B fp32 master" if master else ""
    return f"per trained weight {w} B + {g} B grad{master_part} + {moments} B moments; frozen {w} B"


def federation_note(fed: dict[str, Any]) -> str:
    """The plan table's lines for a split-federated plan: each client's time in a step, the
    shared stages' time for all of them, the round."""
    clients = fed.get("client_ms", {})
    per = ", ".join(f"{c} {ms:.2f}" for c, ms in clients.items())
    return (
        f"federation: {len(clients)} clients share one cut; per client and step (ms): {per}; "
        f"slowest {fed.get('slowest_client')}\nshared stages {fed.get('shared_ms', 0.0):.2f} ms per step for all "
        f"clients; round (FedAvg every {fed.get('rounds_every', 1)} steps) {fed.get('round_ms', 0.0):.2f} ms"
    )


@dataclass
class Plan:
    stages: list[Stage]
    partitioner: str
    schedule: str = "sequential"
    num_micro_batches: int = 1
    label_privacy: bool = False
    precision: str = "fp32"  # train.dtype the memory figures are for (plans written before it: fp32)
    predicted: dict[str, Any] = field(default_factory=dict)  # step_ms, bottleneck, bubble_fraction, ...
    # wires that cross one zone uplink ("link 0->1": "home->cloud"), shared by them in the simulator
    uplinks: dict[str, str] = field(default_factory=dict)
    privacy: str = ""  # what the privacy bound made of the plan, for the footer (splitlearn.privacy)

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def shared_devices(self) -> list[tuple[int, ...]]:
        """Groups of stages on one device (the U-shape's first and last on the data owner)."""
        on: dict[str, list[int]] = {}
        for s in self.stages:
            if len(s.devices) == 1:
                on.setdefault(s.devices[0], []).append(s.index)
        return [tuple(v) for v in on.values() if len(v) > 1]

    @property
    def devices(self) -> list[str]:
        return [d for s in self.stages for d in s.devices]

    @property
    def ranges(self) -> list[tuple[int, int]]:
        return [(s.start, s.stop) for s in self.stages]

    def actions(self) -> Schedule:
        """Each stage's action list for one step: what the workers execute and the simulator
        replays (one source: this plan's ``schedule`` and ``num_micro_batches``)."""
        return build_schedule(self.schedule, self.num_stages, self.num_micro_batches)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        d = dict(d)
        d["stages"] = [Stage(**s) for s in d["stages"]]
        return cls(**d)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> Plan:
        return cls.from_dict(yaml.safe_load(text))

    @property
    def step_ms(self) -> float:
        return float(self.predicted.get("step_ms", 0.0))

    def optimality(self) -> str:
        """What the search proved of this plan: optimal, or how far from the best plan at
        most (``predicted.lower_bound_ms``); empty when it proved nothing."""
        bound = self.predicted.get("lower_bound_ms")
        if bound is None or self.step_ms <= 0:
            return ""
        if self.step_ms <= bound * (1 + 1e-6) + 1e-4:
            return "proven optimal: no plan without replicas has a shorter step"
        return f"within {self.step_ms / bound - 1:.1%} of the best plan (no plan steps under {bound:.2f} ms)"

    def table(self) -> str:
        """The stages as a table (rich boxes on a terminal, plain text in logs: see
        :mod:`cluster.tables`), then the plan's settings and prediction."""
        head: tuple[str, ...] = (
            "stage",
            "device",
            "layers",
            "chain",
            "params",
            "method",
            "mem GB",
            "fwd+bwd ms",
            "link ms",
            "offload",
            "codec",
        )
        rows: list[tuple[str, ...]] = []
        for s in self.stages:
            names = s.layer_names
            span = names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]}" if names else ""
            link = f"{s.link_act_ms:.2f}/{s.link_grad_ms:.2f}" if s.index < len(self.stages) - 1 else "-"
            rows.append(
                (
                    str(s.index),
                    s.devices_label,
                    span,
                    f"[{s.start},{s.stop})",
                    f"{s.params:,}",
                    s.method_label,
                    f"{s.memory_gb:.3f}",
                    f"{s.fwd_ms + s.bwd_ms:.2f}",
                    link,
                    s.offload if s.offload == "none" else f"{s.offload} ({s.host_memory_gb:.3f} GB host)",
                    s.codec,
                )
            )
        if any(s.leak is not None for s in self.stages):
            head = (*head, "leak")
            rows = [(*r, "-" if s.leak is None else f"{s.leak:.0%}") for r, s in zip(rows, self.stages, strict=True)]
        numeric: tuple[str, ...] = ("stage", "params", "mem GB", "fwd+bwd ms", "link ms")
        if head[-1] == "leak":
            numeric = (*numeric, "leak")
        lines = [render_table(head, rows, numeric=numeric)]
        footer = (
            f"partitioner={self.partitioner} schedule={self.schedule} micro_batches={self.num_micro_batches} "
            f"precision={self.precision} ({precision_note(self.precision)})"
        )
        p = self.predicted
        if "step_ms" in p:
            footer += f"\npredicted step {p['step_ms']:.2f} ms, bottleneck {p.get('bottleneck')}, "
            footer += f"bubble {100 * p.get('bubble_fraction', 0):.0f}%"
            sim = p.get("simulated_step_ms")
            if sim is not None and abs(sim - p["step_ms"]) > 1e-3 * max(sim, 1e-9):  # an older plan
                footer += f", simulated {sim:.2f} ms"
            note = self.optimality()
            if note:
                footer += "\n" + note
        measured = p.get("times_measured_on")
        if measured is not None:
            like = p.get("times_measured_like") or {}
            used = {d for s in self.stages for d in s.devices}
            counted = sorted(used - set(measured) - set(like))
            footer += f"\ntimes: measured on {', '.join(measured) or 'no device'} (plan.profile: on_cluster)"
            scaled = [f"{d} from {r}'s" for d, r in like.items() if d in used]
            footer += f"; not on the cluster, scaled by tflops: {', '.join(scaled)}" if scaled else ""
            footer += f"; counted (FLOPs over tflops) on {', '.join(counted)}" if counted else ""
        if p.get("step_overhead_ms"):
            footer += f"\nper step: {p['step_overhead_ms']:.2f} ms outside the stages (the runtime's call to each worker, measured)"
        for host in p.get("shared_cpus") or []:
            devs = ", ".join(host["threads"])
            if sum(host["threads"].values()) > host["cpus"]:
                footer += (
                    f"\ncores shared: {devs} ask {sum(host['threads'].values())} threads of a host's {host['cpus']} "
                    "CPUs; the simulated step stretches their compute where it overlaps"
                )
            side = host.get("side_by_side") or {}
            if side:
                most = {k: max(v.get(k, 0.0) for v in side.values()) for k in ("F", "B", "STEP")}
                figs = ", ".join(f"{k} +{100 * v:.0f}%" for k, v in most.items())
                footer += (
                    f"\nside by side: {', '.join(side)} measured slower per thread computing beside them on their "
                    f"host ({figs}, the most of any); the simulated step stretches their compute where it overlaps"
                )
        if p.get("links_measured"):
            figs = ", ".join(f"{k} {v[0]:.0f} Mbit/s {v[1]:.2f} ms" for k, v in p["links_measured"].items())
            footer += f"\nlinks: measured {figs} (a transfer is no faster than this, whatever the topology says)"
        if "federation" in p:
            footer += "\n" + federation_note(p["federation"])
        turns = p.get("sequential_clients")
        if turns:
            footer += (
                f"\nsequential split learning: {turns} clients take turns, one client's batch a step; the figures "
                "are one turn's (the hand-on of the front through the cloud is not costed)"
            )
        if self.label_privacy:
            footer += "\nlabel_privacy: the head runs on the data owner (U-shaped split)"
        if self.privacy:
            footer += "\n" + self.privacy
        if any(s.num_replicas > 1 for s in self.stages[1 if "federation" in p or turns else 0 :]):
            footer += (
                "\na+b: replicas of one stage (micro-batch m on replica m % R; gradients all-reduced before the step)"
            )
        if any(s.method != "full" or s.recompute for s in self.stages):
            footer += "\nmethod: full | frozen | lora, +bf16/fp16/int8: frozen weights stored so, +rc: recompute"
        return "\n".join([*lines, footer])
