"""From a recipe to a pruned model: the configuration (:class:`Recipe`, :class:`Runtime`, :class:`Allocation`,
bundled for a prune as :class:`PruneConfig`), its calibration checks,
the one recipe -> plan path (:func:`plan_recipe`) that ``prune``, every search trial and ``--from-run``
share, and the prune itself."""

from .calibration import check_calibration, default_refit_calibration, refit_windows
from .config import FRESH_SEED, OBS, REFIT_MODES, Allocation, PruneConfig, Recipe, Runtime, parse_windows
from .plan import PlanInputs, Planned, input_means, plan_for_scores, plan_recipe, statistics, with_activations
from .prune import PruneResult, prune

__all__ = [
    "FRESH_SEED",
    "OBS",
    "REFIT_MODES",
    "Allocation",
    "PlanInputs",
    "Planned",
    "PruneConfig",
    "PruneResult",
    "Recipe",
    "Runtime",
    "check_calibration",
    "default_refit_calibration",
    "input_means",
    "parse_windows",
    "plan_for_scores",
    "plan_recipe",
    "prune",
    "refit_windows",
    "statistics",
    "with_activations",
]
