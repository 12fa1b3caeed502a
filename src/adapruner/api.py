"""The Python API: every CLI command is one of these functions. Each lives in its room (``recipe`` for
pruning, ``search``, ``recovery``, ``evaluation``, ``export``); this module only gathers them (the
``X as X`` imports are the re-exports)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import AdaPrunerError
from .evaluation.compare import compare_table
from .evaluation.run import evaluate as evaluate
from .export.run import export as export
from .models.loading import load_causal_lm
from .pruning.io import read_record
from .pruning.stock import output_kind
from .recipe import Allocation as Allocation
from .recipe import PruneConfig as PruneConfig
from .recipe import PruneResult as PruneResult
from .recipe import Recipe as Recipe
from .recipe import Runtime as Runtime
from .recipe import prune as prune
from .recipe.scores import build_calibration_pool as build_calibration_pool
from .recipe.scores import score_importance as score_importance
from .recovery import finetune as finetune


def load_pruned(directory: str | Path, dtype: str = "float32", device_map: str | None = None) -> torch.nn.Module:
    """Load a model saved by :func:`prune` (any per-layer sizes), without ``trust_remote_code``."""
    read_record(Path(directory))
    return load_causal_lm(str(directory), dtype, device_map)


def compare(paths: list[str | Path] | tuple[str | Path, ...], *, reference: str | Path | None = None) -> str:
    """A markdown table of ``evaluate`` result files: one row each, retention against the reference (default:
    the first file, the dense model). See :func:`adapruner.evaluation.compare.compare_table`."""
    return compare_table(paths, reference=reference)


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
