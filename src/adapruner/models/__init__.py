"""Architecture adapters: one per model family, describing its prunable groups."""

from .base import ADAPTERS, LayerShape, ModelAdapter, get_adapter, supported_model_types
from .groups import GroupSet, Member, attention_group, layer_groups, mlp_group

__all__ = [
    "ADAPTERS",
    "GroupSet",
    "LayerShape",
    "Member",
    "ModelAdapter",
    "attention_group",
    "get_adapter",
    "layer_groups",
    "mlp_group",
    "supported_model_types",
]
