"""Prunable groups as data: which rows/columns of which linear layers are removed together.

Attention units follow transformers' ``repeat_kv`` layout: query head ``h`` reads KV head
``h // (num_attention_heads / num_key_value_heads)``, so the query heads of one KV group are
consecutive. Two head modes exist:

* ``kv-group``: a unit is one KV head with all query heads that read it (q/k/v rows + o columns);
  removing units keeps every remaining group whole. This is LLM-Pruner's head pruning for MHA.
* ``query``: a unit is one query head (q rows + o columns); k/v stay. The same number of query heads
  must stay in every KV group so the layer remains valid GQA (``blocks`` = number of KV groups).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from .base import LayerShape, ModelAdapter

HeadMode = Literal["auto", "kv-group", "query"]
HEAD_MODES: tuple[str, ...] = ("auto", "kv-group", "query")


@dataclass(frozen=True)
class Member:
    """One coupled slice of one linear layer: per unit, the rows (dim 0) or columns (dim 1) it owns."""

    module: str
    role: str
    dim: int
    indices: torch.Tensor  # [num_units, width], long


@dataclass(frozen=True)
class GroupSet:
    """All units of one kind in one layer; pruning keeps a subset of them."""

    layer: int
    kind: Literal["attention", "mlp"]
    num_units: int
    members: tuple[Member, ...]
    params_per_unit: int
    blocks: int = 1  # the keep count must be equal in each of `blocks` consecutive runs of units


def resolve_head_mode(shape: LayerShape, head_mode: HeadMode) -> Literal["kv-group", "query"]:
    """``auto``: whole heads for MHA, query heads for GQA (finer than whole KV groups)."""
    if head_mode == "auto":
        return "kv-group" if shape.num_key_value_heads == shape.num_attention_heads else "query"
    return head_mode


def _unit_slices(num_units: int, width: int) -> torch.Tensor:
    return torch.arange(num_units * width).view(num_units, width)


def _member_params(adapter: ModelAdapter, member: Member) -> int:
    module = adapter.model.get_submodule(member.module)
    width = member.indices.shape[1]
    if member.dim == 0:
        bias = width if module.bias is not None else 0
        return width * module.in_features + bias
    return width * module.out_features


def attention_group(adapter: ModelAdapter, layer: int, head_mode: HeadMode = "auto") -> GroupSet:
    shape = adapter.layer_shape(layer)
    names = adapter.prunable_module_names(layer)
    d, g = adapter.head_dim, shape.queries_per_kv
    mode = resolve_head_mode(shape, head_mode)
    if mode == "query":
        heads = _unit_slices(shape.num_attention_heads, d)
        members = (
            Member(names["q_proj"], "q_proj", 0, heads),
            Member(names["o_proj"], "o_proj", 1, heads),
        )
        num_units, blocks = shape.num_attention_heads, shape.num_key_value_heads
    else:
        queries = _unit_slices(shape.num_key_value_heads, g * d)
        kv = _unit_slices(shape.num_key_value_heads, d)
        members = (
            Member(names["q_proj"], "q_proj", 0, queries),
            Member(names["k_proj"], "k_proj", 0, kv),
            Member(names["v_proj"], "v_proj", 0, kv),
            Member(names["o_proj"], "o_proj", 1, queries),
        )
        num_units, blocks = shape.num_key_value_heads, 1
    params = sum(_member_params(adapter, m) for m in members)
    return GroupSet(layer, "attention", num_units, members, params, blocks)


def mlp_group(adapter: ModelAdapter, layer: int) -> GroupSet:
    shape = adapter.layer_shape(layer)
    names = adapter.prunable_module_names(layer)
    channels = _unit_slices(shape.intermediate_size, 1)
    members = (
        Member(names["gate_proj"], "gate_proj", 0, channels),
        Member(names["up_proj"], "up_proj", 0, channels),
        Member(names["down_proj"], "down_proj", 1, channels),
    )
    params = sum(_member_params(adapter, m) for m in members)
    return GroupSet(layer, "mlp", shape.intermediate_size, members, params)


def layer_groups(adapter: ModelAdapter, layers: list[int], head_mode: HeadMode = "auto") -> list[GroupSet]:
    """Attention and MLP groups of the given layers, in layer order."""
    groups: list[GroupSet] = []
    for layer in layers:
        groups += [attention_group(adapter, layer, head_mode), mlp_group(adapter, layer)]
    return groups
