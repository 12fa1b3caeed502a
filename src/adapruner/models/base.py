"""The adapter interface: what a model family looks like to the pruner.

An adapter turns a loaded Hugging Face model into plain data: per-layer shapes and the linear layers
that belong to each prunable structure. Nothing outside ``models/`` knows a model family.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
from torch import nn

from ..errors import AdaPrunerError


@dataclass(frozen=True)
class LayerShape:
    """Sizes of one decoder layer; pruning changes these, ``head_dim`` and ``hidden_size`` stay."""

    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int

    @property
    def queries_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


ATTENTION_ROLES = ("q_proj", "k_proj", "v_proj", "o_proj")  # the projections a decoder layer's pruning touches
MLP_ROLES = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LayerModules:
    """The linear layers of one decoder layer that pruning touches."""

    attention: nn.Module
    q_proj: nn.Linear
    k_proj: nn.Linear
    v_proj: nn.Linear
    o_proj: nn.Linear
    mlp: nn.Module
    gate_proj: nn.Linear
    up_proj: nn.Linear
    down_proj: nn.Linear


class ModelAdapter:
    """Describes a decoder-only model with separate q/k/v/o and gate/up/down projections.

    Subclasses name the families they accept; the LLaMA layout is shared by LLaMA, Mistral and
    Qwen2, which differ only in biases and defaults that the modules themselves carry.
    """

    family: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()
    causal_lm_class: ClassVar[str] = ""
    # llama.cpp's architecture for the family's stock layout, and whether its rotary embedding there is the
    # "normal" (pair) layout, for which q/k rows are permuted from transformers' rotate-half order
    gguf_arch: ClassVar[str] = "llama"
    gguf_pair_rope: ClassVar[bool] = True
    # llama.cpp's graph for ``gguf_arch`` sizes q and the attention output as hidden x hidden: a model with
    # pruned heads must then be written with deci's per-layer arrays even when every layer is alike
    gguf_full_width_attention: ClassVar[bool] = False

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config

    # -- shapes -----------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.decoder_layers())

    @property
    def head_dim(self) -> int:
        explicit = getattr(self.config, "head_dim", None)
        return explicit or self.config.hidden_size // self.config.num_attention_heads

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def decoder_layers(self) -> nn.ModuleList:
        return self.model.model.layers

    def stock_layer(self, config) -> nn.Module:
        """The decoder layer the family's own class builds from ``config``, on the meta device (no memory)."""
        with torch.device("meta"):
            return type(self.decoder_layers()[0])(config, 0)

    def layer_name(self, index: int) -> str:
        return f"model.layers.{index}"

    def layer(self, index: int) -> LayerModules:
        block = self.decoder_layers()[index]
        attn, mlp = block.self_attn, block.mlp
        projections = {r: getattr(attn, r) for r in ATTENTION_ROLES} | {r: getattr(mlp, r) for r in MLP_ROLES}
        return LayerModules(attention=attn, mlp=mlp, **projections)

    def layer_shape(self, index: int) -> LayerShape:
        """Read sizes from the modules themselves, so an already pruned model is described right."""
        mods = self.layer(index)
        d = self.head_dim
        return LayerShape(
            num_attention_heads=mods.q_proj.out_features // d,
            num_key_value_heads=mods.k_proj.out_features // d,
            intermediate_size=mods.gate_proj.out_features,
        )

    def layer_shapes(self) -> list[LayerShape]:
        return [self.layer_shape(i) for i in range(self.num_layers)]

    def prunable_module_names(self, index: int) -> dict[str, str]:
        """Role -> full module name (``q_proj`` -> ``model.layers.3.self_attn.q_proj``)."""
        prefix = self.layer_name(index)
        attn = {r: f"{prefix}.self_attn.{r}" for r in ATTENTION_ROLES}
        mlp = {r: f"{prefix}.mlp.{r}" for r in MLP_ROLES}
        return attn | mlp

    def projection_names(self, layers: Iterable[int]) -> list[str]:
        """Full names of every prunable projection of ``layers`` (what statistics are gathered for)."""
        return [name for i in layers for name in self.prunable_module_names(i).values()]


class LlamaAdapter(ModelAdapter):
    """LLaMA 1/2/3, Vicuna, SmolLM2 and other ``LlamaForCausalLM`` checkpoints (GQA or not)."""

    family = "llama"
    model_types = ("llama",)
    causal_lm_class = "LlamaForCausalLM"


class MistralAdapter(ModelAdapter):
    family = "mistral"
    model_types = ("mistral",)
    causal_lm_class = "MistralForCausalLM"


class Qwen2Adapter(ModelAdapter):
    """Qwen2 / Qwen2.5: biases on q/k/v move with their rows when heads are removed."""

    family = "qwen2"
    model_types = ("qwen2",)
    causal_lm_class = "Qwen2ForCausalLM"
    gguf_arch = "qwen2"
    gguf_pair_rope = False  # llama.cpp's qwen2 graph uses the NeoX layout, as transformers does
    gguf_full_width_attention = True


ADAPTERS: tuple[type[ModelAdapter], ...] = (LlamaAdapter, MistralAdapter, Qwen2Adapter)


def supported_model_types() -> list[str]:
    return [t for a in ADAPTERS for t in a.model_types]


def adapter_class_for(model_type: str) -> type[ModelAdapter]:
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise AdaPrunerError(
        f"unsupported model type '{model_type}': AdaPruner supports {', '.join(supported_model_types())} "
        "(LLaMA 1/2/3, Vicuna, SmolLM2, Mistral, Qwen2/2.5)"
    )


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for a loaded model, or a one-line error listing the supported families."""
    model_type = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
    return adapter_class_for(model_type)(model)
