"""The AdaPruner search space: calibration data x importance metric x structure allocation.

A trial's parameters are flat Optuna parameters; ``TrialConfig`` is the typed decision they stand for.
``--space data`` or ``metric`` fixes the other subspace at LLM-Pruner's choice (the paper's ablations);
allocation (attention share, depth profile, global ranking) belongs to the metric subspace.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import optuna

from ..errors import AdaPrunerError
from ..util import read_options_file

SPACES = ("joint", "data", "metric")
WINDOW_STATS = ("none", "loss", "grad_norm")


@dataclass(frozen=True)
class TrialConfig:
    """One point of the space: which calibration samples, which metric, how the cut is allocated."""

    sources: tuple[str, ...]
    num_samples: int
    seq_len: int
    window: tuple[str, float, float] | None
    subset_seed: int
    metric: str
    attention_metric: str | None
    aggregation: str
    mix: dict[str, float] | None
    attention_scale: float
    depth_slope: float
    depth_bend: float
    global_ranking: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SearchSpace:
    """What the search may choose from (defaults documented in the README)."""

    sources: list[str] = field(default_factory=lambda: ["books", "wiki", "news", "squad"])
    num_samples: list[int] = field(default_factory=lambda: [5, 10, 20])
    seq_lens: list[int] = field(default_factory=lambda: [32, 64])  # prefixes of the pool's windows
    metrics: list[str] = field(
        default_factory=lambda: ["element1", "element2", "vector", "second", "wanda_sp", "flap", "l2", "mix"]
    )
    mix_components: list[str] = field(default_factory=lambda: ["element1", "wanda_sp", "flap"])
    aggregations: list[str] = field(default_factory=lambda: ["sum", "mean", "max", "prod", "last"])
    attention_scale: tuple[float, float] = (0.0, 1.5)
    separate_attention_metric: bool = True  # may score attention heads with another metric than MLP channels
    depth_slope: tuple[float, float] = (-2.0, 2.0)
    depth_bend: tuple[float, float] = (-2.0, 2.0)
    subset_seeds: int = 10
    space: str = "joint"

    def __post_init__(self) -> None:
        for name in RANGES:
            setattr(self, name, tuple(getattr(self, name)))
        self._check()

    def _check(self) -> None:
        from ..importance import AGGREGATIONS, METRICS
        from ..pruning.plan import MAX_DEPTH_PARAM

        if self.space not in SPACES:
            raise AdaPrunerError(f"unknown --space '{self.space}': choose one of {', '.join(SPACES)}")
        for name in ("sources", "num_samples", "seq_lens", "metrics", "aggregations"):
            if not getattr(self, name):
                raise AdaPrunerError(f"the search space's '{name}' is empty: give at least one value")
        for name, value in ((f, getattr(self, f)) for f in RANGES):
            if len(value) != 2 or not value[0] <= value[1]:
                raise AdaPrunerError(f"the search space's '{name}' must be a range [low, high] with low <= high")
        if self.attention_scale[0] < 0 or max(map(abs, self.depth_slope + self.depth_bend)) > MAX_DEPTH_PARAM:
            raise AdaPrunerError(
                f"attention_scale must be >= 0 and the depth ranges inside [-{MAX_DEPTH_PARAM}, {MAX_DEPTH_PARAM}]"
            )
        unknown = sorted(set(self.metrics + self.mix_components) - set(METRICS))
        unknown += sorted(set(self.aggregations) - set(AGGREGATIONS))
        if unknown:
            raise AdaPrunerError(
                f"unknown metric/aggregation {unknown} in the search space: metrics {', '.join(METRICS)}; "
                f"aggregations {', '.join(AGGREGATIONS)}"
            )
        for name, value in (("num_samples", BASELINE.num_samples), ("seq_lens", BASELINE.seq_len)):
            if value not in getattr(self, name):
                raise AdaPrunerError(
                    f"the search space's {name} {getattr(self, name)} must include {value}, "
                    "LLM-Pruner's choice (trial 0)"
                )
        if min(self.seq_lens) < 2 or min(self.num_samples) < 1 or self.subset_seeds < 1:
            raise AdaPrunerError("seq_lens must be >= 2, num_samples >= 1 and subset_seeds >= 1")


RANGES = ("attention_scale", "depth_slope", "depth_bend")


def load_space(path: str | Path, **overrides: Any) -> SearchSpace:
    """A SearchSpace from a YAML file whose keys are SearchSpace fields; ``overrides`` (CLI flags) win."""
    data = read_options_file(path, SearchSpace, "search space file")
    return SearchSpace(**(data | {k: v for k, v in overrides.items() if v is not None}))


BASELINE = TrialConfig(
    sources=("books",),
    num_samples=10,
    seq_len=64,
    window=None,
    subset_seed=0,
    metric="element1",
    attention_metric=None,
    aggregation="sum",
    mix=None,
    attention_scale=1.0,
    depth_slope=0.0,
    depth_bend=0.0,
    global_ranking=False,
)


def baseline_params(space: SearchSpace) -> dict[str, Any]:
    """Optuna parameters of LLM-Pruner's recipe (element1, sum, 10 books samples), for trial 0."""
    params: dict[str, Any] = {}
    if space.space != "metric":
        params |= {f"use_{s}": s == "books" for s in space.sources}
        params |= {"num_samples": 10, "seq_len": 64, "window_stat": "none", "subset_seed": 0}
    if space.space != "data":
        params |= {"metric": "element1", "aggregation": "sum", "attention_scale": 1.0, "global_ranking": False}
        params |= {"depth_slope": 0.0, "depth_bend": 0.0}
        if space.separate_attention_metric:
            params["attention_metric"] = "same"
    return params


