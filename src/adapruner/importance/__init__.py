"""Importance estimation: metrics, aggregation and the statistics they read."""

from .base import AGGREGATIONS, Importance, Statistics, aggregate, score_group
from .gradients import collect_gradients
from .metrics import METRICS, get_metric

__all__ = [
    "AGGREGATIONS",
    "METRICS",
    "Importance",
    "Statistics",
    "aggregate",
    "collect_gradients",
    "get_metric",
    "score_group",
]
