"""One training loop for every recovery: the Hugging Face ``Trainer`` with a loss that may add the teacher.

LM loss (LoRA or full) is the Trainer's own; distillation replaces it in ``compute_loss`` with the KL
divergence from the teacher (live, or read from the teacher cache carried in the batch), plus the LM
term for ``kd+lm`` and the hidden-state term when asked. Nothing else of the Trainer changes, so
``accelerate launch -m adapruner.cli finetune ...`` runs every mode data-parallel or sharded.
Validation always reports the plain LM loss on held-out text, so runs with different losses compare.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812

from ..util import log
from .config import SCHEDULERS, FinetuneConfig
from .data import ExampleDataset
from .distill import TEACHER_FIELDS, TeacherCache, hidden_loss, kd_loss, kd_loss_topk, lm_loss, next_token_mask

PAD_VALUES = {"input_ids": None, "attention_mask": 0, "labels": -100}  # None: the tokenizer's pad id


class CachedExamples(ExampleDataset):
    """Training examples that carry the teacher's cached top-k outputs for their window."""

    def __init__(self, examples: ExampleDataset, cache: TeacherCache) -> None:
        super().__init__(examples.examples)
        self.cache = cache

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self.examples[index]
        return example | self.cache.window(index, len(example["input_ids"]))


