"""--uniform: every layer pruned alike and saved as the stock architecture that serving engines load."""

from __future__ import annotations

import json

import pytest
import torch

from adapruner import AdaPrunerError
from adapruner.api import prune
from adapruner.models import get_adapter
from adapruner.pruning import prune_physically
from adapruner.pruning.plan import PrunePlan
from adapruner.pruning.stock import make_stock
from adapruner.search.space import SearchSpace, baseline_params, warm_start_params
from conftest import make_tiny, save_tiny
from test_cli import run
from test_io import TOKENS, _reload_without_adapruner
from test_pruning_exact import random_plan


def _uniform_plan(model):
    plan, _ = random_plan(model, 0.3, "auto")
    plan.layers = [plan.layers[1]] * len(plan.layers)
    return plan


def _compensation_means(model) -> dict[str, torch.Tensor]:
    adapter = get_adapter(model)
    means = {}
    for index in range(adapter.num_layers):
        for role, name in adapter.prunable_module_names(index).items():
            if role in ("o_proj", "down_proj"):
                size = getattr(adapter.layer(index), role).in_features
                means[name] = torch.randn(size, generator=torch.Generator().manual_seed(index))
    return means


def test_make_stock_adds_only_zero_biases(tmp_path):
    """Compensation biases on LLaMA become attention_bias/mlp_bias: same logits, stock parameters only."""
    model = make_tiny("llama-gqa")
    plan = _uniform_plan(model)
    prune_physically(get_adapter(model), plan, input_means=_compensation_means(model))
    assert getattr(model.config, "pruned_layers", None)  # o_proj/down_proj biases the config does not build
    expected = model(TOKENS).logits
    make_stock(get_adapter(model))
    assert model.config.attention_bias and model.config.mlp_bias and not getattr(model.config, "pruned_layers", None)
    assert torch.equal(model(TOKENS).logits, expected)
    layer = model.model.layers[0]
    assert torch.count_nonzero(layer.self_attn.q_proj.bias) == 0 and torch.count_nonzero(layer.mlp.up_proj.bias) == 0
    assert torch.count_nonzero(layer.self_attn.o_proj.bias) > 0  # the compensation itself is kept
    model.save_pretrained(tmp_path / "out")
    torch.testing.assert_close(_reload_without_adapruner(tmp_path / "out", False), expected)


@pytest.mark.parametrize("name", ["qwen2-gqa", "mistral-gqa"])
def test_make_stock_refuses_biases_the_family_cannot_hold(name):
    model = make_tiny(name)
    prune_physically(get_adapter(model), _uniform_plan(model), input_means=_compensation_means(model))
    with pytest.raises(AdaPrunerError, match="cannot hold"):
        make_stock(get_adapter(model))


def test_make_stock_refuses_mixed_sizes():
    model = make_tiny("llama-gqa")
    plan, _ = random_plan(model, 0.3, "auto")
    plan.layers[0] = PrunePlan.keep_all(get_adapter(model)).layers[0]
    prune_physically(get_adapter(model), plan)
    with pytest.raises(AdaPrunerError, match="differ in size"):
        make_stock(get_adapter(model))


def _prune_uniform(root, family: str, *extra: str):
    save_tiny(root / family, family)
    args = ["prune", root / family, "--ratio", "0.2", "--uniform", "--calibration", root / "corpus.txt"]
    return run(*args, "--seq-len", "16", "--refit-calibration", "8x32", "--output", root / "out", *extra)


