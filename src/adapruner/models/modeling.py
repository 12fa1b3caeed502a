"""Model classes for AdaPruner checkpoints whose decoder layers have different sizes.

AdaPruner copies this file into every such checkpoint (as ``modeling_adapruner.py``) and points the
config's ``auto_map`` at it, so ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``
works where AdaPruner is not installed. It depends on torch and transformers only, and AdaPruner's own
``load_pruned`` uses the very same classes.

``config.pruned_layers`` lists, per decoder layer, ``num_attention_heads``, ``num_key_value_heads`` and
``intermediate_size``; ``config.head_dim`` is explicit so it never changes when heads go. Entries may
also say ``o_proj_bias``/``down_proj_bias`` (true/false): a bias that bias compensation added to a
projection the config alone would build without one (entries without them keep the config's choice).
"""

from __future__ import annotations

from torch import nn
from transformers import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM


def _linear_like(old: nn.Linear, in_features: int, out_features: int, bias: bool | None = None) -> nn.Linear:
    return nn.Linear(
        in_features,
        out_features,
        bias=old.bias is not None if bias is None else bias,
        device=old.weight.device,
        dtype=old.weight.dtype,
    )


def apply_layer_shapes(model: nn.Module, layer_shapes: list[dict]) -> None:
    """Replace each layer's projections with empty ones of the recorded sizes (weights load after)."""
    config = model.config
    hidden, head_dim = config.hidden_size, config.head_dim
    for block, shape in zip(model.model.layers, layer_shapes, strict=True):
        attn, mlp = block.self_attn, block.mlp
        q_dim = shape["num_attention_heads"] * head_dim
        kv_dim = shape["num_key_value_heads"] * head_dim
        inter = shape["intermediate_size"]
        attn.q_proj = _linear_like(attn.q_proj, hidden, q_dim)
        attn.k_proj = _linear_like(attn.k_proj, hidden, kv_dim)
        attn.v_proj = _linear_like(attn.v_proj, hidden, kv_dim)
        attn.o_proj = _linear_like(attn.o_proj, q_dim, hidden, shape.get("o_proj_bias"))
        attn.num_key_value_groups = shape["num_attention_heads"] // shape["num_key_value_heads"]
        mlp.gate_proj = _linear_like(mlp.gate_proj, hidden, inter)
        mlp.up_proj = _linear_like(mlp.up_proj, hidden, inter)
        mlp.down_proj = _linear_like(mlp.down_proj, inter, hidden, shape.get("down_proj_bias"))
        mlp.intermediate_size = inter


def _pruned_class(base: type) -> type:
    def __init__(self, config) -> None:  # noqa: N807 - method body of the generated class
        base.__init__(self, config)
        shapes = getattr(config, "pruned_layers", None)
        if shapes:
            apply_layer_shapes(self, shapes)

    name = f"Pruned{base.__name__}"
    return type(name, (base,), {"__init__": __init__, "__module__": __name__, "__qualname__": name})


PrunedLlamaForCausalLM = _pruned_class(LlamaForCausalLM)
PrunedMistralForCausalLM = _pruned_class(MistralForCausalLM)
PrunedQwen2ForCausalLM = _pruned_class(Qwen2ForCausalLM)

PRUNED_CLASSES = {
    "llama": PrunedLlamaForCausalLM,
    "mistral": PrunedMistralForCausalLM,
    "qwen2": PrunedQwen2ForCausalLM,
}
