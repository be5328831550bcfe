"""The worker side of a run: one :class:`StageWorker` per stage replica (see its module)."""

from splitlearn.stage.worker import StageWorker

__all__ = ["StageWorker"]
