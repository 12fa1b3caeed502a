"""benchmarks/compare_methods.py: per-model budgets, output names and the report read back from disk."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compare_methods.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("compare_methods", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_each_model_gets_its_budget_unless_a_flag_sets_it(bench):
    args = bench.parse_args([])
    smol, qwen = bench.for_model(args, "smollm2-135m"), bench.for_model(args, "qwen2.5-0.5b")
    assert (smol.trials, smol.finetune_steps, smol.eval_tokens) == (20, 10, 8192)
    assert (qwen.trials, qwen.finetune_steps, qwen.eval_tokens) == (20, 5, 4096)
    assert bench.lora_name(qwen) == "lora-wiki-s5-c128" and bench.eval_tag(qwen) == "eval-src4-tok4096-lim5"
    assert bench.variant("adapruner", qwen) == "adapruner-src4-t20"

    args = bench.parse_args(["--trials", "30", "--eval-tokens", "2048"])
    qwen = bench.for_model(args, "qwen2.5-0.5b")
    assert (qwen.trials, qwen.finetune_steps, qwen.eval_tokens) == (30, 5, 2048)
    assert bench.for_model(args, "smollm2-135m").finetune_steps == 10


def test_full_runs_every_model_with_the_gpu_settings(bench):
    qwen = bench.for_model(bench.parse_args(["--full"]), "qwen2.5-0.5b")
    assert qwen.eval_tokens is None and qwen.limit is None
    assert bench.lora_name(qwen) == "lora-wiki-llm-pruner"


def _write_eval(path: Path, wiki: float, params: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    perplexity = {"wiki@128": wiki, "news@128": 2 * wiki, "books@128": 4 * wiki, "squad@128": wiki}
    geomean = (wiki * 2 * wiki * 4 * wiki * wiki) ** 0.25
    path.write_text(json.dumps({"params": params, "perplexity": perplexity | {"geomean@128": geomean}}))


def test_report_reads_each_model_with_its_own_settings(bench, tmp_path):
    args = bench.parse_args(["--run-root", str(tmp_path), "--methods", "flap", "--tasks", "none"])
    for model, tokens, steps in (("smollm2-135m", 8192, 10), ("qwen2.5-0.5b", 4096, 5)):
        tag = f"eval-src4-tok{tokens}-limall-nozs"
        _write_eval(tmp_path / model / "dense" / f"{tag}.json", 10.0, 100)
        method = tmp_path / model / "r0.2" / "flap"
        _write_eval(method / f"{tag}.json", 20.0, 80)
        _write_eval(method / f"lora-wiki-s{steps}-c128.{tag}.json", 15.0, 80)
    # an output of the other model's settings must not be read
    _write_eval(tmp_path / "qwen2.5-0.5b" / "r0.2" / "flap" / "eval-src4-tok8192-limall-nozs.json", 99.0, 80)

    rows = bench.collect_rows(args)
    qwen = {(r["method"], r["recovery"]): r["wiki_ppl"] for r in rows if r["model"] == "qwen2.5-0.5b"}
    assert qwen == {("dense", "none"): 10.0, ("flap", "none"): 20.0, ("flap", "LoRA 5 steps"): 15.0}
    smol = {(r["method"], r["recovery"]) for r in rows if r["model"] == "smollm2-135m" and r["ratio"] == 0.2}
    assert ("flap", "LoRA 10 steps") in smol
    geo = {(r["method"], r["recovery"]): round(r["geomean_ppl"], 6) for r in rows if r["model"] == "qwen2.5-0.5b"}
    assert geo[("flap", "none")] == round(20.0 * 8**0.25, 6)
    assert all(r["vs_flap"] == pytest.approx(1.0) for r in rows if r["method"] == "flap")

    text = bench.markdown(args, rows)
    assert "first 4096 tokens" in text and "LoRA 5 steps" in text and "first 8192 tokens" in text
