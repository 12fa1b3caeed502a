"""``prune --from-run``: the recipe of a search's best trial, read from its ``best.json``.

A search writes the winning trial's :class:`PruneConfig` whole (``best["recipe"]``), so loading it is
a plain load. Searches written before that store only the trial's search parameters; their recipe is
rebuilt here key by key, as those versions of ``prune --from-run`` did.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any

from ..errors import AdaPrunerError
from .config import FRESH_SEED, PruneConfig

RUNTIME = ("model", "ratio", "dtype")  # what the user's prune decides, never the search


def options_from_run(run_dir: Path) -> tuple[float, dict[str, Any], dict[str, Any]]:
    """Ratio, PruneConfig options and the calibration pool subset of a search's best trial."""
    path = Path(run_dir) / "best.json"
    if not path.is_file():
        raise AdaPrunerError(f"{run_dir} holds no finished search (best.json is missing): run `adapruner search` first")
    try:
        best = json.loads(path.read_text())
        options = _stored_recipe(best, path) if "recipe" in best else _legacy_options(best)
        searched = {"pool": best["pool"], "subset": best["best"]["subset"], "run": str(run_dir)}
        return float(best["ratio"]), options, searched
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise AdaPrunerError(f"{path} is corrupted ({exc}): run the search again") from None


def _stored_recipe(best: dict[str, Any], path: Path) -> dict[str, Any]:
    if not isinstance(best["recipe"], dict):
        raise TypeError("its recipe is not a mapping")
    known = {f.name for f in fields(PruneConfig)}
    unknown = sorted(set(best["recipe"]) - known)
    if unknown:
        raise AdaPrunerError(
            f"{path} was written by a newer AdaPruner (unknown recipe fields {', '.join(unknown)}): upgrade adapruner"
        )
    return {k: v for k, v in best["recipe"].items() if k not in RUNTIME}


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
