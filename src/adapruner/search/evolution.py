"""Per-layer allocation search: budget-preserving mutations of per-layer keep counts (EvoPress-style).

A per-layer trial keeps ``attn_<i>`` attention units and ``mlp_<i>`` MLP channels in layer ``i``; the
values are Optuna trial parameters (so ``trials.csv``, resume and shared storages see them) but TPE does
not model them: :class:`AllocationSampler` hands them to a :class:`Proposer`, and every other parameter
(the data and metric dimensions) to the wrapped sampler (TPE).

The proposer first evaluates its start allocations (the best profile trial's per-layer counts, and a
uniform rate over LLM-Pruner's layer range), then mutates the best per-layer trial so far: a few moves
that prune one layer one step more and another one step less (MLP channels in steps of
``dense / mlp_levels``, attention units one block at a time), after which the MLP counts are repaired so
that the parameters removed stay within one channel of ``ratio`` of the model. EvoPress shows such
level-swapping mutations with elitist selection converge in few evaluations where generic samplers
do not; early rejection (a child worse than its parent on the first validation chunk stops there) keeps
each rejected child cheap.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.distributions import BaseDistribution

from ..errors import AdaPrunerError

ATTENTION_PARAM = "attn_"
MLP_PARAM = "mlp_"
PER_LAYER = "per-layer"
PROFILE = "profile"
ALLOCATIONS = (PROFILE, PER_LAYER)

Counts = dict[int, tuple[int, int]]  # layer -> (attention units kept, MLP channels kept)


def is_allocation_param(name: str) -> bool:
    """Parameters TPE does not model: the per-layer counts and the allocation kind (a schedule)."""
    return name == "allocation" or name.startswith((ATTENTION_PARAM, MLP_PARAM))


def counts_to_params(counts: Counts) -> dict[str, int]:
    params: dict[str, int] = {}
    for layer, (attn, mlp) in sorted(counts.items()):
        params[f"{ATTENTION_PARAM}{layer}"] = attn
        params[f"{MLP_PARAM}{layer}"] = mlp
    return params


def params_to_counts(params: dict[str, Any]) -> Counts:
    layers = sorted(int(k[len(ATTENTION_PARAM) :]) for k in params if k.startswith(ATTENTION_PARAM))
    return {i: (int(params[f"{ATTENTION_PARAM}{i}"]), int(params[f"{MLP_PARAM}{i}"])) for i in layers}


@dataclass(frozen=True)
class LayerLimits:
    """What one layer's counts may be: kept units within [min, dense], attention in multiples of ``step``."""

    attn_min: int
    attn_dense: int
    attn_step: int
    mlp_min: int
    mlp_dense: int
    attn_params: int  # parameters one attention unit owns
    mlp_params: int  # parameters one MLP channel owns


