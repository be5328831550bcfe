"""The plan: which device runs which contiguous range of the layer chain.

Plain data with a YAML round-trip and a printed table. Made by a pure function of the
layer costs and the topology (see :mod:`partitioners.simple`); cutting the model is a
separate step that belongs to the product layer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import yaml

from partitioners.profile import LayerProfile

LayerCost = LayerProfile  # the planner's view of a layer: counts, and times once profiled

OFFLOAD_MODES = ("none", "optimizer", "params")
CODECS = ("none",)


@dataclass
class Stage:
    index: int
    start: int  # first chain index (inclusive)
    stop: int  # last chain index (exclusive)
    devices: list[str]  # one device, or several identical ones as replicas
    layer_names: list[str] = field(default_factory=list)
    offload: str = "none"
    codec: str = "none"
    params: int = 0
    memory_gb: float = 0.0  # predicted: weights + gradients + optimizer state

    @property
    def device(self) -> str:
        return self.devices[0]

    @property
    def num_layers(self) -> int:
        return self.stop - self.start


@dataclass
class Plan:
    stages: list[Stage]
    partitioner: str
    schedule: str = "sequential"
    num_micro_batches: int = 1
    predicted: dict[str, Any] = field(default_factory=dict)

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def devices(self) -> list[str]:
        return [d for s in self.stages for d in s.devices]

    @property
    def ranges(self) -> list[tuple[int, int]]:
        return [(s.start, s.stop) for s in self.stages]

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

    def table(self) -> str:
        """A fixed-width table of the stages, for terminals and logs."""
        head = ("stage", "device", "layers", "chain", "params", "mem GB", "offload", "codec")
        rows = [head]
        for s in self.stages:
            names = s.layer_names
            span = names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]}" if names else ""
            rows.append(
                (
                    str(s.index),
                    ",".join(s.devices),
                    span,
                    f"[{s.start},{s.stop})",
                    f"{s.params:,}",
                    f"{s.memory_gb:.3f}",
                    s.offload,
                    s.codec,
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        footer = f"partitioner={self.partitioner} schedule={self.schedule} micro_batches={self.num_micro_batches}"
        return "\n".join([*lines, footer])