@pytest.mark.parametrize(
    ("family", "extra"),
    [
        ("llama-gqa", ["--method", "flap"]),  # compensation biases -> attention_bias / mlp_bias
        ("llama-mha", ["--method", "local-obs"]),  # least-squares refit with its bias
        ("qwen2-gqa", ["--metric", "element1"]),  # no new bias: Qwen2's own q/k/v biases stay
        ("mistral-gqa", ["--method", "local-obs", "--no-refit-bias"]),
    ],
)
def test_uniform_prune_loads_without_remote_code(tiny_model_dir, family, extra):
    root = tiny_model_dir
    result = _prune_uniform(root, family, *extra)
    assert result.exit_code == 0, result.output
    config = json.loads((root / "out" / "config.json").read_text())
    assert "pruned_layers" not in config and "auto_map" not in config
    assert not (root / "out" / "modeling_adapruner.py").exists()
    record = json.loads((root / "out" / "adapruner.json").read_text())
    shapes = record["layer_shapes"]
    dense = json.loads((root / family / "config.json").read_text())
    assert len({json.dumps(s, sort_keys=True) for s in shapes}) == 1  # one size for every layer ...
    assert shapes[0]["intermediate_size"] < dense["intermediate_size"]  # ... and every layer pruned
    assert config["intermediate_size"] == shapes[0]["intermediate_size"]
    assert config["num_attention_heads"] == shapes[0]["num_attention_heads"]
    assert abs(record["achieved_ratio"] - 0.2) < 0.05
    from adapruner.api import info, load_pruned

    assert info(root / "out")["architecture"] == "stock"
    expected = load_pruned(root / "out")(TOKENS).logits
    torch.testing.assert_close(_reload_without_adapruner(root / "out", False), expected)
    assert '"architecture": "stock"' in run("info", root / "out").output


def test_info_says_per_layer_for_mixed_sizes(tiny_model_dir):
    root = tiny_model_dir
    args = ["prune", root / "tiny", "--ratio", "0.2", "--method", "flap", "--calibration", root / "corpus.txt"]
    assert run(*args, "--seq-len", "16", "--output", root / "out").exit_code == 0
    from adapruner.api import info

    assert info(root / "out")["architecture"] == "per-layer"


@pytest.mark.parametrize(
    ("family", "extra", "message"),
    [
        ("qwen2-gqa", ["--method", "flap"], "has no o_proj/down_proj bias"),
        ("mistral-gqa", ["--method", "local-obs"], "has no o_proj/down_proj bias"),
        ("llama-gqa", ["--layers", "1:3"], "drop --layers"),
        ("llama-gqa", ["--ranking", "global"], "drop --ranking"),
        ("llama-gqa", ["--depth-slope", "1"], "drop --depth-slope"),
    ],
)
def test_uniform_refusals_are_one_line_and_write_nothing(tiny_model_dir, family, extra, message):
    root = tiny_model_dir
    result = _prune_uniform(root, family, *extra)
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (root / "out").exists()


def test_uniform_space_fixes_the_allocation():
    space = SearchSpace(uniform=True)
    assert space.rankings == ["layer"] and space.layer_ranges == ["0:"] and space.per_layer
    assert space.depth_slope == (0.0, 0.0) and space.depth_bend == (0.0, 0.0)
    assert baseline_params(space)["layers"] == "0:"
    flap = warm_start_params(space, "flap")
    assert flap["ranking"] == "layer" and flap["compensate"] and flap["layers"] == "0:"
    assert warm_start_params(SearchSpace(), "flap")["ranking"] == "global-all"


def test_search_uniform_then_prune_from_run(tiny_model_dir):
    root = tiny_model_dir
    corpus = str(root / "corpus.txt")
    common = ["--ratio", "0.15", "--trials", "3", "--sources", corpus, "--metrics", "element1,l2"]
    common += ["--pool-per-source", "10", "--pruner", "none", "--objective-data", corpus, "--objective-tokens", "512"]
    result = run("search", root / "tiny", *common, "--uniform", "--output", root / "run")
    assert result.exit_code == 0, result.output
    best = json.loads((root / "run" / "best.json").read_text())
    assert best["space"]["uniform"] and best["best"]["config"]["layers"] == "0:"
    assert best["best"]["config"]["ranking"] == "layer"
    result = run("prune", root / "tiny", "--from-run", root / "run", "--output", root / "pruned")
    assert result.exit_code == 0, result.output
    from adapruner.api import info

    assert info(root / "pruned")["architecture"] == "stock"
    assert info(root / "pruned")["recipe"]["uniform"]
    result = run("search", root / "tiny", *common, "--uniform", "--layers", "1:3", "--output", root / "run2")
    assert result.exit_code == 2 and "drop --layers" in result.output
    assert not (root / "run2").exists()


def test_from_run_of_a_free_search_refuses_uniform(tiny_model_dir):
    root = tiny_model_dir
    corpus = str(root / "corpus.txt")
    args = ["search", root / "tiny", "--ratio", "0.15", "--trials", "1", "--sources", corpus, "--metrics", "element1"]
    args += ["--pool-per-source", "10", "--objective-data", corpus, "--objective-tokens", "512"]
    assert run(*args, "--output", root / "run").exit_code == 0
    with pytest.raises(AdaPrunerError, match="was not uniform"):
        prune(str(root / "tiny"), from_run=root / "run", uniform=True)


