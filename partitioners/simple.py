"""The first partitioners: ``uniform`` (equal layer counts) and ``manual`` (cuts from the
config), both checked against the same constraints:

- the first stage runs on a data-owning device, so raw inputs never leave it;
- every stage gets at least one layer and a device of the topology, each device once;
- every stage's weights, gradients and AdamW state fit its device's memory.

The memory figure here is the static part only (4 bytes of weight, 4 of gradient and 8 of
AdamW moments per fp32 parameter); activations and offload come with the cost model.
"""

from __future__ import annotations

from cluster.errors import UserError
from cluster.topology import Topology
from partitioners.plan import LayerCost, Plan, Stage

BYTES_PER_TRAINABLE_PARAM = 4 + 4 + 8  # fp32 weight, gradient, two AdamW moments
BYTES_PER_FROZEN_PARAM = 4


class PlanError(UserError):
    """No valid plan for this model on this topology."""


def static_memory_gb(layers: list[LayerCost]) -> float:
    total = 0
    for layer in layers:
        total += layer.trainable * BYTES_PER_TRAINABLE_PARAM
        total += (layer.params - layer.trainable) * BYTES_PER_FROZEN_PARAM
    return total / 1e9


def default_device_order(topology: Topology) -> list[str]:
    """The data owner first, then the other devices as the topology lists them."""
    owner = topology.data_owner.name
    return [owner] + [n for n in topology.device_names if n != owner]


def uniform_cuts(num_layers: int, num_stages: int) -> list[int]:
    """Start index of stages 1..k-1 so that layer counts differ by at most one (earlier
    stages take the extra layers)."""
    base, extra = divmod(num_layers, num_stages)
    cuts, pos = [], 0
    for s in range(num_stages - 1):
        pos += base + (1 if s < extra else 0)
        cuts.append(pos)
    return cuts


def plan_from_cuts(
    layers: list[LayerCost],
    topology: Topology,
    devices: list[str],
    cuts: list[int],
    partitioner: str,
    num_micro_batches: int = 1,
    schedule: str = "sequential",
) -> Plan:
    n = len(layers)
    if not devices:
        raise PlanError("plan.devices: no devices to place stages on")
    for d in devices:
        topology.device(d)  # raises naming the device and the topology's devices
    if len(set(devices)) != len(devices):
        raise PlanError(f"plan.devices: a device is used twice: {devices}")
    if len(cuts) != len(devices) - 1:
        raise PlanError(f"plan.cuts: {len(devices)} stages need {len(devices) - 1} cuts, got {len(cuts)}")
    bounds = [0, *cuts, n]
    for i in range(len(bounds) - 1):
        if not bounds[i] < bounds[i + 1]:
            raise PlanError(
                f"plan.cuts: {cuts} must be strictly increasing within 1..{n - 1} "
                f"(the chain has {n} layers: embed=0, blocks 1..{n - 2}, head={n - 1})"
            )
    first = topology.device(devices[0])
    if not first.owns_data:
        owners = [d.name for d in topology.devices if d.owns_data]
        raise PlanError(
            f"plan.devices: the first stage runs the embedding on the raw inputs, so it must be on a "
            f"data-owning device ({', '.join(owners)}), not '{devices[0]}'"
        )
    stages = []
    for i, dev in enumerate(devices):
        a, b = bounds[i], bounds[i + 1]
        seg = layers[a:b]
        mem = static_memory_gb(seg)
        budget = topology.device(dev).memory_gb
        if mem > budget:
            raise PlanError(
                f"stage {i} ({seg[0].name}..{seg[-1].name}) needs {mem:.2f} GB for weights, gradients "
                f"and AdamW state, but device '{dev}' has memory_gb={budget:g}; "
                "use more devices, other cuts, or bigger devices"
            )
        stages.append(
            Stage(
                index=i,
                start=a,
                stop=b,
                devices=[dev],
                layer_names=[layer.name for layer in seg],
                params=sum(layer.params for layer in seg),
                memory_gb=round(mem, 6),
            )
        )
    return Plan(
        stages=stages,
        partitioner=partitioner,
        schedule=schedule,
        num_micro_batches=num_micro_batches,
    )


def uniform(layers: list[LayerCost], topology: Topology, devices: list[str] | None = None, **kw) -> Plan:
    devices = list(devices or default_device_order(topology))
    if len(devices) > len(layers):
        raise PlanError(
            f"plan.devices: {len(devices)} devices but the model has only {len(layers)} layers to "
            "share; list fewer devices in plan.devices"
        )
    return plan_from_cuts(layers, topology, devices, uniform_cuts(len(layers), len(devices)), "uniform", **kw)


def manual(layers: list[LayerCost], topology: Topology, devices: list[str], cuts: list[int], **kw) -> Plan:
    return plan_from_cuts(layers, topology, list(devices), list(cuts), "manual", **kw)


PARTITIONERS = {"uniform": uniform, "manual": manual}
