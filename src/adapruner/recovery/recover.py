"""``adapruner finetune``: recover a pruned model by distillation from its dense model or by LM loss.

The student is the pruned directory; the teacher, by default, the dense model it records as
``source_model``. LoRA adapters (merged at the end) or every parameter (``full``) train in one loop,
:mod:`adapruner.recovery.trainer`. The result is saved exactly like a pruned model: same per-layer
sizes, modeling file and tokenizer, and the input's ``adapruner.json`` extended with a ``finetune``
record (loss, teacher, tokens, temperature, mode, seconds).

Checkpoints (weights or adapter, optimizer, scheduler, RNG) go to a work directory beside the output
(``OUTPUT.work`` unless ``checkpoint_dir`` says otherwise); running the same command again resumes from
the last one, and the work directory is removed once the output is written.
"""

from __future__ import annotations

import copy
import gc
import json
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from ..errors import AdaPrunerError
from ..files import atomic_output_dir, check_output_dir, write_json_atomic
from ..models.loading import load_causal_lm, resolve_location
from ..pruning.io import read_record, save_pruned
from ..util import log
from ..util import versions as base_versions
from .checkpoints import BACKOFF_KEY, is_main_process, prepare_work_dir, remove_work_dir, run_identity, world_size
from .config import DEFAULT_DATA, LR_BACKOFF, FinetuneConfig
from .data import TrainingData, load_training_data
from .distill import Teacher, load_teacher, open_cache, parse_hidden_layers, teacher_name
from .lora import add_lora, chosen_targets, is_lora, merged, trainable_parameters
from .trainer import CachedExamples, build_trainer

ADAPTER_DIR = "adapter"
CACHE_WAIT_SECONDS = 24 * 3600  # data-parallel workers wait this long for rank 0's teacher cache


@dataclass
class FinetuneResult:
    model: torch.nn.Module  # the merged model
    tokenizer: Any
    record: dict
    output: Path | None = None
    timings: dict[str, float] = field(default_factory=dict)


