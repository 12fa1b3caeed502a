"""LoRA adapters for recovery (LLM-Pruner's post-training, with PEFT): on, and merged back into the weights.

The adapter goes on all seven projections of every layer, whatever their pruned sizes; after training
it is merged, so the output is an ordinary pruned model with the same per-layer sizes.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from ..errors import AdaPrunerError
from ..models.base import get_adapter
from .config import FinetuneConfig


def lora_targets(model: torch.nn.Module) -> list[str]:
    """The projection names the adapter describes (q, k, v, o, gate, up, down for every family)."""
    adapter = get_adapter(model)
    names = adapter.projection_names(range(adapter.num_layers))
    return list(dict.fromkeys(name.rsplit(".", 1)[-1] for name in names))


def chosen_targets(model: torch.nn.Module, cfg: FinetuneConfig) -> list[str]:
    targets = lora_targets(model)
    if cfg.target_modules is None:
        return targets
    unknown = sorted(set(cfg.target_modules) - set(targets))
    if unknown:
        raise AdaPrunerError(f"unknown target modules {', '.join(unknown)}: choose among {', '.join(targets)}")
    return list(cfg.target_modules)


def add_lora(model: torch.nn.Module, cfg: FinetuneConfig, targets: list[str], base: Path) -> torch.nn.Module:
    """``model`` wrapped by PEFT with fresh adapters on ``targets`` (seeded by the caller)."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():  # PEFT reads a property transformers v5 deprecates
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        peft_model = get_peft_model(model, lora)
    peft_model.peft_config["default"].base_model_name_or_path = str(base)
    return peft_model


def is_lora(model: torch.nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def trainable_parameters(model: torch.nn.Module) -> tuple[int, int]:
    if is_lora(model):
        return model.get_nb_trainable_parameters()
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def merged(model: torch.nn.Module, adapter_dir: Path | None = None) -> torch.nn.Module:
    """The plain model: LoRA merged into the weights (the adapter saved first if asked), or ``model`` itself."""
    if not is_lora(model):
        return model
    if adapter_dir is not None:
        model.save_pretrained(adapter_dir)  # before merging: merge_and_unload removes the LoRA layers
    return model.merge_and_unload()
