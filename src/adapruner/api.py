"""The Python API. Every CLI command is one of these functions."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from .data.calibration import WindowCounts, split_sources
from .data.pool import CalibrationPool, build_pool
from .data.sources import ALL_OFFLINE, OFFLINE_SOURCES
from .errors import AdaPrunerError
from .files import check_output_dir, write_csv_atomic, write_json_atomic
from .importance import AGGREGATIONS, Importance, Statistics, collect_statistics, get_metric, score_groups
from .importance.cache import StatisticsCache
from .importance.fresh import FreshWindows
from .importance.metrics import PerKind
from .local import LocalResult, LocalSettings, local_prune
from .methods import get_method, with_method
from .models.base import ModelAdapter, get_adapter
from .models.groups import HEAD_MODES, layer_groups
from .models.loading import load_causal_lm, load_model, load_tokenizer
from .pruning.apply import prune_physically
from .pruning.io import read_record, save_pruned
from .pruning.plan import (
    RANKINGS,
    Budget,
    PrunePlan,
    Scores,
    allocation_offsets,
    count_params,
    parse_layer_range,
    plan_from_scores,
    rate_summary,
    solve_keep_counts,
)
from .pruning.stock import check_stock_possible, make_stock, output_kind
from .util import log, versions


@dataclass(frozen=True)
class PruneConfig:
    """Everything that decides a pruning run; recorded verbatim in ``adapruner.json``."""

    model: str
    ratio: float
    metric: str = "element1"
    aggregation: str = "sum"
    calibration: str = "books"
    num_samples: int = 10
    seq_len: int = 64
    layers: str | None = None
    head_mode: str = "auto"
    attention_scale: float = 1.0
    align: int = 1
    seed: int = 0
    dtype: str = "float32"
    mix: dict[str, float] | None = None
    global_ranking: bool = False
    offload: bool = False
    batch_size: int | None = None  # samples per statistics step; None: all at once, as LLM-Pruner does
    gradient_checkpointing: bool = True  # same statistics, ~0.5x peak memory, a little slower
    attention_metric: str | None = None  # None: ``metric`` scores attention heads too
    depth_slope: float = 0.0  # per-layer rate profile (see Budget); 0, 0 = uniform
    depth_bend: float = 0.0
    method: str | None = None  # the preset (adapruner.methods) the other fields started from
    ranking: str | None = None  # layer | global | global-all (FLAP's AL-AM); None: from global_ranking
    compensate: bool = False  # FLAP's bias compensation of removed o_proj/down_proj inputs
    # "NxL": activation statistics (Wanda-sp, FLAP, compensation) from N fresh windows of L tokens of
    # ``calibration`` instead of the gradient samples; None: from the same samples
    activation_calibration: str | None = None
    activation_seed: int | None = None  # seed of those windows and of the refit's (None: ``seed``)
    # Refit of the kept weights: "none"; "bias" (FLAP's compensation, the same as ``compensate``); "lsq"
    # (layer by layer, least squares of the kept o_proj/down_proj columns, see adapruner.local). The
    # ``obs`` metric always refits by least squares.
    refit: str = "none"
    # NxL windows of ``calibration`` the layer-by-layer engine runs on; None: REFIT_TOKENS tokens in the longest
    # windows the text offers enough of (128x128; books, whose passages are short: 256x64), see check_calibration
    refit_calibration: str | None = None
    refit_damping: float = 1e-3  # fraction of the mean diagonal of each input Gram matrix (measured, README)
    refit_bias: bool = True  # lsq/obs: refit a bias too (the kept columns fitted on centred inputs)
    obs_rounds: int = 16  # obs: batches in which MLP channels are removed
    refit_device: str | None = None  # run the layer-by-layer engine there, one layer at a time (e.g. cuda)
    # A per-layer allocation (a search's per-layer trial): [layer, attention units, MLP channels] kept per
    # layer, pruned by assembling the supernet's candidates (OBS order + least-squares refit on the dense
    # model's inputs over ``refit_calibration`` windows of ``calibration``; adapruner.local.supernet)
    keep_counts: list[list[int]] | None = None
    max_removal: float = 0.9  # the supernet's deepest candidate (it decides OBS's removal order)
    # every layer pruned to the same sizes and saved in the family's stock architecture (no remote code):
    # the ranking is per layer, the layer range every layer, the depth profile flat (adapruner.pruning.stock)
    uniform: bool = False

    @classmethod
    def from_method(cls, model: str, ratio: float, method: str | None = None, **options: Any) -> PruneConfig:
        """The preset of ``method`` (see :mod:`adapruner.methods`), overridden by ``options``."""
        return cls(model=model, ratio=ratio, **with_method({"method": method} | options))

    @property
    def ranking_mode(self) -> str:
        return self.ranking or ("global" if self.global_ranking else "layer")

    @property
    def refit_mode(self) -> str:
        """none, bias or lsq: ``compensate`` is FLAP's name for ``bias``; ``obs`` selection refits by lsq."""
        if self.refit == "lsq" or self.local_selection:
            return "lsq"
        return "bias" if self.refit == "bias" or self.compensate else "none"

    @property
    def output_bias(self) -> str | None:
        """What gives o_proj/down_proj a bias in the output (None: nothing): ``--uniform`` must express it."""
        if self.keep_counts is not None:
            return "the supernet's least-squares refit"
        if self.refit_mode == "bias":
            return "bias compensation (--compensate / --refit bias)"
        if self.refit_mode == "lsq" and self.refit_bias:
            return "the least-squares refit (its bias)"
        return None

    def as_uniform(self, given: dict[str, Any]) -> PruneConfig:
        """This recipe with every layer pruned alike (``--uniform``): a preset's cross-layer ranking becomes
        ``layer`` (FLAP: its uniform UL-UM variant) and its layer range every layer. Options typed in
        ``given`` that contradict it are one-line errors."""
        if given.get("ranking") not in (None, "layer") or given.get("global_ranking"):
            raise AdaPrunerError("--uniform prunes every layer alike: drop --ranking/--global-ranking")
        if given.get("depth_slope") or given.get("depth_bend"):
            raise AdaPrunerError("--uniform prunes every layer alike: drop --depth-slope/--depth-bend")
        if self.keep_counts is not None and len({(a, m) for _, a, m in self.keep_counts}) > 1:
            raise AdaPrunerError(
                "--uniform: this search's best trial keeps different counts per layer; search with --uniform"
            )
        layers = given.get("layers") or ("0:" if self.keep_counts is None else None)
        return replace(self, ranking="layer", global_ranking=False, layers=layers, depth_slope=0.0, depth_bend=0.0)

    @property
    def local_selection(self) -> bool:
        """Structured OBS chooses the units inside the layer-by-layer engine (no static scores)."""
        return self.metric == OBS

    @property
    def uses_local_engine(self) -> bool:
        return self.refit_mode == "lsq"

    def local_settings(self) -> LocalSettings:
        return LocalSettings(
            selection="obs" if self.local_selection else "plan",
            refit="lsq",
            damping=self.refit_damping,
            bias=self.refit_bias,
            rounds=self.obs_rounds,
            device=self.refit_device,
        )

    def build_metric(self) -> Importance:
        if self.local_selection:
            raise AdaPrunerError("the obs metric has no static scores: it selects inside the local engine")
        mlp = get_metric(self.metric, seed=self.seed, mix=self.mix)
        if self.attention_metric in (None, self.metric):
            return mlp
        return PerKind(get_metric(self.attention_metric, seed=self.seed, mix=self.mix), mlp)

    def statistic_needs(self) -> frozenset[str]:
        """What the statistics pass must collect: the metric's needs, plus activations to compensate."""
        if self.local_selection:
            return frozenset()
        return self.build_metric().needs | ({"activations"} if self.refit_mode == "bias" else frozenset())

    def fresh_activations(self) -> bool:
        """Activation statistics come from their own fresh windows rather than the calibration samples.

        ``adapruner prune`` and every search trial decide it here, so a trial and its ``--from-run``
        prune read the same activations.
        """
        return self.activation_calibration is not None and "activations" in self.statistic_needs()

    def budget(self, layer_range: tuple[int, int] | None = None) -> Budget:
        return Budget(
            self.ratio,
            layer_range,
            self.attention_scale,
            self.align,
            self.head_mode,
            self.depth_slope,
            self.depth_bend,
        )

    def validate(self) -> None:
        self.budget()
        self._validate_refit()
        if not self.local_selection:
            self.build_metric()
        if self.method is not None:
            get_method(self.method)
        if self.ranking_mode not in RANKINGS:
            raise AdaPrunerError(f"unknown ranking '{self.ranking}': choose one of {', '.join(RANKINGS)}")
        if self.global_ranking and self.ranking_mode != "global":
            raise AdaPrunerError(f"--global-ranking contradicts ranking '{self.ranking}': give only one of them")
        if self.aggregation not in AGGREGATIONS:
            raise AdaPrunerError(f"unknown aggregation '{self.aggregation}': choose one of {', '.join(AGGREGATIONS)}")
        if self.head_mode not in HEAD_MODES:
            raise AdaPrunerError(f"unknown head mode '{self.head_mode}': choose one of {', '.join(HEAD_MODES)}")
        if self.num_samples < 1 or self.seq_len < 2:
            raise AdaPrunerError("--num-samples must be >= 1 and --seq-len >= 2")
        if self.activation_calibration is not None:
            parse_windows(self.activation_calibration)

    def _validate_refit(self) -> None:
        if self.refit not in REFIT_MODES:
            raise AdaPrunerError(f"unknown --refit '{self.refit}': choose one of {', '.join(REFIT_MODES)}")
        if self.uses_local_engine:
            if self.refit_calibration is not None:
                parse_windows(self.refit_calibration)
            self.local_settings()
        if not self.local_selection:
            return
        if self.refit == "bias" or self.compensate:
            raise AdaPrunerError("--metric obs refits by least squares: drop --refit bias / --compensate")
        if self.ranking_mode != "layer" or self.attention_metric not in (None, OBS):
            raise AdaPrunerError(
                "--metric obs chooses units inside each layer at the budget's per-layer rates: use --ranking layer "
                "and no --attention-metric"
            )


