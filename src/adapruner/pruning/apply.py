"""Applying a PrunePlan: reversible masks (for scoring candidates) or physical removal.

A removed query head contributes to the layer output only through its o_proj columns, and a removed
MLP channel only through its down_proj column. Zeroing the inputs of o_proj/down_proj for removed
units therefore gives exactly the outputs of the physically smaller model, without copying weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..models.base import LayerShape, ModelAdapter
from .plan import PrunePlan


def _head_rows(heads: list[int], head_dim: int) -> torch.Tensor:
    if not heads:
        return torch.empty(0, dtype=torch.long)
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads])


def _input_mask(size: int, kept: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros(size, dtype=like.dtype, device=like.device)
    mask[kept.to(like.device)] = 1
    return mask


def _masking_hook(mask: torch.Tensor):
    def hook(_module: nn.Module, args: tuple) -> tuple:
        return (args[0] * mask, *args[1:])

    return hook


@contextmanager
def masked(adapter: ModelAdapter, plan: PrunePlan) -> Iterator[None]:
    """Run the model as if ``plan`` were applied; the weights are never touched."""
    plan.validate(adapter)
    handles = []
    try:
        for index, lp in enumerate(plan.layers):
            shape, mods = adapter.layer_shape(index), adapter.layer(index)
            if lp.shape == shape:
                continue
            o_weight, down_weight = mods.o_proj.weight, mods.down_proj.weight
            heads = _input_mask(o_weight.shape[1], _head_rows(lp.query_heads, plan.head_dim), o_weight)
            channels = _input_mask(down_weight.shape[1], torch.tensor(lp.channels), down_weight)
            handles.append(mods.o_proj.register_forward_pre_hook(_masking_hook(heads)))
            handles.append(mods.down_proj.register_forward_pre_hook(_masking_hook(channels)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _sliced(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    weight = linear.weight.data
    bias = linear.bias.data if linear.bias is not None else None
    if rows is not None:
        weight = weight.index_select(0, rows.to(weight.device))
        bias = bias.index_select(0, rows.to(weight.device)) if bias is not None else None
    if cols is not None:
        weight = weight.index_select(1, cols.to(weight.device))
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    new.weight.data.copy_(weight)
    if bias is not None:
        new.bias.data.copy_(bias)
    return new


def prune_physically(adapter: ModelAdapter, plan: PrunePlan) -> None:
    """Remove the planned heads and channels in place and record the new sizes in the config."""
    plan.validate(adapter)
    for index, lp in enumerate(plan.layers):
        if lp.shape == adapter.layer_shape(index):
            continue
        mods = adapter.layer(index)
        q_rows = _head_rows(lp.query_heads, plan.head_dim)
        kv_rows = _head_rows(lp.kv_heads, plan.head_dim)
        channels = torch.tensor(lp.channels, dtype=torch.long)
        mods.attention.q_proj = _sliced(mods.q_proj, rows=q_rows)
        mods.attention.k_proj = _sliced(mods.k_proj, rows=kv_rows)
        mods.attention.v_proj = _sliced(mods.v_proj, rows=kv_rows)
        mods.attention.o_proj = _sliced(mods.o_proj, cols=q_rows)
        mods.attention.num_key_value_groups = lp.shape.queries_per_kv
        mods.mlp.gate_proj = _sliced(mods.gate_proj, rows=channels)
        mods.mlp.up_proj = _sliced(mods.up_proj, rows=channels)
        mods.mlp.down_proj = _sliced(mods.down_proj, cols=channels)
        mods.mlp.intermediate_size = len(lp.channels)
    record_shapes_in_config(adapter)


def record_shapes_in_config(adapter: ModelAdapter) -> None:
    """Uniform sizes: a plain config. Mixed sizes: ``pruned_layers`` for the shipped modeling file."""
    config, shapes = adapter.config, adapter.layer_shapes()
    config.head_dim = adapter.head_dim
    if len(set(shapes)) == 1 and _plain_config_valid(config, shapes[0]):
        for key, value in shapes[0].to_dict().items():
            setattr(config, key, value)
        if hasattr(config, "pruned_layers"):
            del config.pruned_layers
    else:
        config.pruned_layers = [s.to_dict() for s in shapes]


def _plain_config_valid(config, shape: LayerShape) -> bool:
    """Some config classes refuse valid pruned sizes (LLaMA wants hidden % heads == 0): check first."""
    values = config.to_dict() | shape.to_dict()
    try:
        type(config)(**values)
    except (ValueError, TypeError):
        return False
    return True
