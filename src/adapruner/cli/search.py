"""``search`` and ``run``: the Optuna study and the whole pipeline from the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from .. import api
from ..data.pool import DEFAULT_POOL_PER_SOURCE
from ..data.sources import ALL_OFFLINE
from ..pipeline import load_run_config, run
from ..search import SearchSpace, load_space
from ..search import search as run_search
from ..search.space import RECIPE
from .app import app, out, split_list, user_errors
from .options import (
    Dtype,
    HeadMode,
    Layers,
    ModelArg,
    Quant,
    Ratio,
    Seed,
    Uniform,
    check_export,
    export_into,
)


@app.command()
@user_errors
def search(
    model: ModelArg,
    ratio: Ratio,
    output: Annotated[Path, typer.Option(help="Run directory: study.db, best.json, trials.csv.")],
    trials: Annotated[int, typer.Option(help="Total number of trials (a rerun continues up to this).")] = 20,
    space: Annotated[
        str | None, typer.Option(help="joint (default), data (metric fixed) or metric (data fixed).")
    ] = None,
    sampler: Annotated[str, typer.Option(help="tpe or random.")] = "tpe",
    sources: Annotated[str | None, typer.Option(help="Calibration sources the search may mix.")] = None,
    metrics: Annotated[str | None, typer.Option(help="Metrics the search may pick.")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML file with SearchSpace fields; flags override it.")] = None,
    pool_per_source: Annotated[int, typer.Option(help="Pool samples per source.")] = DEFAULT_POOL_PER_SOURCE,
    pool_seq_len: Annotated[
        int | None, typer.Option(help="Tokens per pool sample (default: the longest searched length).")
    ] = None,
    pruner: Annotated[
        str, typer.Option(help="Stop hopeless trials on partial evaluation: percentile, median or none.")
    ] = "percentile",
    objective_data: Annotated[
        str, typer.Option(help="Validation text of the objective: sources or local files, comma-separated.")
    ] = ALL_OFFLINE,
    objective_tokens: Annotated[int, typer.Option(help="Validation tokens per objective source.")] = 1024,
    objective: Annotated[
        str, typer.Option(help="ppl (perplexity) or kl (KL divergence from the dense model's next-token distribution).")
    ] = "ppl",
    layers: Layers = None,
    head_mode: HeadMode = "auto",
    uniform: Uniform = False,
    storage: Annotated[str | None, typer.Option(help="Optuna storage URL (default: sqlite in the run dir).")] = None,
    study: Annotated[str, typer.Option(help="Study name inside the storage.")] = "adapruner",
    seed: Seed = 0,
    dtype: Dtype = "float32",
    align: Annotated[
        int | None, typer.Option(help="Kept MLP channels of every trial a multiple of this (as prune --align).")
    ] = None,
    export: Annotated[
        str | None,
        typer.Option("--export", help="Prune the winner into OUTPUT/pruned and write it for an engine: gguf."),
    ] = None,
    quant: Quant = "f16",
) -> None:
    """Search calibration data x importance metric x allocation with TPE; rerun to continue."""
    check_export(export, quant)
    overrides = {
        "space": space,
        "sources": split_list(sources) if sources else None,
        "metrics": split_list(metrics) if metrics else None,
        "uniform": uniform or None,
        "align": align,
    }
    search_space = (
        load_space(config, **overrides)
        if config
        else SearchSpace(**{k: v for k, v in overrides.items() if v is not None})
    )

    result = run_search(
        model,
        ratio,
        trials=trials,
        output=output,
        sampler=sampler,
        seed=seed,
        storage=storage,
        study_name=study,
        layers=layers,
        head_mode=head_mode,
        pool_per_source=pool_per_source,
        pool_seq_len=pool_seq_len,
        objective_data=objective_data,
        objective_tokens=objective_tokens,
        objective=objective,
        dtype=dtype,
        space=search_space,
        pruner=pruner,
    )
    best, baseline = result["best"], result["baseline"]
    table = Table(title=f"search {model} at ratio {ratio}: {result['trials']} trials -> {output}")
    for col in ("", f"validation {objective}", "configuration"):
        table.add_column(col)
    recipe = f"{RECIPE['metric']}, {RECIPE['aggregation']}, {RECIPE['num_samples']} {RECIPE['calibration']} samples"
    table.add_row("LLM-Pruner recipe (trial 0)", f"{baseline['value']:.2f}", recipe)
    for name, start in result.get("warm_starts", {}).items():
        table.add_row(f"{name} recipe (trial {start['trial']}, warm start)", f"{start['value']:.2f}", "")
    table.add_row(f"best (trial {best['trial']})", f"{best['value']:.2f}", describe_trial(best["config"]))
    out.print(table)
    if export is None:
        out.print(f"prune with it: adapruner prune {model} --from-run {output} --output DIR")
        return
    pruned = output / "pruned"
    api.prune(model, from_run=output, output=pruned, overwrite=True, dtype=dtype)
    out.print(f"pruned the best trial into {pruned}")
    export_into(pruned, export, quant)


def describe_trial(cfg: dict) -> str:
    """One line for a trial's configuration (search table, run log)."""
    if cfg.get("allocation") == "per-layer":
        return (
            f"per-layer keep counts of {len(cfg['counts'])} layers from the supernet on "
            f"{'+'.join(cfg['sources'])}: structured OBS + least-squares refit"
        )
    attention = f" (attention: {cfg['attention_metric']})" if cfg.get("attention_metric") else ""
    ranking = cfg.get("ranking") or ("global" if cfg.get("global_ranking") else "layer")
    text = (
        f"{cfg['metric']}{attention}, {cfg['aggregation']}, {cfg['num_samples']}x{cfg['seq_len']} from "
        f"{'+'.join(cfg['sources'])}, {ranking} ranking, attention x{cfg['attention_scale']:.2f}, "
        f"depth slope {cfg['depth_slope']:+.2f} bend {cfg['depth_bend']:+.2f}"
    )
    if cfg.get("layers") not in (None, "default"):
        text += f", layers {cfg['layers']}"
    if cfg.get("refit", "none") == "lsq":
        return text + ", least-squares refit"
    return text + (", bias compensation" if cfg.get("compensate") else "")


