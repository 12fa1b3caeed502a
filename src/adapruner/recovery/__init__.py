"""Recovery after pruning: LoRA fine-tuning (LLM-Pruner's post-training), merged back into the weights."""

from .data import ALPACA_HUB, TrainingData, alpaca_prompt, load_training_data
from .lora import FinetuneConfig, FinetuneResult, finetune, lora_targets

__all__ = [
    "ALPACA_HUB",
    "FinetuneConfig",
    "FinetuneResult",
    "TrainingData",
    "alpaca_prompt",
    "finetune",
    "load_training_data",
    "lora_targets",
]
