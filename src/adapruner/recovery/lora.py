"""LoRA recovery of a pruned model: LLM-Pruner's post-training, with PEFT and the Hugging Face Trainer.

The adapter goes on all seven projections of every layer (whatever their pruned sizes), trains with the
Trainer (so ``accelerate launch -m adapruner.cli finetune ...`` runs it data-parallel unchanged), is
merged into the weights and the result is saved exactly like a pruned model: same per-layer sizes,
modeling file and tokenizer, and the input's ``adapruner.json`` extended with a ``finetune`` record.

Checkpoints (adapter, optimizer, scheduler, RNG) go to a work directory beside the output
(``OUTPUT.work`` unless ``checkpoint_dir`` says otherwise); running the same command again resumes from
the last one, and the work directory is removed once the output is written.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from ..errors import AdaPrunerError
from ..models.base import get_adapter
from ..models.loading import load_causal_lm, resolve_location
from ..pruning.io import (
    atomic_output_dir,
    check_output_dir,
    read_record,
    save_pruned,
    write_json_atomic,
)
from ..util import log
from .data import TrainingData, load_training_data

WORK_MARKER = "adapruner-finetune.json"
ADAPTER_DIR = "adapter"
# Settings that may change between an interrupted run and its resumption.
RESUMABLE_CHANGES = ("max_steps", "save_steps", "eval_steps", "logging_steps", "keep_adapter")


@dataclass(frozen=True)
class FinetuneConfig:
    """LoRA recovery settings; the defaults are LLM-Pruner's (``post_training.py`` and its README)."""

    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] | None = None  # None: all seven projections, named by the model's adapter
    lr: float = 1e-4
    cutoff_len: int = 256
    epochs: float = 2.0
    batch_size: int = 64  # examples per optimizer step, over all devices
    micro_batch_size: int = 4  # examples per forward pass and device; the rest is gradient accumulation
    warmup_steps: int = 100
    max_steps: int | None = None  # stop after this many optimizer steps (overrides epochs)
    val_set_size: int = 2000  # held-out instruction records / validation-split text blocks (0: none)
    eval_steps: int = 100
    save_steps: int = 200
    logging_steps: int = 10
    seed: int = 42
    train_on_inputs: bool = True  # False: loss on the response tokens only
    keep_adapter: bool = False  # also save the unmerged adapter in OUTPUT/adapter/

    def validate(self) -> None:
        checks = [
            (self.lora_r >= 1, "--lora-r must be >= 1"),
            (self.lora_alpha > 0, "--lora-alpha must be > 0"),
            (0 <= self.lora_dropout < 1, "--lora-dropout must be in [0, 1)"),
            (self.lr > 0, "--lr must be > 0"),
            (self.cutoff_len >= 2, "--cutoff-len must be >= 2"),
            (self.epochs > 0, "--epochs must be > 0"),
            (self.micro_batch_size >= 1, "--micro-batch-size must be >= 1"),
            (self.batch_size >= self.micro_batch_size, "--batch-size must be >= --micro-batch-size"),
            (self.warmup_steps >= 0, "--warmup-steps must be >= 0"),
            (self.max_steps is None or self.max_steps >= 1, "--max-steps must be >= 1"),
            (self.val_set_size >= 0, "--val-set-size must be >= 0"),
            (min(self.eval_steps, self.save_steps, self.logging_steps) >= 1, "step intervals must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise AdaPrunerError(message)

    def accumulation_steps(self, world_size: int = 1) -> int:
        """LLM-Pruner: ``batch_size // micro_batch_size``, divided among data-parallel processes."""
        return max(self.batch_size // self.micro_batch_size // max(world_size, 1), 1)


@dataclass
class FinetuneResult:
    model: torch.nn.Module  # the merged model
    tokenizer: Any
    record: dict
    output: Path | None = None
    timings: dict[str, float] = field(default_factory=dict)


def lora_targets(model: torch.nn.Module) -> list[str]:
    """The projection names the adapter describes (q, k, v, o, gate, up, down for every family)."""
    adapter = get_adapter(model)
    names = adapter.projection_names(range(adapter.num_layers))
    return list(dict.fromkeys(name.rsplit(".", 1)[-1] for name in names))


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _precision() -> str:
    if not torch.cuda.is_available():
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def _versions() -> dict[str, str]:
    import peft

    from ..util import versions as base_versions

    return base_versions() | {"peft": peft.__version__}


# --- checkpoints -----------------------------------------------------------------------------------


def _run_identity(model_dir: Path, data: TrainingData, cfg: FinetuneConfig, targets: list[str]) -> dict:
    settings = {k: v for k, v in asdict(cfg).items() if k not in RESUMABLE_CHANGES}
    identity = {
        "model_dir": str(model_dir),
        "data": data.source,
        "data_fingerprint": data.fingerprint,
        "config": settings | {"target_modules": targets},
        "world_size": _world_size(),
    }
    return json.loads(json.dumps(identity))  # as it reads back from the marker file


def _prepare_work_dir(work: Path, identity: dict) -> str | None:
    """Check ``work`` belongs to this fine-tune; the last checkpoint to resume from, if any."""
    from transformers.trainer_utils import get_last_checkpoint

    marker = work / WORK_MARKER
    if marker.is_file():
        try:
            previous = json.loads(marker.read_text())
        except json.JSONDecodeError:
            previous = None
        if previous != identity:
            diff = sorted(k for k in identity if previous.get(k) != identity[k]) if isinstance(previous, dict) else []
            raise AdaPrunerError(
                f"checkpoint directory {work} holds another fine-tune (different {', '.join(diff) or 'settings'}): "
                "remove it to start over, or pass another --checkpoint-dir"
            )
    elif work.is_dir() and any(p.name.startswith("checkpoint-") for p in work.iterdir()):
        raise AdaPrunerError(
            f"checkpoint directory {work} holds checkpoints not written by `adapruner finetune`: "
            "remove it or pass another --checkpoint-dir"
        )
    last = get_last_checkpoint(str(work)) if work.is_dir() else None
    if _is_main_process():
        write_json_atomic(marker, identity)
    return last


def _remove_work_dir(work: Path) -> None:
    """Remove our checkpoints and marker; the directory itself only if nothing else is left in it."""
    if not work.is_dir():
        return
    for path in work.iterdir():
        if path.name.startswith("checkpoint-") and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
    (work / WORK_MARKER).unlink(missing_ok=True)
    if not any(work.iterdir()):
        work.rmdir()


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


# --- training --------------------------------------------------------------------------------------


def _callbacks() -> tuple[list, Any]:
    """Loss lines on stderr via ``log``; a quiet progress bar; a log entry at the very last step."""
    from transformers import ProgressCallback, TrainerCallback

    class QuietProgress(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):  # the bar must not print dicts on stdout
            return None

    class LossLog(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                control.should_log = True  # so the record holds the final training loss
            return control

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                shown = {k: v for k, v in logs.items() if k in ("loss", "eval_loss", "learning_rate", "grad_norm")}
                if shown:
                    values = ", ".join(f"{k} {float(v):.4g}" for k, v in shown.items())
                    log(f"step {state.global_step}/{state.max_steps}: {values}")

    return [LossLog()], QuietProgress


def _trainer(model, tokenizer, data: TrainingData, cfg: FinetuneConfig, work: Path, precision: str):
    from transformers import DataCollatorForSeq2Seq, ProgressCallback, Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(work),
        per_device_train_batch_size=cfg.micro_batch_size,
        per_device_eval_batch_size=cfg.micro_batch_size,
        gradient_accumulation_steps=cfg.accumulation_steps(_world_size()),
        warmup_steps=cfg.warmup_steps,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1,
        learning_rate=cfg.lr,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        optim="adamw_torch",
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if data.val is not None else "no",
        eval_steps=cfg.eval_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=2,
        seed=cfg.seed,
        report_to=[],
        label_names=["labels"],
        ddp_find_unused_parameters=False,
        dataloader_pin_memory=torch.cuda.is_available(),
        disable_tqdm=False,
    )
    collator = DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8, return_tensors="pt", padding=True)
    trainer = Trainer(model=model, args=args, data_collator=collator, train_dataset=data.train, eval_dataset=data.val)
    callbacks, progress = _callbacks()
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(progress)
    for callback in callbacks:
        trainer.add_callback(callback)
    return trainer


def _check_input(model_dir: str | Path) -> tuple[Path, dict]:
    location = Path(resolve_location(str(model_dir)))
    try:
        record = read_record(location)
    except AdaPrunerError as exc:
        raise AdaPrunerError(f"{exc}: fine-tune a directory written by `adapruner prune`") from None
    return location.resolve(), record


def _saved_dtype(model_dir: Path) -> torch.dtype | None:
    config = json.loads((model_dir / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype")
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(name)


def finetune(
    model_dir: str | Path,
    data: str | Path,
    output: str | Path,
    *,
    overwrite: bool = False,
    checkpoint_dir: str | Path | None = None,
    **options: Any,
) -> FinetuneResult:
    """LoRA-fine-tune the pruned model in ``model_dir`` on ``data``, merge, and save it to ``output``.

    ``options`` are the fields of :class:`FinetuneConfig`. ``data`` is ``alpaca`` (the hub's
    yahma/alpaca-cleaned), a local Alpaca .json/.jsonl file, or a text source (wiki, news, books, squad,
    a .txt file). See :mod:`adapruner.recovery` for the resume and multi-GPU behaviour.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, set_seed

    start = time.perf_counter()
    options = dict(options)
    if options.get("target_modules") is not None:
        options["target_modules"] = tuple(options["target_modules"])
    cfg = FinetuneConfig(**options)
    cfg.validate()
    location, record = _check_input(model_dir)
    output = Path(output)
    if output.resolve() == location:
        raise AdaPrunerError(f"--output {output} is the input model: choose another directory")
    check_output_dir(output, overwrite)
    timings: dict[str, float] = {}

    tokenizer = AutoTokenizer.from_pretrained(str(location))
    train_tokenizer = copy.deepcopy(tokenizer)
    if train_tokenizer.pad_token is None:
        train_tokenizer.pad_token = train_tokenizer.eos_token
    train_tokenizer.padding_side = "right"
    dataset = load_training_data(  # before the weights load, so bad data fails fast
        str(data),
        train_tokenizer,
        cutoff_len=cfg.cutoff_len,
        val_set_size=cfg.val_set_size,
        train_on_inputs=cfg.train_on_inputs,
        seed=cfg.seed,
    )
    model = load_causal_lm(str(location))
    targets = lora_targets(model)
    if cfg.target_modules is not None:
        unknown = sorted(set(cfg.target_modules) - set(targets))
        if unknown:
            raise AdaPrunerError(f"unknown target modules {', '.join(unknown)}: choose among {', '.join(targets)}")
        targets = list(cfg.target_modules)
    timings["load"] = round(time.perf_counter() - start, 2)
    log(
        f"data {dataset.source}: {len(dataset.train)} training and {len(dataset.val or [])} validation "
        f"examples ({dataset.kind})"
    )

    work = Path(checkpoint_dir) if checkpoint_dir is not None else output.with_name(f"{output.name}.work")
    resume = _prepare_work_dir(work, _run_identity(location, dataset, cfg, targets))
    if resume:
        log(f"resuming from {resume}")

    set_seed(cfg.seed)  # the LoRA initialisation
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
    peft_model.peft_config["default"].base_model_name_or_path = str(location)
    trainable, total = peft_model.get_nb_trainable_parameters()
    precision = _precision()
    log(f"LoRA r={cfg.lora_r} on {', '.join(targets)}: {trainable:,} trainable of {total:,} parameters ({precision})")

    trainer = _trainer(peft_model, train_tokenizer, dataset, cfg, work, precision)
    train_start = time.perf_counter()
    train_output = trainer.train(resume_from_checkpoint=resume)
    timings["train"] = round(time.perf_counter() - train_start, 2)
    state = trainer.state
    resumed_step = int(Path(resume).name.rsplit("-", 1)[-1]) if resume else 0
    steps_run = state.global_step - resumed_step
    losses = [{"step": e["step"], "loss": e["loss"]} for e in state.log_history if "loss" in e]
    val_losses = [{"step": e["step"], "loss": e["eval_loss"]} for e in state.log_history if "eval_loss" in e]
    world = _world_size()
    finetune_record = {
        "method": "lora",
        "input": str(location),
        "config": asdict(cfg) | {"target_modules": targets},
        "data": dataset.describe(),
        "steps": state.global_step,
        "epochs": round(float(state.epoch or 0), 4),
        "resumed_from_step": resumed_step or None,
        "world_size": world,
        "gradient_accumulation_steps": cfg.accumulation_steps(world),
        "effective_batch_size": cfg.micro_batch_size * cfg.accumulation_steps(world) * world,
        "precision": precision,
        "trainable_params": trainable,
        "train_loss": losses[-1]["loss"] if losses else None,
        "train_loss_mean": train_output.training_loss if steps_run else None,
        "val_loss": val_losses[-1]["loss"] if val_losses else None,
        "loss_history": losses,
        "val_loss_history": val_losses,
        "train_seconds": timings["train"],
        "seconds_per_step": round(timings["train"] / steps_run, 3) if steps_run else None,
        "adapter": ADAPTER_DIR if cfg.keep_adapter else None,
        "versions": _versions(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if not trainer.is_world_process_zero():  # data-parallel workers: rank 0 writes the result
        return FinetuneResult(peft_model, tokenizer, {}, None, timings)

    new_record = dict(record)
    if "finetune" in record:
        new_record["finetune_history"] = [*record.get("finetune_history", []), record["finetune"]]
    new_record["finetune"] = finetune_record
    finetune_record["seconds"] = round(time.perf_counter() - start, 2)  # load + train, without the save
    save_start = time.perf_counter()
    merged = _merge_and_save(peft_model, tokenizer, new_record, output, overwrite, location, cfg.keep_adapter)
    timings["save"] = round(time.perf_counter() - save_start, 2)
    _remove_work_dir(work)
    log(f"fine-tuned model written to {output}")
    return FinetuneResult(merged, tokenizer, new_record, output, timings)


def _merge_and_save(
    peft_model, tokenizer, record: dict, output: Path, overwrite: bool, location: Path, keep_adapter: bool
) -> torch.nn.Module:
    """Adapter (optional) and merged model into ``output``, complete or not at all."""
    dtype = _saved_dtype(location)
    source_config = json.loads((location / "config.json").read_text())
    with atomic_output_dir(output, overwrite) as tmp:
        staged = Path(f"{tmp}-{ADAPTER_DIR}")  # save_pruned replaces tmp as a whole: stage the adapter beside it
        try:
            if keep_adapter:
                peft_model.save_pretrained(staged)  # before merging: merge_and_unload removes the LoRA layers
            merged = peft_model.merge_and_unload()
            if "use_cache" in source_config:  # training turned the KV cache off
                merged.config.use_cache = source_config["use_cache"]
            if dtype is not None:
                merged = merged.to(dtype)
            save_pruned(merged, tokenizer, record, tmp, overwrite=True)  # the pruned-model writer, unchanged
            if "architectures" in source_config:  # the input's class name, not that of the loader's pruned class
                config = json.loads((tmp / "config.json").read_text())
                config["architectures"] = source_config["architectures"]
                write_json_atomic(tmp / "config.json", config)
            if keep_adapter:
                staged.rename(tmp / ADAPTER_DIR)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
    return merged.eval()
