"""The metric menu. Names are part of the public interface (CLI ``--metric``).

Notation: W a weight, g = dL/dW averaged over the calibration samples, F = mean over samples of the
per-sample g_i^2 (diagonal Fisher), X the module's input over all calibration tokens. Each metric scores
one member slice (a unit's rows or columns of one layer); ``--aggregation`` combines the coupled layers.
Scores stay on each metric's own scale (Taylor scores estimate a loss change, so they compare across
layers); ``mix`` divides each component by its mean over all units of a kind before weighting, and
``flap`` standardises per kind across layers as FLAP does.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ..errors import AdaPrunerError
from ..models.groups import GroupSet, Member
from .base import AGGREGATIONS, Importance, Statistics, score_group

Scores = dict[tuple[int, str], torch.Tensor]


def _slice_sum(per_index: torch.Tensor, member: Member) -> torch.Tensor:
    """Sum a per-row (or per-column) vector over each unit's rows (or columns)."""
    return per_index[member.indices.to(per_index.device)].sum(1)


class L1(Importance):
    """Magnitude: sum of |W| over the group."""

    name = "l1"

    def element_scores(self, weight: torch.Tensor, module: str, stats: Statistics) -> torch.Tensor:
        return weight.abs()


class L2(Importance):
    """Magnitude: sum of W^2 over the group (the squared L2 norm; same ranking as the norm)."""

    name = "l2"

    def element_scores(self, weight: torch.Tensor, module: str, stats: Statistics) -> torch.Tensor:
        return weight.pow(2)


class Element1(Importance):
    """LLM-Pruner's element-wise first-order Taylor: sum of |W * g|."""

    name = "element1"
    requires = frozenset({"grad"})
    decomposable = False  # |.| of the subset's summed gradient

    def member_scores(self, weight: torch.Tensor, member: Member, stats: Statistics) -> torch.Tensor:
        if member.module in stats.unit_abs_wg:  # reduced in the gradient hook (one-step pass)
            return _slice_sum(stats.mean_unit_sums("unit_abs_wg", member.module), member)
        return super().member_scores(weight, member, stats)

    def element_scores(self, weight: torch.Tensor, module: str, stats: Statistics) -> torch.Tensor:
        return (weight * stats.grad(module).to(weight.device)).abs()


class Element2(Importance):
    """LLM-Pruner's element-wise second order: sum of |W*g - 1/2 * W*F*W|."""

    name = "element2"
    requires = frozenset({"grad", "fisher"})
    decomposable = False

    def element_scores(self, weight: torch.Tensor, module: str, stats: Statistics) -> torch.Tensor:
        g = stats.grad(module).to(weight.device)
        f = stats.fisher_diag(module).to(weight.device)
        return (weight * g - 0.5 * weight.pow(2) * f).abs()


class Second(Importance):
    """Only the second-order term: sum of 1/2 * W*F*W (from per-sample sums when cached)."""

    name = "second"
    requires = frozenset({"fisher"})

    def member_scores(self, weight: torch.Tensor, member: Member, stats: Statistics) -> torch.Tensor:
        if member.module in stats.unit_wwgg:
            return 0.5 * _slice_sum(stats.mean_unit_sums("unit_wwgg", member.module), member)
        return super().member_scores(weight, member, stats)

    def element_scores(self, weight: torch.Tensor, module: str, stats: Statistics) -> torch.Tensor:
        return 0.5 * weight.pow(2) * stats.fisher_diag(module).to(weight.device)


class Vector(Importance):
    """LLM-Pruner's vector-wise first order: |sum of W*g| over the slice (sum first, then abs)."""

    name = "vector"
    requires = frozenset({"grad"})

    def member_scores(self, weight: torch.Tensor, member: Member, stats: Statistics) -> torch.Tensor:
        if member.module in stats.unit_wg:  # per-sample cache or one-step pass
            return _slice_sum(stats.mean_unit_sums("unit_wg", member.module), member).abs()
        wg = weight.float() * stats.grad(member.module).to(weight.device)
        return _slice_sum(wg.sum(1) if member.dim == 0 else wg.sum(0), member).abs()


