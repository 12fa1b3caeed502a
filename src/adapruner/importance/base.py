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
    """What a metric may read besides the weights, keyed by full module name."""

    grads: dict[str, torch.Tensor] = field(default_factory=dict)  # d(mean calibration loss)/dW, fp32
    num_samples: int = 0

    def grad(self, module: str) -> torch.Tensor:
        try:
            return self.grads[module]
        except KeyError:
            raise AdaPrunerError(
                f"no gradient was collected for {module}: this metric needs calibration data"
            ) from None


def gather_units(tensor: torch.Tensor, member: Member) -> torch.Tensor:
    """[num_units, width, other] view of the rows (dim 0) or columns (dim 1) each unit owns."""
    indices = member.indices.to(tensor.device)
    if member.dim == 0:
        return tensor[indices]
    return tensor[:, indices].permute(1, 2, 0)


class Importance(ABC):
    """Scores one member slice per unit. Subclasses define ``element_scores`` or override ``member_scores``."""

    name: ClassVar[str]
    needs_gradients: ClassVar[bool] = False

    def element_scores(self, weight: torch.Tensor, module: str, stats: Statistics) -> torch.Tensor:
        raise NotImplementedError

    def member_scores(self, weight: torch.Tensor, member: Member, stats: Statistics) -> torch.Tensor:
        """Default: the sum of the per-element scores inside each unit's slice."""
        elements = self.element_scores(weight.float(), member.module, stats)
        return gather_units(elements, member).flatten(1).sum(1)


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
    per_member = [metric.member_scores(model.get_submodule(m.module).weight.detach(), m, stats) for m in group.members]
    scores = aggregate(per_member, aggregation)
    if not torch.isfinite(scores).all():
        raise AdaPrunerError(
            f"{metric.name} gave NaN/inf scores in layer {group.layer} ({group.kind}): "
            "fp16 overflow is the usual cause; load the model in bfloat16 or float32"
        )
    return scores
