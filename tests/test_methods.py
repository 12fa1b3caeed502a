"""Baseline methods (--method): presets, FLAP's joint ranking (AL-AM) and bias compensation."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

from adapruner import AdaPrunerError, load_pruned
from adapruner.api import PruneConfig, Recipe, prune
from adapruner.importance import collect_statistics, score_groups
from adapruner.methods import METHODS, get_method
from adapruner.models import attention_group, get_adapter, mlp_group
from adapruner.models.modeling import apply_layer_shapes
from adapruner.pruning import Budget, masked, plan_from_scores, prune_physically, solve_keep_counts
from adapruner.pruning.io import save_pruned
from adapruner.pruning.plan import count_params, planned_param_count
from conftest import make_tiny
from test_importance import REFERENCES, SAMPLES, module_context, naive_unit_scores
from test_io import TOKENS
from test_pruning_exact import random_plan


def input_means(model, samples=SAMPLES) -> dict[str, torch.Tensor]:
    adapter = get_adapter(model)
    names = [n for n in adapter.projection_names(range(adapter.num_layers)) if n.endswith(("o_proj", "down_proj"))]
    stats = collect_statistics(model, samples, names, {"activations"})
    return {n: stats.input_mean(n) for n in names}


# -- bias compensation ----------------------------------------------------------------------


COMPENSATED = ["llama-gqa", "llama-bias", "qwen2-gqa"]


def _compensated(name: str):
    """A tiny model, a random plan, its masked logits (zeroed and compensated) and the pruned copy."""
    model = make_tiny(name)
    adapter = get_adapter(model)
    plan, _ = random_plan(model, 0.3, "auto")
    means = input_means(model)
    with masked(adapter, plan):
        zeroed = model(TOKENS).logits
    with masked(adapter, plan, input_means=means):
        compensated = model(TOKENS).logits
    pruned = copy.deepcopy(model)
    prune_physically(get_adapter(pruned), plan, input_means=means)
    return zeroed, compensated, pruned


@pytest.mark.parametrize("name", COMPENSATED)
def test_compensated_mask_equals_physical(name):
    zeroed, compensated, pruned = _compensated(name)
    assert not torch.allclose(zeroed, compensated, atol=1e-4), "compensation must change the outputs"
    torch.testing.assert_close(pruned(TOKENS).logits, compensated, atol=1e-5, rtol=1e-5)


def test_compensated_checkpoints_reload_with_remote_code_and_load_pruned(tmp_path):
    expected = {}
    for name in COMPENSATED:
        _, _, pruned = _compensated(name)
        save_pruned(pruned, None, {"format": 1}, tmp_path / name)
        config = json.loads((tmp_path / name / "config.json").read_text())
        if name == "llama-bias":  # its config already builds every bias: a plain checkpoint
            assert "pruned_layers" not in config
        else:
            assert all(entry["o_proj_bias"] and entry["down_proj_bias"] for entry in config["pruned_layers"])
        expected[name] = pruned(TOKENS).logits
        assert torch.equal(load_pruned(tmp_path / name)(TOKENS).logits, expected[name])
    # one interpreter without adapruner for all three (each start costs seconds)
    code = (
        "import sys, torch; sys.modules['adapruner'] = None\n"
        "from transformers import AutoModelForCausalLM\n"
        f"for name in {COMPENSATED!r}:\n"
        f"    m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r} + '/' + name, trust_remote_code=True)\n"
        f"    torch.save(m(torch.arange(3, 23).view(2, 10)).logits, {str(tmp_path)!r} + '/' + name + '.pt')\n"
    )
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "hf_modules"), HF_HUB_OFFLINE="1")
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    for name in COMPENSATED:
        torch.testing.assert_close(torch.load(tmp_path / f"{name}.pt"), expected[name])


def test_compensation_is_exact_at_the_calibration_mean():
    """An input whose removed features equal their means gives the dense projection's output."""
    model = make_tiny("qwen2-gqa")
    adapter = get_adapter(model)
    plan, _ = random_plan(model, 0.3, "auto")
    means = input_means(model)
    names = adapter.prunable_module_names(1)
    dense = {role: copy.deepcopy(getattr(adapter.layer(1), role)) for role in ("o_proj", "down_proj")}
    prune_physically(adapter, plan, input_means=means)
    lp, d = plan.layers[1], plan.head_dim
    kept = {
        "o_proj": torch.cat([torch.arange(h * d, (h + 1) * d) for h in lp.query_heads]),
        "down_proj": torch.tensor(lp.channels),
    }
    for role, module in dense.items():
        x = means[names[role]].clone().expand(5, -1).clone()
        x[:, kept[role]] = torch.randn(5, kept[role].numel())
        torch.testing.assert_close(getattr(adapter.layer(1), role)(x[:, kept[role]]), module(x), atol=1e-6, rtol=1e-5)