@dataclass
class AllocationBudget:
    """The parameters a per-layer allocation must remove: ``target`` (ratio × the whole model's)."""

    limits: dict[int, LayerLimits]
    target: float
    mlp_levels: int = 32
    align: int = 1  # kept MLP channels are multiples of this (or the dense count: the layer untouched)

    def removed(self, counts: Counts) -> int:
        total = 0
        for layer, (attn, mlp) in counts.items():
            lim = self.limits[layer]
            total += (lim.attn_dense - attn) * lim.attn_params + (lim.mlp_dense - mlp) * lim.mlp_params
        return total

    def check_reachable(self, ratio: float) -> None:
        """A grid whose deepest candidates cannot remove ``ratio`` of the model is refused (one line)."""
        deepest = {i: (lim.attn_min, self.snap(lim, lim.mlp_min)) for i, lim in self.limits.items()}
        if self.removed(deepest) < self.target:
            raise AdaPrunerError(
                f"the per-layer levels cannot reach ratio {ratio}: even the deepest candidates of every layer remove "
                f"{self.removed(deepest) / (self.target / ratio):.3f} of the model; raise the supernet's max_removal"
            )

    def mlp_step(self, layer: int) -> int:
        step = max(1, self.limits[layer].mlp_dense // self.mlp_levels)
        return max(self.align, round(step / self.align) * self.align)

    def snap(self, lim: LayerLimits, mlp: int) -> int:
        """The MLP count nearest ``mlp`` on the layer's grid: multiples of ``align`` inside its limits, or dense."""
        if mlp >= lim.mlp_dense or self.align == 1:
            return min(max(mlp, lim.mlp_min), lim.mlp_dense)
        low = -(-lim.mlp_min // self.align) * self.align
        high = lim.mlp_dense // self.align * self.align
        if low > high:  # no multiple fits between the deepest candidate and dense: the layer stays dense
            return lim.mlp_dense
        return min(max(round(mlp / self.align) * self.align, low), high)

    def clamp(self, counts: Counts) -> Counts:
        """Counts inside each layer's limits (attention on its block grid)."""
        out: Counts = {}
        for layer, lim in self.limits.items():
            attn, mlp = counts.get(layer, (lim.attn_dense, lim.mlp_dense))
            attn = min(max(attn - attn % lim.attn_step, lim.attn_min), lim.attn_dense)
            out[layer] = (attn, self.snap(lim, mlp))
        return out

    def repair(self, counts: Counts, rng: random.Random) -> Counts:
        """Adjust MLP counts (attention too, once the MLP has no room left) until the removed parameters
        come within one channel of ``target``."""
        counts = self.clamp(counts)
        layers = list(self.limits)
        for _ in range(8 * len(layers)):
            gap = self.target - self.removed(counts)  # > 0: remove more
            rng.shuffle(layers)
            if all(round(gap / (self.limits[i].mlp_params * self.align)) == 0 for i in layers):
                return counts
            if not self._move_channels(counts, layers, gap) and not self._move_heads(counts, layers, gap):
                break
        if abs(self.target - self.removed(counts)) > self.align * max(lim.mlp_params for lim in self.limits.values()):
            raise AdaPrunerError("cannot meet the ratio with the per-layer levels: raise the supernet's max_removal")
        return counts

    def _move_channels(self, counts: Counts, layers: list[int], gap: float) -> bool:
        for layer in layers:
            lim, (attn, mlp) = self.limits[layer], counts[layer]
            new = self.snap(lim, mlp - round(gap / lim.mlp_params))
            if new != mlp:
                counts[layer] = (attn, new)
                return True
        return False

    def _move_heads(self, counts: Counts, layers: list[int], gap: float) -> bool:
        return any(self._step(counts, layer, "attn", -1 if gap > 0 else 1) for layer in layers)

    def uniform_levels(self) -> list[Counts]:
        """``--uniform``: allocations that give every layer the same (attention units, MLP channels), one per
        attention level (most attention kept first), with the MLP count that comes closest to ``target``;
        levels whose MLP count falls outside the limits are left out."""
        kinds = set(self.limits.values())
        if len(kinds) != 1:
            raise AdaPrunerError("--uniform needs decoder layers of one size: this model's layers differ")
        lim, layers = kinds.pop(), len(self.limits)
        levels = []
        for attn in range(lim.attn_dense, lim.attn_min - 1, -lim.attn_step):
            attention_removed = layers * (lim.attn_dense - attn) * lim.attn_params
            mlp = lim.mlp_dense - round((self.target - attention_removed) / (layers * lim.mlp_params))
            if lim.mlp_min <= mlp <= lim.mlp_dense:
                levels.append(dict.fromkeys(self.limits, (attn, self.snap(lim, mlp))))
        if not levels:
            raise AdaPrunerError("--uniform: no level of the supernet removes the ratio: raise its max_removal")
        return levels

    def random(self, rng: random.Random) -> Counts:
        """Independent uniform keep counts per layer, then the MLP counts repaired to the budget."""
        counts: Counts = {}
        for layer, lim in self.limits.items():
            steps = (lim.attn_dense - lim.attn_min) // lim.attn_step
            counts[layer] = (
                lim.attn_min + lim.attn_step * rng.randint(0, steps),
                rng.randint(lim.mlp_min, lim.mlp_dense),
            )
        return self.repair(counts, rng)

    def mutate(self, parent: Counts, rng: random.Random, scale: int = 1) -> Counts:
        """A few budget-preserving moves: one layer pruned one step more, another one step less (MLP steps
        of ``scale`` levels: coarse to fine)."""
        child = dict(parent)
        moves = rng.choice((1, 1, 2, 3))
        layers = list(self.limits)
        for _ in range(moves):
            for _attempt in range(20):
                more, less = rng.sample(layers, 2)
                kinds = rng.choices((("mlp", "mlp"), ("attn", "attn"), ("attn", "mlp"), ("mlp", "attn")), (4, 2, 1, 1))[
                    0
                ]
                trial = dict(child)
                if self._step(trial, more, kinds[0], -1, scale) and self._step(trial, less, kinds[1], +1, scale):
                    child = trial
                    break
        return self.repair(child, rng)

    def _step(self, counts: Counts, layer: int, kind: str, sign: int, scale: int = 1) -> bool:
        lim, (attn, mlp) = self.limits[layer], counts[layer]
        if kind == "attn":
            new = attn + sign * lim.attn_step
            if not lim.attn_min <= new <= lim.attn_dense:
                return False
            counts[layer] = (new, mlp)
        else:
            new = mlp + sign * scale * self.mlp_step(layer)
            if not lim.mlp_min <= new <= lim.mlp_dense or self.snap(lim, new) == mlp:
                return False
            counts[layer] = (attn, self.snap(lim, new))
        return True


class Proposer:
    """The per-layer counts of the next trial: a start allocation, else a mutation of the best so far."""

    def __init__(
        self,
        budget: AllocationBudget,
        starts: Callable[[optuna.Study], list[Counts]],
        seed: int,
        randomly: bool = False,
        exact_starts: bool = False,
        coarse: int = 1,
        trials: int | None = None,
    ) -> None:
        """``randomly``: after the starts, random allocations of the budget (random search's baseline).
        ``exact_starts``: the starts already meet the budget as they must (``--uniform``), no repair.
        ``coarse``: coarse to fine (Týr-the-Pruner): MLP moves of ``coarse`` levels over the first third of
        the ``trials`` per-layer trials, half as many over the second, one level over the last."""
        self.budget, self.starts, self.seed, self.randomly = budget, starts, seed, randomly
        self.exact_starts, self.coarse, self.trials = exact_starts, coarse, trials

    def scale(self, done: int) -> int:
        """MLP levels per move after ``done`` per-layer trials (1 without coarse to fine)."""
        if self.coarse <= 1 or not self.trials:
            return 1
        return max(1, self.coarse >> min(int(3 * done / self.trials), 2))

    def propose(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> tuple[dict[str, int], dict[str, Any]]:
        """Parameters for ``trial`` and what they came from (user attributes: ``start`` or ``parent``)."""
        rng = random.Random(self.seed * 1_000_003 + trial.number)
        earlier = [t for t in study.get_trials(deepcopy=False) if t.number < trial.number and _per_layer(t)]
        starts = self.starts(study)
        if len(earlier) < len(starts):
            index = len(earlier)
            start = starts[index] if self.exact_starts else self.budget.repair(starts[index], rng)
            return counts_to_params(start), {"start": index}
        if self.randomly:
            return counts_to_params(self.budget.random(rng)), {"random": True}
        done = [t for t in earlier if t.state == optuna.trial.TrialState.COMPLETE and t.value is not None]
        if not done:  # the starts are still running elsewhere, or failed: mutate the first start
            return counts_to_params(self.budget.mutate(self.budget.repair(starts[0], rng), rng)), {"start": 0}
        parent = min(done, key=lambda t: t.value)
        child = self.budget.mutate(params_to_counts(parent.params), rng, self.scale(len(earlier)))
        return counts_to_params(child), {"parent": parent.number}


def _per_layer(trial: optuna.trial.FrozenTrial) -> bool:
    return trial.params.get("allocation") == PER_LAYER or trial.user_attrs.get("allocation") == PER_LAYER


class AllocationSampler(optuna.samplers.BaseSampler):
    """Per-layer counts from a :class:`Proposer`; every other parameter from ``base`` (TPE or random)."""

    def __init__(self, base: optuna.samplers.BaseSampler, profile_trials: int) -> None:
        self.base, self.profile_trials = base, profile_trials
        # how many per-layer trials follow the profile ones (None: all later trials; --uniform: one per
        # level of the uniform allocation, after which the profile search goes on)
        self.per_layer_trials: int | None = None
        self.proposer: Proposer | None = None  # set once the supernet's limits are known
        self._proposals: dict[int, tuple[dict[str, int], dict[str, Any]]] = {}

    def infer_relative_search_space(self, study, trial) -> dict[str, BaseDistribution]:
        space = self.base.infer_relative_search_space(study, trial)
        return {name: dist for name, dist in space.items() if not is_allocation_param(name)}

    def sample_relative(self, study, trial, search_space) -> dict[str, Any]:
        return self.base.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution) -> Any:
        if param_name == "allocation":  # the first profile_trials trials, then per-layer ones
            end = None if self.per_layer_trials is None else self.profile_trials + self.per_layer_trials
            return PER_LAYER if self.profile_trials <= trial.number and (end is None or trial.number < end) else PROFILE
        if not is_allocation_param(param_name):
            return self.base.sample_independent(study, trial, param_name, param_distribution)
        return self.proposal(study, trial)[0][param_name]

    def proposal(self, study, trial) -> tuple[dict[str, int], dict[str, Any]]:
        if self.proposer is None:
            raise AdaPrunerError("the per-layer allocation needs the supernet: no proposer was set")
        if trial.number not in self._proposals:
            self._proposals = {trial.number: self.proposer.propose(study, trial)}
        return self._proposals[trial.number]

    def origin(self, number: int) -> dict[str, Any]:
        """Where trial ``number``'s counts came from (``start`` index or ``parent`` trial), if proposed here."""
        return self._proposals.get(number, ({}, {}))[1]

    def before_trial(self, study, trial) -> None:
        self.base.before_trial(study, trial)

    def after_trial(self, study, trial, state, values) -> None:
        self.base.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.base.reseed_rng()
