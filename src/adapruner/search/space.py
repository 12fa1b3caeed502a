"""The AdaPruner search space: calibration data x importance metric x structure allocation.

A trial's parameters are flat Optuna parameters; ``TrialConfig`` is the typed decision they stand for.
``--space data`` or ``metric`` fixes the other subspace at LLM-Pruner's choice (the paper's ablations);
allocation (attention share, depth profile, ranking, layer range) and FLAP's bias compensation belong
to the metric subspace. Trial 0 is always LLM-Pruner's recipe; ``warm_starts`` enqueue other published
recipes (FLAP) right after it, so the search starts from the best known points instead of having to
rediscover them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import optuna

from ..data.calibration import split_sources
from ..errors import AdaPrunerError
from ..importance import AGGREGATIONS, METRICS, get_metric
from ..methods import FLAP_CALIBRATION, LLM_PRUNER_RECIPE, get_method
from ..pruning.plan import MAX_DEPTH_PARAM
from ..pruning.ranking import RANKINGS
from ..recipe import parse_windows
from ..util import read_options_file
from .evolution import ALLOCATIONS, ATTENTION_PARAM, MLP_PARAM, PER_LAYER, PROFILE

SPACES = ("joint", "data", "metric")
WINDOW_STATS = ("none", "loss", "grad_norm")
DEFAULT_LAYERS = "default"  # LLM-Pruner's layer range for the model (adapruner.pruning.default_layer_range)
WARM_STARTS = ("flap", "flap-refit")
REFITS = ("none", "lsq")  # "bias" is the `compensate` dimension


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
    ranking: str  # layer | global | global-all (see adapruner.pruning.plan_from_scores)
    compensate: bool  # FLAP's bias compensation of the removed o_proj/down_proj inputs
    layers: str  # a layer range label of SearchSpace.layer_ranges ("default": LLM-Pruner's range)
    activation_calibration: str  # "pool": the subset's activations; "NxL": N fresh windows of L tokens
    refit: str = "none"  # "lsq": the kept o_proj/down_proj columns refitted layer by layer (adapruner.local)
    allocation: str = "profile"  # "per-layer": ``counts`` assembled from the supernet (adapruner.local.supernet)
    counts: tuple[tuple[int, int, int], ...] | None = None  # per-layer trials: (layer, attention units, channels)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SearchSpace:
    """What the search may choose from (defaults documented in the README)."""

    sources: list[str] = field(default_factory=lambda: ["books", "wiki", "news", "squad"])
    num_samples: list[int] = field(default_factory=lambda: [5, 10, 20, 40])
    seq_lens: list[int] = field(default_factory=lambda: [32, 64])  # prefixes of the pool's windows
    metrics: list[str] = field(
        default_factory=lambda: ["element1", "element2", "vector", "second", "wanda_sp", "flap", "wifv", "l2", "mix"]
    )
    mix_components: list[str] = field(default_factory=lambda: ["element1", "wanda_sp", "flap"])
    aggregations: list[str] = field(default_factory=lambda: ["sum", "mean", "max", "prod", "last"])
    attention_scale: tuple[float, float] = (0.0, 1.5)
    separate_attention_metric: bool = True  # may score attention heads with another metric than MLP channels
    depth_slope: tuple[float, float] = (-2.0, 2.0)
    depth_bend: tuple[float, float] = (-2.0, 2.0)
    subset_seeds: int = 10
    rankings: list[str] = field(default_factory=lambda: ["layer", "global", "global-all"])
    compensate: list[bool] = field(default_factory=lambda: [False, True])
    layer_ranges: list[str] = field(default_factory=lambda: [DEFAULT_LAYERS, "0:"])  # "START:END" or "default"
    warm_starts: list[str] = field(default_factory=lambda: ["flap", "flap-refit"])  # enqueued after trial 0
    # activation statistics (wanda_sp, flap, wifv, compensation) may come from N fresh windows of L
    # tokens of the chosen sources ("NxL", a forward pass, memoised) instead of the pool subset
    fresh_activations: list[str] = field(default_factory=lambda: ["128x128"])
    # "lsq": refit the kept weights layer by layer on refit_calibration windows (NxL) of the trial's sources
    refits: list[str] = field(default_factory=lambda: ["none", "lsq"])
    refit_calibration: str = "128x128"
    # "per-layer": after `profile_trials` trials the search assigns every layer its own keep counts over a
    # supernet of refitted candidates (adapruner.search.evolution); "profile" only: the paper's allocation
    allocations: list[str] = field(default_factory=lambda: ["profile", "per-layer"])
    profile_trials: int = 8
    # calibration sources of the supernet (windows: refit_calibration); several: TPE picks one per trial
    supernet_data: list[str] = field(default_factory=lambda: ["wiki,news,squad"])
    max_removal: float = 0.9  # the deepest per-layer candidate removes this fraction of a layer's units
    mlp_levels: int = 32  # a mutation moves dense/mlp_levels MLP channels (attention: one unit per KV group)
    # coarse to fine (Týr-the-Pruner): MLP moves of this many levels over the first third of the per-layer
    # trials, half as many over the second third, one level over the last (1: one level throughout).
    # 4 measured better than 1 on 5 of 6 seeds x ratios (docs/results.md, 2026-12-03)
    coarse_to_fine: int = 4
    align: int = 1  # kept MLP channels multiples of this in every trial (prune --align): 64/256 for kernels, K-quants
    space: str = "joint"
    # every layer pruned to one size, so the output is the stock architecture (adapruner.pruning.stock): the
    # allocation keeps only the attention share (per-layer ranking, every layer, flat depth profile)
    uniform: bool = False

    def __post_init__(self) -> None:
        for name in RANGES:
            setattr(self, name, tuple(getattr(self, name)))
        if self.uniform:
            self._make_uniform()
        self._check()

    def _make_uniform(self) -> None:
        """``--uniform`` fixes what would give layers different sizes (whatever a space file says); its
        per-layer stage tries the supernet's candidates at one size for every layer (one trial per attention
        level), then the profile search goes on."""
        self.rankings, self.layer_ranges = ["layer"], [EVERY_LAYER]
        self.depth_slope, self.depth_bend = (0.0, 0.0), (0.0, 0.0)

    def _check(self) -> None:

        if self.space not in SPACES:
            raise AdaPrunerError(f"unknown --space '{self.space}': choose one of {', '.join(SPACES)}")
        for name in ("sources", "num_samples", "seq_lens", "metrics", "aggregations", "rankings", "compensate"):
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
        self._check_structure()
        baseline = baseline_config(self)
        searched_metric = (
            () if self.space == "data" else (("metrics", baseline.metric), ("aggregations", baseline.aggregation))
        )
        for name, value in (
            *searched_metric,
            ("num_samples", baseline.num_samples),
            ("seq_lens", baseline.seq_len),
            ("rankings", baseline.ranking),
            ("compensate", baseline.compensate),
            ("layer_ranges", baseline.layers),
        ):
            if value not in getattr(self, name):
                raise AdaPrunerError(
                    f"the search space's {name} {getattr(self, name)} must include {value}, "
                    "LLM-Pruner's choice (trial 0)"
                )
        if min(self.seq_lens) < 2 or min(self.num_samples) < 1 or self.subset_seeds < 1:
            raise AdaPrunerError("seq_lens must be >= 2, num_samples >= 1 and subset_seeds >= 1")

    def _check_structure(self) -> None:

        unknown = sorted(set(self.rankings) - set(RANKINGS))
        if unknown:
            raise AdaPrunerError(f"unknown ranking {unknown} in the search space: choose from {', '.join(RANKINGS)}")
        if any(not isinstance(v, bool) for v in self.compensate):
            raise AdaPrunerError(f"the search space's compensate {self.compensate} must list true and/or false")
        bad = [r for r in self.layer_ranges if r != DEFAULT_LAYERS and not (isinstance(r, str) and _is_range_text(r))]
        if bad or not self.layer_ranges:
            raise AdaPrunerError(
                f"the search space's layer_ranges {self.layer_ranges} must list 'default' and ranges "
                "'START:END' (END may be empty: to the last layer; quote them in YAML: '0:')"
            )

        for windows in [*self.fresh_activations, self.refit_calibration]:
            parse_windows(windows)
        if not self.refits or set(self.refits) - set(REFITS) or "none" not in self.refits:
            raise AdaPrunerError(
                f"the search space's refits {self.refits} must list 'none' (LLM-Pruner's choice, trial 0) and "
                f"optionally 'lsq'"
            )
        unknown = sorted(set(self.warm_starts) - set(WARM_STARTS))
        if unknown:
            raise AdaPrunerError(f"unknown warm start {unknown}: choose from {', '.join(WARM_STARTS)} (or none)")
        self._check_allocation()

    def _check_allocation(self) -> None:
        if not self.allocations or set(self.allocations) - set(ALLOCATIONS) or PROFILE not in self.allocations:
            raise AdaPrunerError(
                f"the search space's allocations {self.allocations} must list 'profile' (trial 0) and optionally "
                "'per-layer'"
            )
        counts = (self.profile_trials, self.mlp_levels, self.coarse_to_fine, self.align)
        if min(counts) < 1 or not 0.0 < self.max_removal < 1.0:
            raise AdaPrunerError(
                "profile_trials, mlp_levels, coarse_to_fine and align must be >= 1 and max_removal inside (0, 1)"
            )
        if not self.supernet_data or not all(isinstance(d, str) and d.strip(",") for d in self.supernet_data):
            raise AdaPrunerError("the search space's supernet_data must list source specs, e.g. ['wiki,news,squad']")

    @property
    def per_layer(self) -> bool:
        return PER_LAYER in self.allocations


def _is_range_text(text: str) -> bool:
    start, sep, end = str(text).partition(":")
    return sep == ":" and start.strip().isdigit() and (end.strip() == "" or end.strip().isdigit())


RANGES = ("attention_scale", "depth_slope", "depth_bend")


def load_space(path: str | Path, **overrides: Any) -> SearchSpace:
    """A SearchSpace from a YAML file whose keys are SearchSpace fields; ``overrides`` (CLI flags) win."""
    data = read_options_file(path, SearchSpace, "search space file")
    return SearchSpace(**(data | {k: v for k, v in overrides.items() if v is not None}))


RECIPE = get_method(LLM_PRUNER_RECIPE).options  # trial 0: LLM-Pruner's recipe, as `prune --method` runs it
BASELINE = TrialConfig(
    sources=(RECIPE["calibration"],),
    num_samples=RECIPE["num_samples"],
    seq_len=RECIPE["seq_len"],
    window=None,
    subset_seed=0,
    metric=RECIPE["metric"],
    attention_metric=None,
    aggregation=RECIPE["aggregation"],
    mix=None,
    attention_scale=1.0,
    depth_slope=0.0,
    depth_bend=0.0,
    ranking="layer",
    compensate=False,
    layers=DEFAULT_LAYERS,
    activation_calibration="pool",
)


EVERY_LAYER = "0:"


def baseline_config(space: SearchSpace) -> TrialConfig:
    """LLM-Pruner's recipe in ``space``: its own layer range, or every layer in a ``--uniform`` space."""
    return TrialConfig(**(BASELINE.to_dict() | {"layers": EVERY_LAYER})) if space.uniform else BASELINE


