"""Calibration pools, their selection helpers, and the on-disk statistics cache."""

from __future__ import annotations

import pytest
import torch

from adapruner import AdaPrunerError
from adapruner.data.pool import CalibrationPool
from adapruner.importance import collect_statistics, get_metric, score_groups
from adapruner.importance.cache import StatisticsCache
from adapruner.models import attention_group, get_adapter, mlp_group
from conftest import make_tiny


def tiny_pool(n_per_source: int = 4, seq_len: int = 12) -> CalibrationPool:
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 97, (2 * n_per_source, seq_len), generator=gen)
    sources = ["books"] * n_per_source + ["wiki"] * n_per_source
    return CalibrationPool(ids, sources, seq_len, seed=0, stats={"tokens": torch.full((2 * n_per_source,), 12.0)})


def setup(name: str = "llama-gqa"):
    model = make_tiny(name)
    adapter = get_adapter(model)
    modules = adapter.projection_names((1, 2))
    groups = [g for i in (1, 2) for g in (attention_group(adapter, i, "query"), mlp_group(adapter, i))]
    return model, modules, groups


@pytest.mark.parametrize("metric", ["element1", "element2", "vector", "second", "wanda_sp", "flap", "l2"])
def test_cache_scores_equal_scratch_for_any_subset(tmp_path, metric):
    model, modules, groups = setup()
    pool = tiny_pool()
    cache = StatisticsCache(model, pool, modules, directory=tmp_path)
    subset = pool.select(3, sources=["wiki"], seed=1)
    cached = score_groups(model, groups, get_metric(metric), cache.statistics_for(subset, get_metric(metric)))
    fresh_stats = collect_statistics(model, pool.input_ids[subset], modules, get_metric(metric).needs)
    fresh = score_groups(model, groups, get_metric(metric), fresh_stats)
    for key in fresh:
        torch.testing.assert_close(cached[key], fresh[key], rtol=1e-4, atol=1e-6)


def test_per_sample_stats_and_disk_reuse(tmp_path, monkeypatch):
    model, modules, _ = setup()
    pool = tiny_pool()
    StatisticsCache(model, pool, modules, directory=tmp_path).per_sample()
    assert set(pool.stats) == {"tokens", "loss", "grad_norm"}
    # each sample's loss is the dense model's own loss on it
    with torch.no_grad():
        expected = model(input_ids=pool.input_ids[:1], labels=pool.input_ids[:1]).loss
    torch.testing.assert_close(pool.stats["loss"][0], expected)
    assert (pool.stats["grad_norm"] > 0).all()
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1

    import adapruner.importance.cache as cache_module

    def fail(*_a, **_k):
        raise AssertionError("the cache must be reused, not recomputed")

    monkeypatch.setattr(cache_module, "collect_statistics", fail)
    again = StatisticsCache(model, tiny_pool(), modules, directory=tmp_path).per_sample()
    assert again.num_samples == 8


def test_cache_of_another_model_or_pool_is_not_reused(tmp_path):
    model, modules, _ = setup()
    first = StatisticsCache(model, tiny_pool(), modules, directory=tmp_path)
    first.per_sample()
    other_model = make_tiny("llama-gqa", seed=1)
    assert StatisticsCache(other_model, tiny_pool(), modules, directory=tmp_path).path != first.path
    assert StatisticsCache(model, tiny_pool(n_per_source=3), modules, directory=tmp_path).path != first.path
    # a file renamed into place for the wrong model is detected by its fingerprints and recomputed
    second = StatisticsCache(other_model, tiny_pool(), modules, directory=tmp_path)
    first.path.rename(second.path)
    stats = second.per_sample()
    fresh = collect_statistics(other_model, tiny_pool().input_ids, modules, {"unit_sums"})
    torch.testing.assert_close(stats.unit_wg[modules[0]], fresh.unit_wg[modules[0]])


def test_damaged_cache_is_recomputed(tmp_path):
    model, modules, _ = setup()
    cache = StatisticsCache(model, tiny_pool(), modules, directory=tmp_path)
    cache.path.parent.mkdir(parents=True, exist_ok=True)
    cache.path.write_bytes(b"not a safetensors file")
    assert cache.per_sample().num_samples == 8


