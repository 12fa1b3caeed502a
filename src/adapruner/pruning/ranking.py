"""Scores + keep counts -> plan: which units each ranking keeps (per layer, per kind across layers, or
FLAP's one list across kinds and layers), and the offsets that keep the allocation knobs meaningful when
units compete across layers."""

from __future__ import annotations

import math

import torch

from ..errors import AdaPrunerError
from ..models.base import ModelAdapter
from ..models.groups import HeadMode, attention_group, mlp_group
from .plan import Budget, KeepCounts, PrunePlan, depth_profile, layer_plan

Scores = dict[tuple[int, str], torch.Tensor]


RANKINGS: tuple[str, ...] = ("layer", "global", "global-all")


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
        keep = global_keep_counts(adapter, scores, keep, head_mode, align)
    elif ranking == "global-all":
        keep = joint_keep_counts(adapter, scores, keep, head_mode, align)
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


def global_keep_counts(
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


def joint_keep_counts(
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
