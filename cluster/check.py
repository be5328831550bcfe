"""`splitlearn cluster check`: which devices of a topology the running cluster holds, where.

Pure functions over node records in the shape of ``ray.nodes()`` (see :mod:`cluster.remote`
for getting them), so the report is testable without a cluster.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cluster.node import LABEL_PREFIX
from cluster.ray_cluster import devices_in_cluster, join_hint
from cluster.tables import render_table
from cluster.topology import Topology

PRESENT, MISSING, TWICE = "present", "MISSING", "TWICE"


@dataclass
class DeviceRow:
    """One device of the topology on one node (or on none: status MISSING)."""

    device: str
    tier: str
    zone: str
    needed: bool
    status: str  # present | MISSING | TWICE (on more than one node: one row per node)
    node_id: str = ""
    address: str = ""
    head: bool = False
    cpus: float = 0.0
    gpus: float = 0.0
    memory_gb: float = 0.0
    note: str = ""


@dataclass
class ClusterReport:
    address: str
    nodes_alive: int
    rows: list[DeviceRow] = field(default_factory=list)
    other_devices: list[str] = field(default_factory=list)  # in the cluster, not in the topology

    @property
    def missing(self) -> list[str]:
        return _unique(r.device for r in self.rows if r.needed and r.status == MISSING)

    @property
    def twice(self) -> list[str]:
        return _unique(r.device for r in self.rows if r.needed and r.status == TWICE)

    @property
    def ok(self) -> bool:
        return not self.missing and not self.twice


def _unique(items) -> list[str]:
    return list(dict.fromkeys(items))


def _label_note(dev_tier: str, dev_zone: str, labels: dict[str, str]) -> str:
    """Where the node's splitlearn labels disagree with the topology (absent labels are fine)."""
    wrong = [
        f"{key}={labels[f'{LABEL_PREFIX}/{key}']} (topology: {want})"
        for key, want in (("tier", dev_tier), ("zone", dev_zone))
        if labels.get(f"{LABEL_PREFIX}/{key}", want) != want
    ]
    return "label " + ", ".join(wrong) if wrong else ""


def build_report(
    topology: Topology, nodes: list[dict[str, Any]], needed: list[str] | None, address: str
) -> ClusterReport:
    """Rows for every device of ``topology``; ``needed`` (default: all of them) are the ones
    whose absence makes the check fail."""
    need = set(topology.device_names if needed is None else needed)
    for name in need:
        topology.device(name)  # an unknown name raises, listing the devices
    present = devices_in_cluster(nodes)
    report = ClusterReport(address=address, nodes_alive=sum(1 for n in nodes if n.get("Alive")))
    for dev in topology.devices:
        where = present.get(dev.name, [])
        if not where:
            report.rows.append(DeviceRow(dev.name, dev.tier, dev.zone, dev.name in need, MISSING))
            continue
        status = PRESENT if len(where) == 1 else TWICE
        for n in where:
            report.rows.append(
                DeviceRow(
                    dev.name,
                    dev.tier,
                    dev.zone,
                    dev.name in need,
                    status,
                    node_id=str(n["node_id"]),
                    address=str(n.get("address") or ""),
                    head=bool(n.get("head")),
                    cpus=float(n.get("cpus", 0)),
                    gpus=float(n.get("gpus", 0)),
                    memory_gb=float(n.get("memory_gb", 0)),
                    note=_label_note(dev.tier, dev.zone, n.get("labels") or {}),
                )
            )
    report.other_devices = sorted(set(present) - set(topology.device_names))
    return report


def _num(x: float) -> str:
    return f"{x:g}"


def format_report(
    report: ClusterReport, topology: Topology, topology_file: str | None = None, head: str | None = None
) -> str:
    """The report as a table (see :mod:`cluster.tables`), then what is wrong and the commands
    that fix it."""
    header = ("device", "tier", "zone", "needed", "status", "node", "address", "CPUs", "GPUs", "mem GB", "note")
    rows: list[tuple[str, ...]] = []
    for r in report.rows:
        on_node = bool(r.node_id)
        rows.append(
            (
                r.device,
                r.tier,
                r.zone,
                "yes" if r.needed else "no",
                r.status,
                (r.node_id[:8] + (" (head)" if r.head else "")) if on_node else "-",
                r.address if on_node else "-",
                _num(r.cpus) if on_node else "-",
                _num(r.gpus) if on_node else "-",
                f"{r.memory_gb:.1f}" if on_node else "-",
                r.note,
            )
        )
    lines = render_table(header, rows, numeric=("CPUs", "GPUs", "mem GB")).splitlines()
    found = sum(1 for d in topology.device_names if any(r.device == d and r.node_id for r in report.rows))
    lines.insert(
        0,
        f"cluster {report.address}: {report.nodes_alive} alive node(s); "
        f"topology '{topology.name}': {found} of {len(topology.devices)} device(s) present",
    )
    if report.other_devices:
        lines.append(f"devices in the cluster but not in this topology: {', '.join(report.other_devices)}")
    for d in report.missing:
        lines.append(f"missing: {d}; on its machine run: {join_hint(d, topology, topology_file, head)}")
    for d in report.twice:
        nodes = ", ".join(r.node_id[:8] for r in report.rows if r.device == d)
        lines.append(f"twice: {d} is on nodes {nodes}; stop it on all but one (splitlearn node stop on that machine)")
    lines.append("ok: every needed device is present once" if report.ok else "not ok: see above")
    return "\n".join(lines)
