"""AdaPruner: structured pruning of LLMs with searched calibration data and importance metrics."""

from __future__ import annotations

__version__ = "0.1.0"

from .api import (
    PruneConfig,
    PruneResult,
    build_calibration_pool,
    evaluate,
    info,
    load_pruned,
    prune,
    score_importance,
)
from .errors import AdaPrunerError, OfflineError

__all__ = [
    "AdaPrunerError",
    "OfflineError",
    "PruneConfig",
    "PruneResult",
    "__version__",
    "build_calibration_pool",
    "evaluate",
    "info",
    "load_pruned",
    "prune",
    "score_importance",
]
