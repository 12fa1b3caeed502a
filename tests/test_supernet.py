"""The supernet and the per-layer allocation: candidates are exact refits, nested, cached by fingerprint;
mutations keep the budget; impossible grids are refused."""

from __future__ import annotations

import itertools
import random
import shutil

import pytest
import torch

from adapruner import AdaPrunerError
from adapruner.local import applied
from adapruner.local.engine import capture_inputs, input_moments, run_layer, write_refit
from adapruner.local.solve import refit_columns
from adapruner.local.supernet import SupernetSettings, build_supernet
from adapruner.models import get_adapter
from adapruner.pruning import masked, prune_physically
from adapruner.pruning.plan import count_params
from adapruner.search import SearchSpace
from adapruner.search.evolution import params_to_counts
from adapruner.search.objective import allocation_budget
from conftest import TINY, make_tiny

WINDOWS = torch.randint(0, 97, (48, 16), generator=torch.Generator().manual_seed(3))  # 768 tokens
TEXT = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(4))


@pytest.mark.parametrize("name", sorted(TINY))
def test_assembled_candidates_equal_the_physically_pruned_model(name, tmp_path):
    """Masks + candidates written in place (a trial) == the model cut to the plan with the candidates in it."""
    model = make_tiny(name)
    adapter = get_adapter(model)
    net = build_supernet(model, WINDOWS, [0, 1, 2, 3], SupernetSettings(max_removal=0.75), directory=tmp_path)
    (a_min, a_dense, step), (m_min, m_dense, _) = net.limits(1)
    counts = {1: (a_min, m_min), 2: (a_dense, (m_min + m_dense) // 2), 3: (a_dense - step, m_dense)}
    plan, refits = net.assemble(adapter, counts)
    with torch.no_grad(), masked(adapter, plan), applied(model, refits):
        trial = model(TEXT).logits
    pruned = make_tiny(name)  # the same weights: what prune does is write the candidates, then cut
    for module_name, refit in refits.items():
        write_refit(pruned.get_submodule(module_name), refit)
    prune_physically(get_adapter(pruned), plan)
    with torch.no_grad():
        torch.testing.assert_close(pruned(TEXT).logits, trial, atol=1e-5, rtol=1e-4)
    assert count_params(pruned) < count_params(make_tiny(name))


def test_candidates_are_nested_and_each_is_the_least_squares_refit_on_dense_inputs(tmp_path):
    model = make_tiny("llama-mha")
    adapter = get_adapter(model)
    net = build_supernet(model, WINDOWS, [1], SupernetSettings(max_removal=0.75), directory=tmp_path)
    mlp = net.mlp[1]
    kept = [set(mlp.kept_units(k)) for k in range(mlp.min_keep, mlp.num_units + 1)]
    assert all(a < b for a, b in itertools.pairwise(kept))  # keeping one more unit adds one unit
    inputs = capture_inputs(adapter, WINDOWS, 16)
    inputs_1 = run_layer(adapter.decoder_layers()[0], inputs)  # the dense model's inputs of layer 1
    down = adapter.layer(1).down_proj
    moments = input_moments(adapter.decoder_layers()[1], down, inputs_1, torch.device("cpu"))
    keep = (mlp.min_keep + mlp.num_units) // 2
    expected = refit_columns(down.weight, down.bias, moments, torch.tensor(mlp.kept_units(keep)), 1e-3, True)
    got = net.candidate(adapter, 1, "mlp", keep)
    torch.testing.assert_close(got.weight, expected.weight, atol=1e-4, rtol=1e-3)
    with pytest.raises(AdaPrunerError, match="no candidate keeps"):
        mlp.kept_units(mlp.min_keep - 1)


def test_a_supernet_cache_of_another_setting_is_rebuilt_never_reused(tmp_path, capsys):
    model = make_tiny("llama-gqa")
    first = build_supernet(model, WINDOWS, [1, 2], SupernetSettings(), directory=tmp_path)
    again = build_supernet(model, WINDOWS, [1, 2], SupernetSettings(), directory=tmp_path)
    assert again.fingerprint == first.fingerprint and again.mlp[1].order == first.mlp[1].order
    other_windows = build_supernet(model, WINDOWS[:40], [1, 2], SupernetSettings(), directory=tmp_path)
    other_grid = build_supernet(model, WINDOWS, [1, 2], SupernetSettings(max_removal=0.5), directory=tmp_path)
    other_model = build_supernet(make_tiny("llama-gqa", seed=1), WINDOWS, [1, 2], directory=tmp_path)
    prints = {first.fingerprint, other_windows.fingerprint, other_grid.fingerprint, other_model.fingerprint}
    assert len(prints) == 4
    path = tmp_path / first.fingerprint
    shutil.rmtree(path)
    (tmp_path / other_grid.fingerprint).rename(path)  # a directory whose content is another's
    rebuilt = build_supernet(model, WINDOWS, [1, 2], SupernetSettings(), directory=tmp_path)
    assert rebuilt.mlp[1].order == first.mlp[1].order
    assert "another model, data or setting: rebuilding" in " ".join(capsys.readouterr().err.split())
    for damaged in (path / "candidates.json", path / "layer-2.mlp.safetensors"):
        damaged.write_bytes(b"garbage")
        assert (
            build_supernet(model, WINDOWS, [1, 2], SupernetSettings(), directory=tmp_path).mlp[1].order
            == first.mlp[1].order
        )
        assert "damaged" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no partial builds left


def test_gram_matrices_stay_on_disk_and_refits_are_bounded_in_memory(tmp_path, monkeypatch):
    """A 7B model's Gram matrices (~17 GB) cannot live in memory: candidates read theirs when refitting,
    a loaded supernet refits exactly like the one just built, and the memo of refits is bounded in bytes."""
    from adapruner.local import supernet as supernet_module

    model = make_tiny("llama-gqa")
    adapter = get_adapter(model)
    built = build_supernet(model, WINDOWS, [1, 2], SupernetSettings(), directory=tmp_path)
    loaded = build_supernet(model, WINDOWS, [1, 2], SupernetSettings(), directory=tmp_path)
    assert not [
        v
        for c in (*loaded.mlp.values(), *loaded.attention.values())
        for v in vars(c).values()
        if isinstance(v, torch.Tensor) and v.dim() == 2
    ]  # only orders and means in memory
    keep = (built.mlp[1].min_keep + built.mlp[1].num_units) // 2
    torch.testing.assert_close(
        loaded.candidate(adapter, 1, "mlp", keep).weight, built.candidate(adapter, 1, "mlp", keep).weight
    )
    one = built.candidate(adapter, 2, "mlp", keep).weight.nbytes
    monkeypatch.setattr(supernet_module, "MEMO_BYTES", 2 * one)
    for k in range(built.mlp[2].min_keep, built.mlp[2].num_units):
        built.candidate(adapter, 2, "mlp", k)
    assert 1 <= len(built._memo) <= 2 and built._memo_bytes <= 2 * one
    shutil.rmtree(tmp_path / built.fingerprint)  # the cache deleted under a running search: one clear line
    with pytest.raises(AdaPrunerError, match=r"delete .* and rerun"):
        built.candidate(adapter, 2, "mlp", built.mlp[2].min_keep)  # long out of the memo: read again


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5])
def test_mutations_and_random_allocations_keep_the_budget_within_one_channel(ratio):
    model = make_tiny("qwen2-gqa", layers=6)
    budget = allocation_budget(model, ratio, SearchSpace(max_removal=0.9), "auto")
    rng = random.Random(0)
    one_channel = max(lim.mlp_params for lim in budget.limits.values())
    counts = budget.random(rng)
    for _ in range(200):
        child = budget.mutate(counts, rng)
        assert abs(budget.removed(child) - budget.target) <= one_channel
        for layer, (attn, mlp) in child.items():
            lim = budget.limits[layer]
            assert lim.attn_min <= attn <= lim.attn_dense and attn % lim.attn_step == 0
            assert lim.mlp_min <= mlp <= lim.mlp_dense
        counts = child if rng.random() < 0.5 else counts
    assert params_to_counts({"attn_0": 2, "mlp_0": 7, "allocation": "per-layer"}) == {0: (2, 7)}


