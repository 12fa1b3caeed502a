"""Pruning decisions (plans), their application (masks or removal) and saving."""

from .apply import masked, prune_physically
from .plan import Budget, LayerPlan, PrunePlan, solve_keep_counts
from .ranking import plan_from_scores

__all__ = [
    "Budget",
    "LayerPlan",
    "PrunePlan",
    "masked",
    "plan_from_scores",
    "prune_physically",
    "solve_keep_counts",
]
