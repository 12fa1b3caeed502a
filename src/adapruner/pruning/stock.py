"""Outputs in the stock architecture (``--uniform``): what serving engines (vLLM, TGI, llama.cpp) load.

A pruned model whose decoder layers all keep the same heads and channels is the family's own architecture
with smaller numbers in its config, unless pruning gave o_proj/down_proj a bias the config does not build
(FLAP's bias compensation, the least-squares refit's bias). LLaMA's config can ask for those biases
(``attention_bias``, ``mlp_bias``); the same flags also build q/k/v and gate/up with a bias, which the
output then carries as zeros. Qwen2's and Mistral's configs cannot, so such a prune is refused before
any work.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import AdaPrunerError
from ..models.base import ModelAdapter
from .apply import record_shapes_in_config

# config flag -> the projection whose bias it controls (LLaMA's names; a family without them cannot say it)
BIAS_FLAGS = {"attention_bias": "o_proj", "mlp_bias": "down_proj"}


def _output_biases(layer: nn.Module) -> dict[str, bool]:
    return {"o_proj": layer.self_attn.o_proj.bias is not None, "down_proj": layer.mlp.down_proj.bias is not None}


def can_hold_output_biases(adapter: ModelAdapter) -> bool:
    """Whether some config of the family builds o_proj and down_proj with a bias (LLaMA: yes)."""
    return _flags_for(adapter, {"o_proj", "down_proj"}) is not None


def check_stock_possible(adapter: ModelAdapter, why: str | None) -> None:
    """Refuse ``--uniform`` before any work where the output needs o_proj/down_proj biases (because of
    ``why``; None: it needs none) that the family's config cannot build."""
    if why is None or can_hold_output_biases(adapter):
        return
    raise AdaPrunerError(
        f"--uniform: {adapter.config.model_type}'s stock architecture has no o_proj/down_proj bias, which {why} "
        "adds: drop --uniform, or prune without that bias (--refit none, or --no-refit-bias for lsq)"
    )


def _flags_for(adapter: ModelAdapter, projections: set[str]) -> dict[str, bool] | None:
    """The config flags under which the stock layer gives ``projections`` a bias (None: no such flags)."""
    config = copy.deepcopy(adapter.config)
    flags = {flag: True for flag, projection in BIAS_FLAGS.items() if projection in projections}
    for flag in flags:
        setattr(config, flag, True)
    built = _output_biases(adapter.stock_layer(config))
    return flags if all(built[p] for p in projections) else None


def make_stock(adapter: ModelAdapter) -> None:
    """Turn a physically pruned model whose layers all have one size into the stock architecture, in place:
    config flags for the biases pruning added, zero biases where those flags build more, plain sizes in
    the config (no ``pruned_layers``: plain ``from_pretrained`` loads it)."""
    shapes = adapter.layer_shapes()
    if len(set(shapes)) != 1:
        raise AdaPrunerError("--uniform: the pruned layers differ in size, so no stock config describes them")
    layers = [adapter.layer(i) for i in range(adapter.num_layers)]
    present = {p for m in layers for p in ("o_proj", "down_proj") if getattr(m, p).bias is not None}
    stock = _output_biases(adapter.stock_layer(adapter.config))
    missing = {p for p in present if not stock[p]}
    if missing:
        flags = _flags_for(adapter, missing)
        if flags is None:
            raise AdaPrunerError(
                f"--uniform: {adapter.config.model_type}'s stock architecture cannot hold the "
                f"{'/'.join(sorted(missing))} bias pruning added: prune without it or drop --uniform"
            )
        for flag, value in flags.items():
            setattr(adapter.config, flag, value)
    twin = adapter.stock_layer(adapter.config)
    for block in adapter.decoder_layers():
        _add_zero_biases(block, twin)
    record_shapes_in_config(adapter)
    if getattr(adapter.config, "pruned_layers", None):
        raise AdaPrunerError(
            f"--uniform: {type(adapter.config).__name__} refuses the pruned sizes {shapes[0].to_dict()}: drop --uniform"
        )
    _check_like_stock(adapter)


def _add_zero_biases(block: nn.Module, twin: nn.Module) -> None:
    """Give every Linear of ``block`` the bias its stock twin has (zeros: the outputs do not change)."""
    for name, module in twin.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        ours = block.get_submodule(name)
        if module.bias is not None and ours.bias is None:
            ours.bias = nn.Parameter(torch.zeros(ours.out_features, dtype=ours.weight.dtype, device=ours.weight.device))
        elif module.bias is None and ours.bias is not None:
            raise AdaPrunerError(f"--uniform: {name} has a bias the stock architecture cannot hold: drop --uniform")


def _check_like_stock(adapter: ModelAdapter) -> None:
    """Every decoder layer holds exactly the parameters (names and shapes) the stock config builds."""
    expected = {n: tuple(p.shape) for n, p in adapter.stock_layer(adapter.config).named_parameters()}
    for index, block in enumerate(adapter.decoder_layers()):
        found = {n: tuple(p.shape) for n, p in block.named_parameters()}
        if found != expected:
            differ = sorted(set(found.items()) ^ set(expected.items()))[:3]
            raise AdaPrunerError(f"--uniform: layer {index} does not match the stock architecture ({differ})")


def output_kind(config: dict) -> str:
    """What loads a saved output: ``stock`` (plain ``from_pretrained``) or ``per-layer`` (remote code)."""
    return "per-layer" if config.get("pruned_layers") or config.get("auto_map") else "stock"
