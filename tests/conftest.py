"""Tiny random models of every supported family, GQA and not, for fast exact tests."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

TINY = {
    "llama-mha": (LlamaConfig, {"num_attention_heads": 4, "num_key_value_heads": 4}),
    "llama-gqa": (LlamaConfig, {"num_attention_heads": 6, "num_key_value_heads": 2}),
    "llama-bias": (
        LlamaConfig,
        {"num_attention_heads": 4, "num_key_value_heads": 2, "attention_bias": True, "mlp_bias": True},
    ),
    "mistral-gqa": (MistralConfig, {"num_attention_heads": 8, "num_key_value_heads": 2}),
    "qwen2-gqa": (Qwen2Config, {"num_attention_heads": 6, "num_key_value_heads": 3}),
    "qwen2-mha": (Qwen2Config, {"num_attention_heads": 4, "num_key_value_heads": 4}),
}


def make_tiny(name: str, seed: int = 0, layers: int = 4) -> torch.nn.Module:
    """A random model with real structure: 4 layers, hidden 48, head_dim 8, 40 MLP channels."""
    config_cls, extra = TINY[name]
    config = config_cls(
        vocab_size=97,
        hidden_size=48,
        intermediate_size=40,
        num_hidden_layers=layers,
        head_dim=8,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        **extra,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # biases start at zero; make them matter
        for name_, p in model.named_parameters():
            if name_.endswith("bias"):
                p.normal_(0, 0.1)
    return model.eval()


@pytest.fixture(params=sorted(TINY))
def tiny_model(request) -> torch.nn.Module:
    return make_tiny(request.param)


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, 97, (3, 20), generator=torch.Generator().manual_seed(1))
