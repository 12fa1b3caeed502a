"""Saved pruned models reload with identical logits: plain transformers, trust_remote_code and load_pruned."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from adapruner import AdaPrunerError, load_pruned
from adapruner.files import atomic_output_dir
from adapruner.models import get_adapter
from adapruner.pruning import prune_physically
from adapruner.pruning.io import read_record, save_pruned
from conftest import make_tiny
from test_pruning_exact import random_plan

TOKENS = torch.arange(3, 23).view(2, 10)


def _pruned(name: str, layers_equal: bool):
    model = make_tiny(name)
    plan, _ = random_plan(model, 0.3, "auto")
    if not layers_equal:  # leave layer 0 whole -> mixed sizes
        from adapruner.pruning.plan import PrunePlan

        plan.layers[0] = PrunePlan.keep_all(get_adapter(model)).layers[0]
    else:
        plan.layers = [plan.layers[1]] * len(plan.layers)
    prune_physically(get_adapter(model), plan)
    return model, plan


def _reload_without_adapruner(directory, trust_remote_code: bool) -> torch.Tensor:
    """Load in a fresh interpreter where `import adapruner` fails."""
    code = (
        "import sys, torch; sys.modules['adapruner'] = None\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(directory)!r}, trust_remote_code={trust_remote_code})\n"
        f"torch.save(m(torch.arange(3, 23).view(2, 10)).logits, {str(directory / 'logits.pt')!r})\n"
    )
    env = dict(os.environ, HF_MODULES_CACHE=str(directory.parent / "hf_modules"), HF_HUB_OFFLINE="1")
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    return torch.load(directory / "logits.pt")


@pytest.mark.parametrize("name", ["llama-gqa", "qwen2-gqa", "mistral-gqa"])
def test_uniform_sizes_load_with_plain_transformers(tmp_path, name):
    model, _ = _pruned(name, layers_equal=True)
    save_pruned(model, None, {"format": 1}, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "pruned_layers" not in config and "auto_map" not in config
    torch.testing.assert_close(_reload_without_adapruner(tmp_path / "out", False), model(TOKENS).logits)


@pytest.mark.parametrize("name", ["llama-gqa", "llama-bias", "qwen2-gqa", "mistral-gqa"])
def test_mixed_sizes_load_with_remote_code_and_load_pruned(tmp_path, name):
    model, plan = _pruned(name, layers_equal=False)
    expected = model(TOKENS).logits
    save_pruned(model, None, {"format": 1, "plan": plan.to_dict()}, tmp_path / "out")
    assert (tmp_path / "out" / "modeling_adapruner.py").is_file()
    torch.testing.assert_close(_reload_without_adapruner(tmp_path / "out", True), expected)
    reloaded = load_pruned(tmp_path / "out")
    assert torch.equal(reloaded(TOKENS).logits, expected)
    assert get_adapter(reloaded).layer_shapes() == plan.shapes()


def test_existing_output_is_refused_and_kept(tmp_path):
    target = tmp_path / "run"
    target.mkdir()
    (target / "keep.txt").write_text("old")
    with pytest.raises(AdaPrunerError, match="already holds another run"):
        save_pruned(make_tiny("llama-mha"), None, {}, target)
    assert (target / "keep.txt").read_text() == "old"


def test_failure_leaves_nothing_half_written(tmp_path):
    with pytest.raises(RuntimeError), atomic_output_dir(tmp_path / "run") as tmp:
        (tmp / "half.bin").write_text("x")
        raise RuntimeError("crash while saving")
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_atomically(tmp_path):
    target = tmp_path / "run"
    target.mkdir()
    (target / "old.txt").write_text("old")
    save_pruned(make_tiny("llama-mha"), None, {"format": 1}, target, overwrite=True)
    assert not (target / "old.txt").exists() and read_record(target) == {"format": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_corrupted_record_is_reported(tmp_path):
    (tmp_path / "adapruner.json").write_text("{not json")
    with pytest.raises(AdaPrunerError, match="corrupted"):
        read_record(tmp_path)
