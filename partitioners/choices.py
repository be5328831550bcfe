"""The choice lists of a run, each defined once: the config schema validates against these,
and the planner, the cost model and the runtime read the same tuples.

Device tiers and accelerators belong to the machines (:mod:`cluster.topology`); the names of
the schedules and partitioners are the keys of their registries
(:data:`partitioners.schedule.SCHEDULES`, :data:`partitioners.planner.PARTITIONERS`).
"""

from __future__ import annotations

from typing import Literal, get_args

# train.dtype: fp32; bf16 autocast over fp32 weights; bf16 weights and gradients with fp32 master
# weights and AdamW moments for what trains (bf16-master); or everything in bf16 (bf16-pure)
Precision = Literal["fp32", "bf16", "bf16-master", "bf16-pure"]
Method = Literal["full", "frozen", "lora"]  # how a stage fine-tunes
FrozenDtype = Literal["fp32", "bf16", "fp16", "int8"]  # storage of frozen weights (int8: weight-only)
OffloadMode = Literal["none", "optimizer", "params"]  # DeepSpeed ZeRO offload of a stage
Codec = Literal["none", "fp16", "bf16", "int8"]  # how a link packs activations and gradients
AllowOption = Literal["lora", "frozen", "recompute", "bf16", "fp16", "int8"]  # what the planner may change

PRECISIONS: tuple[str, ...] = get_args(Precision)
# the precisions a DeepSpeed-offloaded stage runs with (weights kept in bf16: not yet)
OFFLOAD_PRECISIONS: tuple[str, ...] = ("fp32", "bf16")
METHODS: tuple[str, ...] = get_args(Method)
FROZEN_DTYPES: tuple[str, ...] = get_args(FrozenDtype)
OFFLOAD_MODES: tuple[str, ...] = get_args(OffloadMode)
CODECS: tuple[str, ...] = get_args(Codec)
ALLOW_OPTIONS: tuple[str, ...] = get_args(AllowOption)
