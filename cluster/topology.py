"""Device topology: the machines a run may use and the links between them.

A topology is plain data, loaded from YAML through omegaconf's structured configs so that
unknown keys and wrong types fail with the key's name. It knows nothing of models or plans:
a plan refers to devices by name.

Links are looked up most specific first: a device pair, then a zone pair, then the
default. Each entry is symmetric (the same figures in both directions) unless it gives
``reverse_bandwidth_mbps``, which then applies from ``b`` to ``a``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, OmegaConf

from cluster.conf import load_yaml_file, number_problem, to_typed
from cluster.errors import TopologyError

TIERS = ("edge", "cloud")
ACCELERATORS = ("cpu", "cuda")
RESOURCE_PREFIX = "splitlearn/device:"


@dataclass
class Device:
    """One machine (or one accelerator of a machine) that can run a stage."""

    name: str = MISSING
    tier: str = "edge"  # edge | cloud
    accelerator: str = "cpu"  # cpu | cuda
    memory_gb: float = MISSING  # memory the stage may use on its accelerator (RAM for cpu)
    host_memory_gb: float = 0.0  # host RAM for offload; 0 means "same as memory_gb" for cpu
    tflops: float = MISSING  # sustained dense fp32 (cpu) or bf16 (cuda) TFLOP/s
    zone: str = "default"
    owns_data: bool = False
    cpu_threads: int = 1  # torch threads for this device's worker
    gpus: float = 0.0  # GPUs the worker asks Ray for (cuda devices on a real cluster)
    # ZeRO offload (a stage's optimizer state, and at ``params`` its weights, in host RAM):
    # sustained TFLOP/s of the host CPU running the AdamW step, counted as 12 flops per
    # parameter: measured 0.004 with DeepSpeedCPUAdam on an H200 host's 16 cores (283M
    # parameters: 0.78 s of host step per training step, bench/results/offload-gpu.json),
    # and the host<->accelerator link (PCIe 4 x16: ~25 GB/s = 200 Gbit/s pinned) in gigabits
    # per second, the unit of ``bandwidth_mbps`` times 1000. Unused by cpu devices (no link).
    host_tflops: float = 0.004
    host_link_gbps: float = 200.0

    @property
    def resource(self) -> str:
        return device_resource(self.name)

    @property
    def host_budget_gb(self) -> float:
        return self.host_memory_gb or self.memory_gb


@dataclass
class Link:
    """Figures of a link: bandwidth in megabits per second, one-way latency in ms."""

    bandwidth_mbps: float = 1000.0
    latency_ms: float = 1.0


@dataclass
class LinkEntry:
    """A link between two zones (zone table) or two devices (pair table)."""

    a: str = MISSING
    b: str = MISSING
    bandwidth_mbps: float = MISSING
    latency_ms: float = MISSING
    reverse_bandwidth_mbps: float | None = None  # from b to a, when the link is asymmetric


@dataclass
class LinkTable:
    default: Link = field(default_factory=Link)
    zones: list[LinkEntry] = field(default_factory=list)
    pairs: list[LinkEntry] = field(default_factory=list)


@dataclass
class Topology:
    name: str = "topology"
    devices: list[Device] = field(default_factory=list)
    links: LinkTable = field(default_factory=LinkTable)
    # what a transfer between two devices' hosts measured (``plan.profile: on_cluster``), by
    # "src->dst": a transfer there is no faster than this, whatever the links above say
    measured: dict[str, Link] = field(default_factory=dict)

    # -- lookups -------------------------------------------------------------------------
    def device(self, name: str) -> Device:
        for d in self.devices:
            if d.name == name:
                return d
        raise TopologyError(
            f"device '{name}' is not in topology '{self.name}' (devices: {', '.join(self.device_names)})"
        )

    @property
    def device_names(self) -> list[str]:
        return [d.name for d in self.devices]

    @property
    def data_owner(self) -> Device:
        owners = [d for d in self.devices if d.owns_data]
        return owners[0]

    def without(self, names: list[str] | set[str]) -> Topology:
        """The same topology with devices ``names`` removed (and their pair links)."""
        gone = set(names)
        topo = Topology(
            name=self.name,
            devices=[d for d in self.devices if d.name not in gone],
            links=LinkTable(
                default=self.links.default,
                zones=list(self.links.zones),
                pairs=[e for e in self.links.pairs if e.a not in gone and e.b not in gone],
            ),
            measured={k: v for k, v in self.measured.items() if not set(k.split("->")) & gone},
        )
        validate_topology(topo, f"topology '{self.name}' without {', '.join(sorted(gone))}")
        return topo

    def link(self, src: str, dst: str) -> Link:
        """Figures for a transfer from device ``src`` to device ``dst``."""
        if src == dst:
            return Link(bandwidth_mbps=math.inf, latency_ms=0.0)
        declared = self._declared(src, dst)
        got = self.measured.get(f"{src}->{dst}")
        if got is None:
            return declared
        return Link(min(declared.bandwidth_mbps, got.bandwidth_mbps), max(declared.latency_ms, got.latency_ms))

    def _declared(self, src: str, dst: str) -> Link:
        a, b = self.device(src), self.device(dst)
        for entry in self.links.pairs:
            hit = _match(entry, a.name, b.name)
            if hit is not None:
                return hit
        for entry in self.links.zones:
            hit = _match(entry, a.zone, b.zone)
            if hit is not None:
                return hit
        return Link(self.links.default.bandwidth_mbps, self.links.default.latency_ms)

    def uplink(self, src: str, dst: str) -> str | None:
        """The zone uplink a transfer from ``src`` to ``dst`` crosses (``home->cloud``), shared by
        every transfer between the two zones in that direction; None for a transfer inside a
        zone or over a link of its own (a device pair entry)."""
        a, b = self.device(src), self.device(dst)
        if a.zone == b.zone or any(_match(e, a.name, b.name) is not None for e in self.links.pairs):
            return None
        return f"{a.zone}->{b.zone}"

    def transfer_ms(self, src: str, dst: str, num_bytes: float) -> float:
        link = self.link(src, dst)
        if math.isinf(link.bandwidth_mbps):
            return 0.0
        return link.latency_ms + num_bytes * 8 / (link.bandwidth_mbps * 1e6) * 1e3


def _match(entry: LinkEntry, x: str, y: str) -> Link | None:
    if (entry.a, entry.b) == (x, y):
        return Link(entry.bandwidth_mbps, entry.latency_ms)
    if (entry.a, entry.b) == (y, x):
        bw = entry.reverse_bandwidth_mbps or entry.bandwidth_mbps
        return Link(bw, entry.latency_ms)
    return None


def device_resource(name: str) -> str:
    """Name of the Ray custom resource that marks the node holding device ``name``."""
    return f"{RESOURCE_PREFIX}{name}"


# -- loading and validation --------------------------------------------------------------


def topology_from_container(data: Any, source: str = "<inline>") -> Topology:
    """Build a typed Topology from a dict/DictConfig, with errors that name key and source."""
    if OmegaConf.is_config(data):
        data = OmegaConf.to_container(data, resolve=True)
    if not isinstance(data, dict):
        raise TopologyError(f"{source}: topology: expected a mapping with 'devices' and 'links'")
    data = dict(data)
    devices = data.pop("devices", None) or []
    links = dict(data.pop("links", None) or {})
    if not isinstance(devices, list):
        raise TopologyError(f"{source}: topology.devices: expected a list of devices")
    typed_devices = [
        to_typed(Device, d, prefix=f"topology.devices[{i}]", source=source, error=TopologyError)
        for i, d in enumerate(devices)
    ]
    tables = {}
    for table in ("zones", "pairs"):
        entries = links.pop(table, None) or []
        if not isinstance(entries, list):
            raise TopologyError(f"{source}: topology.links.{table}: expected a list")
        tables[table] = [
            to_typed(LinkEntry, e, prefix=f"topology.links.{table}[{i}]", source=source, error=TopologyError)
            for i, e in enumerate(entries)
        ]
    default = to_typed(
        Link, links.pop("default", None), prefix="topology.links.default", source=source, error=TopologyError
    )
    if links:
        bad = sorted(links)[0]
        raise TopologyError(f"{source}: topology.links.{bad}: unknown key (known: default, zones, pairs)")
    top = to_typed(Topology, data, prefix="topology", source=source, error=TopologyError)
    top.devices = typed_devices
    top.links = LinkTable(default=default, zones=tables["zones"], pairs=tables["pairs"])
    validate_topology(top, source)
    return top


def load_topology(path: str | Path) -> Topology:
    p = Path(path)
    raw: Any = load_yaml_file(p, "topology file", TopologyError)
    if "name" not in raw:
        raw["name"] = p.stem
    return topology_from_container(raw, str(p))


def validate_topology(topo: Topology, source: str = "<inline>") -> None:
    def fail(key: str, msg: str) -> None:
        raise TopologyError(f"{source}: topology.{key}: {msg}")

    if not topo.devices:
        fail("devices", "no devices defined; add at least one device")
    seen: set[str] = set()
    zones = set()
    for i, d in enumerate(topo.devices):
        k = f"devices[{i}]"
        if not d.name or not all(c.isalnum() or c in "-_." for c in d.name):
            fail(f"{k}.name", f"'{d.name}' must be non-empty letters, digits, '-', '_' or '.'")
        if d.name in seen:
            fail(f"{k}.name", f"device '{d.name}' is defined twice")
        seen.add(d.name)
        zones.add(d.zone)
        if d.tier not in TIERS:
            fail(f"{k}.tier", f"'{d.tier}' is not one of {', '.join(TIERS)}")
        if d.accelerator not in ACCELERATORS:
            fail(f"{k}.accelerator", f"'{d.accelerator}' is not one of {', '.join(ACCELERATORS)}")
        # (field, lowest value, whether the lowest itself is excluded)
        for name, low, strict in (
            ("memory_gb", 0, True),
            ("host_memory_gb", 0, False),
            ("tflops", 0, True),
            ("cpu_threads", 1, False),
            ("gpus", 0, False),
            ("host_tflops", 0, True),
            ("host_link_gbps", 0, True),
        ):
            problem = number_problem(getattr(d, name), low, strict)
            if problem:
                fail(f"{k}.{name}", problem)
    if not any(d.owns_data for d in topo.devices):
        fail("devices", "no device has owns_data: true; mark the edge device that holds the data")
    for table in ("zones", "pairs"):
        names = zones if table == "zones" else seen
        for i, e in enumerate(getattr(topo.links, table)):
            k = f"links.{table}[{i}]"
            for end in ("a", "b"):
                if getattr(e, end) not in names:
                    what = "zone" if table == "zones" else "device"
                    fail(
                        f"{k}.{end}",
                        f"unknown {what} '{getattr(e, end)}' (known: {', '.join(sorted(names))})",
                    )
            _check_link(fail, k, e.bandwidth_mbps, e.latency_ms, e.reverse_bandwidth_mbps)
    _check_link(fail, "links.default", topo.links.default.bandwidth_mbps, topo.links.default.latency_ms, None)
    for key, link in topo.measured.items():
        ends = key.split("->")
        if len(ends) != 2 or any(end not in seen for end in ends):
            fail(f"measured.{key}", f"expected 'SRC->DST' naming two devices (known: {', '.join(sorted(seen))})")
        _check_link(fail, f"measured.{key}", link.bandwidth_mbps, link.latency_ms, None)


def _check_link(fail: Any, key: str, bandwidth_mbps: float, latency_ms: float, reverse_mbps: float | None) -> None:
    for name, value, strict in (
        ("bandwidth_mbps", bandwidth_mbps, True),
        ("latency_ms", latency_ms, False),
        ("reverse_bandwidth_mbps", reverse_mbps, True),
    ):
        problem = None if value is None else number_problem(value, 0, strict)
        if problem:
            fail(f"{key}.{name}", problem)
