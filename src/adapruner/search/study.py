"""The AdaPruner search: TPE over calibration data x importance metric, on Optuna storage.

Every trial scores the model with its configuration (statistics come from the pool's cache, so most
trials never run the model for scoring), applies the plan as masks (no copy of the model) and measures
perplexity on a validation split that no calibration sample and no test text comes from. Trial 0 is
LLM-Pruner's recipe, so the search can never end worse than it on its own objective. The study lives
in an SQLite file in the run directory: rerunning the same command continues it. With ``--storage``
(e.g. PostgreSQL) several workers share one study: the trial budget is the study's, and the trials
of a worker that died are failed by heartbeat and run again by the others.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import inspect
import json
import math
import os
import socket
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
import torch
from tqdm.auto import tqdm

from ..api import FRESH_SEED, PruneConfig, input_means, parse_windows, plan_for_scores, with_activations
from ..data import sample_mixture, token_stream
from ..data.calibration import split_sources
from ..data.pool import DEFAULT_POOL_PER_SOURCE, build_pool
from ..data.sources import OFFLINE_SOURCES
from ..errors import AdaPrunerError
from ..evaluation.divergence import dense_reference, windowed_kl
from ..evaluation.perplexity import windowed_nll, windows_of
from ..files import write_csv_atomic, write_json_atomic
from ..importance import Statistics, score_groups
from ..importance.cache import StatisticsCache
from ..importance.fresh import FreshWindows
from ..local import applied, local_prune
from ..local.supernet import Supernet, SupernetSettings, build_supernet, min_keep
from ..models import get_adapter, layer_groups
from ..models.fingerprint import model_fingerprint
from ..models.groups import attention_group, mlp_group
from ..models.loading import load_model
from ..pruning import Budget, masked
from ..pruning.plan import parse_layer_range
from ..pruning.stock import can_hold_output_biases
from ..util import log
from .evolution import PER_LAYER, AllocationBudget, AllocationSampler, Counts, LayerLimits, Proposer
from .report import write_report
from .space import (
    DEFAULT_LAYERS,
    SearchSpace,
    TrialConfig,
    baseline_params,
    suggest,
    warm_start_params,
)

SAMPLERS = ("tpe", "random")
HEARTBEAT_INTERVAL = 60  # seconds between the heartbeats a running trial writes to a shared storage
GRACE_PERIOD = 180  # a RUNNING trial silent for this long belongs to a dead worker: failed, then retried
MAX_RETRY = 3  # how many times the parameters of such a trial are run again
CONNECT_TIMEOUT = 10  # seconds to wait for a PostgreSQL server before giving up


def _sampler(name: str, seed: int | None, space: SearchSpace | None = None) -> optuna.samplers.BaseSampler:
    """TPE or random search over data and metric; with a per-layer space wrapped in the allocation
    sampler, whose proposer gives the per-layer counts (mutations, or random allocations for ``random``)."""
    if name == "tpe":
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        base: optuna.samplers.BaseSampler = optuna.samplers.TPESampler(
            seed=seed, multivariate=True, group=True, constant_liar=True, n_startup_trials=8
        )
    elif name == "random":
        base = optuna.samplers.RandomSampler(seed=seed)
    else:
        raise AdaPrunerError(f"unknown --sampler '{name}': choose one of {', '.join(SAMPLERS)}")
    if space is not None and space.per_layer:
        return AllocationSampler(base, space.profile_trials)
    return base


# SearchSpace fields added after studies existed, with the value those studies ran with: at that value a
# field leaves the fingerprint as it was, so such a study continues (the default coarse_to_fine became 4
# after studies ran with 1: continue one of those with `coarse_to_fine: 1` in the space config)
LATER_FIELDS = {"uniform": False, "coarse_to_fine": 1, "align": 1}


def _fingerprinted_fields(space: SearchSpace) -> dict[str, Any]:
    return {k: v for k, v in asdict(space).items() if k not in LATER_FIELDS or v != LATER_FIELDS[k]}


def space_fields_text(space: SearchSpace) -> str:
    """The fingerprinted fields as JSON: hashed by :func:`space_fingerprint`, stored in the study."""
    return json.dumps(_fingerprinted_fields(space), sort_keys=True, default=str)


def space_fingerprint(space: SearchSpace) -> str:
    """A short hash of the search space: a study continued with another space is refused."""
    return hashlib.sha256(space_fields_text(space).encode()).hexdigest()[:12]


# the study attribute holding the space's fields, so a refusal can name what changed
SPACE_FIELDS_ATTR = "search_space_fields"


def space_change(stored_text: str | None, space: SearchSpace) -> str:
    """Why a study's space differs from ``space``: the changed fields, or (a study made before the fields
    were recorded) the likeliest cause."""
    if not stored_text:
        return (
            "search space changed; a study made before 2026-12-03 with one-level per-layer moves continues "
            "with 'coarse_to_fine: 1' in the --config space"
        )
    before = json.loads(stored_text)
    now = json.loads(space_fields_text(space))
    changed = [
        f"{k} {before.get(k, LATER_FIELDS.get(k))} -> {now.get(k, LATER_FIELDS.get(k))}"
        for k in sorted(before.keys() | now.keys())
        if before.get(k) != now.get(k)
    ]
    return "search space: " + "; ".join(changed)


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


PRUNERS = ("percentile", "median", "none")


def _pruner(name: str) -> optuna.pruners.BasePruner:
    """``percentile`` stops trials in the worst quarter at a partial evaluation (after 8 finished trials)."""
    if name == "percentile":
        return optuna.pruners.PercentilePruner(75.0, n_startup_trials=8, n_warmup_steps=0)
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=8, n_warmup_steps=0)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise AdaPrunerError(f"unknown --pruner '{name}': choose one of {', '.join(PRUNERS)}")


def _lock_id(key: str) -> int:
    """The 64-bit PostgreSQL advisory lock id of ``key`` (the same in every worker)."""
    return int.from_bytes(hashlib.sha256(f"adapruner:{key}".encode()).digest()[:8], "big", signed=True)


@contextlib.contextmanager
def _database_lock(engine: sqlalchemy.engine.Engine, key: str):
    """A PostgreSQL advisory lock held for the block, so concurrent workers take turns.

    Held on its own connection; the server releases it when that connection closes, so a worker
    killed inside the block leaves no stale lock. No-op on other databases.
    """
    if engine.dialect.name != "postgresql":
        yield
        return
    lock_id = _lock_id(key)
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:id)"), {"id": lock_id})
        try:
            yield
        finally:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:id)"), {"id": lock_id})


def _missing(module: str) -> bool:
    return importlib.util.find_spec(module) is None


def _connect(url: str) -> optuna.storages.RDBStorage:
    """A shared storage with heartbeats, connected now so that a bad URL fails before the model loads.

    Trials of a worker that stops writing heartbeats (killed, machine lost) are failed by the next
    worker that starts a trial, and their parameters queued again (at most MAX_RETRY times).
    """
    shown = url
    try:
        parsed = sqlalchemy.engine.make_url(url)
        shown = parsed.render_as_string(hide_password=True)
        engine_kwargs: dict[str, Any] = {}
        if parsed.drivername == "postgresql" and _missing("psycopg") and not _missing("psycopg2"):
            # SQLAlchemy >= 2.1 reads a bare postgresql:// as psycopg 3; adapruner[postgres] installs psycopg2
            parsed = parsed.set(drivername="postgresql+psycopg2")
            url = parsed.render_as_string(hide_password=False)
        if parsed.get_backend_name() == "postgresql":
            engine_kwargs["pool_pre_ping"] = True  # trials are long: the connection may idle out between them
            if "connect_timeout" not in parsed.query:
                engine_kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT}
        retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or (
            optuna.storages.RetryFailedTrialCallback  # optuna < 4.9
        )
        callback_arg = (
            "heartbeat_stale_trial_callback"
            if "heartbeat_stale_trial_callback" in inspect.signature(optuna.storages.RDBStorage).parameters
            else "failed_trial_callback"
        )
        probe = sqlalchemy.create_engine(parsed, **engine_kwargs)
        try:
            # Two workers creating the tables of an empty database at once collide in PostgreSQL's
            # catalog (duplicate key in pg_type): they take turns.
            with _database_lock(probe, "schema"), warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=HEARTBEAT_INTERVAL,
                    grace_period=GRACE_PERIOD,
                    **{callback_arg: retry(max_retry=MAX_RETRY)},
                )
        finally:
            probe.dispose()
    except Exception as exc:
        missing_driver = isinstance(exc, ImportError)
        cause = (exc.__cause__ or exc) if missing_driver else (getattr(exc, "orig", None) or exc)
        lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
        reason = lines[0] if lines else type(cause).__name__
        hint = (
            ('pip install "adapruner[postgres]"' if "postgres" in shown else "install its database driver")
            if missing_driver
            else "check that the server runs, that the database exists and the URL "
            "(dialect://user[:password]@host[:port]/database)"
        )
        raise AdaPrunerError(f"cannot reach storage URL {shown}: {reason}; {hint}") from None


def resolve_layer_ranges(space: SearchSpace, num_layers: int, default: str | None = None) -> dict[str, tuple[int, int]]:
    """Each layer range label of the space ("default", "0:", "4:28") as (start, end) for this model.

    "default" is ``default`` (``--layers``) if given, else LLM-Pruner's range for the model.
    """
    return {
        label: parse_layer_range(default if label == DEFAULT_LAYERS else label, num_layers)
        for label in space.layer_ranges
    }


def _open_study(
    storage: str | optuna.storages.RDBStorage,
    name: str,
    sampler,
    identity: dict[str, str],
    starts: list[dict[str, Any]],
    space: SearchSpace,
) -> optuna.Study:
    """Create or load the study, check it was made for this setting, enqueue the start trials if it is new.

    ``starts`` are Optuna parameters: LLM-Pruner's recipe (trial 0), then the warm starts.

    Workers that start together would each see an empty study and enqueue the baseline (a check,
    then a write: a race). On PostgreSQL they take turns under an advisory lock, so the baseline is
    enqueued exactly once and always becomes trial 0, before any worker asks for a trial; the lock
    also makes writing the identity attributes race-free. (A study user attribute cannot serve as
    the lock: setting one is an upsert, not a compare-and-set.) Other shared databases get no lock:
    there two workers starting within milliseconds may both enqueue the baseline, run twice, harmlessly.
    """
    engine = getattr(storage, "engine", None)
    lock = _database_lock(engine, f"study:{name}") if engine is not None else contextlib.nullcontext()
    with lock:
        try:
            study = optuna.create_study(
                storage=storage, study_name=name, direction="minimize", sampler=sampler, load_if_exists=True
            )
        except Exception as exc:
            shown = storage if isinstance(storage, str) else storage.engine.url.render_as_string(hide_password=True)
            raise AdaPrunerError(f"cannot open the study in {shown}: {str(exc).splitlines()[0]}") from None
        stored = {k: study.user_attrs.get(k) for k in identity}
        if all(v is None for v in stored.values()):
            for key, value in {**identity, SPACE_FIELDS_ATTR: space_fields_text(space)}.items():
                study.set_user_attr(key, value)
        elif stored != identity:
            diff = [f"{k}: {stored[k]} != {identity[k]}" for k in identity if stored[k] != identity[k]]
            if stored.get("search_space") != identity.get("search_space"):
                diff.append(space_change(study.user_attrs.get(SPACE_FIELDS_ATTR), space))
            raise AdaPrunerError(
                f"study '{name}' was made for another setting ({', '.join(diff)}): use a new --output or --study"
            )
        if not study.get_trials(deepcopy=False):
            for params in starts:
                study.enqueue_trial(params)
    return study


def _retry_interrupted(study: optuna.Study) -> None:
    """Trials left RUNNING by a killed process are failed and their parameters queued again.

    Only for the run directory's own SQLite study, which one process uses at a time; on a shared
    storage a RUNNING trial may belong to a live worker.
    """
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
        study.enqueue_trial(trial.params, skip_if_exists=False)


def search(
    model: str,
    ratio: float,
    *,
    trials: int = 20,
    output: str | Path,
    space: SearchSpace | None = None,
    sampler: str = "tpe",
    seed: int = 0,
    storage: str | None = None,
    study_name: str = "adapruner",
    layers: str | None = None,
    head_mode: str = "auto",
    pool_per_source: int = DEFAULT_POOL_PER_SOURCE,
    pool_seq_len: int | None = None,
    objective_data: str = ",".join(OFFLINE_SOURCES),
    objective_tokens: int = 1024,
    objective: str = "ppl",
    objective_seq_len: int = 128,
    dtype: str = "float32",
    pruner: str = "percentile",
) -> dict[str, Any]:
    """Run (or continue) the search; returns the best trial's configuration and objective.

    The pool holds ``pool_per_source`` windows of ``pool_seq_len`` tokens (default: the longest of the
    space's ``seq_lens``) per source; shorter sequence lengths use the windows' prefixes. The objective
    is the perplexity over ``objective_tokens`` validation tokens of each ``objective_data`` source (a
    name or a local file; equal tokens, so it is the geometric mean of the sources' perplexities), or
    with ``objective="kl"`` the mean KL divergence from the dense model on the same windows.
    """
    space = space or SearchSpace()
    if layers is not None and space.uniform:
        raise AdaPrunerError("--uniform prunes every layer alike: drop --layers")
    if layers is not None:  # --layers fixes the range: "default" is that range, and the only one searched
        space = replace(space, layer_ranges=[DEFAULT_LAYERS])
    Budget(ratio)
    if trials < 1:
        raise AdaPrunerError(f"--trials {trials}: give at least 1")
    pool_seq_len = pool_seq_len or max(space.seq_lens)
    if pool_seq_len < max(space.seq_lens):
        raise AdaPrunerError(f"--pool-seq-len {pool_seq_len} is shorter than the space's seq_lens {space.seq_lens}")
    _pruner(pruner)
    score = objective  # the name `objective` is the Objective below
    if score not in SCORES:
        raise AdaPrunerError(f"unknown --objective '{score}': choose one of {', '.join(SCORES)}")
    split_sources(objective_data)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the progress bar shows best and baseline
    run_dir = Path(output)
    shared = _connect(storage) if storage is not None else None  # before the (slow) model load
    hf_model, tokenizer = load_model(model, dtype)
    adapter = get_adapter(hf_model)
    if space.uniform and not can_hold_output_biases(adapter) and (True in space.compensate or "lsq" in space.refits):
        log(
            f"--uniform: {adapter.config.model_type}'s stock architecture has no o_proj/down_proj bias, so the "
            "search leaves out bias compensation, the least-squares refit and the supernet's candidates"
        )
        space = replace(space, compensate=[False], refits=["none"], allocations=["profile"])
    ranges = resolve_layer_ranges(space, adapter.num_layers, layers)
    pool = build_pool(tokenizer, space.sources, pool_per_source, pool_seq_len, seed)
    covered = (min(r[0] for r in ranges.values()), max(r[1] for r in ranges.values()))
    cache = StatisticsCache(hf_model, pool, adapter.projection_names(range(*covered)))
    cache.per_sample()
    valid = [token_stream(tokenizer, name, "validation", objective_tokens) for name in split_sources(objective_data)]
    objective = Objective(
        hf_model,
        ratio,
        ranges,
        head_mode,
        pool,
        cache,
        space,
        valid,
        objective_seq_len,
        tokenizer=tokenizer,
        score=score,
    )
    for length in space.seq_lens:
        objective.cache_for(length)
    layers_text = ",".join(f"{start}:{end}" for start, end in ranges.values())
    identity = {
        "model": model_fingerprint(hf_model),
        "ratio": str(ratio),
        "pool": pool.fingerprint,
        "space": space.space,
        "layers": layers_text,
        "objective": f"{score}:{','.join(split_sources(objective_data))}@{objective_tokens}x{objective_seq_len}",
        "search_space": space_fingerprint(space),
    }
    # Workers of a shared study seeded alike would sample the same configurations side by side.
    # an impossible level grid is refused before anything is written
    budget = allocation_budget(hf_model, ratio, space, head_mode) if space.per_layer else None
    study_sampler = _sampler(sampler, seed if shared is None else None, space)
    if shared is None:  # only now: a bad storage or grid leaves nothing behind (the local study needs the folder)
        run_dir.mkdir(parents=True, exist_ok=True)
    local = f"sqlite:///{(run_dir / 'study.db').resolve()}"
    warm = {name: warm_start_params(space, name, pool_per_source) for name in space.warm_starts}
    objective.warm_starts = {name: params for name, params in warm.items() if params is not None}
    starts = [baseline_params(space), *objective.warm_starts.values()]
    study = _open_study(shared or local, study_name, study_sampler, identity, starts, space)
    run_dir.mkdir(parents=True, exist_ok=True)  # a shared study of another setting was refused above
    study.pruner = _pruner(pruner)
    if shared is None and study.trials:
        study.sampler = _sampler(sampler, resumed_seed(seed, len(study.trials)), space)
    if budget is not None and space.uniform:  # one trial per attention level, every layer alike
        levels = budget.uniform_levels()
        study.sampler.per_layer_trials = len(levels)
        study.sampler.proposer = Proposer(budget, lambda _study: levels, seed, exact_starts=True)
    elif budget is not None:
        start_counts = allocation_starts(objective, ratio, head_mode)
        study.sampler.proposer = Proposer(
            budget,
            start_counts,
            seed,
            randomly=sampler == "random",
            coarse=space.coarse_to_fine,
            trials=max(trials - space.profile_trials, 1),
        )
    if shared is None:
        _retry_interrupted(study)
    counted = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)  # failed trials are retried
    done = len(study.get_trials(deepcopy=False, states=counted))
    started = time.perf_counter()
    with tqdm(total=trials, initial=min(done, trials), desc="search") as bar:

        def progress(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            found = baseline_trial(study)
            baseline = found.value if found is not None and found.value is not None else float("nan")
            best = study.best_value if any(t.value is not None for t in study.trials) else float("nan")
            bar.set_postfix(best=f"{best:.2f}", baseline=f"{baseline:.2f}", refresh=False)
            bar.n = min(len(study.get_trials(deepcopy=False, states=counted)), trials)  # all workers' trials
            bar.refresh()

        if trials > done:
            # --trials is the study's budget, not this worker's: every worker stops once the study
            # holds `trials` finished trials. MaxTrialsCallback looks after each trial, so the trials
            # other workers have in flight then still finish: W workers may end up to W - 1 over.
            budget = optuna.study.MaxTrialsCallback(trials, states=counted)
            study.optimize(objective, n_trials=trials - done, callbacks=[progress, budget])
    pool_spec = {"sources": space.sources, "per_source": pool_per_source, "seq_len": pool_seq_len, "seed": seed}
    return _write_outputs(
        study,
        run_dir,
        model,
        ratio,
        space,
        sampler,
        time.perf_counter() - started,
        {
            "pool": pool_spec,
            "layers": layers_text,
            "layer_ranges": {label: f"{start}:{end}" for label, (start, end) in ranges.items()},
            "head_mode": head_mode,
            "pruner": pruner,
            "objective": f"validation {score} of the masked model, {objective_tokens} tokens of each of "
            f"{', '.join(split_sources(objective_data))}",
        },
    )


def resumed_seed(seed: int, trials: int) -> int:
    """The sampler seed of a run that continues a study of ``trials`` trials.

    A sampler made again with the first run's seed replays the first run's random draws: a resumed
    random search (or TPE still in its start-up trials) would propose the configurations it has
    already measured and spend the budget on duplicates. Continuing from ``trials`` draws anew, and
    the same interrupted study continued twice still proposes the same trials.
    """
    return (seed * 1_000_003 + trials) % 2**32


def baseline_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The finished run of LLM-Pruner's recipe: trial 0 normally, a later one if a worker died on it."""
    finished = [t for t in study.trials if t.value is not None]
    for trial in finished:
        if trial.user_attrs.get("baseline"):
            return trial
    return finished[0] if finished and finished[0].number == 0 else None


def _write_outputs(
    study,
    run_dir: Path,
    model: str,
    ratio: float,
    space: SearchSpace,
    sampler: str,
    seconds: float,
    setting: dict[str, Any],
) -> dict[str, Any]:
    completed = [t for t in study.trials if t.value is not None]
    if not completed:
        raise AdaPrunerError("no trial completed: check the log above")
    best = min(completed, key=lambda t: t.value)
    baseline = baseline_trial(study) or study.trials[0]
    result = {
        "model": model,
        "ratio": ratio,
        "objective": "validation perplexity (masked model)",
        "best": {
            "trial": best.number,
            "value": best.value,
            "config": best.user_attrs["config"],
            "subset": best.user_attrs["subset"],
            "params": best.params,
            "kept": best.user_attrs.get("kept"),
        },
        "baseline": {"trial": baseline.number, "value": baseline.value},
        "warm_starts": {
            t.user_attrs["warm_start"]: {"trial": t.number, "value": t.value}
            for t in completed
            if t.user_attrs.get("warm_start")
        },
        "trials": len(completed),
        "finished": sum(t.state.name in ("COMPLETE", "PRUNED") for t in study.trials),
        "space": asdict(space),
        "sampler": sampler,
        **setting,
        "seconds_this_run": round(seconds, 1),
    }
    write_json_atomic(run_dir / "best.json", result)
    rows = [{"number": t.number, "state": t.state.name, "value": t.value, **t.params} for t in study.trials]
    write_csv_atomic(run_dir / "trials.csv", rows)
    write_report(study, result, run_dir)
    return result
