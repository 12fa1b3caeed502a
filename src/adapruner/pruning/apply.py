"""Applying a PrunePlan: reversible masks (for scoring candidates) or physical removal.

A removed query head contributes to the layer output only through its o_proj columns, and a removed
MLP channel only through its down_proj column. Zeroing the inputs of o_proj/down_proj for removed
units therefore gives exactly the outputs of the physically smaller model, without copying weights.

Bias compensation (FLAP): with ``input_means`` (per o_proj/down_proj module name, the mean of each input
feature over the calibration tokens) a removed feature is replaced by its mean instead of zero. The
masked model feeds ``x * mask + mean * (1 - mask)``; the physical model adds
``W[:, removed] @ mean[removed]`` to the projection's bias (creating the bias where there was none), so
both stay exactly equal.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..errors import AdaPrunerError
from ..models.base import LayerShape, ModelAdapter
from .plan import PrunePlan

InputMeans = dict[str, torch.Tensor]


def _head_rows(heads: list[int], head_dim: int) -> torch.Tensor:
    if not heads:
        return torch.empty(0, dtype=torch.long)
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads])


def _input_mask(size: int, kept: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros(size, dtype=like.dtype, device=like.device)
    mask[kept.to(like.device)] = 1
    return mask


def _masking_hook(mask: torch.Tensor, fill: torch.Tensor | None = None):
    def hook(_module: nn.Module, args: tuple) -> tuple:
        x = args[0] * mask if fill is None else args[0] * mask + fill
        return (x, *args[1:])

    return hook


def _mean_of(input_means: InputMeans, name: str, size: int) -> torch.Tensor:
    """The calibration mean of ``name``'s input features (a one-line error if it is missing)."""
    mean = input_means.get(name)
    if mean is None or mean.numel() != size:
        raise AdaPrunerError(
            f"bias compensation needs the mean input of {name} ({size} features): collect activations for it"
        )
    return mean


