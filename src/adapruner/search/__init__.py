"""The AdaPruner search (Bayesian optimisation with TPE over calibration data x importance metric)."""

from .space import BASELINE, SPACES, SearchSpace, TrialConfig
from .study import SAMPLERS, search

__all__ = ["BASELINE", "SAMPLERS", "SPACES", "SearchSpace", "TrialConfig", "search"]
