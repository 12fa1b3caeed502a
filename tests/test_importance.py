"""Metrics against naive references computed directly with autograd and explicit slicing."""

from __future__ import annotations

import pytest
import torch

from adapruner import AdaPrunerError
from adapruner.importance import aggregate, collect_statistics, get_metric, parse_mix, score_group, score_groups
from adapruner.importance.base import Statistics
from adapruner.importance.metrics import METRICS
from adapruner.models import attention_group, get_adapter, mlp_group
from conftest import make_tiny

SAMPLES = torch.randint(0, 97, (4, 12), generator=torch.Generator().manual_seed(3))


def module_context(model, samples=SAMPLES) -> dict[str, dict[str, torch.Tensor]]:
    """Per linear module, full-shape W, mean gradient G, Fisher F (per-sample loop), input norm/variance."""
    per_sample = []
    for i in range(samples.shape[0]):
        model.zero_grad()
        model(input_ids=samples[i : i + 1], labels=samples[i : i + 1]).loss.backward()
        per_sample.append({n: p.grad.clone() for n, p in model.named_parameters() if n.endswith("proj.weight")})
    model.zero_grad()
    inputs: dict[str, list[torch.Tensor]] = {}
    handles = [
        m.register_forward_hook(lambda mod, args, out, n=n: inputs.setdefault(n, []).append(args[0].detach()))
        for n, m in model.named_modules()
        if n.endswith("proj")
    ]
    with torch.no_grad():
        model(input_ids=samples)
    for h in handles:
        h.remove()
    ctx = {}
    for name, module in model.named_modules():
        if not name.endswith("proj"):
            continue
        grads = torch.stack([g[name + ".weight"] for g in per_sample])
        x = torch.cat(inputs[name]).reshape(-1, module.in_features)
        shape = module.weight.shape
        ctx[name] = {
            "w": module.weight.detach(),
            "g": grads.mean(0),
            "f": grads.pow(2).mean(0),
            "xn": x.pow(2).sum(0).sqrt().expand(shape),
            "xv": x.var(0, unbiased=False).expand(shape),
        }
    return ctx


def _cut(t: torch.Tensor, dim: int, sl: slice) -> torch.Tensor:
    return t[sl] if dim == 0 else t[:, sl]


def naive_unit_scores(ctx, layer: int, kind: str, fn, n_kv: int, g: int, d: int = 8) -> torch.Tensor:
    """Sum of fn over the member slices of each KV group (attention) or channel (MLP), by explicit slicing."""
    if kind == "attention":
        prefix = f"model.layers.{layer}.self_attn."
        units = [
            [
                ("q_proj", 0, slice(j * g * d, (j + 1) * g * d)),
                ("k_proj", 0, slice(j * d, (j + 1) * d)),
                ("v_proj", 0, slice(j * d, (j + 1) * d)),
                ("o_proj", 1, slice(j * g * d, (j + 1) * g * d)),
            ]
            for j in range(n_kv)
        ]
    else:
        prefix = f"model.layers.{layer}.mlp."
        units = [
            [("gate_proj", 0, slice(c, c + 1)), ("up_proj", 0, slice(c, c + 1)), ("down_proj", 1, slice(c, c + 1))]
            for c in range(40)
        ]
    return torch.stack(
        [
            sum(fn(**{k: _cut(v, dim, sl) for k, v in ctx[prefix + role].items()}) for role, dim, sl in unit)
            for unit in units
        ]
    )


REFERENCES = {
    "element1": lambda w, g, f, xn, xv: (w * g).abs().sum(),
    "element2": lambda w, g, f, xn, xv: (w * g - 0.5 * w * f * w).abs().sum(),
    "second": lambda w, g, f, xn, xv: (0.5 * w * f * w).sum(),
    "vector": lambda w, g, f, xn, xv: (w * g).sum().abs(),
    "l1": lambda w, g, f, xn, xv: w.abs().sum(),
    "l2": lambda w, g, f, xn, xv: w.pow(2).sum(),
    "wanda_sp": lambda w, g, f, xn, xv: (w.abs() * xn).sum(),
}