def test_checkpoints_without_bias_flags_keep_the_config_choice():
    model = make_tiny("llama-mha")
    shape = {"num_attention_heads": 2, "num_key_value_heads": 2, "intermediate_size": 20}
    apply_layer_shapes(model, [shape, shape | {"o_proj_bias": True, "down_proj_bias": False}] * 2)
    layers = model.model.layers
    assert layers[0].self_attn.o_proj.bias is None and layers[0].mlp.down_proj.bias is None
    assert layers[1].self_attn.o_proj.bias is not None and layers[1].mlp.down_proj.bias is None


def test_missing_mean_is_a_one_line_error():
    model = make_tiny("llama-mha")
    plan, _ = random_plan(model, 0.3, "auto")
    with pytest.raises(AdaPrunerError, match=r"mean input of model\.layers\.0\.self_attn\.o_proj"):
        prune_physically(get_adapter(model), plan, input_means={})


# -- joint ranking of heads and channels (FLAP's AL-AM) --------------------------------------


def _joint(model, scores, head_mode: str, ratio: float = 0.25):
    adapter = get_adapter(model)
    keep = solve_keep_counts(adapter, Budget(ratio, (1, 5), head_mode=head_mode), count_params(model))
    return plan_from_scores(adapter, scores, keep, head_mode, ranking="global-all"), keep


