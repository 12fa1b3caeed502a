"""Importance estimation: metrics, aggregation and the statistics they read."""

from .base import AGGREGATIONS, Importance, Statistics, aggregate, score_group
from .collector import NEEDS, collect_statistics
from .metrics import METRICS, get_metric, parse_mix, score_groups

__all__ = [
    "AGGREGATIONS",
    "METRICS",
    "NEEDS",
    "Importance",
    "Statistics",
    "aggregate",
    "collect_statistics",
    "get_metric",
    "parse_mix",
    "score_group",
    "score_groups",
]
