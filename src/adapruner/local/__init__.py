"""Local pruning: layer by layer, each decoder layer pruned and refitted on what it really receives."""

from .engine import REFITS, SELECTIONS, LocalResult, LocalSettings, applied, local_prune
from .solve import InputMoments, Refit, obs_select, refit_columns

__all__ = [
    "REFITS",
    "SELECTIONS",
    "InputMoments",
    "LocalResult",
    "LocalSettings",
    "Refit",
    "applied",
    "local_prune",
    "obs_select",
    "refit_columns",
]
