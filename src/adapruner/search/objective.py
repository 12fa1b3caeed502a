"""What one search trial costs and scores: the calibration subset and metric of a profile trial, or the
per-layer counts of a supernet trial, turned into masks on the loaded model and measured on the
validation windows (perplexity or KL from the dense model), with early stopping on partial evaluation."""

from __future__ import annotations

import json
import math
import os
import socket
import time
from dataclasses import asdict
from typing import Any

import optuna
import torch

from ..data.calibration import split_sources
from ..errors import AdaPrunerError
from ..evaluation.divergence import dense_reference, windowed_kl
from ..evaluation.perplexity import windowed_nll, windows_of
from ..importance import Importance, Statistics
from ..importance.cache import StatisticsCache
from ..importance.fresh import FreshWindows
from ..local import applied
from ..local.supernet import min_keep
from ..models import get_adapter
from ..models.groups import attention_group, mlp_group
from ..pruning import Budget, masked
from ..pruning.plan import count_params, default_layer_range, solve_keep_counts
from ..recipe import FRESH_SEED, Allocation, PlanInputs, Planned, Recipe, parse_windows, plan_recipe
from .evolution import PER_LAYER, AllocationBudget, Counts, LayerLimits
from .space import (
    SearchSpace,
    TrialConfig,
    baseline_params,
    suggest,
)


