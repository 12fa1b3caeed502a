"""``finetune``: recovery (distillation or LM loss, LoRA or every parameter) from the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from .. import api
from ..data.sources import ALL_OFFLINE
from ..recovery.config import FinetuneConfig
from .app import app, out, split_list, user_errors


def _finetune_defaults():
    return FinetuneConfig()


_FT = _finetune_defaults()


@app.command()
@user_errors
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
    loss: Annotated[
        str, typer.Option(help="kd+lm (KL from the teacher plus next-token loss), kd, or lm (no teacher).")
    ] = _FT.loss,
    teacher: Annotated[
        str | None,
        typer.Option(help="Dense model to distil from (default: the source_model the input records); 'none': LM loss."),
    ] = None,
    temperature: Annotated[float, typer.Option(help="Distillation temperature.")] = _FT.temperature,
    kd_weight: Annotated[float, typer.Option(help="kd+lm: weight of the KD term (LM gets 1 - it).")] = _FT.kd_weight,
    hidden_loss: Annotated[
        str | None, typer.Option(help="Also match hidden states: cosine or mse (needs the live teacher).")
    ] = None,
    hidden_layers: Annotated[
        str, typer.Option(help="Layers whose outputs --hidden-loss matches: all, or indices like 3,7,-1.")
    ] = _FT.hidden_layers,
    hidden_weight: Annotated[float, typer.Option(help="Weight of the hidden-state term.")] = _FT.hidden_weight,
    teacher_cache: Annotated[
        str | None,
        typer.Option(
            help="Directory for the teacher's top-k logits: built once, shared by later runs on the same data."
        ),
    ] = None,
    cache_top_k: Annotated[int, typer.Option(help="Logits kept per position in --teacher-cache.")] = _FT.cache_top_k,
    full: Annotated[
        bool, typer.Option("--full/--lora", help="Train every parameter (--full) or LoRA adapters (--lora).")
    ] = _FT.full,
    gradient_checkpointing: Annotated[
        bool, typer.Option(help="Recompute activations in the backward pass (less memory, ~30% slower).")
    ] = _FT.gradient_checkpointing,
    precision: Annotated[
        str, typer.Option(help="auto (bf16 autocast where the GPU or CPU does bf16 in hardware), fp32, bf16, fp16.")
    ] = _FT.precision,
    tokens: Annotated[
        int | None, typer.Option(help="Training tokens (sets the steps; wins over --max-steps and --epochs).")
    ] = None,
    lora_r: Annotated[int, typer.Option(help="LoRA rank.")] = _FT.lora_r,
    lora_alpha: Annotated[int, typer.Option(help="LoRA alpha (scaling alpha/r).")] = _FT.lora_alpha,
    lora_dropout: Annotated[float, typer.Option(help="Dropout on the LoRA input.")] = _FT.lora_dropout,
    target_modules: Annotated[
        str | None, typer.Option(help="LoRA on these projections only, e.g. q_proj,v_proj (default: all seven).")
    ] = None,
    lr: Annotated[
        float | None, typer.Option(help="Peak learning rate after the warmup (default: 3e-4 full, 1e-3 LoRA).")
    ] = _FT.lr,
    lr_scheduler: Annotated[str, typer.Option(help="After the warmup: linear, cosine or constant.")] = _FT.lr_scheduler,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = _FT.weight_decay,
    cutoff_len: Annotated[
        int, typer.Option(help="Tokens per example (instructions are truncated, text cut).")
    ] = _FT.cutoff_len,
    epochs: Annotated[float, typer.Option(help="Passes over the training data.")] = _FT.epochs,
    batch_size: Annotated[int, typer.Option(help="Examples per optimizer step, over all devices.")] = _FT.batch_size,
    micro_batch_size: Annotated[int, typer.Option(help="Examples per forward pass and device.")] = _FT.micro_batch_size,
    warmup_steps: Annotated[
        float, typer.Option(help="Linear warmup steps, or a fraction of the steps when below 1.")
    ] = _FT.warmup_steps,
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many optimizer steps.")] = None,
    val_set_size: Annotated[
        int, typer.Option(help="Held-out instruction records, or validation-split text blocks (0: none).")
    ] = _FT.val_set_size,
    eval_steps: Annotated[int, typer.Option(help="Validate every N steps (and at the end).")] = _FT.eval_steps,
    save_steps: Annotated[int, typer.Option(help="Checkpoint every N steps (and at the end).")] = _FT.save_steps,
    logging_steps: Annotated[int, typer.Option(help="Log the training loss every N steps.")] = _FT.logging_steps,
    train_on_inputs: Annotated[
        bool, typer.Option(help="Loss on the prompt too (--no-train-on-inputs: response only).")
    ] = _FT.train_on_inputs,
    divergence: Annotated[
        float,
        typer.Option(
            help="The loss has diverged when a logged training loss exceeds this multiple of the first one (then "
            "--lr-retries, or an error); 0: never."
        ),
    ] = _FT.divergence,
    lr_retries: Annotated[
        int,
        typer.Option(
            help="When the loss diverges, start over from the input's weights at a quarter of the learning rate, "
            "at most this many times (0: stop with the error)."
        ),
    ] = _FT.lr_retries,
    keep_adapter: Annotated[bool, typer.Option(help="Also save the unmerged adapter in OUTPUT/adapter/.")] = False,
    checkpoint_dir: Annotated[
        Path | None, typer.Option(help="Checkpoints for resuming (default: OUTPUT.work beside OUTPUT).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed for the LoRA init, the validation split and data order.")] = _FT.seed,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output directory.")] = False,
) -> None:
    """Recover a pruned model by distillation from its dense model (or LM loss), merge and save; rerun to resume."""
    options = {k: v for k, v in locals().items() if k not in {"model_dir", "data", "output", "overwrite"}}
    checkpoint_dir = options.pop("checkpoint_dir")
    if target_modules is not None:
        options["target_modules"] = split_list(target_modules)
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
