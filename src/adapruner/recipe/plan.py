"""The one path from a recipe to a plan: ``adapruner prune``, every search trial and ``--from-run`` call
:func:`plan_recipe`, so a trial measures exactly the model its ``--from-run`` prune writes.

What differs between them is only where the inputs come from (:class:`PlanInputs`): a prune draws its
calibration samples, fresh activation windows and refit windows from the recipe; a search trial reads
the same things from its statistics cache and memoised passes (``adapruner.search.objective``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..data import sample_mixture
from ..importance import Importance, Statistics, collect_statistics, score_groups
from ..local import local_prune
from ..local.engine import LocalResult, write_refit
from ..local.supernet import Supernet, SupernetSettings, build_supernet
from ..models.base import ModelAdapter, get_adapter
from ..models.groups import GroupSet, layer_groups
from ..pruning.plan import Budget, PrunePlan, count_params, parse_layer_range, solve_keep_counts
from ..pruning.ranking import Scores, allocation_offsets, plan_from_scores
from .calibration import activation_statistics, refit_windows
from .config import Allocation, Recipe, Runtime

OUTPUTS = ("o_proj", "down_proj")  # the projections whose removed inputs bias compensation replaces


@dataclass
class Planned:
    """A recipe's plan on one model and what pruning to it needs.

    ``input_means``: with bias compensation, the calibration mean of every o_proj/down_proj input of the
    pruned layers (for ``prune_physically`` and ``masked``). ``refits``: with ``restore``, the refitted
    projections to apply (``adapruner.local.applied``); without it they are already written into the
    model. ``subset``: the calibration pool samples a search trial read. ``local``: the layer-by-layer
    engine's (or the supernet's) summary for the record.
    """

    plan: PrunePlan
    layers: tuple[int, int]
    dense_params: int
    input_means: dict[str, torch.Tensor] | None = None
    refits: dict[str, Any] | None = None
    subset: list[int] | None = None
    local: dict[str, Any] | None = None
    refit_seconds: float = 0.0


class PlanInputs:
    """Where a plan's inputs come from, drawn as ``adapruner prune`` draws them.

    ``samples``: the gradient samples (``--from-run`` passes the search's pool subset); None draws
    ``num_samples`` windows of ``calibration``. ``runtime``: how the passes run (batch size, offload,
    checkpointing, the refit's device). Refit windows, layer groups and supernets are memoised, so
    a search's trials share them; a search overrides the statistics to read its caches.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        samples: torch.Tensor | None = None,
        runtime: Runtime | None = None,
    ) -> None:
        self.model, self.tokenizer, self.samples = model, tokenizer, samples
        self.runtime = runtime or Runtime()
        self._windows: dict[tuple, torch.Tensor] = {}
        self._groups: dict[tuple, GroupSet] = {}
        self._supernets: dict[tuple, Supernet] = {}
        self.supernet_seconds = 0.0  # the last supernet build (or load from disk); 0 when memoised

    def sample_statistics(
        self, cfg: Recipe, metric: Importance, needs: frozenset[str], modules: list[str]
    ) -> tuple[Statistics, list[int] | None]:
        """Statistics of the calibration samples and which pool samples they were (None: not a pool)."""
        samples = self.samples
        if samples is None:
            samples = sample_mixture(self.tokenizer, cfg.calibration, cfg.num_samples, cfg.seq_len, seed=cfg.seed)
        stats = collect_statistics(
            self.model,
            samples,
            modules,
            needs,
            batch_size=self.runtime.batch_size or samples.shape[0],
            offload=self.runtime.offload,
            checkpointing=self.runtime.gradient_checkpointing,
        )
        return stats, None

    def activations(self, cfg: Recipe, modules: list[str]) -> Statistics:
        """Activation statistics of ``activation_calibration`` fresh windows (forward passes only)."""
        windows = cfg.activation_calibration
        return activation_statistics(self.model, self.tokenizer, modules, cfg.calibration, windows, cfg.fresh_seed)

    def run_local(self, cfg: Recipe, restore: bool, **target: Any) -> LocalResult:
        """The layer-by-layer engine on the recipe's refit windows and the runtime's refit device; ``target``:
        ``keep`` counts (structured OBS selects the units) or the ``plan`` whose kept weights it refits."""
        settings = cfg.local_settings(self.runtime.refit_device)
        windows = self.refit_windows(cfg)
        return local_prune(self.model, windows, settings, head_mode=cfg.head_mode, restore=restore, **target)

    def groups(self, adapter: ModelAdapter, layers: tuple[int, int], head_mode: str) -> GroupSet:
        if (layers, head_mode) not in self._groups:
            self._groups[layers, head_mode] = layer_groups(adapter, list(range(*layers)), head_mode)
        return self._groups[layers, head_mode]

    def refit_windows(self, cfg: Recipe) -> torch.Tensor:
        """The layer-by-layer engine's windows: ``refit_calibration`` of ``calibration``."""
        key = _windows_key(cfg)
        if key not in self._windows:
            self._windows[key] = refit_windows(self.tokenizer, cfg)
        return self._windows[key]

    def supernet(self, cfg: Recipe, max_removal: float) -> Supernet:
        """Every layer's candidates on the refit windows (also cached on disk by ``build_supernet``)."""
        key = (*_windows_key(cfg), cfg.refit_damping, max_removal, cfg.head_mode)
        self.supernet_seconds = 0.0
        if key not in self._supernets:
            clock = time.perf_counter()
            settings = SupernetSettings(damping=cfg.refit_damping, max_removal=max_removal)
            layers = list(range(get_adapter(self.model).num_layers))
            windows = self.refit_windows(cfg)
            self._supernets[key] = build_supernet(self.model, windows, layers, settings, cfg.head_mode)
            self.supernet_seconds = time.perf_counter() - clock
        return self._supernets[key]


def _windows_key(cfg: Recipe) -> tuple:
    """What decides a recipe's refit windows (and so a supernet built on them)."""
    return cfg.calibration, cfg.refit_calibration, cfg.fresh_seed


def plan_recipe(
    model: torch.nn.Module,
    cfg: Recipe,
    inputs: PlanInputs,
    allocation: Allocation | None = None,
    *,
    restore: bool = False,
) -> Planned:
    """The plan ``cfg`` gives on ``model``: a per-layer ``allocation`` assembled from the supernet, structured
    OBS at the budget's per-layer rates, or a metric's scores cut under the budget (then bias
    compensation or a least-squares refit if the recipe asks). With ``restore`` the model's weights are
    left as they were and any refit is returned; otherwise refits are written into ``model``."""
    adapter = get_adapter(model)
    dense_params = count_params(model)
    if allocation is not None:
        return _assemble(model, cfg, allocation, inputs, dense_params, restore)
    layers = parse_layer_range(cfg.layers, adapter.num_layers)
    budget = cfg.budget(layers)
    if cfg.local_selection:
        keep = solve_keep_counts(adapter, budget, dense_params)
        local = inputs.run_local(cfg, restore, keep=keep)
        return _with_local(Planned(local.plan, layers, dense_params), local, restore)
    scores, stats, subset = recipe_scores(model, cfg, inputs, layers)
    plan = plan_for_scores(model, scores, budget, cfg)
    means = input_means(adapter, layers, stats) if cfg.refit_mode == "bias" else None
    planned = Planned(plan, layers, dense_params, input_means=means, subset=subset)
    if not cfg.uses_local_engine:
        return planned
    local = inputs.run_local(cfg, restore, plan=plan)
    return _with_local(planned, local, restore)


def recipe_scores(
    model: torch.nn.Module, cfg: Recipe, inputs: PlanInputs, layers: tuple[int, int]
) -> tuple[Scores, Statistics, list[int] | None]:
    """The recipe's metric over every group of ``layers``, with the statistics it read and which pool
    samples they were (``adapruner importance`` stops here; a plan cuts these scores under the budget)."""
    adapter = get_adapter(model)
    metric = cfg.build_metric()
    stats, subset = statistics(cfg, metric, inputs, adapter.projection_names(list(range(*layers))))
    scores = score_groups(model, inputs.groups(adapter, layers, cfg.head_mode), metric, stats, cfg.aggregation)
    return scores, stats, subset


def statistics(
    cfg: Recipe, metric: Importance, inputs: PlanInputs, modules: list[str]
) -> tuple[Statistics, list[int] | None]:
    """What the metric (and bias compensation) reads: the calibration samples' statistics, with the
    activations from fresh windows instead where the recipe asks for them."""
    needs = cfg.statistic_needs()
    fresh = cfg.fresh_activations()
    main = needs - {"activations"} if fresh else needs
    stats, subset = Statistics(), None
    if main:
        stats, subset = inputs.sample_statistics(cfg, metric, main, modules)
    if fresh:
        stats = with_activations(stats, inputs.activations(cfg, modules))
    return stats, subset


def with_activations(stats: Statistics, acts: Statistics) -> Statistics:
    """``stats`` with the activation tables (and their token counts) of ``acts``; gradients untouched."""
    return replace(stats, act_sum=acts.act_sum, act_sq=acts.act_sq, tokens=acts.tokens, per_sample=False, sample={})


def plan_for_scores(model: torch.nn.Module, scores: Scores, budget: Budget, cfg: Recipe) -> PrunePlan:
    """The units the scores keep under the budget, ranked as the recipe says."""
    adapter = get_adapter(model)
    keep = solve_keep_counts(adapter, budget, count_params(model))
    ranked = allocation_offsets(scores, budget, cfg.ranking)
    return plan_from_scores(adapter, ranked, keep, cfg.head_mode, align=cfg.align, ranking=cfg.ranking)


def input_means(adapter: ModelAdapter, layers: tuple[int, int], stats: Statistics) -> dict[str, torch.Tensor]:
    """Calibration mean of every o_proj/down_proj input in ``layers``: what bias compensation feeds."""
    names = [n for i in range(*layers) for r, n in adapter.prunable_module_names(i).items() if r in OUTPUTS]
    return {name: stats.input_mean(name) for name in names}


def _with_local(planned: Planned, local, restore: bool) -> Planned:
    planned.plan, planned.local, planned.refit_seconds = local.plan, local.summary(), local.seconds
    planned.refits = local.refits if restore else None
    return planned


def _assemble(
    model: torch.nn.Module, cfg: Recipe, allocation: Allocation, inputs: PlanInputs, dense_params: int, restore: bool
):
    """A per-layer allocation from the supernet's candidates: OBS order, refit weights."""
    adapter = get_adapter(model)
    clock = time.perf_counter()
    net = inputs.supernet(cfg, allocation.max_removal)
    plan, refits = net.assemble(adapter, allocation.per_layer, cfg.head_mode)
    if not restore:
        for name, refit in refits.items():
            write_refit(model.get_submodule(name), refit)
    errors = {name: round(refit.error, 6) for name, refit in refits.items()}
    summary = {
        "supernet": net.fingerprint,
        "tokens": int(inputs.refit_windows(cfg).numel()),
        "seconds": round(net.seconds, 2),
        "mean_relative_error": sum(errors.values()) / len(errors) if errors else 0.0,
        "relative_errors": errors,
        "damping_raised": {name: r.damping for name, r in refits.items() if r.damping > cfg.refit_damping},
    }
    layers = (0, adapter.num_layers)
    planned = Planned(plan, layers, dense_params, local=summary, refit_seconds=time.perf_counter() - clock)
    planned.refits = refits if restore else None
    return planned
