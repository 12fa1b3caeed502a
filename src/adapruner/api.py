"""The Python API. Every CLI command is one of these functions."""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .data.pool import CalibrationPool, build_pool
from .errors import AdaPrunerError
from .importance import AGGREGATIONS, Importance, Statistics, collect_statistics, get_metric, score_groups
from .importance.cache import StatisticsCache
from .models.base import ModelAdapter, get_adapter
from .models.groups import HEAD_MODES, layer_groups
from .models.loading import load_causal_lm, load_model
from .pruning.apply import prune_physically
from .pruning.io import check_output_dir, read_record, save_pruned, write_csv_atomic, write_json_atomic
from .pruning.plan import (
    Budget,
    PrunePlan,
    Scores,
    count_params,
    parse_layer_range,
    plan_from_scores,
    rate_summary,
    solve_keep_counts,
)
from .util import log


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
    round_to: int = 1
    seed: int = 0
    dtype: str = "float32"
    mix: dict[str, float] | None = None
    global_ranking: bool = False
    offload: bool = False
    batch_size: int | None = None  # samples per statistics step; None: all at once, as LLM-Pruner does
    gradient_checkpointing: bool = True  # same statistics, ~0.5x peak memory, a little slower

    def build_metric(self) -> Importance:
        return get_metric(self.metric, seed=self.seed, mix=self.mix)

    def validate(self) -> None:
        Budget(self.ratio, attention_scale=self.attention_scale, round_to=self.round_to)
        self.build_metric()
        if self.aggregation not in AGGREGATIONS:
            raise AdaPrunerError(f"unknown aggregation '{self.aggregation}': choose one of {', '.join(AGGREGATIONS)}")
        if self.head_mode not in HEAD_MODES:
            raise AdaPrunerError(f"unknown head mode '{self.head_mode}': choose one of {', '.join(HEAD_MODES)}")
        if self.num_samples < 1 or self.seq_len < 2:
            raise AdaPrunerError("--num-samples must be >= 1 and --seq-len >= 2")


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
    needs = cfg.build_metric().needs
    if not needs:
        return Statistics()
    from .data import sample_mixture

    if samples is None:
        samples = sample_mixture(tokenizer, cfg.calibration, cfg.num_samples, cfg.seq_len, seed=cfg.seed)
    names = adapter.projection_names(layers)
    return collect_statistics(
        model,
        samples,
        names,
        needs,
        batch_size=cfg.batch_size or samples.shape[0],
        offload=cfg.offload,
        checkpointing=cfg.gradient_checkpointing,
    )


def compute_scores(
    model: torch.nn.Module, tokenizer: Any, cfg: PruneConfig, samples: torch.Tensor | None = None
) -> tuple[Scores, Budget]:
    """Importance of every group in the pruned layer range, and the budget they will be cut under."""
    adapter = get_adapter(model)
    layer_range = parse_layer_range(cfg.layers, adapter.num_layers)
    budget = Budget(cfg.ratio, layer_range, cfg.attention_scale, cfg.round_to, cfg.head_mode)
    layers = list(range(*layer_range))
    stats = _statistics(model, tokenizer, adapter, layers, cfg, samples)
    groups = layer_groups(adapter, layers, cfg.head_mode)
    return score_groups(model, groups, cfg.build_metric(), stats, cfg.aggregation), budget


def compute_plan(
    model: torch.nn.Module, tokenizer: Any, cfg: PruneConfig, samples: torch.Tensor | None = None
) -> tuple[PrunePlan, dict]:
    """Score the groups of the pruned layers and keep the best units under the budget."""
    scores, budget = compute_scores(model, tokenizer, cfg, samples)
    plan, info = plan_for_scores(model, scores, budget, cfg)
    return plan, info


def plan_for_scores(model: torch.nn.Module, scores: Scores, budget: Budget, cfg: PruneConfig) -> tuple[PrunePlan, dict]:
    adapter = get_adapter(model)
    dense_params = count_params(model)
    keep = solve_keep_counts(adapter, budget, dense_params)
    plan = plan_from_scores(adapter, scores, keep, cfg.head_mode, cfg.global_ranking, cfg.round_to)
    return plan, {"layers": list(budget.layers), "dense_params": dense_params, "rate": keep.rate}


