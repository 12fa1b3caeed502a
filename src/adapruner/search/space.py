"""The AdaPruner search space: calibration data x importance metric x structure allocation.

A trial's parameters are flat Optuna parameters; ``TrialConfig`` is the typed decision they stand for.
``--space data`` or ``metric`` fixes the other subspace at LLM-Pruner's choice (the paper's ablations);
allocation (attention share, global ranking) belongs to the metric subspace.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import optuna
import yaml

from ..errors import AdaPrunerError

SPACES = ("joint", "data", "metric")
WINDOW_STATS = ("none", "loss", "grad_norm")


@dataclass(frozen=True)
class TrialConfig:
    """One point of the space: which calibration samples, which metric, how the cut is allocated."""

    sources: tuple[str, ...]
    num_samples: int
    window: tuple[str, float, float] | None
    subset_seed: int
    metric: str
    aggregation: str
    mix: dict[str, float] | None
    attention_scale: float
    global_ranking: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SearchSpace:
    """What the search may choose from (defaults documented in the README)."""

    sources: list[str] = field(default_factory=lambda: ["books", "wiki", "news", "squad"])
    num_samples: list[int] = field(default_factory=lambda: [5, 10, 20])
    metrics: list[str] = field(
        default_factory=lambda: ["element1", "element2", "vector", "second", "wanda_sp", "flap", "l2", "mix"]
    )
    mix_components: list[str] = field(default_factory=lambda: ["element1", "wanda_sp", "flap"])
    aggregations: list[str] = field(default_factory=lambda: ["sum", "mean", "max", "prod", "last"])
    attention_scale: tuple[float, float] = (0.0, 1.5)
    subset_seeds: int = 10
    space: str = "joint"

    def __post_init__(self) -> None:
        if self.space not in SPACES:
            raise AdaPrunerError(f"unknown --space '{self.space}': choose one of {', '.join(SPACES)}")
        if not self.sources:
            raise AdaPrunerError("the search space needs at least one calibration source")
        if BASELINE.num_samples not in self.num_samples:
            raise AdaPrunerError(
                f"the sample counts {self.num_samples} must include {BASELINE.num_samples}, "
                "LLM-Pruner's choice (trial 0)"
            )


def load_space(path: str | Path, **overrides: Any) -> SearchSpace:
    """A SearchSpace from a YAML file whose keys are SearchSpace fields; ``overrides`` (CLI flags) win."""
    path = Path(path)
    if not path.is_file():
        raise AdaPrunerError(f"search space file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise AdaPrunerError(f"{path} is not valid YAML ({str(exc).splitlines()[0]})") from None
    known = {f.name for f in fields(SearchSpace)}
    unknown = sorted(set(data) - known) if isinstance(data, dict) else ["(not a mapping)"]
    if unknown:
        raise AdaPrunerError(f"{path}: unknown key(s) {unknown}; known: {', '.join(sorted(known))}")
    if "attention_scale" in data:
        data["attention_scale"] = tuple(data["attention_scale"])
    return SearchSpace(**(data | {k: v for k, v in overrides.items() if v is not None}))


BASELINE = TrialConfig(
    sources=("books",),
    num_samples=10,
    window=None,
    subset_seed=0,
    metric="element1",
    aggregation="sum",
    mix=None,
    attention_scale=1.0,
    global_ranking=False,
)


def baseline_params(space: SearchSpace) -> dict[str, Any]:
    """Optuna parameters of LLM-Pruner's recipe (element1, sum, 10 books samples), for trial 0."""
    params: dict[str, Any] = {}
    if space.space != "metric":
        params |= {f"use_{s}": s == "books" for s in space.sources}
        params |= {"num_samples": 10, "window_stat": "none", "subset_seed": 0}
    if space.space != "data":
        params |= {"metric": "element1", "aggregation": "sum", "attention_scale": 1.0, "global_ranking": False}
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
    return {
        "metric": metric,
        "mix": mix,
        "aggregation": trial.suggest_categorical("aggregation", space.aggregations),
        "attention_scale": trial.suggest_float("attention_scale", *space.attention_scale),
        "global_ranking": trial.suggest_categorical("global_ranking", [False, True]),
    }
