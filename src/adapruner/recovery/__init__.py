"""Recovery after pruning: distillation from the dense model or LM loss, with LoRA or every parameter."""

from .config import DEFAULT_DATA, FinetuneConfig
from .data import ALPACA_HUB, TrainingData, alpaca_prompt, load_training_data
from .distill import TeacherCache, kd_loss, kd_loss_topk
from .lora import lora_targets
from .recover import FinetuneResult, finetune

__all__ = [
    "ALPACA_HUB",
    "DEFAULT_DATA",
    "FinetuneConfig",
    "FinetuneResult",
    "TeacherCache",
    "TrainingData",
    "alpaca_prompt",
    "finetune",
    "kd_loss",
    "kd_loss_topk",
    "load_training_data",
    "lora_targets",
]
