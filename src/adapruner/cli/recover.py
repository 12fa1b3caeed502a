"""``finetune``: recovery (distillation or LM loss, LoRA or every parameter) from the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from .. import api
from ..data.sources import ALL_OFFLINE
from ..recovery.config import FinetuneConfig
from .app import app, out, split_list, user_errors
from .options import Flag, field_defaults, flag_annotations, takes_options

FINETUNE_FLAGS = {
    "loss": Flag("kd+lm (KL from the teacher plus next-token loss), kd, or lm (no teacher)."),
    "teacher": Flag("Dense model to distil from (default: the source_model the input records); 'none': LM loss."),
    "temperature": Flag("Distillation temperature."),
    "kd_weight": Flag("kd+lm: weight of the KD term (LM gets 1 - it)."),
    "hidden_loss": Flag("Also match hidden states: cosine or mse (needs the live teacher)."),
    "hidden_layers": Flag("Layers whose outputs --hidden-loss matches: all, or indices like 3,7,-1."),
    "hidden_weight": Flag("Weight of the hidden-state term."),
    "teacher_cache": Flag(
        "Directory for the teacher's top-k logits: built once, shared by later runs on the same data."
    ),
    "cache_top_k": Flag("Logits kept per position in --teacher-cache."),
    "full": Flag("Train every parameter (--full) or LoRA adapters (--lora).", names=("--full/--lora",)),
    "gradient_checkpointing": Flag("Recompute activations in the backward pass (less memory, ~30% slower)."),
    "precision": Flag("auto (bf16 autocast where the GPU or CPU does bf16 in hardware), fp32, bf16, fp16."),
    "lora_r": Flag("LoRA rank."),
    "lora_alpha": Flag("LoRA alpha (scaling alpha/r)."),
    "lora_dropout": Flag("Dropout on the LoRA input."),
    "target_modules": Flag(
        "LoRA on these projections only, e.g. q_proj,v_proj (default: all seven).", typed=str | None
    ),
    "lr": Flag("Peak learning rate after the warmup (default: 3e-4 full, 1e-3 LoRA)."),
    "lr_scheduler": Flag("After the warmup: linear, cosine or constant."),
    "weight_decay": Flag("AdamW weight decay."),
    "cutoff_len": Flag("Tokens per example (instructions are truncated, text cut)."),
    "epochs": Flag("Passes over the training data."),
    "batch_size": Flag("Examples per optimizer step, over all devices."),
    "micro_batch_size": Flag("Examples per forward pass and device."),
    "warmup_steps": Flag("Linear warmup steps, or a fraction of the steps when below 1."),
    "max_steps": Flag("Stop after this many optimizer steps."),
    "tokens": Flag("Training tokens (sets the steps; wins over --max-steps and --epochs)."),
    "val_set_size": Flag("Held-out instruction records, or validation-split text blocks (0: none)."),
    "eval_steps": Flag("Validate every N steps (and at the end)."),
    "save_steps": Flag("Checkpoint every N steps (and at the end)."),
    "logging_steps": Flag("Log the training loss every N steps."),
    "divergence": Flag(
        "The loss has diverged when a logged training loss exceeds this multiple of the first one (then "
        "--lr-retries, or an error); 0: never."
    ),
    "lr_retries": Flag(
        "When the loss diverges, start over from the input's weights at a quarter of the learning rate, at "
        "most this many times (0: stop with the error)."
    ),
    "seed": Flag("Seed for the LoRA init, the validation split and data order."),
    "train_on_inputs": Flag("Loss on the prompt too (--no-train-on-inputs: response only)."),
    "keep_adapter": Flag("Also save the unmerged adapter in OUTPUT/adapter/."),
}


@app.command()
@user_errors
@takes_options(flag_annotations(FINETUNE_FLAGS, FinetuneConfig), field_defaults(FinetuneConfig))
def finetune(
    model_dir: Annotated[Path, typer.Argument(help="A pruned model directory written by `adapruner prune`.")],
    output: Annotated[Path, typer.Option(help="Directory for the recovered model (same format as a pruned one).")],
    data: Annotated[
        str,
        typer.Option(
            help="Text source(s): wiki, news, books, squad, a .txt path, or a comma-separated mix (their "
            "calibration splits); alpaca (hub) or an Alpaca .json/.jsonl file (instruction, input, output)."
        ),
    ] = ALL_OFFLINE,
    checkpoint_dir: Annotated[
        Path | None, typer.Option(help="Checkpoints for resuming (default: OUTPUT.work beside OUTPUT).")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output directory.")] = False,
    **options: Any,
) -> None:
    """Recover a pruned model by distillation from its dense model (or LM loss), merge and save; rerun to resume."""
    if options["target_modules"] is not None:
        options["target_modules"] = split_list(options["target_modules"])
    result = api.finetune(model_dir, data, output, overwrite=overwrite, checkpoint_dir=checkpoint_dir, **options)
    if result.output is None:  # a data-parallel worker; rank 0 reports
        return
    rec = result.record["finetune"]
    table = Table(title=f"recovered {model_dir} on {data} -> {output}")
    for col in ("mode", "loss", "steps", "tokens", "train loss", "val LM loss", "tokens/s", "time (s)"):
        table.add_column(col, justify="right")
    table.add_row(
        rec["method"],
        rec["loss"],
        str(rec["steps"]),
        f"{rec['tokens']:,}",
        f"{rec['train_loss']:.4f}" if rec["train_loss"] is not None else "-",
        f"{rec['val_loss']:.4f}" if rec["val_loss"] is not None else "-",
        f"{rec['tokens_per_s']:.0f}" if rec["tokens_per_s"] is not None else "-",
        f"{sum(result.timings.values()):.1f}",
    )
    out.print(table)