def _stats_for(model, metric, samples=SAMPLES, **kwargs):
    adapter = get_adapter(model)
    modules = adapter.projection_names(range(4))
    needs = get_metric(metric, mix={"l2": 0.5, "element1": 0.5}).needs
    return collect_statistics(model, samples, modules, needs, **kwargs)


@pytest.mark.parametrize("name", ["llama-gqa", "qwen2-gqa", "llama-mha"])
@pytest.mark.parametrize("metric", sorted(REFERENCES))
def test_metric_matches_naive_reference(name, metric):
    model = make_tiny(name)
    adapter = get_adapter(model)
    ctx = module_context(model)
    stats = _stats_for(model, metric, batch_size=3)  # batches of 3 + 1 must add up exactly
    shape = adapter.layer_shape(1)
    for layer in (1, 2):
        attn = score_group(model, attention_group(adapter, layer, "kv-group"), get_metric(metric), stats)
        mlp = score_group(model, mlp_group(adapter, layer), get_metric(metric), stats)
        ref = {
            kind: naive_unit_scores(
                ctx, layer, kind, REFERENCES[metric], shape.num_key_value_heads, shape.queries_per_kv
            )
            for kind in ("attention", "mlp")
        }
        torch.testing.assert_close(attn, ref["attention"].float(), rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(mlp, ref["mlp"].float(), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("metric", sorted(METRICS))
def test_every_registered_metric_gives_one_finite_score_per_unit(metric):
    """The protocol every entry of METRICS keeps (a new metric class is checked here as soon as it is
    listed): one finite score per unit of both kinds, on GQA and MHA, from the statistics it declares."""
    for name in ("llama-gqa", "llama-mha"):
        model = make_tiny(name)
        adapter = get_adapter(model)
        groups = [g for i in (1, 2) for g in (attention_group(adapter, i, "kv-group"), mlp_group(adapter, i))]
        importance = get_metric(metric, mix={"l2": 0.5, "element1": 0.5})
        scores = score_groups(model, groups, importance, _stats_for(model, metric))
        for group in groups:
            values = scores[(group.layer, group.kind)]
            assert values.shape == (group.num_units,) and torch.isfinite(values).all(), (name, group.kind)


def test_flap_matches_naive_reference():
    """Var(X_j) * ||W[:, j]||^2 on o_proj/down_proj columns, standardised per kind across layers."""
    model = make_tiny("llama-gqa")
    adapter = get_adapter(model)
    ctx = module_context(model)
    groups = [g for i in (1, 2) for g in (attention_group(adapter, i, "kv-group"), mlp_group(adapter, i))]
    scores = score_groups(model, groups, get_metric("flap"), _stats_for(model, "flap"))
    raw = {}
    for layer in (1, 2):
        o = ctx[f"model.layers.{layer}.self_attn.o_proj"]
        down = ctx[f"model.layers.{layer}.mlp.down_proj"]
        per_col_o = (o["xv"][0] * o["w"].pow(2).sum(0)).view(2, 24).sum(1)  # 2 KV groups x (3 heads x 8)
        raw[(layer, "attention")] = per_col_o
        raw[(layer, "mlp")] = down["xv"][0] * down["w"].pow(2).sum(0)
    for kind in ("attention", "mlp"):
        allv = torch.cat([raw[(i, kind)] for i in (1, 2)])
        for layer in (1, 2):
            expected = (raw[(layer, kind)] - allv.mean()) / allv.std()
            torch.testing.assert_close(scores[(layer, kind)], expected, rtol=1e-4, atol=1e-5)


def test_mix_is_weighted_sum_of_mean_normalised_scores():
    model = make_tiny("qwen2-gqa")
    adapter = get_adapter(model)
    groups = [mlp_group(adapter, i) for i in (1, 2)]
    stats = _stats_for(model, "element1")
    l1 = score_groups(model, groups, get_metric("l1"), stats)
    e1 = score_groups(model, groups, get_metric("element1"), stats)
    mixed = score_groups(model, groups, get_metric("mix", mix={"l1": 0.25, "element1": 0.75}), stats)
    l1_mean = torch.cat(list(l1.values())).mean()
    e1_mean = torch.cat(list(e1.values())).mean()
    for key in mixed:
        torch.testing.assert_close(mixed[key], 0.25 * l1[key] / l1_mean + 0.75 * e1[key] / e1_mean)


@pytest.mark.parametrize("metric", ["vector", "second", "wanda_sp", "flap"])
def test_cached_subset_scores_equal_scores_from_scratch(metric):
    """Per-sample statistics gathered once give any subset's scores without touching the model again."""
    model = make_tiny("llama-gqa")
    adapter = get_adapter(model)
    groups = [g for i in (1, 2) for g in (attention_group(adapter, i, "query"), mlp_group(adapter, i))]
    modules = adapter.projection_names(range(4))
    pool = collect_statistics(model, SAMPLES, modules, {"unit_sums", "activations"})
    subset = [0, 2, 3]
    cached = score_groups(model, groups, get_metric(metric), pool.select(subset))
    fresh_stats = collect_statistics(model, SAMPLES[subset], modules, get_metric(metric).needs)
    fresh = score_groups(model, groups, get_metric(metric), fresh_stats)
    for key in fresh:
        torch.testing.assert_close(cached[key], fresh[key], rtol=1e-4, atol=1e-6)


def test_mix_needs_a_positive_weight():
    with pytest.raises(AdaPrunerError, match="positive weight"):
        get_metric("mix", mix={"l1": 0.0})
    with pytest.raises(AdaPrunerError, match="unknown component"):
        get_metric("mix", mix={"taylor": 1.0})
    assert parse_mix("element1=0.7, wanda_sp=0.3") == {"element1": 0.7, "wanda_sp": 0.3}


def test_gradient_collection_restores_requires_grad():
    model = make_tiny("llama-gqa")
    collect_statistics(model, SAMPLES, ["model.layers.0.mlp.up_proj"], {"grad", "fisher", "activations"})
    assert all(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())


def test_aggregations():
    member_scores = [torch.tensor([1.0, 4.0]), torch.tensor([2.0, 3.0]), torch.tensor([5.0, 0.5])]
    expected = {"sum": [8.0, 7.5], "mean": [8 / 3, 2.5], "max": [5.0, 4.0], "prod": [10.0, 6.0], "last": [5.0, 0.5]}
    for how, values in expected.items():
        torch.testing.assert_close(aggregate(member_scores, how), torch.tensor(values))
    with pytest.raises(AdaPrunerError, match="unknown aggregation"):
        aggregate(member_scores, "median")


def test_unknown_metric_lists_choices():
    with pytest.raises(AdaPrunerError, match="element1"):
        get_metric("taylor")


def test_random_metric_is_seeded():
    model = make_tiny("llama-mha")
    group = mlp_group(get_adapter(model), 0)
    a = score_group(model, group, get_metric("random", seed=1), Statistics())
    b = score_group(model, group, get_metric("random", seed=1), Statistics())
    assert torch.equal(a, b)


def test_nan_scores_are_reported():
    model = make_tiny("llama-mha")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("inf")
    with pytest.raises(AdaPrunerError, match="bfloat16 or float32"):
        score_group(model, mlp_group(get_adapter(model), 0), get_metric("l2"), Statistics())


def test_per_kind_metric_scores_each_kind_with_its_own_metric():
    from adapruner.importance.metrics import PerKind
    from adapruner.recipe import Recipe

    model = make_tiny("llama-gqa")
    adapter = get_adapter(model)
    groups = [g for i in (1, 2) for g in (attention_group(adapter, i, "query"), mlp_group(adapter, i))]
    stats = _stats_for(model, "element1")
    metric = Recipe(model="", ratio=0.2, metric="element1", attention_metric="l2").build_metric()
    assert isinstance(metric, PerKind) and metric.needs == frozenset({"grad"})
    scores = score_groups(model, groups, metric, stats)
    l2 = score_groups(model, groups, get_metric("l2"), stats)
    e1 = score_groups(model, groups, get_metric("element1"), stats)
    for (layer, kind), value in scores.items():
        torch.testing.assert_close(value, (l2 if kind == "attention" else e1)[(layer, kind)])
    assert not isinstance(Recipe(model="", ratio=0.2, attention_metric="element1").build_metric(), PerKind)