def test_uniform_is_another_space_but_old_studies_keep_their_fingerprint():
    """A study made before ``uniform``, ``coarse_to_fine`` and ``align`` existed (one-level moves) continues with
    ``coarse_to_fine: 1``; a uniform space, or today's coarse-to-fine default, is another space."""
    import hashlib
    from dataclasses import asdict

    from adapruner.search.storage import space_fingerprint

    old_space = SearchSpace(coarse_to_fine=1)
    before = {k: v for k, v in asdict(old_space).items() if k not in ("uniform", "coarse_to_fine", "align")}
    old = hashlib.sha256(json.dumps(before, sort_keys=True, default=str).encode()).hexdigest()[:12]
    assert space_fingerprint(old_space) == old
    assert space_fingerprint(SearchSpace(coarse_to_fine=1, uniform=True)) != old
    assert SearchSpace().coarse_to_fine == 4 and space_fingerprint(SearchSpace()) != old
    assert space_fingerprint(SearchSpace(coarse_to_fine=1, align=64)) != old  # an aligned search is another space


def test_run_config_uniform_reaches_the_search_space():
    from adapruner.pipeline import RunConfig

    cfg = RunConfig(model="m", ratio=0.2, uniform=True, search_space={"metrics": ["element1", "wifv"]})
    space = cfg.space()
    assert space.uniform and space.metrics == ["element1", "wifv"] and space.rankings == ["layer"]
    assert not RunConfig(model="m", ratio=0.2).space().uniform


def test_uniform_per_layer_stage_tries_each_attention_level_then_tpe_goes_on(tiny_model_dir):
    """A --uniform search assembles the supernet's candidates at one size for every layer, one trial per
    attention level, each within the budget; then profile trials again; its best prunes to the stock
    architecture and reproduces the trial's perplexity."""
    import optuna

    from adapruner.data import token_stream
    from adapruner.evaluation import perplexity
    from adapruner.search import search
    from adapruner.search.evolution import params_to_counts
    from conftest import supernet_search_setup

    root = tiny_model_dir
    corpus, space, kwargs = supernet_search_setup(root, warm_starts=[], profile_trials=1, uniform=True)
    search(str(root / "tiny"), 0.2, trials=6, output=root / "run", space=space, pruner="none", **kwargs)
    study = optuna.load_study(study_name="adapruner", storage=f"sqlite:///{root / 'run' / 'study.db'}")
    kinds = [t.user_attrs.get("allocation", "profile") for t in study.trials]
    levels = [params_to_counts(t.params) for t in study.trials if t.user_attrs.get("allocation") == "per-layer"]
    # tiny LLaMA-GQA: 6 query heads in 2 KV groups -> keep 6, 4 or 2 heads (one per group at least)
    assert kinds == ["profile", "per-layer", "per-layer", "per-layer", "profile", "profile"]
    assert [counts[0][0] for counts in levels] == [6, 4, 2]
    assert all(len(set(counts.values())) == 1 for counts in levels)  # every layer alike
    assert levels[0][0][1] < levels[1][0][1] < levels[2][0][1]  # fewer heads kept, more channels kept
    best = json.loads((root / "run" / "best.json").read_text())
    trial = min((t for t in study.trials if t.user_attrs.get("allocation") == "per-layer"), key=lambda t: t.value)
    best["best"] |= {"trial": trial.number, "value": trial.value, "config": trial.user_attrs["config"], "subset": None}
    best |= trial.user_attrs["from_run"]
    (root / "run" / "best.json").write_text(json.dumps(best))
    pruned = prune(str(root / "tiny"), from_run=root / "run", output=root / "pruned")
    tokens = token_stream(pruned.tokenizer, str(corpus), "validation", 512)
    assert perplexity(pruned.model, tokens, 16, progress=False) == pytest.approx(trial.value, rel=1e-4)
    from adapruner.api import info

    assert info(root / "pruned")["architecture"] == "stock"
    expected = pruned.model(TOKENS).logits
    torch.testing.assert_close(_reload_without_adapruner(root / "pruned", False), expected)
