"""Masked model == physically pruned model, and parameter counts match the plan, for every adapter."""

from __future__ import annotations

import copy

import pytest
import torch

from adapruner.models import attention_group, get_adapter, mlp_group
from adapruner.pruning import Budget, masked, plan_from_scores, prune_physically, solve_keep_counts
from adapruner.pruning.plan import count_params, planned_param_count


def random_plan(model, ratio: float, head_mode: str, seed: int = 0):
    adapter = get_adapter(model)
    keep = solve_keep_counts(adapter, Budget(ratio, (0, adapter.num_layers), head_mode=head_mode), count_params(model))
    gen = torch.Generator().manual_seed(seed)
    scores = {}
    for layer in range(adapter.num_layers):
        scores[(layer, "attention")] = torch.rand(attention_group(adapter, layer, head_mode).num_units, generator=gen)
        scores[(layer, "mlp")] = torch.rand(mlp_group(adapter, layer).num_units, generator=gen)
    return plan_from_scores(adapter, scores, keep, head_mode), keep


@pytest.mark.parametrize("head_mode", ["auto", "kv-group", "query"])
def test_masked_equals_physical(tiny_model, tokens, head_mode):
    plan, _ = random_plan(tiny_model, 0.3, head_mode)
    adapter = get_adapter(tiny_model)
    dense = tiny_model(tokens).logits
    with masked(adapter, plan):
        masked_logits = tiny_model(tokens).logits
    assert torch.equal(tiny_model(tokens).logits, dense), "masks must be removed after the block"
    assert not torch.allclose(masked_logits, dense, atol=1e-4), "the plan must change the model"
    pruned = copy.deepcopy(tiny_model)
    prune_physically(get_adapter(pruned), plan)
    torch.testing.assert_close(pruned(tokens).logits, masked_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("head_mode", ["auto", "kv-group", "query"])
def test_param_count_matches_plan(tiny_model, head_mode):
    dense = count_params(tiny_model)
    plan, keep = random_plan(tiny_model, 0.3, head_mode)
    adapter = get_adapter(tiny_model)
    expected = planned_param_count(adapter, plan, dense)
    prune_physically(adapter, plan)
    assert count_params(tiny_model) == expected == dense - keep.removed_params
    assert get_adapter(tiny_model).layer_shapes() == plan.shapes()


def test_generate_after_pruning_uses_cache(tokens):
    from conftest import make_tiny

    model = make_tiny("llama-gqa")
    plan, _ = random_plan(model, 0.3, "query")
    prune_physically(get_adapter(model), plan)
    out = model.generate(tokens[:1, :5], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9)


def test_query_heads_follow_repeat_kv_layout():
    """Zeroing KV head j's values silences exactly query heads j*g..(j+1)*g-1 (transformers' layout)."""
    from conftest import make_tiny

    model = make_tiny("llama-gqa")  # 6 query heads, 2 KV heads -> g = 3
    adapter = get_adapter(model)
    d, g = adapter.head_dim, 3
    attn = adapter.layer(0)
    captured = {}
    attn.o_proj.register_forward_pre_hook(lambda _m, args: captured.setdefault("x", args[0].detach()))
    with torch.no_grad():
        attn.v_proj.weight[d : 2 * d] = 0  # KV head 1
    model(torch.arange(10).view(1, 10))
    per_head = captured["x"].view(1, 10, 6, d).abs().sum(dim=(0, 1, 3))
    assert torch.all(per_head[g:] == 0) and torch.all(per_head[:g] > 0)
    group = attention_group(adapter, 0, "kv-group")
    q_member = next(m for m in group.members if m.role == "q_proj")
    assert q_member.indices[1].tolist() == list(range(g * d, 2 * g * d))


def test_budget_meets_ratio_closely():
    from conftest import make_tiny

    model = make_tiny("llama-gqa", layers=6)
    adapter = get_adapter(model)
    total = count_params(model)
    keep = solve_keep_counts(adapter, Budget(0.2, (1, 5), attention_scale=0.0), total)
    assert abs(keep.achieved_ratio - 0.2) < 0.01
    assert keep.counts[0] is None and keep.counts[5] is None
    assert all(c[0] == 6 for c in keep.counts[1:5])  # attention_scale 0 leaves heads whole


def test_align_multiple():
    from conftest import make_tiny

    model = make_tiny("llama-mha")
    adapter = get_adapter(model)
    keep = solve_keep_counts(adapter, Budget(0.2, (0, 4), align=8), count_params(model))
    assert all(c[1] % 8 == 0 for c in keep.counts)


@pytest.mark.parametrize("head_mode", ["kv-group", "query"])
def test_global_ranking_moves_cuts_to_low_scoring_layers(head_mode):
    from conftest import make_tiny

    model = make_tiny("mistral-gqa", layers=6)  # 8 query heads, 2 KV heads, 40 channels
    adapter = get_adapter(model)
    keep = solve_keep_counts(adapter, Budget(0.25, (1, 5), head_mode=head_mode), count_params(model))
    scores = {}
    for layer in range(1, 5):  # layer 2 is unimportant everywhere, layer 4 is precious
        scale = {2: 0.01, 4: 100.0}.get(layer, 1.0)
        scores[(layer, "attention")] = torch.rand(attention_group(adapter, layer, head_mode).num_units) * scale
        scores[(layer, "mlp")] = torch.rand(40) * scale
    local = plan_from_scores(adapter, scores, keep, head_mode)
    ranked = plan_from_scores(adapter, scores, keep, head_mode, ranking="global")
    removed = [
        sum(d - k for d, k in zip(full, kept, strict=True))
        for full, kept in (
            (adapter.layer_shape(i).to_dict().values(), p.shape.to_dict().values()) for i, p in enumerate(ranked.layers)
        )
    ]
    assert removed[2] == max(removed) > removed[1] and removed[4] == min(removed[1:5]) < removed[1]
    # same totals per kind as per-layer ranking, so the same parameter count
    dense = count_params(model)
    assert planned_param_count(adapter, ranked, dense) == planned_param_count(adapter, local, dense)
    pruned = copy.deepcopy(model)
    prune_physically(get_adapter(pruned), ranked)
    tokens = torch.randint(0, 97, (2, 12))
    with masked(adapter, ranked):
        torch.testing.assert_close(pruned(tokens).logits, model(tokens).logits, atol=1e-5, rtol=1e-5)


def test_depth_profile_is_smooth_positive_and_mean_one():
    from adapruner.pruning.plan import depth_profile

    flat = depth_profile(6)
    assert flat == pytest.approx([1.0] * 6)
    rising = depth_profile(6, slope=1.0)
    assert sum(rising) / 6 == pytest.approx(1.0) and all(w > 0 for w in rising)
    assert rising == sorted(rising) and rising[-1] / rising[0] == pytest.approx(torch.e**2, rel=1e-6)
    bowl = depth_profile(5, bend=1.0)
    assert bowl[0] == pytest.approx(bowl[-1]) and min(bowl) == bowl[2]
    assert depth_profile(1, slope=3.0) == [1.0]


@pytest.mark.parametrize("slope", [1.5, -1.5])
def test_depth_slope_moves_the_cut_along_depth_and_keeps_the_ratio(slope):
    from conftest import make_tiny

    model = make_tiny("llama-mha", layers=6)
    adapter = get_adapter(model)
    total = count_params(model)
    uniform = solve_keep_counts(adapter, Budget(0.2, (0, 6)), total)
    tilted = solve_keep_counts(adapter, Budget(0.2, (0, 6), depth_slope=slope), total)
    assert abs(tilted.achieved_ratio - 0.2) < 0.015 and abs(uniform.achieved_ratio - 0.2) < 0.015
    channels = [c[1] for c in tilted.counts]
    assert channels == sorted(channels, reverse=slope > 0)  # slope > 0 cuts deeper layers more
    assert channels[0] != channels[-1]
    assert len({c[1] for c in uniform.counts}) == 1


def test_depth_parameters_out_of_range_are_refused():
    from adapruner import AdaPrunerError

    with pytest.raises(AdaPrunerError, match="depth-slope"):
        Budget(0.2, depth_slope=9.0)


def test_rate_summary_totals_every_layer():
    """The pruned: line sums over all layers: the first changed layer alone (old summary) misleads when
    layers keep different counts, as under a global ranking or OBS."""
    from adapruner.models.base import LayerShape
    from adapruner.pruning.plan import LayerPlan, PrunePlan, rate_summary

    dense = [LayerShape(9, 3, 1536)] * 4
    plan = PrunePlan(
        [
            LayerPlan(list(range(9)), [0, 1, 2], list(range(1536))),  # untouched
            LayerPlan(list(range(9)), [0, 1, 2], list(range(1488))),  # the old summary described only this one
            LayerPlan([0, 1, 2], [0], list(range(170))),
            LayerPlan([0, 3, 6], [0, 1, 2], list(range(1200))),
        ],
        64,
    )
    assert rate_summary(plan, dense) == (
        "heads 24/36 kept (3-9 per layer), kv heads 10/12 (1-3 per layer), "
        "channels 4,394/6,144 (170-1,536 per layer) in 3 of 4 layers"
    )
    assert rate_summary(PrunePlan([LayerPlan([0, 3], [0, 1], [0])] * 2, 64), [LayerShape(4, 2, 8)] * 2) == (
        "heads 4/8 kept (2 per layer), kv heads 4/4 (2 per layer), channels 2/16 (1 per layer) in 2 of 2 layers"
    )
    whole = PrunePlan([LayerPlan(list(range(9)), [0, 1, 2], list(range(1536)))] * 4, 64)
    assert rate_summary(whole, dense) == "nothing removed"
