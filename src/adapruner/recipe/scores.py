"""Importance without pruning: per-group scores of a recipe (``adapruner importance``) and the per-sample
statistics of a calibration pool (``adapruner pool``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..data.pool import CalibrationPool, build_pool
from ..files import write_csv_atomic, write_json_atomic
from ..importance.cache import StatisticsCache
from ..models.base import get_adapter
from ..models.loading import load_causal_lm, load_model, load_tokenizer
from ..pruning.plan import parse_layer_range
from ..util import versions
from .calibration import check_calibration
from .config import PruneConfig
from .plan import PlanInputs, plan_for_scores, recipe_scores


def score_importance(
    model: str, ratio: float = 0.2, *, output: str | Path | None = None, device_map: str | None = None, **options: Any
) -> dict:
    """Per-group importance scores (and the plan ``ratio`` would give), without pruning.

    The result is JSON-ready: ``scores["<layer>.<kind>"]`` lists one score per unit (query head, KV group
    or MLP channel, in the model's own order).
    """
    cfg = PruneConfig.from_method(model, ratio, **options)
    cfg.validate()
    recipe = cfg.recipe
    tokenizer = load_tokenizer(model)
    check_calibration(tokenizer, recipe, refit=False)
    hf_model = load_causal_lm(model, cfg.runtime.dtype, device_map)
    layers = parse_layer_range(recipe.layers, get_adapter(hf_model).num_layers)
    scores, _, _ = recipe_scores(hf_model, recipe, PlanInputs(hf_model, tokenizer, runtime=cfg.runtime), layers)
    plan = plan_for_scores(hf_model, scores, recipe.budget(layers), recipe)
    report = {
        "model": model,
        **cfg.to_dict(),
        "units": {"attention": "query head" if recipe.head_mode == "query" else recipe.head_mode, "mlp": "channel"},
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
