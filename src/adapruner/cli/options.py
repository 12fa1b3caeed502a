"""Options shared by several commands (one definition each) and the helpers that read them."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any

import typer

from .. import api
from ..export import check_export_request, default_gguf_name
from ..importance.metrics import parse_mix
from ..recipe.config import LEGACY_SPELLINGS, Recipe, Runtime, field_names
from .app import out

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
GradientCheckpointing = Annotated[
    bool, typer.Option(help="Gradient checkpointing in the statistics pass (less memory).")
]
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


def check_export(export: str | None, quant: str) -> None:
    """Refuse a bad --export/--quant before minutes of pruning."""
    if export is not None:
        check_export_request(export, quant)


def export_into(model_dir: Path, export: str | None, quant: str) -> None:
    """``--export gguf``: the model in ``model_dir`` as ``model_dir/model-QUANT.gguf``."""
    if export is None:
        return
    result = api.export(model_dir, model_dir / default_gguf_name(quant), quant=quant, overwrite=True)
    print_export(result)


def print_export(result) -> None:
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


# The recipe and runtime options that several commands take, by group: each is declared once above, under its
# field's name in CamelCase, and defaults to its field's default in Recipe/Runtime (adapruner.recipe.config).
SCORING = (
    "metric", "mix", "aggregation", "calibration", "num_samples", "seq_len", "layers", "head_mode", "attention_scale",
    "align", "global_ranking", "attention_metric", "depth_slope", "depth_bend", "ranking", "activation_calibration",
    "seed",
)  # fmt: skip
REFITTING = (
    "compensate", "refit", "refit_calibration", "refit_damping", "refit_bias", "obs_rounds", "refit_device", "uniform",
)  # fmt: skip
STATISTICS_RUNTIME = ("dtype", "device_map", "offload", "batch_size", "gradient_checkpointing")


def takes(*groups: tuple[str, ...]) -> Callable[[Callable], Callable]:
    """Give a command the options of ``groups`` in place of its ``**options``: typer reads the signature, so
    each option is declared once here and its default is the recipe's (the command receives them in
    ``options``)."""

    def decorate(command: Callable) -> Callable:
        signature = inspect.signature(command, eval_str=True)
        params = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
        shared = [
            inspect.Parameter(name, KEYWORD, default=DEFAULTS.get(name), annotation=_declared(name))
            for group in groups
            for name in group
        ]
        command.__signature__ = signature.replace(parameters=params + shared)
        return command

    return decorate


def _declared(name: str) -> Any:
    return globals()["".join(word.capitalize() for word in name.split("_"))]


# each shared option's default: its field's, False for the older spellings, None for device_map
DEFAULTS = {f.name: f.default for cls in (Recipe, Runtime) for f in fields(cls)}
DEFAULTS |= dict.fromkeys(LEGACY_SPELLINGS, False)
KEYWORD = inspect.Parameter.KEYWORD_ONLY


def config_options(values: dict[str, Any]) -> dict[str, Any]:
    """The recipe and runtime fields (and their older spellings) among a command's parameters (``--mix``
    text parsed into weights)."""
    names = (field_names(Recipe) | field_names(Runtime) | set(LEGACY_SPELLINGS)) - {"model", "ratio"}
    options = {k: v for k, v in values.items() if k in names}
    options["mix"] = parse_mix(options.get("mix")) or None
    return options


def given_options(ctx: typer.Context, options: dict[str, Any]) -> dict[str, Any]:
    """Only the options typed on the command line (with --method the rest come from the preset)."""

    def typed(name: str) -> bool:  # by name: typer may ship its own copy of click's ParameterSource
        source = ctx.get_parameter_source(name)
        return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")

    return {k: v for k, v in options.items() if typed(k)}
