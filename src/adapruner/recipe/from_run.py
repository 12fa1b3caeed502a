"""``prune --from-run``: the recipe and allocation of a search's best trial, read from its ``best.json``.

A search writes the winning trial's :class:`Recipe` and :class:`Allocation`, each by its own serialiser
(``best["recipe"]``, ``best["allocation"]``), so loading them is a plain load. Older searches are still
read: those of 2026-12-06 stored one flat recipe (runtime fields included), earlier ones only the trial's
search parameters, from which the recipe is rebuilt key by key, as those versions of ``prune --from-run``
did.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..errors import AdaPrunerError
from .config import FRESH_SEED, Allocation, PruneConfig, Recipe, Runtime, field_names, known_fields


def recipe_from_run(run_dir: Path) -> tuple[Recipe, Allocation | None, dict[str, Any]]:
    """The best trial's recipe (its model left empty: the prune's) and allocation, and what the search
    read from its calibration pool."""
    path = Path(run_dir) / "best.json"
    if not path.is_file():
        raise AdaPrunerError(f"{run_dir} holds no finished search (best.json is missing): run `adapruner search` first")
    try:
        best = json.loads(path.read_text())
        if "allocation" in best:
            recipe = Recipe.from_dict(best["recipe"], str(path))
            allocation = Allocation.from_dict(best["allocation"], str(path))
        else:
            options = _flat_recipe(best, path) if "recipe" in best else _legacy_options(best)
            cfg = PruneConfig.from_flat(options | {"model": "", "ratio": best["ratio"]})
            recipe, allocation = cfg.recipe, cfg.allocation
        searched = {"pool": best["pool"], "subset": best["best"]["subset"], "run": str(run_dir)}
        return replace(recipe, model="", ratio=float(best["ratio"])), allocation, searched
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise AdaPrunerError(f"{path} is corrupted ({exc}): run the search again") from None


def _flat_recipe(best: dict[str, Any], path: Path) -> dict[str, Any]:
    """The one flat recipe a search of 2026-12-06 stored, without what the prune decides."""
    recipe = known_fields(best["recipe"], str(path), "recipe", Recipe, Runtime, Allocation)
    return {k: v for k, v in recipe.items() if k not in field_names(Runtime) | {"model", "ratio"}}


def _legacy_options(best: dict[str, Any]) -> dict[str, Any]:
    """The recipe of a ``best.json`` written before recipes were stored, from the trial's parameters."""
    config, space = best["best"]["config"], best.get("space", {})
    fresh = None if config.get("activation_calibration") in (None, "pool") else config["activation_calibration"]
    refit = config.get("refit", "none")
    label = config.get("layers")  # None: searches before layer ranges were searched used the study's one
    options = {
        "metric": config["metric"],
        "aggregation": config["aggregation"],
        "mix": config["mix"],
        "attention_scale": config["attention_scale"],
        "ranking": config.get("ranking") or ("global" if config.get("global_ranking") else "layer"),
        "layers": best["layers"] if label is None else best["layer_ranges"][label],
        "head_mode": best["head_mode"],
        "seed": config["subset_seed"],
        "calibration": ",".join(config["sources"]),
        "num_samples": config["num_samples"],
        "seq_len": config.get("seq_len", best["pool"]["seq_len"]),
        "attention_metric": config.get("attention_metric"),
        "depth_slope": config.get("depth_slope", 0.0),
        "depth_bend": config.get("depth_bend", 0.0),
        "activation_calibration": fresh,
        "refit": "bias" if refit == "none" and config.get("compensate") else refit,
        "refit_calibration": space.get("refit_calibration", "128x128"),
        "activation_seed": FRESH_SEED if fresh or refit != "none" else None,
        "uniform": bool(space.get("uniform", False)),
        "align": int(space.get("align", 1)),
    }
    if config.get("allocation") == "per-layer":
        options |= {"keep_counts": [list(c) for c in config["counts"]], "layers": None}
        options["max_removal"] = space["max_removal"]
    return options
