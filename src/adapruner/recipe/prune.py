"""``adapruner prune``: resolve the recipe, check its calibration, load, plan, cut, record, save."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from ..data.pool import build_pool
from ..errors import AdaPrunerError
from ..files import check_output_dir
from ..models.base import ModelAdapter, get_adapter
from ..models.loading import load_causal_lm, load_tokenizer
from ..pruning.apply import prune_physically
from ..pruning.io import save_pruned
from ..pruning.plan import PrunePlan, count_params, parse_layer_range, rate_summary
from ..pruning.stock import check_stock_possible, make_stock
from ..util import log, versions
from .calibration import check_calibration
from .config import PruneConfig, Runtime, field_names
from .from_run import recipe_from_run
from .plan import PlanInputs, plan_recipe


@dataclass
class PruneResult:
    model: torch.nn.Module
    tokenizer: Any
    plan: PrunePlan
    record: dict
    output: Path | None = None
    timings: dict[str, float] = field(default_factory=dict)


@contextmanager
def timed(timings: dict[str, float], step: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[step] = round(time.perf_counter() - start, 2)
    log(f"{step}: {timings[step]:.1f}s")


def resolve_config(
    model: str, ratio: float | None, options: dict[str, Any], from_run: str | Path | None
) -> tuple[PruneConfig, dict[str, Any] | None]:
    """The validated configuration of a prune: a method's preset overridden by ``options``, or a search's
    best trial (``from_run``: its recipe and allocation, with the runtime of ``options``), with what the
    search read from its pool."""
    searched = None
    if from_run is not None:
        cfg, searched = _from_run(model, options, Path(from_run))
    elif ratio is None:
        raise AdaPrunerError("give --ratio (or --from-run RUN_DIR)")
    else:
        cfg = PruneConfig.from_method(model, ratio, **options)
    if cfg.recipe.uniform:
        cfg = cfg.as_uniform(options if from_run is None else cfg.recipe.to_dict())
    cfg.validate()
    return cfg, searched


def _from_run(model: str, options: dict[str, Any], run_dir: Path) -> tuple[PruneConfig, dict[str, Any]]:
    if options.get("method") is not None:
        raise AdaPrunerError("--method and --from-run exclude each other: give one of them")
    recipe, allocation, searched = recipe_from_run(run_dir)
    if options.get("uniform") and not recipe.uniform:
        raise AdaPrunerError(
            f"--uniform: the search in {run_dir} was not uniform: run `adapruner search --uniform` first"
        )
    runtime = Runtime(**{k: v for k, v in options.items() if k in field_names(Runtime)})
    return PruneConfig(replace(recipe, model=model), runtime, allocation), searched


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

    ``options`` are the fields of the recipe and runtime (metric, calibration, layers, dtype, ...); with
    ``method="flap"`` (or another name of :mod:`adapruner.methods`) they override that baseline's preset. With
    ``from_run`` the configuration (and the exact calibration samples) of a search's best trial are used.
    With ``output`` the pruned model is saved as an HF directory plus ``adapruner.json``.
    """
    cfg, searched = resolve_config(model, ratio, options, from_run)
    if output is not None:
        check_output_dir(Path(output), overwrite)
    timings: dict[str, float] = {}
    subset = searched["subset"] if searched is not None else None  # None: the trial read no pool sample
    with timed(timings, "check"):  # the calibration sizes, before minutes of loading and scoring
        tokenizer = load_tokenizer(model)
        recipe = check_calibration(tokenizer, cfg.recipe, cfg.allocation, samples_given=subset is not None)
        cfg = replace(cfg, recipe=recipe)
    with timed(timings, "load"):
        hf_model = load_causal_lm(model, cfg.runtime.dtype, device_map)
    dense_shapes = get_adapter(hf_model).layer_shapes()
    if recipe.uniform:
        check_uniform(get_adapter(hf_model), cfg)
    samples = None
    if subset is not None:
        spec = searched["pool"]
        pool = build_pool(tokenizer, spec["sources"], spec["per_source"], spec["seq_len"], spec["seed"])
        samples = pool.truncated(recipe.seq_len).input_ids[subset]
    with timed(timings, "plan"):  # scoring, and the layer-by-layer refit (its share logged apart)
        inputs = PlanInputs(hf_model, tokenizer, samples, cfg.runtime)
        planned = plan_recipe(hf_model, recipe, inputs, cfg.allocation)
    if planned.refit_seconds:
        timings["refit"] = round(planned.refit_seconds, 2)
        timings["plan"] = round(timings["plan"] - timings["refit"], 2)
        log(f"of which refit: {timings['refit']:.1f}s")
    with timed(timings, "prune"):
        prune_physically(get_adapter(hf_model), planned.plan, input_means=planned.input_means)
        if recipe.uniform:
            make_stock(get_adapter(hf_model))
    log(f"pruned: {rate_summary(planned.plan, dense_shapes)}" + (f"; see adapruner info {output}" if output else ""))
    record = _record(hf_model, model, cfg, planned, searched)
    result = PruneResult(hf_model, tokenizer, planned.plan, record, timings=timings)
    if output is not None:
        with timed(timings, "save"):
            result.output = save_pruned(hf_model, tokenizer, record, Path(output), overwrite)
    return result


def _record(hf_model, model: str, cfg: PruneConfig, planned, searched) -> dict[str, Any]:
    """``adapruner.json``: what was pruned, how, and what it gave."""
    pruned_params = count_params(hf_model)
    return {
        "format": 2,  # 2: recipe, runtime and allocation (1, before 2026-12-07: one flat "config")
        "source_model": model,
        "model_type": hf_model.config.model_type,
        "target_ratio": cfg.recipe.ratio,
        "achieved_ratio": 1 - pruned_params / planned.dense_params,
        "params": {"dense": planned.dense_params, "pruned": pruned_params},
        "layer_range": list(planned.layers),
        **cfg.to_dict(),
        "search": searched,
        "local": planned.local,
        "layer_shapes": [s.to_dict() for s in planned.plan.shapes()],
        "plan": planned.plan.to_dict(),
        "versions": versions(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def check_uniform(adapter: ModelAdapter, cfg: PruneConfig) -> None:
    """Before any work: ``--uniform`` prunes every layer, and the output's biases fit the stock config."""
    every = (0, adapter.num_layers)
    if cfg.allocation is None and parse_layer_range(cfg.recipe.layers, adapter.num_layers) != every:
        raise AdaPrunerError(f"--uniform prunes every layer alike: drop --layers (or give 0:{adapter.num_layers})")
    check_stock_possible(adapter, cfg.output_bias)