class Objective:
    """Validation perplexity of the masked model pruned with a trial's configuration.

    The validation windows are evaluated in ``steps`` chunks; after each, the running perplexity is
    reported so an Optuna pruner can stop a hopeless trial before it has paid for the whole pass.
    """

    def __init__(
        self,
        model,
        ratio: float,
        layers: dict[str, tuple[int, int]],
        head_mode: str,
        pool,
        cache,
        space: SearchSpace,
        valid_tokens: torch.Tensor,
        seq_len: int,
        steps: int = 4,
        tokenizer=None,
        score: str = "ppl",
    ) -> None:
        """``valid_tokens``: one token stream, or one per objective source (each cut into windows, then
        interleaved so that every evaluation chunk holds an equal share of every source). ``score``: ``ppl``
        (perplexity) or ``kl`` (mean KL divergence from the dense model's next-token distribution, whose
        top-k is computed here, while the model is still dense)."""
        self.model, self.adapter, self.tokenizer = model, get_adapter(model), tokenizer
        self.ratio, self.layers, self.head_mode = ratio, layers, head_mode
        self.pool, self.space = pool, space
        self.caches = {pool.seq_len: cache}
        self.inputs = SearchInputs(self, FreshWindows(model, tokenizer, cache.modules))
        streams = valid_tokens if isinstance(valid_tokens, list | tuple) else [valid_tokens]
        self.windows = interleaved([windows_of(tokens, seq_len) for tokens in streams])
        self.dense = [
            (attention_group(self.adapter, i, head_mode).num_units, s.intermediate_size)
            for i, s in enumerate(self.adapter.layer_shapes())
        ]
        if score not in SCORES:
            raise AdaPrunerError(f"unknown --objective '{score}': choose one of {', '.join(SCORES)}")
        self.score = score
        self.reference = dense_reference(model, self.windows) if score == "kl" else None
        if self.windows.shape[0] < steps:
            raise AdaPrunerError(
                f"the validation text gives only {self.windows.shape[0]} windows of {seq_len} tokens: "
                f"the objective needs at least {steps}; raise --objective-tokens or use a larger source"
            )
        self.steps = steps
        self.warm_starts: dict[str, dict[str, Any]] = {}  # name -> Optuna parameters, to label those trials

    def cache_for(self, seq_len: int) -> StatisticsCache:
        """Statistics of the pool cut to ``seq_len`` tokens (computed once, then from disk)."""
        if seq_len not in self.caches:
            pool = self.pool.truncated(seq_len)
            self.caches[seq_len] = StatisticsCache(self.model, pool, self.caches[self.pool.seq_len].modules)
            self.caches[seq_len].per_sample()
        return self.caches[seq_len]

    def recipe_for(self, config: TrialConfig) -> tuple[Recipe, Allocation | None]:
        """A trial's recipe and allocation: what its ``prune --from-run`` loads from ``best.json`` (the model
        and the runtime are the prune's)."""
        fresh = None if config.activation_calibration == "pool" else config.activation_calibration
        options = {
            "metric": config.metric,
            "attention_metric": config.attention_metric,
            "aggregation": config.aggregation,
            "mix": config.mix,
            "attention_scale": config.attention_scale,
            "depth_slope": config.depth_slope,
            "depth_bend": config.depth_bend,
            "ranking": config.ranking,
            "layers": "{}:{}".format(*self.layers[config.layers]),
            "head_mode": self.head_mode,
            "seed": config.subset_seed,
            "calibration": ",".join(config.sources),
            "num_samples": config.num_samples,
            "seq_len": config.seq_len,
            "activation_calibration": fresh,
            "refit": "bias" if config.refit == "none" and config.compensate else config.refit,
            "refit_calibration": self.space.refit_calibration,
            "activation_seed": FRESH_SEED if fresh or config.refit != "none" else None,
            "uniform": self.space.uniform,
            "align": self.space.align,
        }
        allocation = None
        if config.allocation == PER_LAYER:
            options["layers"] = None
            allocation = Allocation(config.counts, self.space.max_removal)
        return Recipe(model="", ratio=self.ratio, **options), allocation

    def stored_recipe(self, config: TrialConfig) -> dict[str, Any]:
        """A trial's recipe and allocation, each by its own serialiser: what ``best.json`` stores for
        ``prune --from-run`` (and every trial as its user attribute ``from_run``)."""
        recipe, allocation = self.recipe_for(config)
        return {"recipe": recipe.to_dict(), "allocation": None if allocation is None else allocation.to_dict()}

    def plan_for(self, config: TrialConfig) -> Planned:
        """The plan a trial's recipe gives, by the path ``adapruner prune`` takes (:func:`plan_recipe`), on
        this search's cached statistics, shared fresh windows and memoised supernets; the model's
        weights are left as they were (refits come back in ``refits``)."""
        recipe, allocation = self.recipe_for(config)
        return plan_recipe(self.model, recipe, self.inputs.for_trial(config), allocation, restore=True)

    def __call__(self, trial: optuna.Trial) -> float:
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")  # who ran (or abandoned) it
        config = suggest(trial, self.space, self.dense)
        if config.allocation == PER_LAYER:
            trial.set_user_attr("allocation", PER_LAYER)
            origin = getattr(trial.study.sampler, "origin", lambda _t: {})(trial.number)
            for key, value in origin.items():
                trial.set_user_attr(key, value)
        if trial.params == baseline_params(self.space):
            trial.set_user_attr("baseline", True)
        for name, params in self.warm_starts.items():
            if trial.params == params:
                trial.set_user_attr("warm_start", name)
        trial.set_user_attr("config", config.to_dict())
        trial.set_user_attr("from_run", self.stored_recipe(config))
        earlier = _same_config(trial, config)
        if earlier is not None:  # e.g. TPE proposing a point it has already measured: reuse, do not re-run
            for key in ("subset", "kept"):
                trial.set_user_attr(key, earlier.user_attrs.get(key))
            trial.set_user_attr("duplicate_of", earlier.number)
            trial.set_user_attr("seconds", {"importance": 0.0, "masking": 0.0, "evaluation": 0.0})
            return earlier.value
        clock = time.perf_counter()
        try:
            planned = self.plan_for(config)
        except AdaPrunerError as exc:  # e.g. a quantile window leaves too few samples
            raise optuna.TrialPruned(str(exc)) from None
        seconds = {"importance": time.perf_counter() - clock - planned.refit_seconds}
        if planned.refits is not None:
            seconds["refit"] = planned.refit_seconds
        if config.allocation == PER_LAYER and self.inputs.supernet_seconds:  # built (or loaded) in this trial
            trial.set_user_attr("supernet_seconds", round(self.inputs.supernet_seconds, 1))
        trial.set_user_attr("subset", planned.subset)
        trial.set_user_attr("kept", [list(asdict(s).values()) for s in planned.plan.shapes()])
        try:
            return self._evaluate(trial, planned.plan, seconds, planned.input_means, planned.refits)
        finally:
            trial.set_user_attr("seconds", {k: round(v, 3) for k, v in seconds.items()})

    def _rival(self, trial: optuna.Trial) -> float | None:
        """A per-layer trial stops after its first chunk if it is worse there than the best per-layer trial."""
        if trial.user_attrs.get("allocation") != PER_LAYER:
            return None
        done = [
            t
            for t in trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if t.user_attrs.get("allocation") == PER_LAYER and t.user_attrs.get("partial")
        ]
        if not done:
            return None
        return min(done, key=lambda t: t.value).user_attrs["partial"][0] * (1 + REJECT_TOLERANCE)

    def _evaluate(self, trial: optuna.Trial, plan, seconds: dict[str, float], means=None, refits=None) -> float:
        """Masked validation perplexity, chunk by chunk; times masking and evaluation separately.

        Refitted projections are written in place for the evaluation and the dense weights put back after.
        The running value after each chunk is kept (``partial``): per-layer trials are rejected early
        against the best per-layer trial's first chunk; the others go to the Optuna pruner.
        """
        rival = self._rival(trial)
        partial: list[float] = []
        total_loss, total_tokens = 0.0, 0
        chunks = self.windows.tensor_split(self.steps)
        references = self.reference.split(self.steps) if self.reference is not None else [None] * len(chunks)
        clock = time.perf_counter()
        with torch.no_grad(), masked(self.adapter, plan, input_means=means), applied(self.model, refits or {}):
            seconds["masking"] = time.perf_counter() - clock
            clock = time.perf_counter()
            for step, (chunk, reference) in enumerate(zip(chunks, references, strict=True)):
                losses = (
                    windowed_nll(self.model, chunk) if reference is None else windowed_kl(self.model, chunk, reference)
                )
                for loss, count in losses:
                    total_loss += loss
                    total_tokens += count
                seconds["evaluation"] = time.perf_counter() - clock
                if step < self.steps - 1:
                    running = self._value(total_loss, total_tokens)
                    partial.append(running)
                    trial.set_user_attr("partial", partial)
                    trial.report(running, step)
                    if rival is not None and step == 0 and running > rival:
                        raise optuna.TrialPruned(f"worse than the best per-layer trial after 1/{self.steps} chunks")
                    if rival is None and trial.user_attrs.get("allocation") != PER_LAYER and trial.should_prune():
                        raise optuna.TrialPruned(f"validation {self.score} after {step + 1}/{self.steps} chunks")
        return self._value(total_loss, total_tokens)

    def _value(self, loss: float, tokens: int) -> float:
        """Perplexity (exp of the mean NLL) or the mean KL divergence per predicted token."""
        return math.exp(loss / tokens) if self.score == "ppl" else loss / tokens


