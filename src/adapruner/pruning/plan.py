"""PrunePlan: the single decision object (kept heads and channels per layer).

The search produces plans, masks and physical removal consume them, ``adapruner.json`` records them.
``Budget`` turns a whole-model ratio into per-layer keep counts; ``plan_from_scores`` picks which
units to keep.
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


# -- scores + keep counts -> plan -----------------------------------------------------------


def _top_units(scores: torch.Tensor, keep: int, blocks: int) -> list[int]:
    """Highest-scoring units, an equal number from each block (ties broken by lower index)."""
    per_block = keep // blocks
    block_len = scores.numel() // blocks
    kept: list[int] = []
    for b in range(blocks):
        block = scores[b * block_len : (b + 1) * block_len].double()
        order = sorted(range(block_len), key=lambda i: (-float(block[i]), i))
        kept += [b * block_len + i for i in order[:per_block]]
    return sorted(kept)


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


Scores = dict[tuple[int, str], torch.Tensor]

RANKINGS: tuple[str, ...] = ("layer", "global", "global-all")


def plan_from_scores(
    adapter: ModelAdapter,
    scores: Scores,
    keep: KeepCounts,
    head_mode: HeadMode,
    align: int = 1,
    ranking: str = "layer",
) -> PrunePlan:
    """Keep the top-scoring units of each pruned layer; layers outside the range stay whole.

    ``ranking``:

    * ``layer``: each pruned layer keeps the counts of ``keep`` (its top-scoring units);
    * ``global``: the per-kind totals of ``keep`` are kept but redistributed across layers: units of
      one kind compete across all pruned layers on their scores;
    * ``global-all``: FLAP's "AL-AM" structure: attention units and MLP channels of all pruned layers
      compete in one list, lowest score first, each removal costing its parameters, until
      ``keep.target_removed`` parameters are gone (the counts of ``keep`` only name the pruned layers).
      The scores of both kinds must be comparable (``wifv``/``flap`` standardise them).

    Every ranking keeps at least one unit per block (attention) and one channel (MLP) in every layer.
    """
    if ranking == "global":
        keep = _global_keep_counts(adapter, scores, keep, head_mode, align)
    elif ranking == "global-all":
        keep = _joint_keep_counts(adapter, scores, keep, head_mode, align)
    elif ranking != "layer":
        raise AdaPrunerError(f"unknown ranking '{ranking}': choose one of {', '.join(RANKINGS)}")
    plan = PrunePlan.keep_all(adapter)
    for layer, counts in enumerate(keep.counts):
        if counts is None:
            continue
        attn = attention_group(adapter, layer, head_mode)
        units = _top_units(scores[(layer, "attention")], counts[0], attn.blocks)
        channels = _top_units(scores[(layer, "mlp")], counts[1], 1)
        plan.layers[layer] = layer_plan(adapter.layer_shape(layer), attn, units, channels)
    plan.validate(adapter)
    return plan


def _removal_steps(scores: torch.Tensor, blocks: int, step: int) -> list[float]:
    """Cost of each successive removal step in one layer: the next-lowest unit of every block (summed).

    Steps are non-decreasing, so taking the cheapest steps globally always takes a prefix per layer.
    At least one unit per block (``step`` channels for MLP) always stays.
    """
    block_len = scores.numel() // blocks
    ordered = scores.double().view(blocks, block_len).sort(dim=1).values.sum(0)  # k-th lowest, summed
    if step > 1:
        usable = (block_len - 1) // step * step
        return ordered[:usable].view(-1, step).sum(1).tolist()
    return ordered[: block_len - 1].tolist()


def _global_keep_counts(
    adapter: ModelAdapter, scores: Scores, keep: KeepCounts, head_mode: HeadMode, align: int
) -> KeepCounts:
    layers = [i for i, c in enumerate(keep.counts) if c is not None]
    counts = {i: list(keep.counts[i]) for i in layers}
    for slot, kind in enumerate(("attention", "mlp")):
        steps: list[tuple[float, int, int]] = []
        removed_units = 0
        for layer in layers:
            group = attention_group(adapter, layer, head_mode) if kind == "attention" else mlp_group(adapter, layer)
            size = group.blocks if kind == "attention" else align
            blocks = group.blocks if kind == "attention" else 1
            steps += [
                (cost, layer, k)
                for k, cost in enumerate(
                    _removal_steps(scores[(layer, kind)], blocks, 1 if kind == "attention" else size)
                )
            ]
            removed_units += group.num_units - keep.counts[layer][slot]
            counts[layer][slot] = group.num_units
        budget = round(removed_units / size)
        for _, layer, _ in sorted(steps)[:budget]:
            counts[layer][slot] -= size
    per_layer = [tuple(counts[i]) if i in counts else None for i in range(len(keep.counts))]
    return KeepCounts(per_layer, keep.rate, keep.removed_params, keep.total_params)


def _joint_keep_counts(
    adapter: ModelAdapter, scores: Scores, keep: KeepCounts, head_mode: HeadMode, align: int
) -> KeepCounts:
    """Remove the lowest-scoring removal steps of both kinds, across layers, until the parameter target.

    A step is the next unit of every block (attention) or the next ``align`` channels (MLP); it is
    ranked by the mean score of its units and costs their parameters. Steps of one layer and kind have
    non-decreasing scores, so each layer loses a prefix of its ranking. The walk stops at the step count
    whose removed parameters are closest to the target (FLAP's threshold on the cumulative size).
    """
    target = keep.target_removed if keep.target_removed is not None else keep.removed_params
    counts: dict[int, list[int]] = {}
    steps: list[tuple[float, int, int, int, int, int]] = []  # (score, layer, slot, step, units, params)
    for layer in (i for i, c in enumerate(keep.counts) if c is not None):
        attn, mlp = attention_group(adapter, layer, head_mode), mlp_group(adapter, layer)
        counts[layer] = [attn.num_units, mlp.num_units]
        for slot, group, blocks, size in ((0, attn, attn.blocks, 1), (1, mlp, 1, align)):
            units = blocks * size  # units one step removes
            for k, total in enumerate(_removal_steps(scores[(layer, group.kind)], blocks, size)):
                steps.append((total / units, layer, slot, k, units, units * group.params_per_unit))
    max_removed = sum(step[5] for step in steps)
    if max_removed < target:
        raise AdaPrunerError(
            f"ratio {target / keep.total_params:.3f} cannot be reached inside the pruned layers (at most "
            f"{max_removed / keep.total_params:.3f} with one unit left per block): widen --layers"
        )
    removed = 0
    for _, layer, slot, _, units, params in sorted(steps):
        if abs(removed + params - target) >= abs(removed - target):
            break
        removed += params
        counts[layer][slot] -= units
    per_layer = [tuple(counts[i]) if i in counts else None for i in range(len(keep.counts))]
    return KeepCounts(per_layer, keep.rate, removed, keep.total_params, target)


LOCKED = 1e6  # offset (in spreads) that keeps a unit out of the cross-layer ranking: attention_scale 0


def allocation_offsets(scores: Scores, budget: Budget, ranking: str) -> Scores:
    """Scores shifted so that the allocation knobs keep their meaning when units compete across layers.

    With ``layer`` ranking the depth profile and the attention scale set each layer's keep counts. With
    ``global`` (units of a kind across layers) and ``global-all`` (everything in one list) the counts
    come from the scores, so the knobs act on the scores instead: a unit whose layer (and kind) the
    knobs ask to cut ``w`` times as much as average loses ``log(w)`` robust spreads of its kind's scores
    (1.4826 x the median absolute deviation), i.e. it is removed earlier. ``w`` is the depth profile's
    weight, times ``attention_scale`` for heads under ``global-all`` (under ``global`` the scale already
    fixes how many heads go); a scale of 0 keeps attention whole. Neutral knobs (1, 0, 0) change nothing,
    so FLAP's ranking stays FLAP's.
    """
    neutral_depth = budget.depth_slope == 0.0 and budget.depth_bend == 0.0
    if ranking == "layer" or (neutral_depth and (ranking == "global" or budget.attention_scale == 1.0)):
        return scores
    start, end = budget.layers or (min(k[0] for k in scores), max(k[0] for k in scores) + 1)
    profile = depth_profile(end - start, budget.depth_slope, budget.depth_bend)
    spread = {}
    for kind in {k for _, k in scores}:
        values = torch.cat([v.double() for (_, k), v in scores.items() if k == kind])
        mad = (values - values.median()).abs().median()
        spread[kind] = float(1.4826 * mad) or float(values.std()) or 1.0
    shifted: Scores = {}
    for (layer, kind), value in scores.items():
        weight = profile[layer - start] if start <= layer < end else 1.0
        if kind == "attention" and ranking == "global-all":
            weight *= budget.attention_scale
        offset = LOCKED if weight <= 0 else -math.log(weight)
        shifted[(layer, kind)] = value + offset * spread[kind]
    return shifted


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
    "RANKINGS",
    "Budget",
    "KeepCounts",
    "LayerPlan",
    "PrunePlan",
    "allocation_offsets",
    "count_params",
    "default_layer_range",
    "parse_layer_range",
    "plan_from_scores",
    "planned_param_count",
    "rate_summary",
    "solve_keep_counts",
]
