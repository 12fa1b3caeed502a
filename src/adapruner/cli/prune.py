"""``prune``, ``importance`` and ``pool``: pruning and scoring from the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from .. import api
from .app import app, out, user_errors
from .options import (
    REFITTING,
    SCORING,
    STATISTICS_RUNTIME,
    Calibration,
    Dtype,
    ExportFormat,
    Layers,
    ModelArg,
    Quant,
    Ratio,
    Seed,
    SeqLen,
    check_export,
    config_options,
    export_into,
    given_options,
    takes,
)


@app.command()
@user_errors
@takes(SCORING, REFITTING, STATISTICS_RUNTIME)
def prune(
    ctx: typer.Context,
    model: ModelArg,
    output: Annotated[Path, typer.Option(help="Directory for the pruned model.")],
    ratio: Annotated[float | None, typer.Option(help="Fraction of the whole model's parameters to remove.")] = None,
    from_run: Annotated[
        Path | None, typer.Option(help="Use the best configuration of `adapruner search` in this run directory.")
    ] = None,
    method: Annotated[
        str | None,
        typer.Option(
            help="A baseline preset: random, l2, llm-pruner-element1, llm-pruner-element2, llm-pruner-vector, "
            "wanda-sp, flap, flap-refit or local-obs. It sets metric, aggregation, calibration, layers, ranking and "
            "refit; options given explicitly still override it."
        ),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output directory.")] = False,
    export: ExportFormat = None,
    quant: Quant = "f16",
    **options: Any,
) -> None:
    """Prune MODEL by RATIO of its parameters and save a loadable HF directory (and a GGUF with --export gguf)."""
    check_export(export, quant)
    device_map = options.pop("device_map")
    options = config_options(options)
    if method is not None:
        options = given_options(ctx, options) | {"method": method}
    result = api.prune(
        model, ratio, output=output, overwrite=overwrite, device_map=device_map, from_run=from_run, **options
    )
    rec = result.record
    table = Table(title=f"pruned {model} -> {output}")
    for col in ("dense params", "pruned params", "target ratio", "achieved ratio", "time (s)"):
        table.add_column(col, justify="right")
    table.add_row(
        f"{rec['params']['dense']:,}",
        f"{rec['params']['pruned']:,}",
        f"{rec['target_ratio']:.3f}",
        f"{rec['achieved_ratio']:.3f}",
        f"{sum(result.timings.values()):.1f}",
    )
    out.print(table)
    export_into(output, export, quant)


@app.command()
@user_errors
@takes(SCORING, STATISTICS_RUNTIME)
def importance(
    model: ModelArg,
    output: Annotated[Path, typer.Option(help="JSON file for the per-group scores and the resulting plan.")],
    ratio: Ratio = 0.2,
    **options: Any,
) -> None:
    """Score every prunable group of MODEL and save the scores (and the plan RATIO would give) as JSON."""
    device_map = options.pop("device_map")
    report = api.score_importance(model, ratio, output=output, device_map=device_map, **config_options(options))
    out.print(f"scores of {len(report['scores'])} groups written to {output}")


@app.command()
@user_errors
def pool(
    model: ModelArg,
    output: Annotated[Path, typer.Option(help="CSV file: one row per sample with its statistics.")],
    calibration: Calibration = "books,wiki,news,squad",
    per_source: Annotated[int, typer.Option(help="Samples drawn from each source.")] = 16,
    seq_len: SeqLen = 128,
    layers: Layers = None,
    seed: Seed = 0,
    dtype: Dtype = "float32",
) -> None:
    """Build a calibration pool and its per-sample statistics (dense loss, gradient norm), cached on disk."""
    built = api.build_calibration_pool(
        model, calibration, per_source=per_source, seq_len=seq_len, seed=seed, layers=layers, output=output, dtype=dtype
    )
    table = Table(title=f"pool {built.fingerprint}: {len(built)} samples x {built.seq_len} tokens")
    for col in ("source", "samples", "mean loss", "mean grad norm"):
        table.add_column(col, justify="right")
    for source in built.source_names():
        idx = [i for i, s in enumerate(built.sources) if s == source]
        table.add_row(
            source,
            str(len(idx)),
            f"{built.stats['loss'][idx].mean():.3f}",
            f"{built.stats['grad_norm'][idx].mean():.3f}",
        )
    out.print(table)
