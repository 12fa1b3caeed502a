"""PrunePlan: the single decision object (kept heads and channels per layer).

The search produces plans, masks and physical removal consume them, ``adapruner.json`` records them.
``Budget`` turns a whole-model ratio into per-layer keep counts; ``adapruner.pruning.ranking`` picks
which units to keep.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import AdaPrunerError
from ..models.base import LayerShape, ModelAdapter
from ..models.groups import GroupSet, HeadMode, attention_group, mlp_group


@dataclass
class LayerPlan:
    """Original indices of what stays in one layer (sorted)."""

    query_heads: list[int]
    kv_heads: list[int]
    channels: list[int]

    @property
    def shape(self) -> LayerShape:
        return LayerShape(len(self.query_heads), len(self.kv_heads), len(self.channels))


@dataclass
class PrunePlan:
    layers: list[LayerPlan]
    head_dim: int

    @classmethod
    def keep_all(cls, adapter: ModelAdapter) -> PrunePlan:
        layers = [
            LayerPlan(
                list(range(s.num_attention_heads)),
                list(range(s.num_key_value_heads)),
                list(range(s.intermediate_size)),
            )
            for s in adapter.layer_shapes()
        ]
        return cls(layers, adapter.head_dim)

    def shapes(self) -> list[LayerShape]:
        return [layer.shape for layer in self.layers]

    @property
    def is_uniform(self) -> bool:
        return len(set(self.shapes())) == 1

    def to_dict(self) -> dict:
        return {
            "head_dim": self.head_dim,
            "layers": [
                {"query_heads": lp.query_heads, "kv_heads": lp.kv_heads, "channels": lp.channels} for lp in self.layers
            ],
        }

    @classmethod
    def from_dict(cls, data: dict) -> PrunePlan:
        layers = [LayerPlan(d["query_heads"], d["kv_heads"], d["channels"]) for d in data["layers"]]
        return cls(layers, int(data["head_dim"]))

    def validate(self, adapter: ModelAdapter) -> None:
        """Every kept KV head serves the same number of kept query heads, and only kept ones are read."""
        if len(self.layers) != adapter.num_layers:
            raise AdaPrunerError(f"plan has {len(self.layers)} layers but the model has {adapter.num_layers}")
        for index, (lp, shape) in enumerate(zip(self.layers, adapter.layer_shapes(), strict=True)):
            g = shape.queries_per_kv
            per_kv = {kv: 0 for kv in lp.kv_heads}
            for h in lp.query_heads:
                if h // g not in per_kv:
                    raise AdaPrunerError(f"layer {index}: query head {h} reads a removed KV head {h // g}")
                per_kv[h // g] += 1
            if not lp.query_heads or len(set(per_kv.values())) != 1:
                raise AdaPrunerError(f"layer {index}: kept query heads are not spread evenly over KV heads")
            if not lp.channels:
                raise AdaPrunerError(f"layer {index}: every MLP channel was removed")


# -- budget -> keep counts ------------------------------------------------------------------


def default_layer_range(num_layers: int) -> tuple[int, int]:
    """LLM-Pruner's habit (layers 4..30 of 32): leave the first ~1/8 and the last ~1/16 whole."""
    start = max(1, round(num_layers * 4 / 32))
    end = num_layers - max(1, round(num_layers * 2 / 32))
    return (start, end) if start < end else (0, num_layers)


def parse_layer_range(text: str | None, num_layers: int) -> tuple[int, int]:
    """``"4:26"`` -> (4, 26), end exclusive; ``None`` -> the default range."""
    if text is None:
        return default_layer_range(num_layers)
    try:
        start_s, end_s = text.split(":")
        start = int(start_s) if start_s else 0
        end = int(end_s) if end_s else num_layers
    except ValueError:
        raise AdaPrunerError(f"--layers '{text}' is not of the form START:END (e.g. 4:26)") from None
    if not 0 <= start < end <= num_layers:
        raise AdaPrunerError(
            f"--layers {text} is outside the model's {num_layers} layers: use START:END with "
            f"0 <= START < END <= {num_layers}"
        )
    return start, end