def baseline_params(space: SearchSpace) -> dict[str, Any]:
    """Optuna parameters of LLM-Pruner's recipe (element1, sum, 10 books samples: ``BASELINE``), for trial 0."""
    params: dict[str, Any] = {}
    if space.space != "metric":
        params |= {f"use_{s}": s in BASELINE.sources for s in space.sources}
        params |= {"num_samples": BASELINE.num_samples, "seq_len": BASELINE.seq_len, "window_stat": "none"}
        params["subset_seed"] = BASELINE.subset_seed
    if space.space != "data":
        params |= {"metric": BASELINE.metric, "aggregation": BASELINE.aggregation, "attention_scale": 1.0}
        params["ranking"] = BASELINE.ranking
        params |= {"depth_slope": 0.0, "depth_bend": 0.0, "compensate": False, "layers": baseline_config(space).layers}
        params["refit"] = "none"
        if space.separate_attention_metric:
            params["attention_metric"] = "same"
    return _with_allocation(space, params)


def _with_allocation(space: SearchSpace, params: dict[str, Any]) -> dict[str, Any]:
    """Profile trials carry ``allocation: profile`` once the space also searches per-layer counts."""
    return params | {"allocation": "profile"} if space.per_layer else params


def warm_start_params(space: SearchSpace, name: str, max_samples: int | None = None) -> dict[str, Any] | None:
    """Optuna parameters of a published recipe inside ``space``, or None where the space cannot express it.

    ``flap``: FLAP's defaults (WIFV, AL-AM joint ranking of heads and channels, bias compensation, every
    layer) on the pool's ``wiki`` windows (all sources if the space has no ``wiki``), as many (up to
    ``max_samples``, the pool's windows per source)
    and as long as the space allows (FLAP itself uses
    more and longer samples; ``adapruner prune --method flap`` is the faithful baseline). Only the
    metric subspace carries FLAP's choices, so a ``data`` ablation gets no warm start.
    """
    if name not in WARM_STARTS or space.space == "data":
        return None
    refit = name == "flap-refit"
    if refit and "lsq" not in space.refits:
        return None
    every_layer = next((r for r in space.layer_ranges if r.replace(" ", "") == EVERY_LAYER), None)
    # a --uniform space ranks within each layer: FLAP's uniform variant (UL-UM) instead of its AL-AM
    ranking = "global-all" if "global-all" in space.rankings else ("layer" if space.uniform else None)
    if "wifv" not in space.metrics or ranking is None or True not in space.compensate or every_layer is None:
        return None
    params = {"metric": "wifv", "attention_scale": 1.0, "ranking": ranking}  # wifv has no aggregation
    params |= {"depth_slope": 0.0, "depth_bend": 0.0, "layers": every_layer}
    params |= {"refit": "lsq"} if refit else {"refit": "none", "compensate": True}
    if space.separate_attention_metric:
        params["attention_metric"] = "same"
    if space.space == "joint":
        wiki = "wiki" in space.sources  # FLAP calibrates on WikiText2; without wiki: every source of the space
        params |= {f"use_{s}": s == "wiki" or not wiki for s in space.sources}
        if FLAP_WINDOWS in space.fresh_activations:  # FLAP's own 128 windows of 128 tokens: FLAP exactly
            return _with_allocation(space, params | {"activation_calibration": FLAP_WINDOWS})
        fitting = [n for n in space.num_samples if max_samples is None or n <= max_samples]
        if not fitting:
            return None
        params |= {"num_samples": max(fitting), "seq_len": max(space.seq_lens), "window_stat": "none"}
        params["subset_seed"] = 0
        if space.fresh_activations:
            params["activation_calibration"] = "pool"
    return _with_allocation(space, params)