@contextmanager
def masked(adapter: ModelAdapter, plan: PrunePlan, input_means: InputMeans | None = None) -> Iterator[None]:
    """Run the model as if ``plan`` were applied; the weights are never touched.

    With ``input_means`` removed features take their calibration means (bias compensation, see above).
    """
    plan.validate(adapter)
    handles = []
    try:
        for index, lp in enumerate(plan.layers):
            shape, mods = adapter.layer_shape(index), adapter.layer(index)
            if lp.shape == shape:
                continue
            names = adapter.prunable_module_names(index)
            o_weight, down_weight = mods.o_proj.weight, mods.down_proj.weight
            heads = _input_mask(o_weight.shape[1], _head_rows(lp.query_heads, plan.head_dim), o_weight)
            channels = _input_mask(down_weight.shape[1], torch.tensor(lp.channels), down_weight)
            for module, role, mask in ((mods.o_proj, "o_proj", heads), (mods.down_proj, "down_proj", channels)):
                fill = None
                if input_means is not None:
                    mean = _mean_of(input_means, names[role], mask.numel())
                    fill = mean.to(device=mask.device, dtype=mask.dtype) * (1 - mask)
                handles.append(module.register_forward_pre_hook(_masking_hook(mask, fill)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _sliced(
    linear: nn.Linear,
    rows: torch.Tensor | None = None,
    cols: torch.Tensor | None = None,
    input_mean: torch.Tensor | None = None,
) -> nn.Linear:
    """``linear`` cut to ``rows`` (outputs) and ``cols`` (inputs); with ``input_mean`` the removed
    columns live on as the bias ``W[:, removed] @ input_mean[removed]`` (added to any existing bias)."""
    weight = linear.weight.data
    bias = linear.bias.data if linear.bias is not None else None
    if input_mean is not None and cols is not None and len(cols) < weight.shape[1]:  # else: nothing to add
        removed = torch.ones(weight.shape[1], dtype=torch.bool)
        removed[cols] = False
        removed = removed.nonzero().squeeze(1).to(weight.device)
        mean = input_mean.to(device=weight.device, dtype=torch.float32)
        extra = weight.index_select(1, removed).float() @ mean.index_select(0, removed)
        bias = extra.to(weight.dtype) if bias is None else (bias.float() + extra).to(weight.dtype)
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


def prune_physically(adapter: ModelAdapter, plan: PrunePlan, input_means: InputMeans | None = None) -> None:
    """Remove the planned heads and channels in place and record the new sizes in the config.

    With ``input_means`` the removed inputs of o_proj/down_proj are compensated by a bias (see above).
    """
    plan.validate(adapter)
    for index, lp in enumerate(plan.layers):
        if lp.shape == adapter.layer_shape(index):
            continue
        mods = adapter.layer(index)
        o_mean = down_mean = None
        if input_means is not None:
            names = adapter.prunable_module_names(index)
            o_mean = _mean_of(input_means, names["o_proj"], mods.o_proj.in_features)
            down_mean = _mean_of(input_means, names["down_proj"], mods.down_proj.in_features)
        q_rows = _head_rows(lp.query_heads, plan.head_dim)
        kv_rows = _head_rows(lp.kv_heads, plan.head_dim)
        channels = torch.tensor(lp.channels, dtype=torch.long)
        mods.attention.q_proj = _sliced(mods.q_proj, rows=q_rows)
        mods.attention.k_proj = _sliced(mods.k_proj, rows=kv_rows)
        mods.attention.v_proj = _sliced(mods.v_proj, rows=kv_rows)
        mods.attention.o_proj = _sliced(mods.o_proj, cols=q_rows, input_mean=o_mean)
        mods.attention.num_key_value_groups = lp.shape.queries_per_kv
        mods.mlp.gate_proj = _sliced(mods.gate_proj, rows=channels)
        mods.mlp.up_proj = _sliced(mods.up_proj, rows=channels)
        mods.mlp.down_proj = _sliced(mods.down_proj, cols=channels, input_mean=down_mean)
        mods.mlp.intermediate_size = len(lp.channels)
    record_shapes_in_config(adapter)


def record_shapes_in_config(adapter: ModelAdapter) -> None:
    """Uniform sizes: a plain config. Mixed sizes: ``pruned_layers`` for the shipped modeling file.

    A bias on o_proj/down_proj that the plain config would not create (bias compensation on a model
    without one) also needs ``pruned_layers``: every entry then carries ``o_proj_bias``/``down_proj_bias``.
    """
    config, shapes = adapter.config, adapter.layer_shapes()
    config.head_dim = adapter.head_dim
    mods = [adapter.layer(i) for i in range(len(shapes))]
    biases = [(m.o_proj.bias is not None, m.down_proj.bias is not None) for m in mods]
    default = _config_biases(adapter)
    plain_biases = all(b == default for b in biases)
    if plain_biases and len(set(shapes)) == 1 and _plain_config_valid(config, shapes[0]):
        for key, value in shapes[0].to_dict().items():
            setattr(config, key, value)
        if hasattr(config, "pruned_layers"):
            del config.pruned_layers
    elif plain_biases:
        config.pruned_layers = [s.to_dict() for s in shapes]
    else:
        config.pruned_layers = [
            s.to_dict() | {"o_proj_bias": o_bias, "down_proj_bias": down_bias}
            for s, (o_bias, down_bias) in zip(shapes, biases, strict=True)
        ]


def _config_biases(adapter: ModelAdapter) -> tuple[bool, bool]:
    """Whether the model class builds o_proj/down_proj with a bias from the config alone.

    A decoder layer is built on the meta device (no memory), so every family answers for itself (LLaMA:
    ``attention_bias``/``mlp_bias``; Qwen2 and Mistral: never).
    """
    config = adapter.config
    try:
        layer = adapter.stock_layer(config)
        return layer.self_attn.o_proj.bias is not None, layer.mlp.down_proj.bias is not None
    except Exception:  # an unexpected layer signature: fall back to LLaMA's config names
        return bool(getattr(config, "attention_bias", False)), bool(getattr(config, "mlp_bias", False))


def _plain_config_valid(config, shape: LayerShape) -> bool:
    """Some config classes refuse valid pruned sizes (LLaMA wants hidden % heads == 0): check first."""
    values = config.to_dict() | shape.to_dict()
    try:
        type(config)(**values)
    except (ValueError, TypeError):
        return False
    return True
