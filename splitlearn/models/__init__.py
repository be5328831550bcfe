"""Model building and cutting: Hugging Face causal LMs as a chain of layers."""

from splitlearn.models.chain import (
    Segment,
    build_model,
    causal_lm_loss,
    chain_names,
    count_items,
    cut,
    layer_views,
    meta_profile,
    num_blocks,
    split_model,
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
    "layer_views",
    "meta_profile",
    "num_blocks",
    "register_family",
    "split_model",
    "supported_families",
    "tied_parameter_names",
]