class WandaSP(Importance):
    """Wanda for structures: sum over the slice of |W_ij| * ||X_j|| (the input feature's L2 norm)."""

    name = "wanda_sp"
    requires = frozenset({"activations"})

    def member_scores(self, weight: torch.Tensor, member: Member, stats: Statistics) -> torch.Tensor:
        # per row: |W| @ ||X||; per column: ||X_j|| * sum_i |W_ij| -- no [out, in] temporary beyond |W|
        norm = stats.input_norm(member.module).to(weight.device)
        magnitude = weight.float().abs()
        per_index = magnitude @ norm if member.dim == 0 else magnitude.sum(0) * norm
        return _slice_sum(per_index, member)


def _fluctuation(model: torch.nn.Module, group: GroupSet, stats: Statistics) -> tuple[Member, torch.Tensor]:
    """FLAP's fluctuation of every input column j of the group's o_proj/down_proj: Var(X_j) * ||W[:, j]||^2."""
    member = next(m for m in group.members if m.dim == 1)
    weight = model.get_submodule(member.module).weight.detach().float()
    return member, stats.input_variance(member.module).to(weight.device) * weight.pow(2).sum(0)


class Flap(Importance):
    """FLAP's fluctuation metric on the unit's input to o_proj/down_proj: Var(X_j) * ||W[:, j]||^2.

    Only the output projection sees the unit's own channel, so aggregation does not apply. Scores are
    standardised per kind ((s - mean) / std over all units of all scored layers), as FLAP does before
    comparing structures across layers.
    """

    name = "flap"
    requires = frozenset({"activations"})
    uses_aggregation = False

    def group_scores(self, model: torch.nn.Module, group: GroupSet, stats: Statistics, aggregation: str):
        member, per_column = _fluctuation(model, group, stats)
        return _slice_sum(per_column, member)

    def score_all(self, model, groups, stats, aggregation) -> Scores:
        raw = super().score_all(model, groups, stats, aggregation)
        return {key: _standardised(raw, key[1])[key] for key in raw}


class Wifv(Importance):
    """FLAP's WIFV as FLAP's code scores units for its default "AL-AM" structure (``--method flap``).

    Per input column j of o_proj/down_proj: Var(X_j) * ||W[:, j]||^2, squared for o_proj (as in
    ``prune_flap``); standardised over the columns of that module in that layer ((s - mean) / std, the
    unbiased std); a unit scores the mean over its columns. Heads and channels of every layer are then
    on one scale and can be ranked together (``ranking global-all``). Aggregation does not apply.
    ``flap`` is AdaPruner's variant: unit sums, standardised per kind across layers.
    """

    name = "wifv"
    requires = frozenset({"activations"})
    uses_aggregation = False

    def group_scores(self, model: torch.nn.Module, group: GroupSet, stats: Statistics, aggregation: str):
        member, per_column = _fluctuation(model, group, stats)
        if group.kind == "attention":
            per_column = per_column.pow(2)
        z = (per_column - per_column.mean()) / per_column.std().clamp_min(1e-12)
        return z[member.indices.to(z.device)].mean(1)


def _standardised(scores: Scores, kind: str) -> Scores:
    values = torch.cat([v for (_, k), v in scores.items() if k == kind])
    mean, std = values.mean(), values.std().clamp_min(1e-12)
    return {key: (v - mean) / std for key, v in scores.items() if key[1] == kind}


def _mean_normalised(scores: Scores) -> Scores:
    out: Scores = {}
    for kind in {k for _, k in scores}:
        mean = torch.cat([v for (_, k), v in scores.items() if k == kind]).abs().mean().clamp_min(1e-12)
        out |= {key: v / mean for key, v in scores.items() if key[1] == kind}
    return out


