"""Hugging Face causal LMs as a chain of layers: building (:mod:`.build`), cutting
(:mod:`.chain`), families (:mod:`.families`), fine-tuning methods (:mod:`.methods`) and
their per-layer costs (:mod:`.costs`)."""

from splitlearn.models.build import build_model, import_adapter_module, meta_model
from splitlearn.models.chain import (
    Segment,
    causal_lm_loss,
    chain_names,
    count_items,
    cut,
    layer_views,
    num_blocks,
    tied_parameter_names,
)
from splitlearn.models.families import (
    Context,
    FamilyAdapter,
    LlamaLikeAdapter,
    adapter_for,
    register_family,
    supported_families,
)

__all__ = [
    "Context",
    "FamilyAdapter",
    "LlamaLikeAdapter",
    "Segment",
    "adapter_for",
    "build_model",
    "causal_lm_loss",
    "chain_names",
    "count_items",
    "cut",
    "import_adapter_module",
    "layer_views",
    "meta_model",
    "num_blocks",
    "register_family",
    "supported_families",
    "tied_parameter_names",
]
