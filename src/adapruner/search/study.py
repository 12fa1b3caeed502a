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

import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import optuna
from tqdm.auto import tqdm

from ..data import token_stream
from ..data.calibration import split_sources
from ..data.pool import DEFAULT_POOL_PER_SOURCE, build_pool
from ..data.sources import OFFLINE_SOURCES
from ..errors import AdaPrunerError
from ..files import write_csv_atomic, write_json_atomic
from ..importance.cache import StatisticsCache
from ..models import get_adapter
from ..models.fingerprint import model_fingerprint
from ..models.loading import load_model
from ..pruning import Budget
from ..pruning.plan import parse_layer_range
from ..pruning.stock import can_hold_output_biases
from ..util import log
from .evolution import AllocationSampler, Proposer
from .objective import SCORES, Objective, allocation_budget, allocation_starts
from .report import write_report
from .space import (
    DEFAULT_LAYERS,
    SearchSpace,
    TrialConfig,
    baseline_params,
    warm_start_params,
)
from .storage import connect, open_study, retry_interrupted, space_fingerprint

SAMPLERS = ("tpe", "random")


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


def resolve_layer_ranges(space: SearchSpace, num_layers: int, default: str | None = None) -> dict[str, tuple[int, int]]:
    """Each layer range label of the space ("default", "0:", "4:28") as (start, end) for this model.

    "default" is ``default`` (``--layers``) if given, else LLM-Pruner's range for the model.
    """
    return {
        label: parse_layer_range(default if label == DEFAULT_LAYERS else label, num_layers)
        for label in space.layer_ranges
    }


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
    shared = connect(storage) if storage is not None else None  # before the (slow) model load
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
    study = open_study(shared or local, study_name, study_sampler, identity, starts, space)
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
        retry_interrupted(study)
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
        objective,
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


def _recipe_of(trial: optuna.trial.FrozenTrial, objective: Objective) -> dict[str, Any]:
    """The trial's recipe and allocation as ``prune --from-run`` loads them; a trial of a study begun by an
    older version did not store them, and they are rebuilt from its configuration."""
    return trial.user_attrs.get("from_run") or objective.stored_recipe(TrialConfig(**trial.user_attrs["config"]))


def _write_outputs(
    study,
    objective: Objective,
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
        **_recipe_of(best, objective),
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
