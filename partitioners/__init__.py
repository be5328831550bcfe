"""Pure planning: layer costs, partition algorithms and the plan data type. No Ray."""

from partitioners.plan import LayerCost, Plan, Stage
from partitioners.profile import LayerProfile, ModelProfile, calibrate_tflops, profile_chain
from partitioners.simple import PARTITIONERS, PlanError, manual, plan_from_cuts, static_memory_gb, uniform, uniform_cuts

__all__ = [
    "PARTITIONERS",
    "LayerCost",
    "LayerProfile",
    "ModelProfile",
    "calibrate_tflops",
    "profile_chain",
    "Plan",
    "PlanError",
    "Stage",
    "manual",
    "plan_from_cuts",
    "static_memory_gb",
    "uniform",
    "uniform_cuts",
]