@dataclass(frozen=True)
class Budget:
    """How much to remove and where.

    ``ratio`` is the fraction of the *whole model's* parameters to remove (embeddings included).
    Inside ``layers`` (end exclusive) layer ``i`` loses a fraction ``r * w_i`` of its MLP channels and
    ``attention_scale * r * w_i`` of its attention units; ``r`` is solved so the total meets ``ratio``.
    ``attention_scale=0`` leaves attention whole. The depth profile ``w`` (mean 1) is a smooth curve
    over the pruned layers: ``depth_slope > 0`` cuts deeper layers more, ``depth_bend > 0`` cuts both
    ends more than the middle; both 0 is LLM-Pruner's uniform rate. MLP keep counts are rounded to
    ``align``.
    """

    ratio: float
    layers: tuple[int, int] | None = None
    attention_scale: float = 1.0
    align: int = 1
    head_mode: HeadMode = "auto"
    depth_slope: float = 0.0
    depth_bend: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 < self.ratio < 1.0:
            raise AdaPrunerError(f"ratio {self.ratio} is outside (0, 1): give the fraction to remove, e.g. 0.2")
        if self.attention_scale < 0:
            raise AdaPrunerError("attention scale must be >= 0 (0 leaves attention whole)")
        if self.align < 1:
            raise AdaPrunerError("--align must be a positive integer (1: free widths)")
        if not (abs(self.depth_slope) <= MAX_DEPTH_PARAM and abs(self.depth_bend) <= MAX_DEPTH_PARAM):
            raise AdaPrunerError(
                f"--depth-slope and --depth-bend must lie in [-{MAX_DEPTH_PARAM}, {MAX_DEPTH_PARAM}] (0: uniform)"
            )


MAX_DEPTH_PARAM = 4.0


def depth_profile(num_layers: int, slope: float = 0.0, bend: float = 0.0) -> list[float]:
    """Relative pruning rate of each of ``num_layers`` consecutive layers, mean 1.

    ``exp(slope * u + bend * (u^2 - 1/3))`` with ``u`` from -1 (first pruned layer) to 1 (last):
    always positive, so no layer is asked for a negative cut, and smooth, so two numbers describe it.
    """
    if num_layers == 1:
        return [1.0]
    u = [2 * i / (num_layers - 1) - 1 for i in range(num_layers)]
    weights = [math.exp(slope * x + bend * (x * x - 1 / 3)) for x in u]
    mean = sum(weights) / num_layers
    return [w / mean for w in weights]


@dataclass
class KeepCounts:
    """Per-layer number of attention units and MLP channels to keep (None = layer untouched)."""

    counts: list[tuple[int, int] | None]
    rate: float
    removed_params: int
    total_params: int = field(default=0)
    target_removed: float | None = None  # ratio * total_params (what ``global-all`` ranking aims at)

    @property
    def achieved_ratio(self) -> float:
        return self.removed_params / self.total_params


def _keep_units(group: GroupSet, rate: float) -> int:
    per_block = group.num_units // group.blocks
    keep = max(1, round(per_block * (1.0 - min(rate, 1.0))))
    return keep * group.blocks


def _keep_channels(group: GroupSet, rate: float, align: int) -> int:
    keep = group.num_units * (1.0 - min(rate, 1.0))
    keep = max(align, round(keep / align) * align) if align > 1 else max(1, round(keep))
    return min(keep, group.num_units)