@app.command("run")
@user_errors
def run_pipeline(
    model: Annotated[str | None, typer.Argument(help="Asset name, local directory or hub id (or in --config).")] = None,
    output: Annotated[Path, typer.Option(help="Run directory; a rerun skips finished stages.")] = Path("runs/run"),
    ratio: Annotated[float | None, typer.Option(help="Fraction of the parameters to remove.")] = None,
    trials: Annotated[int | None, typer.Option(help="Search trials (default 20).")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML file holding any RunConfig option; flags win.")] = None,
    space: Annotated[str | None, typer.Option(help="Search space: joint (default), data or metric.")] = None,
    sources: Annotated[str | None, typer.Option(help="Calibration sources the search may mix.")] = None,
    metrics: Annotated[str | None, typer.Option(help="Metrics the search may pick.")] = None,
    sampler: Annotated[str | None, typer.Option(help="tpe (default) or random.")] = None,
    pool_per_source: Annotated[int | None, typer.Option(help="Search pool samples per source.")] = None,
    pool_seq_len: Annotated[int | None, typer.Option(help="Tokens per pool sample (default: the longest).")] = None,
    pruner: Annotated[str | None, typer.Option(help="percentile (default), median or none.")] = None,
    objective_data: Annotated[str | None, typer.Option(help="Validation text of the search's objective.")] = None,
    objective_tokens: Annotated[int | None, typer.Option(help="Validation tokens per objective source.")] = None,
    objective: Annotated[str | None, typer.Option(help="ppl (default) or kl.")] = None,
    layers: Annotated[str | None, typer.Option(help="The search's layer range START:END (default: searched).")] = None,
    head_mode: Annotated[str | None, typer.Option(help="auto (default), kv-group or query.")] = None,
    storage: Annotated[str | None, typer.Option(help="Optuna storage URL of the search (default: sqlite).")] = None,
    study: Annotated[str | None, typer.Option(help="Study name inside the storage (default adapruner).")] = None,
    baseline: Annotated[
        bool | None, typer.Option("--baseline/--no-baseline", help="Also run LLM-Pruner's recipe for the table.")
    ] = None,
    baseline_calibration: Annotated[str | None, typer.Option(help="The baseline's calibration (books).")] = None,
    finetune_data: Annotated[
        str | None,
        typer.Option(help="Recovery text: sources joined by commas (default wiki,news,books,squad), alpaca, a file."),
    ] = None,
    no_finetune: Annotated[bool, typer.Option("--no-finetune", help="Skip the recovery stage.")] = False,
    max_steps: Annotated[int | None, typer.Option(help="Recovery optimizer steps (default: 2 epochs).")] = None,
    finetune_tokens: Annotated[
        int | None, typer.Option(help="Recovery training tokens per model (wins over --max-steps).")
    ] = None,
    ppl: Annotated[str | None, typer.Option(help="Perplexity sources (default wiki,news,books,squad).")] = None,
    seq_len: Annotated[str | None, typer.Option(help="Perplexity window lengths, e.g. 128,2048.")] = None,
    eval_tokens: Annotated[int | None, typer.Option(help="Test tokens per perplexity source.")] = None,
    tasks: Annotated[str | None, typer.Option(help="Zero-shot tasks (default: the seven); '' for none.")] = None,
    limit: Annotated[int | None, typer.Option(help="Documents per zero-shot task (default: all).")] = None,
    seed: Annotated[int | None, typer.Option(help="Search seed.")] = None,
    dtype: Annotated[str | None, typer.Option(help="float32 (default), bfloat16 or float16.")] = None,
    uniform: Uniform = False,
    align: Annotated[
        int | None, typer.Option(help="Kept MLP channels a multiple of this (search and baseline, as prune --align).")
    ] = None,
    export: Annotated[
        str | None, typer.Option("--export", help="Write the final AdaPruner model for an engine: gguf (llama.cpp).")
    ] = None,
    quant: Annotated[str | None, typer.Option(help="Matrix type of the GGUF (as export --quant; default f16).")] = None,
) -> None:
    """Search -> prune -> recover (distillation) -> evaluate (dense, LLM-Pruner recipe, AdaPruner), with a report.

    Every option of `adapruner search` is here too (the search's space as --space/--sources/--metrics or a
    YAML `search_space`); flags win over --config."""
    space_flags = {"space": space, "sources": split_list(sources) if sources else None}
    space_flags["metrics"] = split_list(metrics) if metrics else None
    cfg = load_run_config(
        config,
        model=model,
        ratio=ratio,
        trials=trials,
        sampler=sampler,
        pool_per_source=pool_per_source,
        pool_seq_len=pool_seq_len,
        pruner=pruner,
        objective_data=objective_data,
        objective_tokens=objective_tokens,
        objective=objective,
        layers=layers,
        head_mode=head_mode,
        storage=storage,
        study=study,
        baseline=baseline,
        baseline_calibration=baseline_calibration,
        finetune_data=finetune_data,
        ppl=split_list(ppl) if ppl else None,
        seq_len=[int(n) for n in split_list(seq_len)] if seq_len else None,
        eval_tokens=eval_tokens,
        tasks=split_list(tasks) if tasks is not None else None,
        limit=limit,
        seed=seed,
        dtype=dtype,
        uniform=uniform or None,
        align=align,
        export=export,
        export_quant=quant,
        search_space={k: v for k, v in space_flags.items() if v is not None} or None,
    )
    if no_finetune:
        cfg.finetune_data = None
    if max_steps is not None:
        cfg.finetune = cfg.finetune | {"max_steps": max_steps}
    if finetune_tokens is not None:
        cfg.finetune = cfg.finetune | {"tokens": finetune_tokens}
        cfg.baseline_finetune = cfg.baseline_finetune | {"tokens": finetune_tokens}
    run(cfg, output)
    print((output / "report.md").read_text())  # plain: the markdown holds [..] that rich would read as markup
