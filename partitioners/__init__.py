"""Pure planning: layer profiles, cost model, partitioners, plan type, schedules. No Ray."""

from partitioners.plan import Plan, Stage
from partitioners.planner import (
    PARTITIONERS,
    PlanError,
    PlanRequest,
    default_device_order,
    partition,
    uniform_cuts,
)
from partitioners.profile import LayerProfile, ModelProfile, calibrate_tflops, profile_chain

__all__ = [
    "PARTITIONERS",
    "LayerProfile",
    "ModelProfile",
    "Plan",
    "PlanError",
    "PlanRequest",
    "Stage",
    "calibrate_tflops",
    "default_device_order",
    "partition",
    "profile_chain",
    "uniform_cuts",
]