def solve_keep_counts(adapter: ModelAdapter, budget: Budget, total_params: int) -> KeepCounts:
    """Find the uniform rate whose discrete keep counts remove closest to ``ratio`` of the model."""
    start, end = budget.layers or default_layer_range(adapter.num_layers)
    groups = [(attention_group(adapter, i, budget.head_mode), mlp_group(adapter, i)) for i in range(start, end)]
    profile = depth_profile(end - start, budget.depth_slope, budget.depth_bend)
    target = budget.ratio * total_params

    def counts_at(rate: float) -> tuple[list[tuple[int, int]], int]:
        counts, removed = [], 0
        for (attn, mlp), weight in zip(groups, profile, strict=True):
            a = _keep_units(attn, budget.attention_scale * rate * weight)
            m = _keep_channels(mlp, rate * weight, budget.align)
            counts.append((a, m))
            removed += (attn.num_units - a) * attn.params_per_unit + (mlp.num_units - m) * mlp.params_per_unit
        return counts, removed

    _, max_removed = counts_at(1.0 / min(profile))
    if max_removed < target:
        raise AdaPrunerError(
            f"ratio {budget.ratio} cannot be reached inside layers {start}:{end} (at most "
            f"{max_removed / total_params:.3f}): widen --layers or raise the attention share"
        )
    lo, hi = 0.0, 1.0 / min(profile)  # at hi every layer is cut to its minimum
    for _ in range(60):
        mid = (lo + hi) / 2
        if counts_at(mid)[1] < target:
            lo = mid
        else:
            hi = mid
    best = min((lo, hi), key=lambda r: abs(counts_at(r)[1] - target))
    counts, removed = counts_at(best)
    per_layer: list[tuple[int, int] | None] = [None] * adapter.num_layers
    for offset, c in enumerate(counts):
        per_layer[start + offset] = c
    return KeepCounts(per_layer, best, removed, total_params, target)


def layer_plan(shape: LayerShape, attn: GroupSet, attn_units: list[int], channels: list[int]) -> LayerPlan:
    """Translate kept attention units (query heads or KV groups) into kept query/KV heads."""
    g = shape.queries_per_kv
    if attn.num_units == shape.num_attention_heads and attn.blocks == shape.num_key_value_heads:
        queries = attn_units
        kv = sorted({h // g for h in queries})
    else:
        kv = attn_units
        queries = [j * g + q for j in kv for q in range(g)]
    return LayerPlan(queries, kv, channels)


def planned_param_count(adapter: ModelAdapter, plan: PrunePlan, dense_params: int) -> int:
    """Parameters after applying ``plan``, computed from group sizes (tests compare with the real count)."""
    removed = 0
    for layer, lp in enumerate(plan.layers):
        shape = adapter.layer_shape(layer)
        q_group = attention_group(adapter, layer, "query")
        kv_group = attention_group(adapter, layer, "kv-group")
        mlp = mlp_group(adapter, layer)
        removed_kv = shape.num_key_value_heads - len(lp.kv_heads)
        removed_q_inside = (shape.num_attention_heads - len(lp.query_heads)) - removed_kv * shape.queries_per_kv
        removed += removed_kv * kv_group.params_per_unit + removed_q_inside * q_group.params_per_unit
        removed += (shape.intermediate_size - len(lp.channels)) * mlp.params_per_unit
    return dense_params - removed


def count_params(model: torch.nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


def rate_summary(plan: PrunePlan, dense: list[LayerShape]) -> str:
    """One line over every layer: kept / dense totals of query heads, KV heads and MLP channels, the per-layer
    range, and how many layers changed, e.g. ``heads 270/405 kept (3-9 per layer), kv heads 90/135 (3 per
    layer), channels 12,345/46,080 (170-1,536 per layer) in 29 of 30 layers``.

    Layers differ under a global ranking, a depth profile or OBS, so no single layer describes the cut.
    """
    kept = plan.shapes()
    changed = sum(k != d for k, d in zip(kept, dense, strict=True))
    if not changed:
        return "nothing removed"

    def part(name: str, field_name: str, suffix: str = "") -> str:
        counts = [getattr(shape, field_name) for shape in kept]
        total = sum(getattr(shape, field_name) for shape in dense)
        low, high = min(counts), max(counts)
        spread = f"{low:,}" if low == high else f"{low:,}-{high:,}"
        return f"{name} {sum(counts):,}/{total:,}{suffix} ({spread} per layer)"

    parts = [
        part("heads", "num_attention_heads", " kept"),
        part("kv heads", "num_key_value_heads"),
        part("channels", "intermediate_size"),
    ]
    return f"{', '.join(parts)} in {changed} of {len(dense)} layers"


__all__ = [
    "Budget",
    "KeepCounts",
    "LayerPlan",
    "PrunePlan",
    "count_params",
    "default_layer_range",
    "parse_layer_range",
    "planned_param_count",
    "rate_summary",
    "solve_keep_counts",
]
