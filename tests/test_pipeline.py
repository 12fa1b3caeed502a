"""`adapruner run` on a tiny model: every stage runs once, a rerun skips them, the report is complete."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapruner import AdaPrunerError
from adapruner.pipeline import load_run_config, recovery_label, run


def tiny_run_config(root, **overrides):
    corpus = str(root / "corpus.txt")
    options = {
        "model": str(root / "tiny"),
        "ratio": 0.2,
        "trials": 2,
        "search_space": {"sources": [corpus], "num_samples": [4, 10], "metrics": ["element1", "l2"]},
        "pool_per_source": 10,
        "objective_data": corpus,
        "objective_tokens": 512,
        "baseline_calibration": corpus,
        "finetune_data": corpus,
        "finetune": {"max_steps": 2, "cutoff_len": 32, "val_set_size": 0, "warmup_steps": 0, "batch_size": 4},
        "ppl": [corpus],
        "seq_len": [16],
        "eval_tokens": 512,
        "tasks": [],
    }
    return load_run_config(None, **(options | overrides))


def test_run_does_every_stage_once_and_reports(tiny_model_dir, monkeypatch):
    from conftest import name_tokenizer_for_llama_cpp

    root = tiny_model_dir
    name_tokenizer_for_llama_cpp(root / "tiny", monkeypatch)
    cfg = tiny_run_config(root, align=4, export="gguf", export_quant="f32")
    evaluations = run(cfg, root / "run")
    recovered = recovery_label(cfg.recovery_options(baseline=False))
    assert recovered.startswith("KD") and recovery_label(cfg.recovery_options(baseline=True)) == "LoRA"
    assert list(evaluations) == [
        "dense",
        "LLM-Pruner recipe",
        "AdaPruner",
        "LLM-Pruner recipe + LoRA",
        f"AdaPruner + {recovered}",
    ]
    results = {label: json.loads(Path(path).read_text()) for label, path in evaluations.items()}
    dense = results["dense"]["params"]
    for label, result in results.items():
        assert result["label"] == label
        if label != "dense":
            assert result["params"] == pytest.approx(0.8 * dense, rel=0.03)
    (recovered_dir,) = [d for d in (root / "run").iterdir() if d.name.startswith("adapruner-") and d.is_dir()]
    ours = json.loads((recovered_dir / "adapruner.json").read_text())
    assert ours["search"]["run"] == str(root / "run" / "search")
    assert ours["finetune"]["loss"] == "kd+lm" and ours["finetune"]["teacher"] == str(root / "tiny")
    for model in (recovered_dir, root / "run" / "llm-pruner"):  # align 4: every layer's channels on the grid
        shapes = json.loads((model / "adapruner.json").read_text())["layer_shapes"]
        widths = [layer["intermediate_size"] for layer in shapes]
        assert all(w % 4 == 0 for w in widths) and min(widths) < 40, widths
    from adapruner.export import gguf_layers

    exported = gguf_layers(recovered_dir / "model-f32.gguf")  # the final model, as llama.cpp reads it
    assert exported["channels"] == [layer["intermediate_size"] for layer in ours["layer_shapes"]]
    baseline = json.loads((root / "run" / "llm-pruner-lora" / "adapruner.json").read_text())["finetune"]
    assert baseline["loss"] == "lm" and baseline["method"] == "lora" and baseline["teacher"] is None
    assert baseline["lr"] == 1e-4  # LLM-Pruner's own setting, not the measured LoRA default
    report = (root / "run" / "report.md").read_text()
    rows = [line.split("|")[1].strip() for line in report.splitlines() if line.startswith("| ")]
    assert set(evaluations) <= set(rows), rows
    assert "Stage times" in report and "<table>" in (root / "run" / "report.html").read_text()
    times = json.loads((root / "run" / "stages.json").read_text())
    assert {"search", "prune adapruner", "finetune adapruner", "export", f"evaluate AdaPruner + {recovered}"} <= set(
        times
    )

    # a rerun finds every stage done: nothing is recomputed (no stage may run again)
    def fail(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    for name in ("adapruner.api.evaluate", "adapruner.api.prune", "adapruner.pipeline.finetune"):
        monkeypatch.setattr(name, fail)
    run(cfg, root / "run")
    assert json.loads((root / "run" / "stages.json").read_text()) == times


def test_run_config_errors(tmp_path):
    with pytest.raises(AdaPrunerError, match="needs a ratio"):
        load_run_config(None, model="x")
    with pytest.raises(AdaPrunerError, match="outside"):
        load_run_config(None, model="x", ratio=1.5)
    path = tmp_path / "run.yaml"
    path.write_text("model: x\nratio: 0.2\ntrails: 3\n")
    with pytest.raises(AdaPrunerError, match="unknown key"):
        load_run_config(path)
    path.write_text("model: x\nratio: 0.2\nfinetune: {rank: 3}\n")
    with pytest.raises(AdaPrunerError, match="fine-tuning option"):
        load_run_config(path)
    with pytest.raises(AdaPrunerError, match="unknown export format 'onnx'"):
        load_run_config(None, model="x", ratio=0.2, export="onnx")
    with pytest.raises(AdaPrunerError, match="unknown --quant 'q9'"):
        load_run_config(None, model="x", ratio=0.2, export="gguf", export_quant="q9")
    path.write_text("model: x\nratio: 0.2\ntasks: [boolq, nosuchtask]\nlimit: 5\n")
    with pytest.raises(AdaPrunerError, match="nosuchtask"):
        load_run_config(path)


def test_run_cli_refuses_a_bad_config_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from adapruner.cli import app

    path = tmp_path / "run.yaml"
    path.write_text("model: x\nratio: 0.2\ntrails: 3\n")
    result = CliRunner().invoke(app, ["run", "--config", str(path), "--output", str(tmp_path / "out")])
    assert result.exit_code == 2 and "unknown key(s) ['trails']" in result.output
    result = CliRunner().invoke(app, ["run", "x", "--ratio", "2", "--output", str(tmp_path / "out")])
    assert result.exit_code == 2 and "outside (0, 1)" in result.output
    assert not (tmp_path / "out").exists()


def test_run_reaches_every_search_option_and_every_run_config_field():
    """CLI parity for `run`: every option of `adapruner search` is a `run` flag, and every RunConfig field
    a flag too, except the three mappings of other configs' fields that only YAML can hold."""
    import inspect
    from dataclasses import fields

    from adapruner import cli
    from adapruner.cli.search import run_pipeline
    from adapruner.pipeline import RunConfig

    search_flags = set(inspect.signature(cli.search).parameters)
    run_flags = set(inspect.signature(run_pipeline).parameters)
    assert search_flags - run_flags == set()
    renamed = {"export_quant": "quant"}
    config = {renamed.get(f.name, f.name) for f in fields(RunConfig)}
    assert config - run_flags == {"search_space", "finetune", "baseline_finetune"}  # YAML: dicts of other configs
    flags_for_those = {"space", "sources", "metrics", "no_finetune", "max_steps", "finetune_tokens"}
    assert run_flags - config == {"output", "config"} | flags_for_those


