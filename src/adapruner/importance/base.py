"""The importance interface: a metric scores the units of a group from weights and statistics.

A metric maps one member slice (rows or columns of one linear layer) to one score per unit; an
aggregation reduces the member scores of the coupled layers to one score per unit. Statistics
(gradients now; Fisher terms and activation moments later) are gathered once by a collector and
handed to any metric, so metrics never run the model themselves.
"""

from __future__ import annotations

from abc import ABC
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..errors import AdaPrunerError
from ..models.groups import GroupSet, Member


@dataclass
class Statistics:
    """What a metric may read besides the weights, keyed by full module name (see ``collector``).

    Per-element tables (``grads``, ``fisher``) hold means over the samples. Step tables hold one row per
    forward pass (one per sample when ``per_sample``), so a subset of samples is a row selection.
    """

    grads: dict[str, torch.Tensor] = field(default_factory=dict)
    fisher: dict[str, torch.Tensor] = field(default_factory=dict)
    act_sum: dict[str, torch.Tensor] = field(default_factory=dict)  # [steps, in_features]
    act_sq: dict[str, torch.Tensor] = field(default_factory=dict)  # [steps, in_features]
    tokens: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # [steps]
    unit_wg: dict[str, torch.Tensor] = field(default_factory=dict)  # [samples, rows or cols]
    unit_wwgg: dict[str, torch.Tensor] = field(default_factory=dict)  # [samples, rows or cols]
    unit_abs_wg: dict[str, torch.Tensor] = field(default_factory=dict)  # [1, rows or cols], lean element1
    sample: dict[str, torch.Tensor] = field(default_factory=dict)  # "loss", "grad_norm": [steps]
    num_samples: int = 0
    per_sample: bool = False

    def _table(self, table: dict[str, torch.Tensor], module: str, what: str) -> torch.Tensor:
        try:
            return table[module]
        except KeyError:
            raise AdaPrunerError(f"no {what} was collected for {module}: this metric needs calibration data") from None

    def grad(self, module: str) -> torch.Tensor:
        return self._table(self.grads, module, "gradient")

    def fisher_diag(self, module: str) -> torch.Tensor:
        return self._table(self.fisher, module, "Fisher term")

    def input_norm(self, module: str) -> torch.Tensor:
        """L2 norm of each input feature over all calibration tokens (Wanda-sp's ||X||)."""
        return self._table(self.act_sq, module, "activation statistic").sum(0).sqrt()

    def input_mean(self, module: str) -> torch.Tensor:
        """Per-feature mean of the input over all calibration tokens (FLAP's bias compensation)."""
        return self._table(self.act_sum, module, "activation statistic").sum(0) / self.tokens.sum()

    def input_variance(self, module: str) -> torch.Tensor:
        """Per-feature variance of the input over all calibration tokens (FLAP's fluctuation)."""
        n = self.tokens.sum()
        mean = self._table(self.act_sum, module, "activation statistic").sum(0) / n
        return (self.act_sq[module].sum(0) / n - mean.pow(2)).clamp_min(0)

    def mean_unit_sums(self, table: str, module: str) -> torch.Tensor:
        """Mean over samples of the cached per-row/column sums (``unit_wg`` or ``unit_wwgg``)."""
        return self._table(getattr(self, table), module, "per-sample sum").mean(0)

    def select(self, indices: list[int] | torch.Tensor) -> Statistics:
        """Statistics of a subset of the samples, from per-sample rows alone (no model pass)."""
        if not self.per_sample:
            raise AdaPrunerError("these statistics were not gathered per sample; subsets need a per-sample pass")
        idx = torch.as_tensor(indices, dtype=torch.long)
        pick = {
            name: {k: v[idx.to(v.device)] for k, v in getattr(self, name).items()}
            for name in ("act_sum", "act_sq", "unit_wg", "unit_wwgg")
        }
        return Statistics(tokens=self.tokens[idx], num_samples=len(idx), per_sample=True, **pick)


def gather_units(tensor: torch.Tensor, member: Member) -> torch.Tensor:
    """[num_units, width, other] view of the rows (dim 0) or columns (dim 1) each unit owns."""
    indices = member.indices.to(tensor.device)
    if member.dim == 0:
        return tensor[indices]
    return tensor[:, indices].permute(1, 2, 0)


class Importance(ABC):
    """Scores one member slice per unit. Subclasses define ``element_scores`` or override ``member_scores``."""

    name: ClassVar[str]
    requires: ClassVar[frozenset[str]] = frozenset()  # statistics it reads (see ``collector.NEEDS``)
    # True when a subset's scores follow from per-sample cached numbers (no model pass for the subset)
    decomposable: ClassVar[bool] = True
    # False for metrics that score a unit from one member only (FLAP's): --aggregation does not apply
    uses_aggregation: ClassVar[bool] = True

    def element_scores(self, weight: torch.Tensor, module: str, stats: Statistics) -> torch.Tensor:
        raise NotImplementedError

    def member_scores(self, weight: torch.Tensor, member: Member, stats: Statistics) -> torch.Tensor:
        """Default: the sum of the per-element scores inside each unit's slice."""
        elements = self.element_scores(weight.float(), member.module, stats)
        return gather_units(elements, member).flatten(1).sum(1)

    def group_scores(
        self, model: torch.nn.Module, group: GroupSet, stats: Statistics, aggregation: str
    ) -> torch.Tensor:
        """Aggregate the member scores of the coupled layers."""
        weights = {m.module: model.get_submodule(m.module).weight.detach() for m in group.members}
        return aggregate([self.member_scores(weights[m.module], m, stats) for m in group.members], aggregation)

    @property
    def needs(self) -> frozenset[str]:
        return self.requires

    def score_all(
        self, model: torch.nn.Module, groups: list[GroupSet], stats: Statistics, aggregation: str
    ) -> dict[tuple[int, str], torch.Tensor]:
        """Scores of many groups; metrics that compare across layers (FLAP, mix) override this."""
        return {(g.layer, g.kind): score_group(model, g, self, stats, aggregation) for g in groups}


AGGREGATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "sum": lambda s: s.sum(0),
    "mean": lambda s: s.mean(0),
    "max": lambda s: s.max(0).values,
    "prod": lambda s: s.prod(0),
    "last": lambda s: s[-1],
}


def aggregate(member_scores: list[torch.Tensor], how: str) -> torch.Tensor:
    """Reduce [num_members][num_units] to [num_units]; ``last`` takes the group's final layer."""
    if how not in AGGREGATIONS:
        raise AdaPrunerError(f"unknown aggregation '{how}': choose one of {', '.join(AGGREGATIONS)}")
    return AGGREGATIONS[how](torch.stack(member_scores))


def score_group(
    model: torch.nn.Module, group: GroupSet, metric: Importance, stats: Statistics, aggregation: str = "sum"
) -> torch.Tensor:
    """One score per unit of ``group``; NaN/inf (fp16 overflow) is an error, not a silent ranking."""
    scores = metric.group_scores(model, group, stats, aggregation)
    if not torch.isfinite(scores).all():
        raise AdaPrunerError(
            f"{metric.name} gave NaN/inf scores in layer {group.layer} ({group.kind}): "
            "fp16 overflow is the usual cause; load the model in bfloat16 or float32"
        )
    return scores
