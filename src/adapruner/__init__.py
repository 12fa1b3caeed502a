"""AdaPruner: structured pruning of LLMs with searched calibration data and importance metrics."""

from __future__ import annotations

__version__ = "0.1.0"

from . import export as _export_room  # noqa: F401 - loaded first: the function below takes its name
from .api import (
    Allocation,
    PruneConfig,
    PruneResult,
    Recipe,
    Runtime,
    build_calibration_pool,
    compare,
    evaluate,
    export,
    finetune,
    info,
    load_pruned,
    prune,
    score_importance,
)
from .errors import AdaPrunerError, OfflineError
from .pipeline import RunConfig, run
from .search.study import search  # the function shadows the subpackage name: adapruner.search(...)

__all__ = [
    "AdaPrunerError",
    "Allocation",
    "OfflineError",
    "PruneConfig",
    "PruneResult",
    "Recipe",
    "RunConfig",
    "Runtime",
    "__version__",
    "build_calibration_pool",
    "compare",
    "evaluate",
    "export",
    "finetune",
    "info",
    "load_pruned",
    "prune",
    "run",
    "score_importance",
    "search",
]