OBS = "obs"  # structured OBS selection: a metric name that the local engine, not a score, implements
REFIT_MODES = ("none", "bias", "lsq")


REFIT_TOKENS = 128 * 128  # the default refit windows: 128 of 128 tokens, or as many tokens in shorter ones
REFIT_LENGTHS = (128, 64, 32)  # their lengths, longest first


def parse_windows(text: str) -> tuple[int, int]:
    """``"128x128"`` -> (128 windows, 128 tokens each); a one-line error otherwise."""
    count, sep, length = str(text).lower().partition("x")
    if not (sep and count.strip().isdigit() and length.strip().isdigit()) or int(count) < 1 or int(length) < 2:
        raise AdaPrunerError(f"activation calibration '{text}' must look like 128x128 (windows x tokens)")
    return int(count), int(length)


def activation_statistics(
    model: torch.nn.Module, tokenizer: Any, modules: list[str], sources: str, windows: str, seed: int
) -> Statistics:
    """Input sums and squares of ``modules`` over fresh calibration windows: forward passes, no gradient.

    The batches a search's shared ``FreshWindows`` runs, without the sharing.
    """
    return FreshWindows(model, tokenizer, modules, reuse=False).statistics(sources, *parse_windows(windows), seed)


@dataclass
class PruneResult:
    model: torch.nn.Module
    tokenizer: Any
    plan: PrunePlan
    record: dict
    output: Path | None = None
    timings: dict[str, float] = field(default_factory=dict)