def _versions() -> dict[str, str]:
    import transformers

    return {
        "adapruner": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def _options_from_run(run_dir: Path) -> tuple[float, dict[str, Any], dict[str, Any]]:
    """Ratio, PruneConfig options and the calibration pool subset of a search's best trial."""
    path = Path(run_dir) / "best.json"
    if not path.is_file():
        raise AdaPrunerError(f"{run_dir} holds no finished search (best.json is missing): run `adapruner search` first")
    try:
        best = json.loads(path.read_text())
        config, pool = best["best"]["config"], best["pool"]
        options = {
            "metric": config["metric"],
            "aggregation": config["aggregation"],
            "mix": config["mix"],
            "attention_scale": config["attention_scale"],
            "global_ranking": config["global_ranking"],
            "layers": best["layers"],
            "head_mode": best["head_mode"],
            "seed": config["subset_seed"],
            "calibration": ",".join(config["sources"]),
            "num_samples": config["num_samples"],
            "seq_len": pool["seq_len"],
        }
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

    ``options`` are the fields of :class:`PruneConfig` (metric, calibration, layers, ...). With
    ``from_run`` the configuration (and the exact calibration samples) of a search's best trial are used.
    With ``output`` the pruned model is saved as an HF directory plus ``adapruner.json``.
    """
    searched = None
    if from_run is not None:
        ratio, run_options, searched = _options_from_run(Path(from_run))
        options = run_options | {k: v for k, v in options.items() if k == "dtype"}
    if ratio is None:
        raise AdaPrunerError("give --ratio (or --from-run RUN_DIR)")
    cfg = PruneConfig(model=model, ratio=ratio, **options)
    cfg.validate()
    if output is not None:
        check_output_dir(Path(output), overwrite)
    timings: dict[str, float] = {}
    with _timed(timings, "load"):
        hf_model, tokenizer = load_model(model, cfg.dtype, device_map)
    dense_shapes = get_adapter(hf_model).layer_shapes()
    samples = None
    if searched is not None:
        spec = searched["pool"]
        pool = build_pool(tokenizer, spec["sources"], spec["per_source"], spec["seq_len"], spec["seed"])
        samples = pool.input_ids[searched["subset"]]
    with _timed(timings, "score"):
        plan, info = compute_plan(hf_model, tokenizer, cfg, samples)
    with _timed(timings, "prune"):
        prune_physically(get_adapter(hf_model), plan)
    pruned_params = count_params(hf_model)
    log(f"pruned: {rate_summary(plan, dense_shapes)}")
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
        "layer_shapes": [s.to_dict() for s in plan.shapes()],
        "plan": plan.to_dict(),
        "versions": _versions(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    result = PruneResult(hf_model, tokenizer, plan, record, timings=timings)
    if output is not None:
        with _timed(timings, "save"):
            result.output = save_pruned(hf_model, tokenizer, record, Path(output), overwrite)
    return result


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
    cfg = PruneConfig(model=model, ratio=ratio, **options)
    cfg.validate()
    hf_model, tokenizer = load_model(model, cfg.dtype, device_map)
    scores, budget = compute_scores(hf_model, tokenizer, cfg)
    plan, _ = plan_for_scores(hf_model, scores, budget, cfg)
    report = {
        "model": model,
        "config": asdict(cfg),
        "units": {"attention": "query head" if cfg.head_mode == "query" else cfg.head_mode, "mlp": "channel"},
        "scores": {f"{layer}.{kind}": v.tolist() for (layer, kind), v in scores.items()},
        "plan": plan.to_dict(),
        "versions": _versions(),
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
    ppl: tuple[str, ...] | list[str] = ("wiki", "news"),
    seq_len: tuple[int, ...] | list[int] = (128,),
    max_tokens: int | None = 40_960,
    batch_size: int = 8,
    tokenizer: Any = None,
    output: str | Path | None = None,
    dtype: str = "float32",
) -> dict:
    """Perplexity of a model on the test split of each source, at each window length."""
    from .data import token_stream
    from .evaluation import perplexity

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
    results["settings"] = {"split": "test", "max_tokens": max_tokens, "versions": _versions()}
    if output is not None:
        write_json_atomic(Path(output), results)
    return results


def info(directory: str | Path) -> dict:
    """The record of a pruned model directory, without loading weights."""
    return read_record(Path(directory))
