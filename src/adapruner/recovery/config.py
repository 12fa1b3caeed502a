"""What a recovery run does: the loss, the teacher, LoRA or every parameter, and the budget."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..data.sources import ALL_OFFLINE
from ..errors import AdaPrunerError
from .distill import HIDDEN_LOSSES, LOSSES

SCHEDULERS = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}
DEFAULT_LR_FULL, DEFAULT_LR_LORA = 3e-4, 1e-3  # best of 1e-4/3e-4/1e-3 (full), 1e-4/3e-4/1e-3 (LoRA) at 32k tokens
LR_BACKOFF = 0.25  # a diverged run starts over at this fraction of its learning rate (lr_retries times at most)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEFAULT_DATA = ALL_OFFLINE  # the four offline sources' calibration splits, interleaved


@dataclass(frozen=True)
class FinetuneConfig:
    """Recovery settings. LoRA's rank, alpha, dropout and targets are LLM-Pruner's (``post_training.py``);
    the loss, the mode and the learning rate are what ``benchmarks/recovery.py`` measured best."""

    loss: str = "kd+lm"  # lm | kd | kd+lm; kd and kd+lm need a teacher (LM loss when --teacher none)
    teacher: str | None = None  # None: the dense model the input records (source_model); "none": no teacher
    temperature: float = 1.0
    kd_weight: float = 0.5  # kd+lm: kd_weight * KD + (1 - kd_weight) * LM
    hidden_loss: str | None = None  # cosine | mse on the residual stream of hidden_layers (live teacher only)
    hidden_layers: str = "all"  # all, or decoder-layer indices such as 3,7,-1
    hidden_weight: float = 1.0
    teacher_cache: str | None = None  # directory of the teacher's cached top-k logits
    cache_top_k: int = 64
    full: bool = True  # train every parameter (False: LoRA adapters, merged at the end)
    gradient_checkpointing: bool = False
    precision: str = "auto"  # auto (bf16 autocast where the GPU or CPU has bf16 in hardware), fp32, bf16, fp16
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] | None = None  # None: all seven projections, named by the model's adapter
    lr: float | None = None  # None: 3e-4 for full training, 1e-3 for LoRA (benchmarks/recovery.py; LLM-Pruner: 1e-4)
    lr_scheduler: str = "linear"  # linear | cosine | constant (each after the warmup)
    weight_decay: float = 0.0
    cutoff_len: int = 256
    epochs: float = 2.0
    batch_size: int = 64  # examples per optimizer step, over all devices
    micro_batch_size: int = 4  # examples per forward pass and device; the rest is gradient accumulation
    warmup_steps: float = 0.05  # a fraction of the steps when below 1 (LLM-Pruner: 100 of ~1,600), else steps
    max_steps: int | None = None  # stop after this many optimizer steps (overrides epochs)
    tokens: int | None = None  # training tokens; sets max_steps (and wins over it)
    val_set_size: int = 2000  # held-out instruction records / validation-split text blocks (0: none)
    eval_steps: int = 100
    save_steps: int = 200
    logging_steps: int = 10
    # stop when a logged training loss exceeds this multiple of the first one (a learning rate too high for the
    # model: KD + LM at lr 3e-4 took Qwen2.5-0.5B's loss from 2.3 to ~4); 0: never
    divergence: float = 1.5
    # when the loss diverges, start over from the input's weights at a quarter of the learning rate, at most this
    # many times (a rate tuned on SmolLM2-135M is too high for Qwen2.5-0.5B); 0: stop with the error instead
    lr_retries: int = 2
    seed: int = 42
    train_on_inputs: bool = True  # False: loss on the response tokens only
    keep_adapter: bool = False  # also save the unmerged adapter in OUTPUT/adapter/

    def validate(self) -> None:
        checks = [
            (self.loss in LOSSES, f"--loss {self.loss}: choose one of {', '.join(LOSSES)}"),
            (self.temperature > 0, "--temperature must be > 0"),
            (0 <= self.kd_weight <= 1, "--kd-weight must be in [0, 1]"),
            (
                self.hidden_loss is None or self.hidden_loss in HIDDEN_LOSSES,
                f"--hidden-loss {self.hidden_loss}: choose one of {', '.join(HIDDEN_LOSSES)}",
            ),
            (self.hidden_weight >= 0, "--hidden-weight must be >= 0"),
            (self.cache_top_k >= 1, "--cache-top-k must be >= 1"),
            (
                not (self.hidden_loss and self.teacher_cache),
                "--hidden-loss needs the live teacher's hidden states, which --teacher-cache does not keep: drop one",
            ),
            (self.precision in PRECISIONS, f"--precision {self.precision}: choose one of {', '.join(PRECISIONS)}"),
            (self.lr_scheduler in SCHEDULERS, f"--lr-scheduler: choose one of {', '.join(SCHEDULERS)}"),
            (self.weight_decay >= 0, "--weight-decay must be >= 0"),
            (self.lora_r >= 1, "--lora-r must be >= 1"),
            (self.lora_alpha > 0, "--lora-alpha must be > 0"),
            (0 <= self.lora_dropout < 1, "--lora-dropout must be in [0, 1)"),
            (self.lr is None or self.lr > 0, "--lr must be > 0"),
            (self.divergence == 0 or self.divergence > 1, "--divergence must be 0 (never stop) or above 1"),
            (self.lr_retries >= 0, "--lr-retries must be >= 0"),
            (self.cutoff_len >= 2, "--cutoff-len must be >= 2"),
            (self.epochs > 0, "--epochs must be > 0"),
            (self.micro_batch_size >= 1, "--micro-batch-size must be >= 1"),
            (self.batch_size >= self.micro_batch_size, "--batch-size must be >= --micro-batch-size"),
            (self.warmup_steps >= 0, "--warmup-steps must be >= 0"),
            (self.max_steps is None or self.max_steps >= 1, "--max-steps must be >= 1"),
            (self.tokens is None or self.tokens >= 1, "--tokens must be >= 1"),
            (self.val_set_size >= 0, "--val-set-size must be >= 0"),
            (min(self.eval_steps, self.save_steps, self.logging_steps) >= 1, "step intervals must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise AdaPrunerError(message)

    @property
    def learning_rate(self) -> float:
        """The peak learning rate: ``lr``, or the measured best of the mode."""
        if self.lr is not None:
            return self.lr
        return DEFAULT_LR_FULL if self.full else DEFAULT_LR_LORA

    @property
    def distils(self) -> bool:
        return self.loss != "lm"

    def accumulation_steps(self, world_size: int = 1) -> int:
        """LLM-Pruner: ``batch_size // micro_batch_size``, divided among data-parallel processes."""
        return max(self.batch_size // self.micro_batch_size // max(world_size, 1), 1)

    def effective_batch(self, world_size: int = 1) -> int:
        return self.micro_batch_size * self.accumulation_steps(world_size) * max(world_size, 1)

    def steps(self, tokens_per_example: float, world_size: int = 1) -> int | None:
        """Optimizer steps: from ``tokens`` when given (rounded up), else ``max_steps`` (None: by epochs)."""
        if self.tokens is None:
            return self.max_steps
        return max(math.ceil(self.tokens / (self.effective_batch(world_size) * tokens_per_example)), 1)