def suggest(trial: optuna.Trial, space: SearchSpace) -> TrialConfig:
    data = _suggest_data(trial, space) if space.space != "metric" else {}
    metric = _suggest_metric(trial, space) if space.space != "data" else {}
    base = BASELINE.to_dict()
    return TrialConfig(**(base | data | metric))


def _suggest_data(trial: optuna.Trial, space: SearchSpace) -> dict[str, Any]:
    chosen = tuple(s for s in space.sources if trial.suggest_categorical(f"use_{s}", [True, False]))
    window = None
    stat = trial.suggest_categorical("window_stat", list(WINDOW_STATS))
    if stat != "none":
        low = trial.suggest_float("window_low", 0.0, 0.6)
        width = trial.suggest_float("window_width", 0.3, 1.0)
        window = (stat, low, min(1.0, low + width))
    return {
        "sources": chosen or tuple(space.sources),
        "num_samples": trial.suggest_categorical("num_samples", space.num_samples),
        "seq_len": trial.suggest_categorical("seq_len", space.seq_lens),
        "window": window,
        "subset_seed": trial.suggest_int("subset_seed", 0, space.subset_seeds - 1),
    }


def _suggest_metric(trial: optuna.Trial, space: SearchSpace) -> dict[str, Any]:
    metric = trial.suggest_categorical("metric", space.metrics)
    mix = None
    if metric == "mix":
        mix = {c: trial.suggest_float(f"mix_{c}", 0.0, 1.0) for c in space.mix_components}
        if not any(w > 0 for w in mix.values()):
            mix[space.mix_components[0]] = 1.0
    attention_metric = None
    if space.separate_attention_metric:
        choice = trial.suggest_categorical("attention_metric", ["same", *(m for m in space.metrics if m != "mix")])
        attention_metric = None if choice in ("same", metric) else choice
    return {
        "metric": metric,
        "attention_metric": attention_metric,
        "mix": mix,
        "aggregation": trial.suggest_categorical("aggregation", space.aggregations),
        "attention_scale": trial.suggest_float("attention_scale", *space.attention_scale),
        "depth_slope": trial.suggest_float("depth_slope", *space.depth_slope),
        "depth_bend": trial.suggest_float("depth_bend", *space.depth_bend),
        "global_ranking": trial.suggest_categorical("global_ranking", [False, True]),
    }