def test_selection_helpers():
    pool = tiny_pool()
    pool.stats["loss"] = torch.arange(8, dtype=torch.float32)
    assert pool.quantile_window("loss", 0.2, 0.6) == [2, 3, 4]
    assert pool.by_sources({"books": 2, "wiki": 1}, seed=3)[:2] == sorted(pool.by_sources({"books": 2}, seed=3))
    assert len(pool.select(2, sources=["wiki"], window=("loss", 0.0, 0.5), seed=0)) == 2
    assert all(pool.sources[i] == "wiki" for i in pool.select(3, sources=["wiki"]))
    assert pool.random_subset(5, seed=1) == pool.random_subset(5, seed=1) != pool.random_subset(5, seed=2)
    with pytest.raises(AdaPrunerError, match="offers only 4 samples"):
        pool.select(5, sources=["books"])
    with pytest.raises(AdaPrunerError, match="no 'news' samples"):
        pool.by_sources({"news": 1})
    with pytest.raises(AdaPrunerError, match="no per-sample statistic 'grad_norm'"):
        pool.quantile_window("grad_norm", 0.1, 0.5)
    with pytest.raises(AdaPrunerError, match="quantile window"):
        pool.quantile_window("loss", 0.6, 0.2)
    assert pool.fingerprint != tiny_pool(n_per_source=3).fingerprint


def test_bf16_model_gets_fp32_statistics():
    model, modules, groups = setup()
    model = model.to(torch.bfloat16)
    stats = collect_statistics(model, tiny_pool().input_ids[:3], modules, {"grad", "fisher", "activations"})
    assert all(v.dtype == torch.float32 for v in stats.grads.values())
    scores = score_groups(model, groups, get_metric("element2"), stats)
    assert all(torch.isfinite(v).all() and v.dtype == torch.float32 for v in scores.values())


@pytest.mark.parametrize("metric", ["element1", "vector"])
def test_one_step_lean_pass_equals_accumulated_gradients(metric):
    """With all samples in one batch no per-element gradient is kept; scores must not change."""
    model, modules, groups = setup("qwen2-gqa")
    samples = tiny_pool().input_ids[:4]
    lean = collect_statistics(model, samples, modules, {"grad"}, batch_size=4)
    assert not lean.grads and lean.unit_abs_wg
    accumulated = collect_statistics(model, samples, modules, {"grad"}, batch_size=1)
    assert accumulated.grads and not accumulated.unit_abs_wg
    a = score_groups(model, groups, get_metric(metric), lean)
    b = score_groups(model, groups, get_metric(metric), accumulated)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)


def test_gradient_checkpointing_gives_the_same_statistics():
    model, modules, _ = setup()
    samples = tiny_pool().input_ids[:3]
    plain = collect_statistics(model, samples, modules, {"grad", "fisher"})
    checkpointed = collect_statistics(model, samples, modules, {"grad", "fisher"}, checkpointing=True)
    assert not model.training and not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    for name in modules:
        torch.testing.assert_close(checkpointed.grads[name], plain.grads[name])
        torch.testing.assert_close(checkpointed.fisher[name], plain.fisher[name])


@pytest.mark.parametrize("name", ["llama-gqa", "llama-bias", "qwen2-mha", "mistral-gqa"])
def test_batched_per_sample_pass_equals_one_sample_per_pass(name):
    """Per-sample statistics from module inputs x output gradients, several samples a pass, are exact."""
    model = make_tiny(name)
    modules = get_adapter(model).projection_names(range(4))
    samples = tiny_pool(n_per_source=5).input_ids  # 10 samples: batches of 4, 4, 2
    needs = {"unit_sums", "activations", "grad", "fisher"}
    one = collect_statistics(model, samples, modules, needs, sample_batch=1)
    batched = collect_statistics(model, samples, modules, needs, sample_batch=4)
    assert batched.per_sample and batched.num_samples == 10
    for table in ("act_sum", "act_sq", "unit_wg", "unit_wwgg", "grads", "fisher"):
        ref, got = getattr(one, table), getattr(batched, table)
        assert set(got) == set(ref) == set(modules), table
        for module in modules:
            torch.testing.assert_close(got[module], ref[module], rtol=1e-4, atol=1e-7, msg=f"{table} {module}")
    for stat in ("loss", "grad_norm"):
        torch.testing.assert_close(batched.sample[stat], one.sample[stat], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(batched.tokens, one.tokens)
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())  # restored