@contextmanager
def _timed(timings: dict[str, float], step: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[step] = round(time.perf_counter() - start, 2)
    log(f"{step}: {timings[step]:.1f}s")


def _statistics(
    model, tokenizer, adapter: ModelAdapter, layers: list[int], cfg: PruneConfig, samples: torch.Tensor | None = None
) -> Statistics:
    needs = cfg.statistic_needs()
    names = adapter.projection_names(layers)
    separate = cfg.fresh_activations()
    main = needs - {"activations"} if separate else needs
    stats = Statistics()
    if main:
        from .data import sample_mixture

        if samples is None:
            samples = sample_mixture(tokenizer, cfg.calibration, cfg.num_samples, cfg.seq_len, seed=cfg.seed)
        stats = collect_statistics(
            model,
            samples,
            names,
            main,
            batch_size=cfg.batch_size or samples.shape[0],
            offload=cfg.offload,
            checkpointing=cfg.gradient_checkpointing,
        )
    if separate:
        seed = cfg.seed if cfg.activation_seed is None else cfg.activation_seed
        acts = activation_statistics(model, tokenizer, names, cfg.calibration, cfg.activation_calibration, seed)
        stats = with_activations(stats, acts)
    return stats


def with_activations(stats: Statistics, acts: Statistics) -> Statistics:
    """``stats`` with the activation tables (and their token counts) of ``acts``; gradients untouched."""
    return replace(stats, act_sum=acts.act_sum, act_sq=acts.act_sq, tokens=acts.tokens, per_sample=False, sample={})


def compute_scores(
    model: torch.nn.Module, tokenizer: Any, cfg: PruneConfig, samples: torch.Tensor | None = None
) -> tuple[Scores, Budget]:
    """Importance of every group in the pruned layer range, and the budget they will be cut under."""
    scores, budget, _ = _scores_and_statistics(model, tokenizer, cfg, samples)
    return scores, budget


def _scores_and_statistics(
    model: torch.nn.Module, tokenizer: Any, cfg: PruneConfig, samples: torch.Tensor | None = None
) -> tuple[Scores, Budget, Statistics]:
    adapter = get_adapter(model)
    layer_range = parse_layer_range(cfg.layers, adapter.num_layers)
    budget = cfg.budget(layer_range)
    layers = list(range(*layer_range))
    stats = _statistics(model, tokenizer, adapter, layers, cfg, samples)
    groups = layer_groups(adapter, layers, cfg.head_mode)
    return score_groups(model, groups, cfg.build_metric(), stats, cfg.aggregation), budget, stats


def compute_plan(
    model: torch.nn.Module, tokenizer: Any, cfg: PruneConfig, samples: torch.Tensor | None = None
) -> tuple[PrunePlan | None, dict]:
    """Score the groups of the pruned layers and keep the best units under the budget.

    With bias compensation, ``info["input_means"]`` holds the calibration mean of every o_proj/down_proj
    input of the pruned layers, for :func:`~adapruner.pruning.apply.prune_physically` and ``masked``.
    With the ``obs`` metric there are no scores: the plan is None and ``info["keep"]`` holds the per-layer
    keep counts the local engine selects to (:func:`run_local`).
    """
    if cfg.keep_counts is not None:
        return None, {"layers": [0, get_adapter(model).num_layers], "dense_params": count_params(model)}
    if cfg.local_selection:
        adapter = get_adapter(model)
        layer_range = parse_layer_range(cfg.layers, adapter.num_layers)
        dense_params = count_params(model)
        keep = solve_keep_counts(adapter, cfg.budget(layer_range), dense_params)
        return None, {"layers": list(layer_range), "dense_params": dense_params, "rate": keep.rate, "keep": keep}
    scores, budget, stats = _scores_and_statistics(model, tokenizer, cfg, samples)
    plan, info = plan_for_scores(model, scores, budget, cfg)
    if cfg.refit_mode == "bias":
        info["input_means"] = input_means(get_adapter(model), budget.layers, stats)
    return plan, info


def refit_windows(tokenizer: Any, cfg: PruneConfig) -> torch.Tensor:
    """The calibration windows of the layer-by-layer engine: ``refit_calibration`` of ``calibration``."""
    from .data import sample_mixture

    count, length = parse_windows(cfg.refit_calibration or default_refit_calibration(tokenizer, cfg.calibration))
    seed = cfg.seed if cfg.activation_seed is None else cfg.activation_seed
    return sample_mixture(tokenizer, cfg.calibration, count, length, seed=seed)


def default_refit_calibration(tokenizer: Any, sources: str, windows: WindowCounts | None = None) -> str:
    """The refit windows when ``--refit-calibration`` is not given: REFIT_TOKENS tokens of ``sources`` in the
    longest of REFIT_LENGTHS that they offer enough windows of. 128x128 suits wiki, news and squad, but
    books' passages hold ~80 tokens (17 windows of 128), so its refit runs on 256x64."""
    windows = windows or WindowCounts(tokenizer)
    for length in REFIT_LENGTHS:
        if windows.fits(sources, REFIT_TOKENS // length, length):
            return f"{REFIT_TOKENS // length}x{length}"
    lengths = ", ".join(map(str, REFIT_LENGTHS))
    raise AdaPrunerError(
        f"--calibration {sources} has too little text for the default refit windows ({REFIT_TOKENS:,} tokens in "
        f"windows of {lengths} tokens): give a smaller --refit-calibration NxL or another --calibration"
    )


def check_calibration(tokenizer: Any, cfg: PruneConfig, samples_given: bool = False, refit: bool = True) -> PruneConfig:
    """``cfg`` with its default refit windows chosen, once every calibration draw it will make fits its sources.

    It needs only the tokenizer, so a source too small for the asked windows fails before the weights load
    and the scoring runs, with a one-line error naming the option that fixes it. ``samples_given``: the
    gradient samples come from a search's pool (``--from-run``), not from ``calibration``; ``refit=False``:
    scores only (``importance``), no refit windows are drawn.
    """
    windows = WindowCounts(tokenizer)
    if cfg.keep_counts is None:  # a per-layer allocation scores nothing: only its refit windows are drawn
        fresh = cfg.fresh_activations()
        if not samples_given and cfg.statistic_needs() - ({"activations"} if fresh else set()):
            _check_draw(windows, cfg.calibration, cfg.num_samples, cfg.seq_len, None)
        if fresh:
            count, length = parse_windows(cfg.activation_calibration)
            _check_draw(windows, cfg.calibration, count, length, "--activation-calibration")
    if not refit or (cfg.keep_counts is None and not cfg.uses_local_engine):
        return cfg
    if cfg.refit_calibration is not None:
        _check_draw(windows, cfg.calibration, *parse_windows(cfg.refit_calibration), "--refit-calibration")
        return cfg
    chosen = default_refit_calibration(tokenizer, cfg.calibration, windows)
    log(f"refit windows: {chosen} of {cfg.calibration} (--refit-calibration NxL to change)")
    return replace(cfg, refit_calibration=chosen)


def _check_draw(windows: WindowCounts, sources: str, count: int, length: int, option: str | None) -> None:
    """``count`` windows of ``length`` tokens of ``sources`` exist, or a one-line error that names the option
    to change: ``option`` (an NxL option), or --num-samples/--seq-len for the gradient samples (None)."""
    asked = f"{option} {count}x{length}" if option else f"--num-samples {count} x --seq-len {length}"
    names = split_sources(sources)
    if count < len(names):
        raise AdaPrunerError(f"{asked} cannot cover the {len(names)} sources of --calibration: ask for more windows")
    missing = windows.shortfall(sources, count, length)
    if missing is None:
        return
    source, have, need = missing
    shorter = [length // 2**k for k in range(1, length.bit_length()) if length // 2**k >= 2]
    if option:  # as many tokens in shorter windows
        sizes = [(count * length // n, n) for n in shorter]
        fit = next((f"{c}x{n}" for c, n in sizes if windows.fits(sources, c, n)), None)
        fix = f"give {option} {fit}" if fit else f"give a smaller {option}"
    else:
        fit = next((f"{n}" for n in shorter if windows.fits(sources, count, n)), None)
        fix = f"use --seq-len {fit} or fewer --num-samples" if fit else "use fewer --num-samples or a shorter --seq-len"
    raise AdaPrunerError(
        f"source '{source}' has only {have} windows of {length} tokens in its calibration split and {asked} needs "
        f"{need}: {fix}, or another --calibration"
    )


def run_local(
    model: torch.nn.Module,
    tokenizer: Any,
    cfg: PruneConfig,
    plan: PrunePlan | None,
    info: dict,
    restore: bool = False,
    windows: torch.Tensor | None = None,
) -> LocalResult:
    """Refit (and, for ``obs``, select) layer by layer: see :func:`adapruner.local.local_prune`."""
    windows = refit_windows(tokenizer, cfg) if windows is None else windows
    return local_prune(
        model,
        windows,
        cfg.local_settings(),
        plan=None if cfg.local_selection else plan,
        keep=info.get("keep"),
        head_mode=cfg.head_mode,
        restore=restore,
    )


def run_supernet(model: torch.nn.Module, tokenizer: Any, cfg: PruneConfig) -> tuple[PrunePlan, dict[str, Any]]:
    """Prune to ``cfg.keep_counts`` with the supernet's candidates, written into ``model`` in place."""
    from .local.engine import write_refit
    from .local.supernet import SupernetSettings, build_supernet

    adapter = get_adapter(model)
    counts = {int(layer): (int(attn), int(mlp)) for layer, attn, mlp in cfg.keep_counts}
    settings = SupernetSettings(damping=cfg.refit_damping, max_removal=cfg.max_removal)
    windows = refit_windows(tokenizer, cfg)
    net = build_supernet(model, windows, list(range(adapter.num_layers)), settings, cfg.head_mode)
    plan, refits = net.assemble(adapter, counts, cfg.head_mode)
    for name, refit in refits.items():
        write_refit(model.get_submodule(name), refit)
    errors = {name: round(refit.error, 6) for name, refit in refits.items()}
    raised = {name: refit.damping for name, refit in refits.items() if refit.damping > cfg.refit_damping}
    return plan, {
        "supernet": net.fingerprint,
        "tokens": int(windows.numel()),
        "seconds": round(net.seconds, 2),
        "mean_relative_error": sum(errors.values()) / len(errors) if errors else 0.0,
        "relative_errors": errors,
        "damping_raised": raised,
    }


OUTPUTS = ("o_proj", "down_proj")  # the projections whose removed inputs bias compensation replaces


def input_means(adapter: ModelAdapter, layers: tuple[int, int], stats: Statistics) -> dict[str, torch.Tensor]:
    """Calibration mean of every o_proj/down_proj input in ``layers``: what bias compensation feeds."""
    names = [n for i in range(*layers) for r, n in adapter.prunable_module_names(i).items() if r in OUTPUTS]
    return {name: stats.input_mean(name) for name in names}


def plan_for_scores(model: torch.nn.Module, scores: Scores, budget: Budget, cfg: PruneConfig) -> tuple[PrunePlan, dict]:
    adapter = get_adapter(model)
    dense_params = count_params(model)
    keep = solve_keep_counts(adapter, budget, dense_params)
    ranked = allocation_offsets(scores, budget, cfg.ranking_mode)
    plan = plan_from_scores(adapter, ranked, keep, cfg.head_mode, align=cfg.align, ranking=cfg.ranking_mode)
    return plan, {"layers": list(budget.layers), "dense_params": dense_params, "rate": keep.rate}


FRESH_SEED = 0  # the search draws fresh activation windows with this seed: one pass per source, shared by mixes


def _fresh_windows(value: str | None) -> str | None:
    return None if value in (None, "pool") else value


def _searched_layers(config: dict[str, Any], best: dict[str, Any]) -> str:
    """The best trial's layer range as START:END (searches before ranges were searched: the study's one)."""
    label = config.get("layers")
    if label is None:
        return best["layers"]
    return best["layer_ranges"][label]


def _options_from_run(run_dir: Path) -> tuple[float, dict[str, Any], dict[str, Any]]:
    """Ratio, PruneConfig options and the calibration pool subset of a search's best trial."""
    path = Path(run_dir) / "best.json"
    if not path.is_file():
        raise AdaPrunerError(f"{run_dir} holds no finished search (best.json is missing): run `adapruner search` first")
    try:
        best = json.loads(path.read_text())
        config, pool = best["best"]["config"], best["pool"]
        fresh = _fresh_windows(config.get("activation_calibration"))
        options = {
            "metric": config["metric"],
            "aggregation": config["aggregation"],
            "mix": config["mix"],
            "attention_scale": config["attention_scale"],
            "ranking": config.get("ranking") or ("global" if config.get("global_ranking") else "layer"),
            "compensate": bool(config.get("compensate", False)),
            "layers": _searched_layers(config, best),
            "head_mode": best["head_mode"],
            "seed": config["subset_seed"],
            "calibration": ",".join(config["sources"]),
            "num_samples": config["num_samples"],
            "seq_len": config.get("seq_len", pool["seq_len"]),
            "attention_metric": config.get("attention_metric"),
            "depth_slope": config.get("depth_slope", 0.0),
            "depth_bend": config.get("depth_bend", 0.0),
            "activation_calibration": fresh,
            "refit": config.get("refit", "none"),
            "refit_calibration": best.get("space", {}).get("refit_calibration", "128x128"),
            "activation_seed": FRESH_SEED if fresh or config.get("refit", "none") != "none" else None,
        }
        if config.get("allocation") == "per-layer":
            options |= {"keep_counts": [list(c) for c in config["counts"]], "layers": None}
            options["max_removal"] = best["space"]["max_removal"]
        options["uniform"] = bool(best.get("space", {}).get("uniform", False))
        options["align"] = int(best.get("space", {}).get("align", 1))
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise AdaPrunerError(f"{path} is corrupted ({exc}): run the search again") from None
    return float(best["ratio"]), options, {"pool": pool, "subset": best["best"]["subset"], "run": str(run_dir)}


def prune(
    model: str,
    ratio: float | None = None,
    *,
    output: str | Path | None = None,
    overwrite: bool = False,
    device_map: str | None = None,
    from_run: str | Path | None = None,
    **options: Any,
) -> PruneResult:
    """Prune ``model`` (asset name, local dir or hub id) by ``ratio`` of its parameters.

    ``options`` are the fields of :class:`PruneConfig` (metric, calibration, layers, ...); with
    ``method="flap"`` (or another name of :mod:`adapruner.methods`) they override that baseline's preset. With
    ``from_run`` the configuration (and the exact calibration samples) of a search's best trial are used.
    With ``output`` the pruned model is saved as an HF directory plus ``adapruner.json``.
    """
    searched = None
    if from_run is not None:
        if options.get("method") is not None:
            raise AdaPrunerError("--method and --from-run exclude each other: give one of them")
        ratio, run_options, searched = _options_from_run(Path(from_run))
        if options.get("uniform") and not run_options["uniform"]:
            raise AdaPrunerError(
                f"--uniform: the search in {from_run} was not uniform: run `adapruner search --uniform` first"
            )
        options = run_options | {k: v for k, v in options.items() if k == "dtype"}
    if ratio is None:
        raise AdaPrunerError("give --ratio (or --from-run RUN_DIR)")
    cfg = PruneConfig.from_method(model, ratio, **options)
    if cfg.uniform:
        cfg = cfg.as_uniform(options)
    cfg.validate()
    if output is not None:
        check_output_dir(Path(output), overwrite)
    timings: dict[str, float] = {}
    with _timed(timings, "check"):  # the calibration sizes, before minutes of loading and scoring
        tokenizer = load_tokenizer(model)
        cfg = check_calibration(tokenizer, cfg, samples_given=searched is not None and searched["subset"] is not None)
    with _timed(timings, "load"):
        hf_model = load_causal_lm(model, cfg.dtype, device_map)
    dense_shapes = get_adapter(hf_model).layer_shapes()
    if cfg.uniform:
        _check_uniform(get_adapter(hf_model), cfg)
    samples = None
    if searched is not None and searched["subset"] is not None:  # None: the trial read no pool sample
        spec = searched["pool"]
        pool = build_pool(tokenizer, spec["sources"], spec["per_source"], spec["seq_len"], spec["seed"])
        samples = pool.truncated(cfg.seq_len).input_ids[searched["subset"]]
    with _timed(timings, "score"):
        plan, info = compute_plan(hf_model, tokenizer, cfg, samples)
    local, local_summary = None, None
    if cfg.keep_counts is not None:
        with _timed(timings, "refit"):
            plan, local_summary = run_supernet(hf_model, tokenizer, cfg)
    elif cfg.uses_local_engine:
        with _timed(timings, "refit"):
            local = run_local(hf_model, tokenizer, cfg, plan, info)
        plan = local.plan
    with _timed(timings, "prune"):
        prune_physically(get_adapter(hf_model), plan, input_means=info.get("input_means"))
        if cfg.uniform:
            make_stock(get_adapter(hf_model))
    pruned_params = count_params(hf_model)
    log(f"pruned: {rate_summary(plan, dense_shapes)}" + (f"; see adapruner info {output}" if output else ""))
    record = {
        "format": 1,
        "source_model": model,
        "model_type": hf_model.config.model_type,
        "target_ratio": ratio,
        "achieved_ratio": 1 - pruned_params / info["dense_params"],
        "params": {"dense": info["dense_params"], "pruned": pruned_params},
        "layer_range": info["layers"],
        "config": asdict(cfg),
        "search": searched,
        "local": local.summary() if local is not None else local_summary,
        "layer_shapes": [s.to_dict() for s in plan.shapes()],
        "plan": plan.to_dict(),
        "versions": versions(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    result = PruneResult(hf_model, tokenizer, plan, record, timings=timings)
    if output is not None:
        with _timed(timings, "save"):
            result.output = save_pruned(hf_model, tokenizer, record, Path(output), overwrite)
    return result


def _check_uniform(adapter: ModelAdapter, cfg: PruneConfig) -> None:
    """Before any work: ``--uniform`` prunes every layer, and the output's biases fit the stock config."""
    every = (0, adapter.num_layers)
    if cfg.keep_counts is None and parse_layer_range(cfg.layers, adapter.num_layers) != every:
        raise AdaPrunerError(f"--uniform prunes every layer alike: drop --layers (or give 0:{adapter.num_layers})")
    check_stock_possible(adapter, cfg.output_bias)


def score_importance(
    model: str,
    ratio: float = 0.2,
    *,
    output: str | Path | None = None,
    device_map: str | None = None,
    **options: Any,
) -> dict:
    """Per-group importance scores (and the plan ``ratio`` would give), without pruning.

    The result is JSON-ready: ``scores["<layer>.<kind>"]`` lists one score per unit (query head, KV group
    or MLP channel, in the model's own order).
    """
    cfg = PruneConfig.from_method(model, ratio, **options)
    cfg.validate()
    tokenizer = load_tokenizer(model)
    check_calibration(tokenizer, cfg, refit=False)
    hf_model = load_causal_lm(model, cfg.dtype, device_map)
    scores, budget = compute_scores(hf_model, tokenizer, cfg)
    plan, _ = plan_for_scores(hf_model, scores, budget, cfg)
    report = {
        "model": model,
        "config": asdict(cfg),
        "units": {"attention": "query head" if cfg.head_mode == "query" else cfg.head_mode, "mlp": "channel"},
        "scores": {f"{layer}.{kind}": v.tolist() for (layer, kind), v in scores.items()},
        "plan": plan.to_dict(),
        "versions": versions(),
    }
    if output is not None:
        write_json_atomic(Path(output), report)
    return report


def build_calibration_pool(
    model: str,
    calibration: str = "books,wiki,news,squad",
    *,
    per_source: int = 16,
    seq_len: int = 128,
    seed: int = 0,
    layers: str | None = None,
    output: str | Path | None = None,
    dtype: str = "float32",
) -> CalibrationPool:
    """A pool of candidate calibration samples with per-sample dense loss and gradient norm.

    Runs the per-sample statistics pass once (stored in the statistics cache, so later scoring of any
    subset is free) and, with ``output``, writes one CSV row per sample.
    """
    hf_model, tokenizer = load_model(model, dtype)
    adapter = get_adapter(hf_model)
    pool = build_pool(tokenizer, calibration, per_source, seq_len, seed)
    names = adapter.projection_names(range(*parse_layer_range(layers, adapter.num_layers)))
    StatisticsCache(hf_model, pool, names).per_sample()
    if output is not None:
        write_csv_atomic(Path(output), pool.describe())
    return pool


def load_pruned(directory: str | Path, dtype: str = "float32", device_map: str | None = None) -> torch.nn.Module:
    """Load a model saved by :func:`prune` (any per-layer sizes), without ``trust_remote_code``."""
    read_record(Path(directory))
    return load_causal_lm(str(directory), dtype, device_map)


def evaluate(
    model: str | torch.nn.Module,
    *,
    ppl: tuple[str, ...] | list[str] = OFFLINE_SOURCES,
    seq_len: tuple[int, ...] | list[int] = (128,),
    max_tokens: int | None = 40_960,
    batch_size: int = 8,
    tokenizer: Any = None,
    output: str | Path | None = None,
    dtype: str = "float32",
    tasks: str | list[str] | tuple[str, ...] | None = None,
    limit: int | None = None,
    seed: int = 0,
    task_source: str = "offline",
) -> dict:
    """Perplexity on the test split of each source at each window length, and zero-shot accuracy.

    With several sources, ``perplexity["geomean@L"]`` is their geometric mean at window length ``L``
    (each source weighted equally: a model that gains on one text and loses on another shows it).

    ``tasks`` (e.g. ``["boolq", "piqa"]`` or ``"boolq,piqa"``) are run with lm-evaluation-harness (see
    :mod:`adapruner.evaluation.zeroshot`) on the first ``limit`` documents of each (None: all), offline
    from the fetched task data unless ``task_source="hub"``. ``batch_size`` is used for both.
    """
    from .data import token_stream
    from .evaluation import perplexity
    from .evaluation.perplexity import GEOMEAN, geometric_mean

    names = None
    if tasks:
        from .evaluation import zeroshot

        names = zeroshot.check_request(tasks, limit, task_source)  # before loading any model
    elif limit is not None:
        raise AdaPrunerError("--limit applies to zero-shot tasks: give --tasks too")
    if isinstance(model, str | Path):
        name = str(model)
        model, tokenizer = load_model(name, dtype)
    else:
        name = getattr(model.config, "_name_or_path", "in-memory model")
        if tokenizer is None:
            raise AdaPrunerError("evaluate() on an in-memory model needs its tokenizer")
    results: dict[str, Any] = {"model": name, "params": count_params(model), "perplexity": {}}
    for source in ppl:
        tokens = token_stream(tokenizer, source, "test", max_tokens)
        for length in seq_len:
            value = perplexity(model, tokens, length, batch_size)
            results["perplexity"][f"{source}@{length}"] = value
            log(f"{name}: {source} perplexity @{length} = {value:.2f}")
    if len(ppl) > 1:
        for length in seq_len:
            values = [results["perplexity"][f"{source}@{length}"] for source in ppl]
            results["perplexity"][f"{GEOMEAN}@{length}"] = geometric_mean(values)
    library_versions = versions()
    if names:
        zs = zeroshot.zero_shot(
            model, tokenizer, names, limit=limit, batch_size=batch_size, seed=seed, source=task_source
        )
        results["zero_shot"] = zs
        library_versions["lm_eval"] = zs["settings"]["lm_eval"]
        for task, entry in zs["tasks"].items():
            log(f"{name}: {task} {entry['metric']} = {entry[entry['metric']]:.4f} ({entry['documents']} documents)")
        log(f"{name}: zero-shot average = {zs['average']:.4f}")
    results["settings"] = {"split": "test", "max_tokens": max_tokens, "dtype": dtype, "versions": library_versions}
    if output is not None:
        write_json_atomic(Path(output), results)
    return results


def compare(paths: list[str | Path] | tuple[str | Path, ...], *, reference: str | Path | None = None) -> str:
    """A markdown table of ``evaluate`` result files: one row each, retention against the reference.

    The reference is ``reference`` if given, else the first file (the dense model). See
    :func:`adapruner.evaluation.compare.compare_table`.
    """
    from .evaluation.compare import compare_table

    return compare_table(paths, reference=reference)


def finetune(
    model_dir: str | Path,
    data: str | Path = ALL_OFFLINE,
    output: str | Path | None = None,
    *,
    overwrite: bool = False,
    checkpoint_dir: str | Path | None = None,
    **options: Any,
):
    """Recover a pruned model: distillation from its dense model (or LM loss), LoRA or every parameter.

    ``options`` are the fields of :class:`adapruner.recovery.FinetuneConfig` (loss, teacher, full, tokens,
    lr, teacher_cache, ...); ``data`` is a text source or a comma-separated mix (default: the four offline
    sources), ``alpaca`` or a local Alpaca .json/.jsonl file. The result is merged and saved like a pruned
    model; returns a :class:`adapruner.recovery.FinetuneResult`. Rerunning an interrupted call resumes.
    """
    from .recovery import finetune as run_finetune

    return run_finetune(model_dir, data, output, overwrite=overwrite, checkpoint_dir=checkpoint_dir, **options)


def export(
    model_dir: str | Path,
    output: str | Path,
    *,
    format: str = "gguf",
    quant: str = "f16",
    tokenizer_gguf: str | Path | None = None,
    overwrite: bool = False,
):
    """Write a pruned (or plain) model directory as a file an inference engine runs: GGUF for llama.cpp.

    Per-layer widths become llama.cpp's ``deci`` architecture; uniform ones keep the family's. The
    tokenizer fields come from ``tokenizer_gguf``, else from the GGUF an offline asset was converted from
    (the recorded ``source_model``), else from the Hugging Face tokenizer. Returns an
    :class:`adapruner.export.ExportResult`. See :mod:`adapruner.export.gguf`.
    """
    from .export import check_export_request, export_gguf

    check_export_request(format, quant)
    source = None  # the dense model's directory, resolved as `prune` resolved it, if it is on this disk
    if (Path(model_dir) / "adapruner.json").is_file():
        from .assets import resolve_model

        name = read_record(Path(model_dir)).get("source_model")
        try:
            location = Path(resolve_model(name)) if name else None
        except AdaPrunerError:  # an asset not fetched here: the Hugging Face tokenizer is the fallback
            location = None
        source = location if location is not None and location.is_dir() else None
    return export_gguf(
        model_dir, output, quant=quant, tokenizer_gguf=tokenizer_gguf, source_dir=source, overwrite=overwrite
    )


def info(directory: str | Path) -> dict:
    """The record of a pruned model directory, without loading weights, with ``architecture``: ``stock``
    (plain ``from_pretrained`` and serving engines load it) or ``per-layer`` (``trust_remote_code=True``)."""
    record = read_record(Path(directory))
    config = Path(directory) / "config.json"
    try:
        record["architecture"] = output_kind(json.loads(config.read_text()))
    except (OSError, json.JSONDecodeError) as exc:
        raise AdaPrunerError(f"{config} is missing or corrupted ({exc}): prune the model again") from None
    return record
