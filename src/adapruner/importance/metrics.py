"""The metric menu. Names are part of the public interface (CLI ``--metric``)."""

from __future__ import annotations

import torch

from ..errors import AdaPrunerError
from ..models.groups import Member
from .base import Importance, Statistics


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
    """LLM-Pruner's element-wise first-order Taylor: sum of |W * dL/dW| over the group."""

    name = "element1"
    needs_gradients = True

    def element_scores(self, weight: torch.Tensor, module: str, stats: Statistics) -> torch.Tensor:
        return (weight * stats.grad(module).to(weight.device)).abs()


class Random(Importance):
    """A baseline: uniform random scores, reproducible from the seed."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def member_scores(self, weight: torch.Tensor, member: Member, stats: Statistics) -> torch.Tensor:
        return torch.rand(member.indices.shape[0], generator=self.generator)


METRICS: dict[str, type[Importance]] = {m.name: m for m in (Random, L1, L2, Element1)}


def get_metric(name: str, seed: int = 0) -> Importance:
    if name not in METRICS:
        raise AdaPrunerError(f"unknown metric '{name}': choose one of {', '.join(METRICS)}")
    return Random(seed) if name == "random" else METRICS[name]()