class Random(Importance):
    """A baseline: uniform random scores, reproducible from the seed."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def member_scores(self, weight: torch.Tensor, member: Member, stats: Statistics) -> torch.Tensor:
        return torch.rand(member.indices.shape[0], generator=self.generator)


class Mix(Importance):
    """A weighted sum of other metrics, each divided by its mean over all units of a kind (tunable weights)."""

    name = "mix"
    components: ClassVar[tuple[str, ...]] = ("l1", "l2", "element1", "element2", "second", "vector", "wanda_sp", "flap")

    def __init__(self, weights: dict[str, float], seed: int = 0) -> None:
        unknown = sorted(set(weights) - set(self.components))
        if unknown:
            raise AdaPrunerError(f"mix: unknown component(s) {unknown}: choose from {', '.join(self.components)}")
        if not any(w > 0 for w in weights.values()):
            raise AdaPrunerError("mix needs at least one positive weight, e.g. --mix element1=0.7,wanda_sp=0.3")
        self.weights = {k: float(w) for k, w in weights.items() if w != 0}
        self.parts = {k: get_metric(k, seed=seed) for k in self.weights}

    @property
    def needs(self) -> frozenset[str]:
        return frozenset().union(*(p.needs for p in self.parts.values()))

    @property
    def decomposable(self) -> bool:  # type: ignore[override]
        return all(p.decomposable for p in self.parts.values())

    def group_scores(self, model, group, stats, aggregation):
        return self.score_all(model, [group], stats, aggregation)[(group.layer, group.kind)]

    def score_all(self, model, groups, stats, aggregation) -> Scores:
        total: Scores = {}
        for name, part in self.parts.items():
            normalised = _mean_normalised(part.score_all(model, groups, stats, aggregation))
            for key, value in normalised.items():
                total[key] = total.get(key, 0) + self.weights[name] * value
        return total


class PerKind(Importance):
    """One metric for attention heads, another for MLP channels (kinds never compete for units)."""

    name = "per_kind"

    def __init__(self, attention: Importance, mlp: Importance) -> None:
        self.attention, self.mlp = attention, mlp

    @property
    def needs(self) -> frozenset[str]:
        return self.attention.needs | self.mlp.needs

    @property
    def decomposable(self) -> bool:  # type: ignore[override]
        return self.attention.decomposable and self.mlp.decomposable

    def _for(self, kind: str) -> Importance:
        return self.attention if kind == "attention" else self.mlp

    def group_scores(self, model, group, stats, aggregation):
        return self._for(group.kind).group_scores(model, group, stats, aggregation)

    def score_all(self, model, groups, stats, aggregation) -> Scores:
        attention = [g for g in groups if g.kind == "attention"]
        mlp = [g for g in groups if g.kind != "attention"]
        return self.attention.score_all(model, attention, stats, aggregation) | self.mlp.score_all(
            model, mlp, stats, aggregation
        )


METRICS: dict[str, type[Importance]] = {
    m.name: m for m in (Random, L1, L2, Element1, Element2, Second, Vector, WandaSP, Flap, Wifv, Mix)
}


def parse_mix(text: str | None) -> dict[str, float]:
    """``"element1=0.7,wanda_sp=0.3"`` -> {"element1": 0.7, "wanda_sp": 0.3}."""
    weights: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        name, _, value = part.partition("=")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            raise AdaPrunerError(f"--mix '{text}' must look like element1=0.7,wanda_sp=0.3") from None
    return weights


def get_metric(name: str, seed: int = 0, mix: dict[str, float] | None = None) -> Importance:
    if name not in METRICS:
        raise AdaPrunerError(f"unknown metric '{name}': choose one of {', '.join(METRICS)}")
    if name == "mix":
        return Mix(mix or {}, seed)
    return Random(seed) if name == "random" else METRICS[name]()


def score_groups(
    model: torch.nn.Module, groups: list[GroupSet], metric: Importance, stats: Statistics, aggregation: str = "sum"
) -> Scores:
    """Scores for every group, keyed by (layer, kind)."""
    if aggregation not in AGGREGATIONS:
        raise AdaPrunerError(f"unknown aggregation '{aggregation}': choose one of {', '.join(AGGREGATIONS)}")
    return metric.score_all(model, groups, stats, aggregation)


__all__ = ["METRICS", "PerKind", "get_metric", "parse_mix", "score_group", "score_groups"]