class SearchInputs(PlanInputs):
    """A trial's plan inputs from the search's caches: the pool subset's statistics (computed once per
    pool, then from disk) and fresh activation windows run once per source and shared by every mix."""

    def __init__(self, objective: Objective, fresh_windows: FreshWindows) -> None:
        super().__init__(objective.model, objective.tokenizer)
        self.objective, self.fresh_windows = objective, fresh_windows
        self._fresh: dict[tuple, Statistics] = {}
        self.window: tuple[str, float, float] | None = None

    def for_trial(self, config: TrialConfig) -> SearchInputs:
        self.window = config.window  # the pool quantile window the subset is drawn from
        return self

    def sample_statistics(self, cfg: Recipe, metric: Importance, needs: frozenset[str], modules: list[str]):
        cache = self.objective.cache_for(cfg.seq_len)
        sources = split_sources(cfg.calibration)
        subset = cache.pool.select(cfg.num_samples, sources=sources, window=self.window, seed=cfg.seed)
        return cache.statistics_for(subset, metric), subset

    def activations(self, cfg: Recipe, modules: list[str]) -> Statistics:
        key = (cfg.calibration, cfg.activation_calibration)
        if key not in self._fresh:
            if self.tokenizer is None:
                raise AdaPrunerError("fresh activation windows need the tokenizer: pass it to the Objective")
            count, length = parse_windows(cfg.activation_calibration)
            sources = split_sources(cfg.calibration)
            self._fresh[key] = self.fresh_windows.statistics(sources, count, length, cfg.fresh_seed)
        return self._fresh[key]