@pytest.mark.parametrize("ratio", [0.1, 0.3])
def test_aligned_allocations_keep_multiples_of_align_and_the_budget_within_align_channels(ratio):
    model = make_tiny("qwen2-gqa", layers=6)
    budget = allocation_budget(model, ratio, SearchSpace(max_removal=0.9, align=8), "auto")
    rng = random.Random(0)
    tolerance = 8 * max(lim.mlp_params for lim in budget.limits.values())
    counts = budget.random(rng)
    seen = set()
    for _ in range(100):
        child = budget.mutate(counts, rng, scale=rng.choice((1, 2)))
        assert abs(budget.removed(child) - budget.target) <= tolerance
        for layer, (_attn, mlp) in child.items():
            lim = budget.limits[layer]
            assert mlp == lim.mlp_dense or (mlp % 8 == 0 and lim.mlp_min <= mlp < lim.mlp_dense)
            seen.add(mlp)
        counts = child
    assert len(seen) > 2  # the search still moves widths, on the grid
    assert all(mlp % 8 == 0 for level in budget.uniform_levels() for _attn, mlp in level.values())
    with pytest.raises(AdaPrunerError, match="align must be >= 1"):
        SearchSpace(align=0)


def test_coarse_to_fine_moves_more_channels_early_and_one_level_late():
    from adapruner.search.evolution import Proposer

    model = make_tiny("qwen2-gqa", layers=6)
    budget = allocation_budget(model, 0.3, SearchSpace(max_removal=0.9, mlp_levels=40), "auto")  # 1 channel/level
    proposer = Proposer(budget, lambda _study: [], seed=0, coarse=4, trials=30)
    assert [proposer.scale(n) for n in (0, 9, 10, 19, 20, 29)] == [4, 4, 2, 2, 1, 1]
    assert Proposer(budget, lambda _study: [], seed=0).scale(0) == 1
    rng = random.Random(0)
    parent = budget.random(rng)
    for scale in (1, 4):
        counts = dict(parent)
        assert budget._step(counts, 2, "mlp", +1, scale) or budget._step(counts, 2, "mlp", -1, scale)
        assert abs(counts[2][1] - parent[2][1]) == scale * budget.mlp_step(2)
        child = budget.mutate(parent, rng, scale)  # still within one channel of the budget
        assert abs(budget.removed(child) - budget.target) <= max(lim.mlp_params for lim in budget.limits.values())


def test_a_level_grid_that_cannot_reach_the_ratio_is_refused():
    model = make_tiny("llama-mha")
    with pytest.raises(AdaPrunerError, match=r"cannot reach ratio 0.6.*max_removal"):
        allocation_budget(model, 0.6, SearchSpace(max_removal=0.3), "auto")
    with pytest.raises(AdaPrunerError, match="max_removal"):
        SearchSpace(max_removal=1.0)
    with pytest.raises(AdaPrunerError, match="allocations"):
        SearchSpace(allocations=["per-layer"])