class Collator:
    """Right-pads every field of a batch to its longest example (a multiple of 8); teacher fields too."""

    def __init__(self, pad_token_id: int, multiple: int = 8) -> None:
        self.pad_token_id = pad_token_id
        self.multiple = multiple

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(r["input_ids"]) for r in rows)
        length = -(-longest // self.multiple) * self.multiple
        batch = {}
        for name in rows[0]:
            pad = PAD_VALUES.get(name, 0)
            pad = self.pad_token_id if pad is None else pad
            batch[name] = torch.stack([_pad_to(torch.as_tensor(r[name]), length, pad) for r in rows])
        return batch


def _pad_to(value: torch.Tensor, length: int, pad: float) -> torch.Tensor:
    if value.shape[0] == length:
        return value
    filler = torch.full((length - value.shape[0], *value.shape[1:]), pad, dtype=value.dtype)
    return torch.cat([value, filler])


def _trainer_class():
    from transformers import Trainer

    class RecoveryTrainer(Trainer):
        """The Trainer with the recovery loss; ``teacher`` is a live model or None (LM loss, or a cache)."""

        def __init__(self, *args: Any, recovery: FinetuneConfig, loss: str, teacher=None, hidden=(), **kwargs):
            super().__init__(*args, **kwargs)
            self.recovery, self.loss_kind, self.teacher, self.hidden_layers = recovery, loss, teacher, list(hidden)
            self.plain_lm = loss == "lm" and not self.hidden_layers
            # our own losses are per-micro-batch means, which the Trainer divides among accumulation steps
            self.loss_is_scaled_for_ga = None if self.plain_lm else False
            self.tokens_seen = 0
            self._clock: tuple[float, int] | None = None  # (time, tokens) when this process began training
            self._parts: dict[str, list[float]] = {}

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            cached = {name: inputs.pop(name) for name in TEACHER_FIELDS if name in inputs}
            if model.training:
                if self._clock is None:
                    self._clock = (time.perf_counter(), self.tokens_seen)
                self.tokens_seen += int(inputs["attention_mask"].sum())
            if self.plain_lm or not model.training:  # validation: held-out LM loss, whatever the training loss
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            labels = inputs["labels"]
            want_hidden = bool(self.hidden_layers)
            outputs = model(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], output_hidden_states=want_hidden
            )
            mask = next_token_mask(labels)
            parts = {}
            temperature = self.recovery.temperature
            shared = None  # KD + LM at T = 1 without a cache: one log-softmax over the vocabulary for both
            if self.loss_kind == "kd+lm" and temperature == 1 and not cached:
                shared = F.log_softmax(outputs.logits.float(), dim=-1)
            if self.loss_kind in ("lm", "kd+lm"):
                parts["lm"] = lm_loss(outputs.logits, labels, shared)
            teacher_out = self._teacher_outputs(inputs, want_hidden) if self.teacher is not None else None
            if self.loss_kind != "lm":
                if cached:
                    parts["kd"] = kd_loss_topk(
                        outputs.logits, cached["teacher_idx"], cached["teacher_val"], cached["teacher_rest"], mask,
                        temperature,
                    )  # fmt: skip
                else:
                    parts["kd"] = kd_loss(outputs.logits, teacher_out.logits, mask, temperature, shared)
            if want_hidden:
                parts["hidden"] = hidden_loss(
                    outputs.hidden_states,
                    teacher_out.hidden_states,
                    self.hidden_layers,
                    self.recovery.hidden_loss,
                    inputs["attention_mask"],
                )
            loss = self._combine(parts)
            for name, value in parts.items():
                self._parts.setdefault(name, []).append(float(value.detach()))
            return (loss, outputs) if return_outputs else loss

        def _teacher_outputs(self, inputs, want_hidden: bool):
            device = inputs["input_ids"].device
            if next(self.teacher.parameters()).device != device and not hasattr(self.teacher, "hf_device_map"):
                self.teacher.to(device)
            with torch.no_grad(), self.accelerator.autocast():  # the student's mixed precision, if any
                return self.teacher(
                    input_ids=inputs["input_ids"],
                    attention_mask=inputs["attention_mask"],
                    output_hidden_states=want_hidden,
                )

        def _combine(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
            weight = self.recovery.kd_weight
            if self.loss_kind == "kd+lm":
                loss = weight * parts["kd"] + (1 - weight) * parts["lm"]
            else:
                loss = parts[self.loss_kind]
            if "hidden" in parts:
                loss = loss + self.recovery.hidden_weight * parts["hidden"]
            return loss

        def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
            if "loss" in logs:
                for name, values in self._parts.items():
                    logs[f"{name}_loss"] = round(sum(values) / len(values), 4)
                self._parts = {}
                if self._clock is not None:
                    seconds = time.perf_counter() - self._clock[0]
                    tokens = (self.tokens_seen - self._clock[1]) * self.args.world_size
                    logs["tokens_per_s"] = round(tokens / max(seconds, 1e-9), 1)
            super().log(logs, *args, **kwargs)

    return RecoveryTrainer


def _callbacks() -> tuple[list, Any]:
    """Loss lines on stderr via ``log``; a progress bar with loss and tokens/s; a log entry at the very last step."""
    from transformers import ProgressCallback, TrainerCallback

    class LossProgress(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):  # the bar must not print dicts on stdout
            if state.is_world_process_zero and self.training_bar is not None and logs and "loss" in logs:
                postfix = {"loss": f"{logs['loss']:.4g}"}
                if "tokens_per_s" in logs:
                    postfix["tok/s"] = f"{logs['tokens_per_s']:.0f}"
                self.training_bar.set_postfix(postfix, refresh=False)

    class LossLog(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                control.should_log = True  # so the record holds the final training loss
            return control

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                keys = ("loss", "kd_loss", "lm_loss", "hidden_loss", "eval_loss", "learning_rate", "tokens_per_s")
                shown = {k: logs[k] for k in keys if k in logs}
                if shown:
                    values = ", ".join(f"{k} {float(v):.4g}" for k, v in shown.items())
                    log(f"step {state.global_step}/{state.max_steps}: {values}")

    return [LossLog()], LossProgress


def _divergence_guard(factor: float):
    """A callback that stops training once a logged loss exceeds ``factor`` x the first (or is not finite)."""
    from transformers import TrainerCallback

    class DivergenceGuard(TrainerCallback):
        def __init__(self) -> None:
            self.first: tuple[int, float] | None = None
            self.tripped: tuple[int, float] | None = None

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs:
                return control
            loss = float(logs["loss"])
            if self.first is None:
                self.first = (state.global_step, loss)
            elif factor and (not math.isfinite(loss) or loss > factor * self.first[1]):
                self.tripped = (state.global_step, loss)
                control.should_training_stop = True
                control.should_save = False
            return control

        def message(self, tried: Sequence[float]) -> str:
            """The error once no retry is left; ``tried``: every learning rate that diverged, the last one this."""
            (start, first), (step, loss) = self.first, self.tripped
            rates = ", ".join(f"{lr:g}" for lr in tried)
            return (
                f"training diverged: the loss rose from {first:.4g} (step {start}) to {loss:.4g} (step {step}), "
                f"over {factor:g}x, at lr {rates}: rerun with a lower --lr than {min(tried):g} (or more "
                "--lr-retries), or --divergence 0 to train on"
            )

    return DivergenceGuard()


def _cpu_only() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return not torch.cuda.is_available() and not (mps is not None and mps.is_available())


def _checkpointing(enabled: bool, arguments: type) -> dict[str, Any]:
    """Activation checkpointing under the name this transformers knows (``gradient_*`` before 5.x renamed it)."""
    name = (
        "activation_checkpointing"
        if "activation_checkpointing" in arguments.__dataclass_fields__
        else "gradient_checkpointing"
    )
    return {name: enabled, f"{name}_kwargs": {"use_reentrant": False} if enabled else None}


def build_trainer(
    model: torch.nn.Module,
    data: Any,
    train_set: ExampleDataset,
    cfg: FinetuneConfig,
    *,
    work: Path,
    precision: str,
    pad_token_id: int,
    max_steps: int | None,
    world_size: int,
    loss: str,
    teacher: torch.nn.Module | None = None,
    hidden_layers: Sequence[int] = (),
):
    """The recovery Trainer over ``train_set`` (validation: ``data.val``), checkpointing into ``work``."""
    from transformers import ProgressCallback, TrainingArguments

    args = TrainingArguments(
        output_dir=str(work),
        per_device_train_batch_size=cfg.micro_batch_size,
        per_device_eval_batch_size=cfg.micro_batch_size,
        gradient_accumulation_steps=cfg.accumulation_steps(world_size),
        warmup_steps=cfg.warmup_steps,
        num_train_epochs=cfg.epochs,
        max_steps=max_steps or -1,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=SCHEDULERS[cfg.lr_scheduler],
        weight_decay=cfg.weight_decay,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        optim="adamw_torch",
        **_checkpointing(cfg.gradient_checkpointing, TrainingArguments),
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if data.val is not None else "no",
        eval_steps=cfg.eval_steps,
        prediction_loss_only=True,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=2,
        seed=cfg.seed,
        report_to=[],
        label_names=["labels"],
        remove_unused_columns=False,  # the teacher's cached fields ride in the batch
        ddp_find_unused_parameters=False,
        dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=_cpu_only(),  # so data-parallel processes without a GPU train over gloo
        disable_tqdm=False,
    )
    trainer = _trainer_class()(
        model=model,
        args=args,
        data_collator=Collator(pad_token_id),
        train_dataset=train_set,
        eval_dataset=data.val,
        recovery=cfg,
        loss=loss,
        teacher=teacher,
        hidden=hidden_layers,
    )
    callbacks, progress = _callbacks()
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(progress)
    for callback in callbacks:
        trainer.add_callback(callback)
    trainer.divergence = _divergence_guard(cfg.divergence)  # recover.finetune reads whether it tripped
    trainer.add_callback(trainer.divergence)
    return trainer
