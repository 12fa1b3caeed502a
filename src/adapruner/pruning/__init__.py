"""Pruning decisions (plans), their application (masks or removal) and saving."""

from .apply import masked, prune_physically
from .plan import Budget, LayerPlan, PrunePlan, plan_from_scores, solve_keep_counts

__all__ = [
    "Budget",
    "LayerPlan",
    "PrunePlan",
    "masked",
    "plan_from_scores",
    "prune_physically",
    "solve_keep_counts",
]
