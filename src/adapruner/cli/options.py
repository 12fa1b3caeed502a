"""Options shared by several commands (one definition each) and the helpers that read them."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated, Any, get_type_hints

import typer

from .. import api
from ..export import check_export_request, default_gguf_name
from ..importance.metrics import parse_mix
from ..recipe.config import LEGACY_SPELLINGS, Recipe, Runtime, field_names
from .app import out

ModelArg = Annotated[str, typer.Argument(help="Asset name (smollm2-135m), local directory or hub id.")]
Ratio = Annotated[float, typer.Option(help="Fraction of the whole model's parameters to remove.")]


@dataclass(frozen=True)
class Flag:
    """A configuration field's command-line option: the help text, and only what differs from the field (the
    type typed where the field holds a parsed value, other spellings). Name, type and default are the field's."""

    help: str
    typed: Any = None
    names: tuple[str, ...] = ()
    hidden: bool = False

    def annotation(self, field_type: Any) -> Any:
        return Annotated[self.typed or field_type, typer.Option(*self.names, help=self.help, hidden=self.hidden)]


def flag_annotations(flags: dict[str, Flag], *classes: type) -> dict[str, Any]:
    """Each flag's typer annotation, its type read from the field of that name in ``classes``."""
    types = {name: kind for cls in classes for name, kind in get_type_hints(cls).items()}
    return {name: flag.annotation(types.get(name)) for name, flag in flags.items()}


# The recipe and runtime options that several commands take (adapruner.recipe.config's Recipe and Runtime).
RECIPE_FLAGS = {
    "metric": Flag(
        "random, l1, l2, element1, element2, second, vector, wanda_sp, flap, wifv, mix, or obs (structured "
        "OBS inside the layer-by-layer engine, refitted by least squares)."
    ),
    "mix": Flag("Weights for --metric mix, e.g. element1=0.7,wanda_sp=0.3.", typed=str | None),
    "aggregation": Flag("sum, mean, max, prod or last over coupled layers."),
    "calibration": Flag("Calibration source(s): books, wiki, news, squad, a path; a,b mixes."),
    "num_samples": Flag("Calibration samples (spread evenly over the sources)."),
    "seq_len": Flag("Tokens per calibration sample."),
    "layers": Flag("Layer range START:END to prune (default: LLM-Pruner's)."),
    "head_mode": Flag("auto, kv-group or query."),
    "attention_scale": Flag("Attention rate / MLP rate (0: attention whole)."),
    "align": Flag(
        "Kept MLP channels of every pruned layer a multiple of this (64, 256: what kernels and K-quants like).",
        names=("--align", "--round-to"),
    ),
    "global_ranking": Flag("Older spelling of --ranking global.", typed=bool, hidden=True),
    "attention_metric": Flag("Another metric for attention heads (default: --metric)."),
    "depth_slope": Flag("Per-layer rate profile: >0 cuts deeper layers more (0: uniform)."),
    "depth_bend": Flag("Per-layer rate profile: >0 cuts both ends more than the middle."),
    "ranking": Flag(
        "layer (each layer keeps its share), global (units of a kind compete across layers) or global-all "
        "(heads and channels of all layers in one list, FLAP's AL-AM)."
    ),
    "activation_calibration": Flag(
        "Activation statistics (wanda_sp, flap, wifv, --refit bias) from N fresh windows of L tokens of "
        "--calibration, e.g. 128x128 (default: the same samples as the gradients)."
    ),
    "seed": Flag("Seed for calibration sampling and the random metric."),
    "compensate": Flag("Older spelling of --refit bias.", typed=bool, hidden=True),
    "refit": Flag(
        "none; bias (FLAP's compensation: removed o_proj/down_proj inputs live on as a bias); lsq (layer by "
        "layer, least-squares refit of the kept o_proj/down_proj columns and a bias on the pruned model's own "
        "inputs)."
    ),
    "refit_calibration": Flag(
        "Windows of --calibration the layer-by-layer engine (lsq, obs) runs on, NxL (default: 16,384 tokens in "
        "the longest windows the text has enough of: 128x128, books 256x64)."
    ),
    "refit_damping": Flag("lsq/obs ridge: fraction of the mean diagonal of each Gram matrix."),
    "refit_bias": Flag("lsq/obs: refit a bias too (--no-refit-bias keeps the old one)."),
    "obs_rounds": Flag("obs: batches in which MLP channels are removed."),
    "refit_device": Flag(
        "Run the layer-by-layer engine there (e.g. cuda) while the model stays where it was loaded: one decoder "
        "layer at a time on the device."
    ),
    "uniform": Flag(
        "Prune every layer to the same heads and channels and save the stock architecture: plain "
        "from_pretrained, vLLM, TGI and llama.cpp conversions load it (no trust_remote_code)."
    ),
    "dtype": Flag("float32, bfloat16 or float16."),
    "device_map": Flag("Passed to from_pretrained, e.g. auto.", typed=str | None),
    "offload": Flag("Keep gradient statistics on the CPU (large models)."),
    "batch_size": Flag("Samples per statistics step (default: all at once)."),
    "gradient_checkpointing": Flag("Gradient checkpointing in the statistics pass (less memory)."),
}
RECIPE_OPTIONS = flag_annotations(RECIPE_FLAGS, Recipe, Runtime)
# the ones other commands (pool, search) declare with their own defaults
Calibration, SeqLen, Layers, HeadMode = (RECIPE_OPTIONS[n] for n in ("calibration", "seq_len", "layers", "head_mode"))
Seed, Dtype, Uniform = (RECIPE_OPTIONS[n] for n in ("seed", "dtype", "uniform"))

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


# The recipe and runtime options that several commands take, by group: each is declared once, in RECIPE_FLAGS,
# and defaults to its field's default in Recipe/Runtime (adapruner.recipe.config).
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
    """Give a command the recipe options of ``groups`` in place of its ``**options``, defaults the recipe's."""
    return takes_options({name: RECIPE_OPTIONS[name] for group in groups for name in group}, DEFAULTS)


def takes_options(annotations: dict[str, Any], defaults: dict[str, Any]) -> Callable[[Callable], Callable]:
    """Give a command these options in place of its ``**options``: typer reads the signature, so each option
    is declared once, in its table, and the command receives them in ``options``."""

    def decorate(command: Callable) -> Callable:
        signature = inspect.signature(command, eval_str=True)
        params = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
        shared = [
            inspect.Parameter(name, KEYWORD, default=defaults.get(name), annotation=annotation)
            for name, annotation in annotations.items()
        ]
        command.__signature__ = signature.replace(parameters=params + shared)
        return command

    return decorate


def field_defaults(*classes: type) -> dict[str, Any]:
    """Each field's default: what its flag defaults to."""
    return {f.name: f.default for cls in classes for f in fields(cls)}


# each shared option's default: its field's, False for the older spellings, None for device_map
DEFAULTS = field_defaults(Recipe, Runtime) | dict.fromkeys(LEGACY_SPELLINGS, False)
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
