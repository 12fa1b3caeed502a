"""Integration on the real SmolLM2-135M (LLaMA, GQA 9/3): exact masks, exact parameter counts, reload."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch

from adapruner import PruneConfig, Recipe, load_pruned
from adapruner.assets import model_dir
from adapruner.models import get_adapter
from adapruner.pruning import masked, prune_physically
from adapruner.pruning.io import save_pruned
from adapruner.pruning.plan import count_params, planned_param_count
from adapruner.recipe import PlanInputs, plan_recipe

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def smollm2():
    if not (model_dir("smollm2-135m") / "config.json").is_file():
        pytest.skip("SmolLM2 is not fetched: run `adapruner assets fetch smollm2-135m data` (make test does)")
    from adapruner.models.loading import load_model

    return load_model("smollm2-135m")


def test_element1_plan_is_exact_on_smollm2(smollm2, tmp_path):
    model, tokenizer = smollm2
    cfg = Recipe(model="smollm2-135m", ratio=0.2, num_samples=4, seq_len=32)
    planned = plan_recipe(model, cfg, PlanInputs(model, tokenizer))
    plan = planned.plan
    adapter = get_adapter(model)
    assert planned.layers == (4, 28)
    assert plan.layers[0].shape == adapter.layer_shape(0)  # first layers stay whole
    shape = plan.layers[10].shape
    assert shape.num_key_value_heads == 3 and shape.num_attention_heads % 3 == 0 and shape.num_attention_heads < 9
    text = torch.tensor([tokenizer("The quick brown fox jumps over the lazy dog. " * 4).input_ids])
    with torch.no_grad(), masked(adapter, plan):
        masked_logits = model(text).logits
    pruned = copy.deepcopy(model)
    prune_physically(get_adapter(pruned), plan)
    with torch.no_grad():
        pruned_logits = pruned(text).logits
    # 30 fp32 layers summed in a different order: ~1e-4 noise on logits of magnitude ~10
    torch.testing.assert_close(pruned_logits, masked_logits, atol=1e-3, rtol=1e-4)
    assert count_params(pruned) == planned_param_count(adapter, plan, planned.dense_params)
    assert abs(1 - count_params(pruned) / planned.dense_params - 0.2) < 0.005
    save_pruned(pruned, tokenizer, {"format": 1, "plan": plan.to_dict()}, tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(load_pruned(tmp_path / "out")(text).logits, pruned_logits)


def test_refit_trial_equals_the_saved_model_on_smollm2(smollm2, tmp_path):
    """FLAP's units refitted layer by layer (two layers, to stay quick): the search trial's weights written
    in place score exactly what the physically pruned, saved and reloaded model scores, and the refit
    lowers perplexity against plain removal."""
    from adapruner.data import token_stream
    from adapruner.evaluation import perplexity
    from adapruner.local import applied

    model, tokenizer = smollm2
    options = {"layers": "10:12", "num_samples": 24, "refit_calibration": "24x128"}
    cfg = PruneConfig.from_method("smollm2-135m", 0.02, method="flap-refit", **options).recipe
    trial_plan = plan_recipe(model, cfg, PlanInputs(model, tokenizer), restore=True)
    plan, refits, summary = trial_plan.plan, trial_plan.refits, trial_plan.local
    refitted = {f"model.layers.{i}.{m}" for i in (10, 11) for m in ("self_attn.o_proj", "mlp.down_proj")}
    errors = summary["relative_errors"]
    assert summary["tokens"] == 24 * 128 and errors and set(errors) <= refitted and set(refits) == set(errors)
    adapter = get_adapter(model)
    valid = token_stream(tokenizer, "wiki", "validation", 1024)
    with torch.no_grad(), masked(adapter, plan):
        removed = perplexity(model, valid, 128, progress=False)
    with torch.no_grad(), masked(adapter, plan), applied(model, refits):
        trial = perplexity(model, valid, 128, progress=False)
    assert trial < removed
    pruned = copy.deepcopy(model)
    in_place = plan_recipe(pruned, cfg, PlanInputs(pruned, tokenizer))  # what `adapruner prune` does
    assert in_place.plan.to_dict() == plan.to_dict() and in_place.refits is None
    prune_physically(get_adapter(pruned), plan)
    save_pruned(pruned, tokenizer, {"format": 1, "plan": plan.to_dict()}, tmp_path / "out")
    with torch.no_grad():
        assert perplexity(load_pruned(tmp_path / "out"), valid, 128, progress=False) == pytest.approx(trial, rel=1e-4)


def test_books_windows_are_checked_before_the_weights_load(monkeypatch, tmp_path):
    """Issue 26: books' passages hold ~80 tokens (17 windows of 128). The default refit windows fit them
    (256x64; wiki keeps 128x128), and a choice they cannot give fails in seconds, naming the option, before
    the weights load (it used to fail after loading and ~13 s of scoring)."""
    from adapruner import AdaPrunerError, api
    from adapruner.models.loading import load_tokenizer
    from adapruner.recipe import check_calibration

    prune_room = importlib.import_module("adapruner.recipe.prune")  # the module (the package exports the function)

    if not (model_dir("smollm2-135m") / "config.json").is_file():
        pytest.skip("SmolLM2 is not fetched: run `adapruner assets fetch smollm2-135m data` (make test does)")
    tokenizer = load_tokenizer("smollm2-135m")
    default = Recipe(model="smollm2-135m", ratio=0.2, refit="lsq")
    assert check_calibration(tokenizer, default).refit_calibration == "256x64"
    obs = PruneConfig.from_method("smollm2-135m", 0.2, "local-obs").recipe
    assert check_calibration(tokenizer, obs).refit_calibration == "128x128"

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights were loaded before the calibration was checked")

    monkeypatch.setattr(prune_room, "load_causal_lm", no_weights)
    with pytest.raises(AdaPrunerError, match=r"'books' has only 17 windows of 128 tokens.*--refit-calibration 256x64"):
        api.prune("smollm2-135m", 0.2, refit="lsq", refit_calibration="128x128", output=tmp_path / "out")
    with pytest.raises(AdaPrunerError, match=r"--num-samples 128 x --seq-len 128 needs 128: use --seq-len 64"):
        api.prune("smollm2-135m", 0.2, method="flap", calibration="books")
    assert not (tmp_path / "out").exists()