def test_run_flags_reach_the_search(tiny_model_dir, tmp_path):
    """`run --layers --head-mode --storage --study --sources --pool-seq-len` are what the search ran with."""
    import optuna
    from typer.testing import CliRunner

    from adapruner.cli import app

    root = tiny_model_dir
    corpus = str(root / "corpus.txt")
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    args = ["run", str(root / "tiny"), "--output", str(root / "run"), "--ratio", "0.2", "--trials", "1"]
    args += ["--layers", "1:3", "--head-mode", "kv-group", "--storage", storage, "--study", "tiny-run"]
    args += ["--sources", corpus, "--metrics", "element1,l2", "--pool-per-source", "10", "--pool-seq-len", "80"]
    args += ["--objective-data", corpus, "--objective-tokens", "512", "--no-baseline", "--no-finetune"]
    args += ["--ppl", corpus, "--seq-len", "16", "--eval-tokens", "256", "--tasks", ""]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    best = json.loads((root / "run" / "search" / "best.json").read_text())
    assert best["head_mode"] == "kv-group" and best["layers"] == "1:3" and best["pool"]["seq_len"] == 80
    assert best["pool"]["per_source"] == 10 and best["space"]["sources"] == [corpus]
    assert best["space"]["metrics"] == ["element1", "l2"]
    study = optuna.load_study(study_name="tiny-run", storage=storage)
    assert len(study.trials) == 1 and study.trials[0].user_attrs["from_run"]["recipe"]["head_mode"] == "kv-group"