def _normal_scores(adapter, head_mode: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return {
        (layer, kind): torch.randn(group.num_units, generator=gen)
        for layer in range(1, 5)
        for kind, group in (
            ("attention", attention_group(adapter, layer, head_mode)),
            ("mlp", mlp_group(adapter, layer)),
        )
    }


@pytest.mark.parametrize("head_mode", ["kv-group", "query"])
def test_joint_ranking_meets_the_ratio_within_one_unit(head_mode):
    model = make_tiny("mistral-gqa", layers=6)  # 8 query heads, 2 KV heads, 40 channels
    adapter = get_adapter(model)
    plan, keep = _joint(model, _normal_scores(adapter, head_mode), head_mode)
    dense = count_params(model)
    removed = dense - planned_param_count(adapter, plan, dense)
    attn = attention_group(adapter, 1, head_mode)
    largest_step = max(attn.params_per_unit * attn.blocks, mlp_group(adapter, 1).params_per_unit)
    assert abs(removed - keep.target_removed) <= largest_step
    assert plan.layers[0].shape == adapter.layer_shape(0) and plan.layers[5].shape == adapter.layer_shape(5)
    shapes = plan.shapes()[1:5]
    assert len({s.intermediate_size for s in shapes}) > 1 or len({s.num_attention_heads for s in shapes}) > 1
    pruned = copy.deepcopy(model)
    prune_physically(get_adapter(pruned), plan)
    assert count_params(pruned) == dense - removed


def test_joint_ranking_moves_the_cut_to_a_layer_with_lower_scores():
    model = make_tiny("llama-mha", layers=6)
    adapter = get_adapter(model)
    scores = _normal_scores(adapter, "kv-group")
    before, _ = _joint(model, scores, "kv-group")
    lowered = {k: v - 1.5 if k[0] == 3 else v for k, v in scores.items()}
    after, _ = _joint(model, lowered, "kv-group")
    channels_before = [s.intermediate_size for s in before.shapes()]
    channels_after = [s.intermediate_size for s in after.shapes()]
    assert channels_after[3] < channels_before[3]
    assert after.shapes()[3].num_attention_heads <= before.shapes()[3].num_attention_heads
    assert all(channels_after[i] >= channels_before[i] for i in (1, 2, 4))
    # one list: a layer whose heads score low loses heads, paid for by channels elsewhere
    heads_low = {k: v - 3.0 if k == (2, "attention") else v for k, v in scores.items()}
    plan, _ = _joint(model, heads_low, "kv-group")
    assert plan.layers[2].shape.num_attention_heads == 1 < before.layers[2].shape.num_attention_heads


def test_joint_plan_with_compensation_masked_equals_physical():
    """Layers the joint ranking leaves whole get no bias; the others match the masked model exactly."""
    model = make_tiny("llama-gqa", layers=6)
    adapter = get_adapter(model)
    scores = _normal_scores(adapter, "query")
    scores = {k: v + 10.0 if k[0] == 2 else v for k, v in scores.items()}  # layer 2 is precious
    plan, _ = _joint(model, scores, "query", ratio=0.2)
    assert plan.layers[2].shape == adapter.layer_shape(2)
    means = input_means(model)
    with masked(adapter, plan, input_means=means):
        expected = model(TOKENS).logits
    prune_physically(adapter, plan, input_means=means)
    torch.testing.assert_close(model(TOKENS).logits, expected, atol=1e-5, rtol=1e-5)
    assert model.model.layers[2].mlp.down_proj.bias is None and model.model.layers[0].mlp.down_proj.bias is None
    assert any(layer.mlp.down_proj.bias is not None for layer in model.model.layers)
    flags = [(e["o_proj_bias"], e["down_proj_bias"]) for e in model.config.pruned_layers]
    assert flags[0] == flags[2] == (False, False)


def test_ranking_options_are_checked():
    with pytest.raises(AdaPrunerError, match="unknown ranking"):
        Recipe(model="", ratio=0.2, ranking="everywhere").validate()
    with pytest.raises(AdaPrunerError, match="contradicts"):
        PruneConfig.from_method("", 0.2, ranking="global-all", global_ranking=True)


def test_older_spellings_become_the_one_field_of_their_concept():
    """--global-ranking is --ranking global and --compensate is --refit bias: one field each in the recipe
    (a least-squares refit, which supersedes compensation, stays)."""
    from dataclasses import fields

    assert not {"global_ranking", "compensate"} & {f.name for f in fields(Recipe)}
    assert PruneConfig.from_method("", 0.2, global_ranking=True).recipe.ranking == "global"
    assert PruneConfig.from_method("", 0.2, compensate=True).recipe.refit == "bias"
    assert PruneConfig.from_method("", 0.2, compensate=True, refit="lsq").recipe.refit == "lsq"
    assert PruneConfig.from_method("", 0.2, compensate=False, global_ranking=False) == PruneConfig(
        Recipe(model="", ratio=0.2)
    )


# -- method presets -------------------------------------------------------------------------


def test_presets_and_overrides():
    cfg = PruneConfig.from_method("m", 0.2, "flap", num_samples=16).recipe
    assert (cfg.metric, cfg.ranking, cfg.refit, cfg.layers) == ("wifv", "global-all", "bias", "0:")
    assert cfg.num_samples == 16 and cfg.method == "flap"
    assert PruneConfig.from_method("m", 0.2, "llm-pruner-element1") == PruneConfig(
        Recipe("m", 0.2, method="llm-pruner-element1")
    ), "LLM-Pruner's element1 settings are AdaPruner's defaults"
    for name in METHODS:
        PruneConfig.from_method("m", 0.2, name).validate()
    with pytest.raises(AdaPrunerError, match="unknown method 'sparsegpt': choose one of random, l2, "):
        get_method("sparsegpt")


def _method_scores(model, method: str, layer: int):
    cfg = PruneConfig.from_method("", 0.2, method).recipe
    adapter = get_adapter(model)
    stats = collect_statistics(model, SAMPLES, adapter.projection_names(range(4)), cfg.build_metric().needs)
    groups = [attention_group(adapter, layer, "kv-group"), mlp_group(adapter, layer)]
    return score_groups(model, groups, cfg.build_metric(), stats, cfg.aggregation)


def test_method_scores_match_naive_formulas():
    model = make_tiny("qwen2-gqa")
    ctx = module_context(model)
    layer, shape = 1, get_adapter(model).layer_shape(1)
    n_kv, g = shape.num_key_value_heads, shape.queries_per_kv
    attn_prefix, mlp_prefix = f"model.layers.{layer}.self_attn.", f"model.layers.{layer}.mlp."

    # l2: LLM-Pruner's MagnitudeImportance(p=2): sum of W^2 per member, mean over the coupled layers
    scores = _method_scores(model, "l2", layer)
    for kind, members in (("attention", 4), ("mlp", 3)):
        ref = naive_unit_scores(ctx, layer, kind, REFERENCES["l2"], n_kv, g) / members
        torch.testing.assert_close(scores[(layer, kind)], ref.float(), rtol=1e-4, atol=1e-7)

    # wanda-sp: sum over the unit's o_proj/down_proj columns of |W_ij| * ||X_j||
    scores = _method_scores(model, "wanda-sp", layer)
    o, down = ctx[attn_prefix + "o_proj"], ctx[mlp_prefix + "down_proj"]
    per_col_o = (o["w"].abs() * o["xn"]).sum(0)
    torch.testing.assert_close(scores[(layer, "attention")], per_col_o.view(n_kv, -1).sum(1), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(scores[(layer, "mlp")], (down["w"].abs() * down["xn"]).sum(0), rtol=1e-4, atol=1e-6)

    # flap: FLAP's prune_flap, WIFV, AL-AM: (Var * ||W_col||^2)^2 for o_proj, Var * ||W_col||^2 for
    # down_proj, standardised over the layer's columns (torch.std, unbiased), mean over each unit's columns
    def standardise(x):
        return (x - x.mean()) / x.std()

    scores = _method_scores(model, "flap", layer)
    wifv_o = standardise((o["xv"][0] * o["w"].pow(2).sum(0)) ** 2)
    wifv_down = standardise(down["xv"][0] * down["w"].pow(2).sum(0))
    torch.testing.assert_close(scores[(layer, "attention")], wifv_o.view(n_kv, -1).mean(1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(scores[(layer, "mlp")], wifv_down, rtol=1e-4, atol=1e-5)


def test_every_method_prunes_a_tiny_model_to_the_ratio(tiny_model_dir):
    root = tiny_model_dir
    common = {"calibration": str(root / "corpus.txt"), "num_samples": 4, "seq_len": 16, "refit_calibration": "64x16"}
    plans = {}
    for method in METHODS:
        result = prune(str(root / "tiny"), 0.15, method=method, **common)
        record = result.record
        assert record["recipe"]["method"] == method, method
        assert abs(record["achieved_ratio"] - 0.15) < 0.02, (method, record["achieved_ratio"])
        plans[method] = record["plan"]
        if method == "flap":
            flap_result = result
    assert all(plans[m] != plans["random"] for m in METHODS if m != "random")
    assert flap_result.record["recipe"]["refit"] == "bias" and flap_result.record["recipe"]["ranking"] == "global-all"
    assert any(m.mlp.down_proj.bias is not None for m in flap_result.model.model.layers)


def test_cli_method_flap_saves_a_reloadable_model_and_flags_override(tiny_model_dir):
    from test_cli import run

    root = tiny_model_dir
    result = run(
        "prune", root / "tiny", "--method", "flap", "--ratio", "0.2", "--output", root / "out",
        "--calibration", root / "corpus.txt", "--num-samples", "6", "--seq-len", "16",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    config = json.loads((root / "out" / "adapruner.json").read_text())["recipe"]
    assert config["method"] == "flap" and config["metric"] == "wifv" and config["refit"] == "bias"
    assert config["num_samples"] == 6 and config["seq_len"] == 16 and config["layers"] == "0:"
    model = load_pruned(root / "out")
    assert torch.isfinite(model(TOKENS).logits).all()
    assert any(layer.mlp.down_proj.bias is not None for layer in model.model.layers)


def test_cli_unknown_method_is_one_line(tiny_model_dir):
    from test_cli import run

    root = tiny_model_dir
    result = run("prune", root / "tiny", "--method", "obs", "--ratio", "0.2", "--output", root / "out")
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "unknown method 'obs'" in errors[0] and "flap" in errors[0]
    assert not (root / "out").exists()


def _plan_with_knobs(model, scores, ranking: str, **knobs):
    from adapruner.recipe import Recipe, plan_for_scores

    cfg = Recipe(model="", ratio=0.25, head_mode="kv-group", ranking=ranking, layers="1:5", **knobs)
    return plan_for_scores(model, scores, cfg.budget((1, 5)), cfg)


@pytest.mark.parametrize("ranking", ["global", "global-all"])
def test_allocation_knobs_act_on_cross_layer_rankings(ranking):
    """Depth profile and attention scale still decide where the cut falls when units compete across layers."""
    from adapruner.pruning.ranking import allocation_offsets

    model = make_tiny("llama-mha", layers=6)
    adapter = get_adapter(model)
    scores = _normal_scores(adapter, "kv-group")
    neutral = _plan_with_knobs(model, scores, ranking)
    assert allocation_offsets(scores, Budget(0.25, (1, 5)), ranking) is scores  # FLAP's ranking untouched
    deep = _plan_with_knobs(model, scores, ranking, depth_slope=2.0)
    shallow = _plan_with_knobs(model, scores, ranking, depth_slope=-2.0)

    def removed(plan, layers):
        return sum(adapter.layer_shape(i).intermediate_size - plan.layers[i].shape.intermediate_size for i in layers)

    assert removed(deep, (3, 4)) > removed(neutral, (3, 4)) > removed(shallow, (3, 4))
    assert removed(deep, (1, 2)) < removed(shallow, (1, 2))
    dense = count_params(model)
    counts = {planned_param_count(adapter, p, dense) for p in (neutral, deep, shallow)}
    attn = attention_group(adapter, 1, "kv-group")
    largest_step = max(attn.params_per_unit * attn.blocks, mlp_group(adapter, 1).params_per_unit)
    assert max(counts) - min(counts) <= 2 * largest_step  # the ratio still holds


def test_attention_scale_sets_the_head_share_of_the_joint_ranking():
    model = make_tiny("llama-mha", layers=6)
    adapter = get_adapter(model)
    scores = _normal_scores(adapter, "kv-group")

    def heads_removed(plan):
        return sum(
            adapter.layer_shape(i).num_attention_heads - plan.layers[i].shape.num_attention_heads for i in range(6)
        )

    whole = _plan_with_knobs(model, scores, "global-all", attention_scale=0.0)
    assert heads_removed(whole) == 0
    less = _plan_with_knobs(model, scores, "global-all", attention_scale=0.5)
    neutral = _plan_with_knobs(model, scores, "global-all")
    more = _plan_with_knobs(model, scores, "global-all", attention_scale=2.0)
    assert heads_removed(less) <= heads_removed(neutral) <= heads_removed(more)
    assert heads_removed(less) < heads_removed(more)
