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

from ..api import FRESH_SEED, PruneConfig, input_means, parse_windows, plan_for_scores, with_activations
from ..data import sample_mixture
from ..errors import AdaPrunerError
from ..evaluation.divergence import dense_reference, windowed_kl
from ..evaluation.perplexity import windowed_nll, windows_of
from ..importance import Statistics, score_groups
from ..importance.cache import StatisticsCache
from ..importance.fresh import FreshWindows
from ..local import applied, local_prune
from ..local.supernet import Supernet, SupernetSettings, build_supernet, min_keep
from ..models import get_adapter, layer_groups
from ..models.groups import attention_group, mlp_group
from ..pruning import Budget, masked
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
        self._fresh: dict[tuple, Statistics] = {}
        self._refit_windows: dict[tuple[str, ...], torch.Tensor] = {}
        self.last_refit_seconds = 0.0  # the layer-by-layer refit's share of the last trial's plan_for
        self.last_supernet_seconds = 0.0  # the supernet's build (or load) when the last trial needed it
        self.ratio, self.layers, self.head_mode = ratio, layers, head_mode
        self.pool, self.space = pool, space
        self.caches = {pool.seq_len: cache}
        self.fresh_windows = FreshWindows(model, tokenizer, cache.modules)  # source passes shared by the mixes
        streams = valid_tokens if isinstance(valid_tokens, list | tuple) else [valid_tokens]
        self.windows = interleaved([windows_of(tokens, seq_len) for tokens in streams])
        self.supernet_settings = SupernetSettings(damping=PruneConfig.refit_damping, max_removal=space.max_removal)
        self._supernets: dict[tuple[str, ...], Supernet] = {}
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
        self._groups: dict[tuple[int, int], Any] = {}
        self.warm_starts: dict[str, dict[str, Any]] = {}  # name -> Optuna parameters, to label those trials

    def groups_for(self, layers: tuple[int, int]):
        if layers not in self._groups:
            self._groups[layers] = layer_groups(self.adapter, list(range(*layers)), self.head_mode)
        return self._groups[layers]

    def cache_for(self, seq_len: int) -> StatisticsCache:
        """Statistics of the pool cut to ``seq_len`` tokens (computed once, then from disk)."""
        if seq_len not in self.caches:
            pool = self.pool.truncated(seq_len)
            self.caches[seq_len] = StatisticsCache(self.model, pool, self.caches[self.pool.seq_len].modules)
            self.caches[seq_len].per_sample()
        return self.caches[seq_len]

    def fresh_activations(self, config: TrialConfig) -> Statistics:
        """Activation statistics of N fresh windows of L tokens of the trial's sources (memoised).

        The windows are drawn with one seed (``FRESH_SEED``); each source's windows are run once and
        shared by every mix that draws them (``FreshWindows``).
        """
        key = (config.sources, config.activation_calibration)
        if key not in self._fresh:
            if self.tokenizer is None:
                raise AdaPrunerError("fresh activation windows need the tokenizer: pass it to the Objective")
            count, length = parse_windows(config.activation_calibration)
            self._fresh[key] = self.fresh_windows.statistics(list(config.sources), count, length, FRESH_SEED)
        return self._fresh[key]

    def prune_config(self, config: TrialConfig) -> PruneConfig:
        """The PruneConfig of a trial (``prune --from-run`` builds the same one from ``best.json``)."""
        return PruneConfig(
            model="",
            ratio=self.ratio,
            metric=config.metric,
            attention_metric=config.attention_metric,
            aggregation=config.aggregation,
            mix=config.mix,
            attention_scale=config.attention_scale,
            depth_slope=config.depth_slope,
            depth_bend=config.depth_bend,
            ranking=config.ranking,
            compensate=config.compensate,
            head_mode=self.head_mode,
            seed=config.subset_seed,
            activation_calibration=None if config.activation_calibration == "pool" else config.activation_calibration,
            refit=config.refit,
            refit_calibration=self.space.refit_calibration,
            align=self.space.align,
        )

    def refit_windows(self, config: TrialConfig) -> torch.Tensor:
        """The layer-by-layer engine's windows: ``refit_calibration`` of the trial's sources, seed FRESH_SEED."""
        if config.sources not in self._refit_windows:
            count, length = parse_windows(self.space.refit_calibration)
            windows = sample_mixture(self.tokenizer, list(config.sources), count, length, seed=FRESH_SEED)
            self._refit_windows[config.sources] = windows
        return self._refit_windows[config.sources]

    def supernet_for(self, config: TrialConfig) -> Supernet:
        """The supernet of every layer on the trial's refit windows (built once per sources, cached on disk)."""
        if config.sources not in self._supernets:
            layers = list(range(self.adapter.num_layers))
            net = build_supernet(self.model, self.refit_windows(config), layers, self.supernet_settings, self.head_mode)
            self._supernets[config.sources] = net
        return self._supernets[config.sources]

    def plan_for(self, config: TrialConfig):
        """The plan a trial's configuration gives, built exactly as ``adapruner prune`` builds it.

        Returns the plan, the calibration subset, with compensation the subset's mean input of every
        o_proj/down_proj (None otherwise) and with ``refit`` lsq the refitted projections (None otherwise).
        A per-layer trial assembles its plan and refits from the supernet's candidates.
        """
        if config.allocation == PER_LAYER:
            clock = time.perf_counter()
            built = config.sources not in self._supernets
            net = self.supernet_for(config)
            self.last_supernet_seconds = time.perf_counter() - clock if built else 0.0
            plan, refits = net.assemble(self.adapter, {i: (a, m) for i, a, m in config.counts}, self.head_mode)
            self.last_refit_seconds = time.perf_counter() - clock
            return plan, None, None, refits
        layers = self.layers[config.layers]
        cfg = self.prune_config(config)
        metric = cfg.build_metric()
        fresh = cfg.fresh_activations()
        subset, stats = None, Statistics()
        if not fresh or metric.needs & {"grad", "fisher"}:  # the trial reads pool samples
            cache = self.cache_for(config.seq_len)
            subset = cache.pool.select(
                config.num_samples, sources=list(config.sources), window=config.window, seed=config.subset_seed
            )
            stats = cache.statistics_for(subset, metric)
        if fresh:
            stats = with_activations(stats, self.fresh_activations(config))
        scores = score_groups(self.model, self.groups_for(layers), metric, stats, config.aggregation)
        plan, _ = plan_for_scores(self.model, scores, cfg.budget(layers), cfg)
        means = input_means(self.adapter, layers, stats) if cfg.refit_mode == "bias" else None
        refits = None
        if cfg.uses_local_engine:
            local = local_prune(self.model, self.refit_windows(config), cfg.local_settings(), plan=plan, restore=True)
            refits, self.last_refit_seconds = local.refits, local.seconds
        return plan, subset, means, refits

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
        earlier = _same_config(trial, config)
        if earlier is not None:  # e.g. TPE proposing a point it has already measured: reuse, do not re-run
            for key in ("subset", "kept"):
                trial.set_user_attr(key, earlier.user_attrs.get(key))
            trial.set_user_attr("duplicate_of", earlier.number)
            trial.set_user_attr("seconds", {"importance": 0.0, "masking": 0.0, "evaluation": 0.0})
            return earlier.value
        clock = time.perf_counter()
        self.last_refit_seconds = 0.0
        try:
            plan, subset, means, refits = self.plan_for(config)
        except AdaPrunerError as exc:  # e.g. a quantile window leaves too few samples
            raise optuna.TrialPruned(str(exc)) from None
        seconds = {"importance": time.perf_counter() - clock - self.last_refit_seconds}
        if refits is not None:
            seconds["refit"] = self.last_refit_seconds
        if config.allocation == PER_LAYER and self.last_supernet_seconds:  # built (or loaded) in this trial
            trial.set_user_attr("supernet_seconds", round(self.last_supernet_seconds, 1))
        trial.set_user_attr("subset", subset)
        trial.set_user_attr("kept", [list(asdict(s).values()) for s in plan.shapes()])
        try:
            return self._evaluate(trial, plan, seconds, means, refits)
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


SCORES = ("ppl", "kl")
REJECT_TOLERANCE = 0.005  # a per-layer child continues past its first chunk if within 0.5% of the best


def interleaved(sources: list[torch.Tensor]) -> torch.Tensor:
    """Windows of several sources, equally many of each (the shortest decides), in round-robin order."""
    count = min(w.shape[0] for w in sources)
    return torch.stack([w[:count] for w in sources], dim=1).reshape(count * len(sources), -1)


def allocation_budget(model, ratio: float, space: SearchSpace, head_mode: str) -> AllocationBudget:
    """Per-layer limits of the supernet's candidates and the parameters ``ratio`` must remove."""
    from ..pruning.plan import count_params

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
    from ..pruning.plan import count_params, default_layer_range, solve_keep_counts

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