def _precision(asked: str) -> str:
    """``auto``: bf16 autocast on GPUs that support it (fp16 on the others) and on CPUs with native bf16
    instructions (1.7x the tokens/s of fp32 at the same test perplexity, measured), else fp32."""
    if asked != "auto":
        return asked
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX (Linux's CPU flags): bf16 matrix products run in hardware, not emulated."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f" {flag}" in flags for flag in ("avx512_bf16", "amx_bf16"))


def _versions() -> dict[str, str]:
    import peft

    return base_versions() | {"peft": peft.__version__}


# --- inputs ----------------------------------------------------------------------------------------


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


def _effective_loss(cfg: FinetuneConfig, teacher: str | None) -> str:
    """``kd``/``kd+lm`` need a teacher; ``--teacher none`` falls back to LM loss."""
    if teacher is not None or not cfg.distils:
        return cfg.loss
    if cfg.teacher is None:  # no source_model in the record
        raise AdaPrunerError(
            f"--loss {cfg.loss}: the input records no dense model to distil from: pass --teacher DIR or --teacher none"
        )
    log(f"--teacher none: LM loss instead of {cfg.loss}")
    return "lm"


def _teacher_dtype() -> str:
    return "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"


def _prepare_teacher(cfg: FinetuneConfig, name: str, tokenizer: Any, config: Any, dataset: TrainingData):
    """The live teacher, or the teacher cache (built here if incomplete, the teacher freed afterwards)."""
    if cfg.teacher_cache is None:
        return load_teacher(name, tokenizer, config, dtype=_teacher_dtype()), None
    teacher = load_teacher(name, tokenizer, config, load_weights=False)
    cache = open_cache(
        Path(cfg.teacher_cache),
        teacher,
        dataset.train.examples,
        cfg.cache_top_k,
        cfg.temperature,
        precision=_precision(cfg.precision),
    )
    cache.check()
    if cache.missing_shards():
        if is_main_process():
            _build_cache(cache, teacher, cfg, dataset.train.examples)
        else:
            _wait_for(cache)
    return teacher, cache  # its weights were never loaded here (the build loads and frees them)


def _build_cache(cache, teacher: Teacher, cfg: FinetuneConfig, examples: list) -> None:
    model = load_causal_lm(teacher.location, _teacher_dtype())
    if torch.cuda.is_available():
        model.to("cuda")
    log(f"teacher cache: running {teacher.name} over {cache.windows} windows (top {cfg.cache_top_k})")
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(_precision(cfg.precision))
    cache.build(model, examples, batch_size=cfg.micro_batch_size, autocast=autocast)
    del model
    gc.collect()


def _wait_for(cache) -> None:
    deadline = time.monotonic() + CACHE_WAIT_SECONDS
    while cache.missing_shards():
        if time.monotonic() > deadline:
            raise AdaPrunerError(f"teacher cache {cache.directory} was not completed by rank 0: rerun")
        time.sleep(5)


# --- the run ---------------------------------------------------------------------------------------


def finetune(
    model_dir: str | Path,
    data: str | Path = DEFAULT_DATA,
    output: str | Path | None = None,
    *,
    overwrite: bool = False,
    checkpoint_dir: str | Path | None = None,
    **options: Any,
) -> FinetuneResult:
    """Recover the pruned model in ``model_dir`` on ``data`` and save the merged result to ``output``:
    distillation from its dense model (or LM loss), LoRA or every parameter.

    ``options`` are the fields of :class:`FinetuneConfig` (loss, teacher, full, tokens, lr, teacher_cache,
    ...). ``data`` is a text source or a comma-separated mix of them (default: the four offline sources'
    calibration splits), ``alpaca`` (the hub's yahma/alpaca-cleaned) or a local Alpaca .json/.jsonl file.
    The result is saved like a pruned model; rerunning an interrupted call resumes. The training stack
    (Trainer, peft) loads only when this is called.
    """
    from transformers import AutoConfig, AutoTokenizer, set_seed

    if output is None:
        raise AdaPrunerError("give --output, the directory for the recovered model")
    start = time.perf_counter()
    options = dict(options)
    if options.get("target_modules") is not None:
        options["target_modules"] = tuple(options["target_modules"])
    for name in ("teacher", "teacher_cache"):  # paths are recorded as text
        if options.get(name) is not None:
            options[name] = str(options[name])
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
    student_config = AutoConfig.from_pretrained(str(location))
    teacher_id = teacher_name(cfg.teacher, record) if (cfg.distils or cfg.hidden_loss) else None
    loss = _effective_loss(cfg, teacher_id)
    if cfg.hidden_loss and teacher_id is None:
        raise AdaPrunerError("--hidden-loss needs a teacher: drop --teacher none or --hidden-loss")
    hidden = parse_hidden_layers(cfg.hidden_layers, student_config.num_hidden_layers) if cfg.hidden_loss else []
    world = world_size()
    steps = cfg.steps(dataset.tokens_per_example, world)
    teacher, cache = (None, None)
    if teacher_id is not None:
        teacher, cache = _prepare_teacher(cfg, teacher_id, tokenizer, student_config, dataset)
    timings["teacher"] = round(time.perf_counter() - start, 2)

    model = load_causal_lm(str(location))
    targets = chosen_targets(model, cfg)
    timings["load"] = round(time.perf_counter() - start - timings["teacher"], 2)
    log(
        f"data {dataset.source}: {len(dataset.train)} training and {len(dataset.val or [])} validation "
        f"examples ({dataset.kind}, {dataset.tokens_per_example:.0f} tokens each)"
    )
    work = Path(checkpoint_dir) if checkpoint_dir is not None else output.with_name(f"{output.name}.work")
    teacher_location = teacher.location if teacher is not None else None
    identity = run_identity(location, dataset, cfg, targets, teacher_location)
    precision = _precision(cfg.precision)
    train_set = CachedExamples(dataset.train, cache) if cache is not None else dataset.train
    mode = "every parameter" if cfg.full else f"LoRA r={cfg.lora_r} on {', '.join(targets)}"
    source = f"teacher {teacher.name}" + (f" (cache {cfg.teacher_cache})" if cache else "") if teacher else "no teacher"
    backoff: list[dict] = []
    while True:  # once, unless the loss diverges: then again from the input's weights at a lower rate
        resume, backoff = prepare_work_dir(work, identity, backoff)
        run_cfg = replace(cfg, lr=cfg.learning_rate * LR_BACKOFF ** len(backoff))
        if resume:
            log(f"resuming from {resume}")
        if model is None:
            model = load_causal_lm(str(location))
        set_seed(cfg.seed)  # the LoRA initialisation
        if not cfg.full:
            model = add_lora(model, cfg, targets, location)
        trainable, total = trainable_parameters(model)
        log(
            f"{loss} loss, {source}; {mode}: {trainable:,} trainable of {total:,} parameters ({precision}, "
            f"lr {run_cfg.learning_rate:g})"
        )
        trainer = build_trainer(
            model,
            dataset,
            train_set,
            run_cfg,
            work=work,
            precision=precision,
            pad_token_id=train_tokenizer.pad_token_id,
            max_steps=steps,
            world_size=world,
            loss=loss,
            teacher=teacher.model if teacher is not None else None,
            hidden_layers=hidden,
        )
        train_start = time.perf_counter()
        train_output = trainer.train(resume_from_checkpoint=resume)
        timings["train"] = round(time.perf_counter() - train_start, 2)
        if trainer.divergence.tripped is None:
            break
        backoff = _after_divergence(trainer, work, run_cfg.learning_rate, backoff, cfg.lr_retries)
        timings["diverged"] = round(timings.get("diverged", 0.0) + timings.pop("train"), 2)
        model = trainer = train_output = None  # the next attempt starts from the input's weights
        gc.collect()
    finetune_record = _record(trainer, train_output, cfg, dataset, location, resume, timings, world)
    finetune_record |= {
        "method": "full" if cfg.full else "lora",
        "loss": loss,
        "teacher": teacher_location,
        "teacher_cache": str(cfg.teacher_cache) if cache is not None else None,
        "temperature": cfg.temperature if loss != "lm" else None,
        "lr": run_cfg.learning_rate,
        BACKOFF_KEY: backoff,
        "hidden_loss": cfg.hidden_loss,
        "trainable_params": trainable,
        "precision": precision,
        "config": asdict(cfg) | {"target_modules": targets},
    }
    if not trainer.is_world_process_zero():  # data-parallel workers: rank 0 writes the result
        return FinetuneResult(model, tokenizer, {}, None, timings)

    new_record = dict(record)
    if "finetune" in record:
        new_record["finetune_history"] = [*record.get("finetune_history", []), record["finetune"]]
    new_record["finetune"] = finetune_record
    finetune_record["seconds"] = round(time.perf_counter() - start, 2)  # load + train, without the save
    save_start = time.perf_counter()
    result_model = _merge_and_save(model, tokenizer, new_record, output, overwrite, location, cfg.keep_adapter)
    timings["save"] = round(time.perf_counter() - save_start, 2)
    remove_work_dir(work)
    log(f"recovered model written to {output}")
    return FinetuneResult(result_model, tokenizer, new_record, output, timings)


def _after_divergence(trainer, work: Path, lr: float, backoff: list[dict], retries: int) -> list[dict]:
    """Clear the diverged run's checkpoints (they hold its weights) and record its rate for the retry;
    the one-line error once ``retries`` are spent."""
    if trainer.is_world_process_zero():  # every process stops on the same (gathered) loss; one cleans up
        remove_work_dir(work)
    trainer.accelerator.wait_for_everyone()  # no process reads the old marker or checkpoints after this
    guard = trainer.divergence
    if len(backoff) >= retries:
        raise AdaPrunerError(guard.message([*(b["lr"] for b in backoff), lr]))
    (_, first), (step, value) = guard.first, guard.tripped
    log(
        f"training diverged at lr {lr:g} (loss {first:.4g} -> {value:.4g} at step {step}): starting over from the "
        f"input's weights at lr {lr * LR_BACKOFF:g} (retry {len(backoff) + 1} of {retries})"
    )
    return [*backoff, {"lr": lr, "step": step, "loss": value}]


def _record(trainer, train_output, cfg, dataset, location, resume, timings, world) -> dict[str, Any]:
    state = trainer.state
    resumed_step = int(Path(resume).name.rsplit("-", 1)[-1]) if resume else 0
    steps_run = state.global_step - resumed_step
    losses = [{"step": e["step"], "loss": e["loss"]} for e in state.log_history if "loss" in e]
    parts = {
        name: [e[f"{name}_loss"] for e in state.log_history if f"{name}_loss" in e] for name in ("kd", "lm", "hidden")
    }
    val_losses = [{"step": e["step"], "loss": e["eval_loss"]} for e in state.log_history if "eval_loss" in e]
    speeds = [e["tokens_per_s"] for e in state.log_history if "tokens_per_s" in e]
    effective = cfg.effective_batch(world)
    return {
        "input": str(location),
        "data": dataset.describe(),
        "steps": state.global_step,
        "tokens": round(state.global_step * effective * dataset.tokens_per_example),
        "epochs": round(float(state.epoch or 0), 4),
        "resumed_from_step": resumed_step or None,
        "world_size": world,
        "gradient_accumulation_steps": cfg.accumulation_steps(world),
        "effective_batch_size": effective,
        "train_loss": losses[-1]["loss"] if losses else None,
        "train_loss_mean": train_output.training_loss if steps_run else None,
        "final_loss_parts": {name: values[-1] for name, values in parts.items() if values},
        "val_loss": val_losses[-1]["loss"] if val_losses else None,
        "loss_history": losses,
        "val_loss_history": val_losses,
        "train_seconds": timings["train"],
        "seconds_per_step": round(timings["train"] / steps_run, 3) if steps_run else None,
        "tokens_per_s": speeds[-1] if speeds else None,
        "adapter": ADAPTER_DIR if cfg.keep_adapter and not cfg.full else None,
        "versions": _versions(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _merge_and_save(
    model, tokenizer, record: dict, output: Path, overwrite: bool, location: Path, keep_adapter: bool
) -> torch.nn.Module:
    """Adapter (optional) and merged model into ``output``, complete or not at all."""
    dtype = _saved_dtype(location)
    source_config = json.loads((location / "config.json").read_text())
    with atomic_output_dir(output, overwrite) as tmp:
        staged = Path(f"{tmp}-{ADAPTER_DIR}")  # save_pruned replaces tmp as a whole: stage the adapter beside it
        try:
            keep = keep_adapter and is_lora(model)
            plain = merged(model, staged if keep else None)
            if "use_cache" in source_config:  # training turned the KV cache off
                plain.config.use_cache = source_config["use_cache"]
            if dtype is not None:
                plain = plain.to(dtype)
            save_pruned(plain, tokenizer, record, tmp, overwrite=True)  # the pruned-model writer, unchanged
            if "architectures" in source_config:  # the input's class name, not that of the loader's pruned class
                config = json.loads((tmp / "config.json").read_text())
                config["architectures"] = source_config["architectures"]
                write_json_atomic(tmp / "config.json", config)
            if keep:
                staged.rename(tmp / ADAPTER_DIR)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
    return plain.eval()
