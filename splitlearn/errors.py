"""The product's errors. A ``UserError`` is printed as one line with exit code 2.

Every one of them pickles (a worker's error reaches the driver through Ray): an error whose
``__init__`` takes other than one message defines ``__reduce__``.
"""

from __future__ import annotations

from cluster.errors import PlacementError, TopologyError, UserError
from partitioners.planner import PlanError


class ConfigError(UserError):
    """The run config is missing, malformed or has a bad value; the message names the key."""


class ModelError(UserError):
    """The model cannot be built or split as asked."""


class DataError(UserError):
    """The data file is missing or cannot be read as asked."""


class OutputError(UserError):
    """A file the user asked for cannot be written where they asked (a directory, no such directory)."""


class MemoryBudgetError(UserError):
    """A stage held more memory than its device has (``memory_gb``): the run stops, named."""


class StageFailed(RuntimeError):
    """A stage worker failed during a step. Not a user error: it carries the traceback."""

    def __init__(self, stage: int, device: str, step: int, action: str, cause: str):
        self.stage, self.device, self.step, self.action, self.cause = stage, device, step, action, cause
        super().__init__(f"stage {stage} on device '{device}' failed at step {step}, action {action}: {cause}")

    def __reduce__(self) -> tuple[type[StageFailed], tuple[int, str, int, str, str]]:
        """Pickled with its five arguments (the default passes only the message), so that it
        crosses the Ray boundary from a worker to the driver's restart path."""
        return (type(self), (self.stage, self.device, self.step, self.action, self.cause))


__all__ = [
    "ConfigError",
    "DataError",
    "MemoryBudgetError",
    "ModelError",
    "OutputError",
    "PlacementError",
    "PlanError",
    "StageFailed",
    "TopologyError",
    "UserError",
]