FLAP_WINDOWS = f"{FLAP_CALIBRATION['num_samples']}x{FLAP_CALIBRATION['seq_len']}"  # FLAP's calibration: 128 x 128


def suggest(trial: optuna.Trial, space: SearchSpace, dense: list[tuple[int, int]] | None = None) -> TrialConfig:
    """The metric subspace first: which statistics it reads decides which data parameters matter.

    Once the space searches per-layer counts, ``allocation`` comes first: a per-layer trial draws only its
    supernet's calibration data (TPE, when there is a choice) and its counts (the mutation proposer);
    ``dense`` holds every layer's (attention units, MLP channels) of the dense model.
    """
    if space.per_layer and trial.suggest_categorical("allocation", list(space.allocations)) == PER_LAYER:
        data = space.supernet_data[0]
        if len(space.supernet_data) > 1:
            data = trial.suggest_categorical("supernet_data", list(space.supernet_data))

        if dense is None:
            raise AdaPrunerError("a per-layer trial needs the model's dense counts")
        counts = []
        for layer, (units, channels) in enumerate(dense):
            attn = trial.suggest_int(f"{ATTENTION_PARAM}{layer}", 1, units)
            counts.append((layer, attn, trial.suggest_int(f"{MLP_PARAM}{layer}", 1, channels)))
        fields = {"metric": "obs", "refit": "lsq", "allocation": PER_LAYER, "counts": tuple(counts)}
        return TrialConfig(**(baseline_config(space).to_dict() | fields | {"sources": tuple(split_sources(data))}))
    config = baseline_config(space).to_dict() | (_suggest_metric(trial, space) if space.space != "data" else {})
    if space.space != "metric":
        config |= _suggest_data(trial, space, *_reads(config), refit=config["refit"] != "none")
    return TrialConfig(**config)


