"""The machines: topology schema, Ray start/attach, placement of workers on devices."""

from cluster.errors import PlacementError, TopologyError, UserError
from cluster.topology import Device, Link, LinkEntry, LinkTable, Topology, device_resource, load_topology

__all__ = [
    "Device",
    "Link",
    "LinkEntry",
    "LinkTable",
    "PlacementError",
    "Topology",
    "TopologyError",
    "UserError",
    "device_resource",
    "load_topology",
]
