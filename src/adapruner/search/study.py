"""The AdaPruner search: TPE over calibration data x importance metric, on Optuna storage.

Every trial scores the model with its configuration (statistics come from the pool's cache, so most
trials never run the model for scoring), applies the plan as masks (no copy of the model) and measures
perplexity on a validation split that no calibration sample and no test text comes from. Trial 0 is
LLM-Pruner's recipe, so the search can never end worse than it on its own objective. The study lives
in an SQLite file in the run directory: rerunning the same command continues it.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import optuna
import torch
from tqdm.auto import tqdm

from ..api import PruneConfig, plan_for_scores
from ..data import token_stream
from ..data.pool import build_pool
from ..errors import AdaPrunerError
from ..evaluation import perplexity
from ..importance import score_groups
from ..importance.cache import StatisticsCache, model_fingerprint
from ..models import get_adapter, layer_groups
from ..models.loading import load_model
from ..pruning import Budget, masked
from ..pruning.io import write_csv_atomic, write_json_atomic
from ..pruning.plan import parse_layer_range
from .report import write_report
from .space import SearchSpace, TrialConfig, baseline_params, suggest

SAMPLERS = ("tpe", "random")


def _sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    if name == "tpe":
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=seed, multivariate=True, group=True, constant_liar=True, n_startup_trials=8
        )
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise AdaPrunerError(f"unknown --sampler '{name}': choose one of {', '.join(SAMPLERS)}")


class Objective:
    """Validation perplexity of the masked model pruned with a trial's configuration."""

    def __init__(
        self,
        model,
        ratio: float,
        layers: tuple[int, int],
        head_mode: str,
        pool,
        cache,
        space: SearchSpace,
        valid_tokens: torch.Tensor,
        seq_len: int,
    ) -> None:
        self.model, self.adapter = model, get_adapter(model)
        self.ratio, self.layers, self.head_mode = ratio, layers, head_mode
        self.pool, self.cache, self.space = pool, cache, space
        self.valid_tokens, self.seq_len = valid_tokens, seq_len
        self.groups = layer_groups(self.adapter, list(range(*layers)), head_mode)

    def plan_for(self, config: TrialConfig):
        """The plan a trial's configuration gives, built exactly as ``adapruner prune`` builds it."""
        cfg = PruneConfig(
            model="",
            ratio=self.ratio,
            metric=config.metric,
            aggregation=config.aggregation,
            mix=config.mix,
            attention_scale=config.attention_scale,
            global_ranking=config.global_ranking,
            head_mode=self.head_mode,
            seed=config.subset_seed,
        )
        metric = cfg.build_metric()
        subset = self.pool.select(
            config.num_samples, sources=list(config.sources), window=config.window, seed=config.subset_seed
        )
        scores = score_groups(
            self.model, self.groups, metric, self.cache.statistics_for(subset, metric), config.aggregation
        )
        budget = Budget(self.ratio, self.layers, config.attention_scale, 1, self.head_mode)
        plan, _ = plan_for_scores(self.model, scores, budget, cfg)
        return plan, subset

    def __call__(self, trial: optuna.Trial) -> float:
        config = suggest(trial, self.space)
        try:
            plan, subset = self.plan_for(config)
        except AdaPrunerError as exc:  # e.g. a quantile window leaves too few samples
            raise optuna.TrialPruned(str(exc)) from None
        with torch.no_grad(), masked(self.adapter, plan):
            value = perplexity(self.model, self.valid_tokens, self.seq_len, progress=False)
        trial.set_user_attr("config", config.to_dict())
        trial.set_user_attr("subset", subset)
        trial.set_user_attr("kept", [list(asdict(s).values()) for s in plan.shapes()])
        return value


def _open_study(storage: str, name: str, sampler, identity: dict[str, str]) -> optuna.Study:
    try:
        study = optuna.create_study(
            storage=storage, study_name=name, direction="minimize", sampler=sampler, load_if_exists=True
        )
    except Exception as exc:
        raise AdaPrunerError(f"cannot open the study in {storage}: {str(exc).splitlines()[0]}") from None
    stored = {k: study.user_attrs.get(k) for k in identity}
    if all(v is None for v in stored.values()):
        for key, value in identity.items():
            study.set_user_attr(key, value)
    elif stored != identity:
        diff = ", ".join(f"{k}: {stored[k]} != {identity[k]}" for k in identity if stored[k] != identity[k])
        raise AdaPrunerError(f"study '{name}' was made for another setting ({diff}): use a new --output or --study")
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
    pool_per_source: int = 20,
    pool_seq_len: int = 64,
    objective_source: str = "wiki",
    objective_tokens: int = 4096,
    objective_seq_len: int = 128,
    dtype: str = "float32",
) -> dict[str, Any]:
    """Run (or continue) the search; returns the best trial's configuration and objective."""
    space = space or SearchSpace()
    Budget(ratio)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the progress bar shows best and baseline
    run_dir = Path(output)
    run_dir.mkdir(parents=True, exist_ok=True)
    hf_model, tokenizer = load_model(model, dtype)
    adapter = get_adapter(hf_model)
    layer_range = parse_layer_range(layers, adapter.num_layers)
    pool = build_pool(tokenizer, space.sources, pool_per_source, pool_seq_len, seed)
    modules = adapter.projection_names(range(*layer_range))
    cache = StatisticsCache(hf_model, pool, modules)
    cache.per_sample()
    valid = token_stream(tokenizer, objective_source, "validation", objective_tokens)
    objective = Objective(hf_model, ratio, layer_range, head_mode, pool, cache, space, valid, objective_seq_len)
    identity = {
        "model": model_fingerprint(hf_model),
        "ratio": str(ratio),
        "pool": pool.fingerprint,
        "space": space.space,
        "layers": f"{layer_range[0]}:{layer_range[1]}",
    }
    study = _open_study(
        storage or f"sqlite:///{(run_dir / 'study.db').resolve()}", study_name, _sampler(sampler, seed), identity
    )
    if storage is None:
        _retry_interrupted(study)
    if not study.trials:
        study.enqueue_trial(baseline_params(space))
    counted = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)  # failed trials are retried
    done = sum(t.state in counted for t in study.trials)
    started = time.perf_counter()
    with tqdm(total=trials, initial=min(done, trials), desc="search") as bar:

        def progress(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            baseline = study.trials[0].value if study.trials and study.trials[0].value else float("nan")
            best = study.best_value if any(t.value is not None for t in study.trials) else float("nan")
            bar.set_postfix(best=f"{best:.2f}", baseline=f"{baseline:.2f}", refresh=False)
            bar.update(1)

        if trials > done:
            study.optimize(objective, n_trials=trials - done, callbacks=[progress])
    pool_spec = {"sources": space.sources, "per_source": pool_per_source, "seq_len": pool_seq_len, "seed": seed}
    layers_text = f"{layer_range[0]}:{layer_range[1]}"
    return _write_outputs(
        study,
        run_dir,
        model,
        ratio,
        space,
        sampler,
        time.perf_counter() - started,
        {"pool": pool_spec, "layers": layers_text, "head_mode": head_mode},
    )


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
    baseline = study.trials[0]
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
        "trials": len(completed),
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