def _reads(config: dict[str, Any]) -> tuple[bool, bool]:
    """(gradients, activations): the statistics a configuration's metrics (and compensation) read."""

    needs = frozenset().union(
        *(get_metric(m, mix=config["mix"]).needs for m in {config["metric"], config["attention_metric"]} if m)
    )
    compensate = config["compensate"] and config["refit"] == "none"
    return bool(needs & {"grad", "fisher"}), "activations" in needs or compensate


def _uses_aggregation(metric: str) -> bool:
    """Whether ``aggregation`` changes this metric's scores (not for FLAP's, which read one member)."""

    return METRICS[metric].uses_aggregation


def _suggest_data(
    trial: optuna.Trial, space: SearchSpace, gradients: bool, activations: bool, refit: bool = False
) -> dict[str, Any]:
    """Only the parameters the trial reads: none for data-free metrics (l2, random) without a refit, and no
    pool subset when every statistic comes from fresh activation windows (a refit reads only the sources)."""
    if not (gradients or activations or refit):
        return {}
    chosen = tuple(s for s in space.sources if trial.suggest_categorical(f"use_{s}", [True, False]))
    data: dict[str, Any] = {"sources": chosen or tuple(space.sources)}
    if activations and space.fresh_activations:
        choices = ["pool", *space.fresh_activations]
        data["activation_calibration"] = trial.suggest_categorical("activation_calibration", choices)
    if gradients or (activations and data.get("activation_calibration", "pool") == "pool"):
        data["subset_seed"] = trial.suggest_int("subset_seed", 0, space.subset_seeds - 1)
        window = None
        stat = trial.suggest_categorical("window_stat", list(WINDOW_STATS))
        if stat != "none":
            low = trial.suggest_float("window_low", 0.0, 0.6)
            width = trial.suggest_float("window_width", 0.3, 1.0)
            window = (stat, low, min(1.0, low + width))
        data["window"] = window
        data["num_samples"] = trial.suggest_categorical("num_samples", space.num_samples)
        data["seq_len"] = trial.suggest_categorical("seq_len", space.seq_lens)
    return data


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
    aggregation = "sum"
    if _uses_aggregation(metric) or _uses_aggregation(attention_metric or metric):
        aggregation = trial.suggest_categorical("aggregation", space.aggregations)
    return {
        "metric": metric,
        "attention_metric": attention_metric,
        "mix": mix,
        "aggregation": aggregation,
        "attention_scale": trial.suggest_float("attention_scale", *space.attention_scale),
        "depth_slope": trial.suggest_float("depth_slope", *space.depth_slope),
        "depth_bend": trial.suggest_float("depth_bend", *space.depth_bend),
        "ranking": trial.suggest_categorical("ranking", list(space.rankings)),
        "layers": trial.suggest_categorical("layers", list(space.layer_ranges)),
    } | _suggest_refit(trial, space)


def _suggest_refit(trial: optuna.Trial, space: SearchSpace) -> dict[str, Any]:
    """``lsq`` refits the kept weights (its bias replaces FLAP's compensation, which is then not drawn)."""
    refit = trial.suggest_categorical("refit", list(space.refits))
    compensate = refit == "none" and trial.suggest_categorical("compensate", list(space.compensate))
    return {"refit": refit, "compensate": compensate}