SCORES = ("ppl", "kl")
REJECT_TOLERANCE = 0.005  # a per-layer child continues past its first chunk if within 0.5% of the best


def interleaved(sources: list[torch.Tensor]) -> torch.Tensor:
    """Windows of several sources, equally many of each (the shortest decides), in round-robin order."""
    count = min(w.shape[0] for w in sources)
    return torch.stack([w[:count] for w in sources], dim=1).reshape(count * len(sources), -1)


def allocation_budget(model, ratio: float, space: SearchSpace, head_mode: str) -> AllocationBudget:
    """Per-layer limits of the supernet's candidates and the parameters ``ratio`` must remove."""
    adapter = get_adapter(model)
    limits = {}
    for i in range(adapter.num_layers):
        attn, mlp = attention_group(adapter, i, head_mode), mlp_group(adapter, i)
        limits[i] = LayerLimits(
            min_keep(attn.num_units, attn.blocks, space.max_removal),
            attn.num_units,
            attn.blocks,
            min_keep(mlp.num_units, 1, space.max_removal),
            mlp.num_units,
            attn.params_per_unit,
            mlp.params_per_unit,
        )
    budget = AllocationBudget(limits, ratio * count_params(model), space.mlp_levels, space.align)
    budget.check_reachable(ratio)
    return budget


def kept_counts(kept: list[list[int]], dense: list[tuple[int, int]], adapter) -> Counts:
    """A trial's recorded layer shapes (query heads, KV heads, channels) as per-layer keep counts."""
    counts: Counts = {}
    for i, ((queries, kv, channels), (units, _)) in enumerate(zip(kept, dense, strict=True)):
        counts[i] = (queries if units == adapter.layer_shape(i).num_attention_heads else kv, channels)
    return counts


def allocation_starts(objective: Objective, ratio: float, head_mode: str):
    """The proposer's start allocations: the best profile trial's counts, then a uniform rate over
    LLM-Pruner's layer range (``--method local-obs``'s allocation)."""
    adapter = objective.adapter
    uniform = solve_keep_counts(
        adapter,
        Budget(ratio, default_layer_range(adapter.num_layers), head_mode=head_mode, align=objective.space.align),
        count_params(adapter.model),
    )
    dense = objective.dense
    uniform_counts = {i: c if c is not None else dense[i] for i, c in enumerate(uniform.counts)}

    def starts(study: optuna.Study) -> list[Counts]:
        profile = [
            t
            for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if t.user_attrs.get("allocation") != PER_LAYER and t.user_attrs.get("kept") and t.value is not None
        ]
        found = [kept_counts(min(profile, key=lambda t: t.value).user_attrs["kept"], dense, adapter)] if profile else []
        return [*found, uniform_counts]

    return starts


def _same_config(trial: optuna.Trial, config: TrialConfig) -> optuna.trial.FrozenTrial | None:
    """A completed trial of this study with exactly this configuration (JSON-equal), if any."""

    def normal(value: Any) -> str:  # storages differ: RDB gives JSON lists, in-memory keeps tuples
        return json.dumps(value, sort_keys=True)

    wanted = normal(config.to_dict())
    completed = trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return next((t for t in completed if normal(t.user_attrs.get("config")) == wanted), None)
