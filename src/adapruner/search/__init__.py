"""The AdaPruner search (Bayesian optimisation with TPE over calibration data x importance metric)."""

from .space import BASELINE, SPACES, SearchSpace, TrialConfig, load_space
from .study import SAMPLERS, search

__all__ = ["BASELINE", "SAMPLERS", "SPACES", "SearchSpace", "TrialConfig", "load_space", "search"]
