"""Metrics against naive references computed directly with autograd and explicit slicing."""

from __future__ import annotations

import pytest
import torch

from adapruner import AdaPrunerError
from adapruner.importance import aggregate, collect_gradients, get_metric, score_group
from adapruner.importance.base import Statistics
from adapruner.models import attention_group, get_adapter, mlp_group
from conftest import make_tiny

SAMPLES = torch.randint(0, 97, (4, 12), generator=torch.Generator().manual_seed(3))


def naive_gradients(model) -> dict[str, torch.Tensor]:
    """Plain full backward of the mean loss over all samples at once."""
    model.zero_grad()
    model(input_ids=SAMPLES, labels=SAMPLES).loss.backward()
    grads = {n.removesuffix(".weight"): p.grad.clone() for n, p in model.named_parameters() if n.endswith("weight")}
    model.zero_grad()
    return grads


def naive_head_scores(model, layer: int, grads, fn) -> torch.Tensor:
    """Per KV group: fn over q rows of its query heads, k/v rows of the KV head, o columns of the queries."""
    attn = model.model.layers[layer].self_attn
    d, n_kv = 8, attn.k_proj.out_features // 8
    g = attn.q_proj.out_features // d // n_kv
    prefix = f"model.layers.{layer}.self_attn."
    scores = []
    for j in range(n_kv):
        q = slice(j * g * d, (j + 1) * g * d)
        kv = slice(j * d, (j + 1) * d)
        total = fn(attn.q_proj.weight[q], grads[prefix + "q_proj"][q])
        total += fn(attn.k_proj.weight[kv], grads[prefix + "k_proj"][kv])
        total += fn(attn.v_proj.weight[kv], grads[prefix + "v_proj"][kv])
        total += fn(attn.o_proj.weight[:, q], grads[prefix + "o_proj"][:, q])
        scores.append(total)
    return torch.stack(scores).detach()


def naive_channel_scores(model, layer: int, grads, fn) -> torch.Tensor:
    mlp = model.model.layers[layer].mlp
    prefix = f"model.layers.{layer}.mlp."
    return torch.stack(
        [
            fn(mlp.gate_proj.weight[c], grads[prefix + "gate_proj"][c])
            + fn(mlp.up_proj.weight[c], grads[prefix + "up_proj"][c])
            + fn(mlp.down_proj.weight[:, c], grads[prefix + "down_proj"][:, c])
            for c in range(mlp.gate_proj.out_features)
        ]
    ).detach()


REFERENCES = {
    "element1": lambda w, g: (w * g).abs().sum(),
    "l1": lambda w, g: w.abs().sum(),
    "l2": lambda w, g: w.pow(2).sum(),
}


@pytest.mark.parametrize("name", ["llama-gqa", "qwen2-gqa", "llama-mha"])
@pytest.mark.parametrize("metric", sorted(REFERENCES))
def test_metric_matches_naive_reference(name, metric):
    model = make_tiny(name)
    adapter = get_adapter(model)
    grads = naive_gradients(model)
    modules = [n for i in range(4) for n in adapter.prunable_module_names(i).values()]
    stats = collect_gradients(model, SAMPLES, modules, batch_size=3)  # batches of 3+1 must add up exactly
    for layer in (1, 2):
        attn = score_group(model, attention_group(adapter, layer, "kv-group"), get_metric(metric), stats)
        mlp = score_group(model, mlp_group(adapter, layer), get_metric(metric), stats)
        torch.testing.assert_close(
            attn, naive_head_scores(model, layer, grads, REFERENCES[metric]), rtol=1e-4, atol=1e-7
        )
        torch.testing.assert_close(
            mlp, naive_channel_scores(model, layer, grads, REFERENCES[metric]), rtol=1e-4, atol=1e-7
        )


def test_gradient_collection_restores_requires_grad():
    model = make_tiny("llama-gqa")
    collect_gradients(model, SAMPLES, ["model.layers.0.mlp.up_proj"])
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
