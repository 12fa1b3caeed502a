"""The CLI end to end on a tiny saved model, and every bad input: one line, exit 2, nothing written."""

from __future__ import annotations

import importlib
import json

import pytest
from typer.testing import CliRunner

from adapruner.cli import app

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def prune_args(root, *extra: str) -> list[str]:
    return [
        "prune",
        root / "tiny",
        "--ratio",
        "0.15",
        "--calibration",
        root / "corpus.txt",
        "--seq-len",
        "16",
        "--layers",
        "1:3",
        *extra,
    ]


def test_prune_info_evaluate_roundtrip(tiny_model_dir):
    root = tiny_model_dir
    result = run(*prune_args(root, "--output", root / "out"))
    assert result.exit_code == 0, result.output
    record = json.loads((root / "out" / "adapruner.json").read_text())
    assert record["recipe"]["metric"] == "element1" and record["recipe"]["calibration"].endswith("corpus.txt")
    assert record["layer_shapes"][0] == {"num_attention_heads": 6, "num_key_value_heads": 2, "intermediate_size": 40}
    assert record["params"]["pruned"] < record["params"]["dense"]
    assert abs(record["achieved_ratio"] - 0.15) < 0.03
    shown = run("info", root / "out")
    assert shown.exit_code == 0 and '"recipe"' in shown.output and '"metric": "element1"' in shown.output
    # a directory written before 2026-12-07 (format 1: one flat "config") still loads and shows its config
    old = {k: v for k, v in record.items() if k not in ("recipe", "runtime", "allocation")}
    (root / "out" / "adapruner.json").write_text(json.dumps(old | {"format": 1, "config": record["recipe"]}))
    shown = run("info", root / "out")
    assert shown.exit_code == 0 and '"config"' in shown.output and '"metric": "element1"' in shown.output
    result = run(
        "evaluate", root / "out", "--ppl", root / "corpus.txt", "--seq-len", "16,32", "--output", root / "eval.json"
    )
    assert result.exit_code == 0, result.output
    ppl = json.loads((root / "eval.json").read_text())["perplexity"]
    assert set(ppl) == {f"{root / 'corpus.txt'}@16", f"{root / 'corpus.txt'}@32"}
    assert all(1.0 < v < 1e6 for v in ppl.values())


def test_l2_needs_no_calibration(tiny_model_dir):
    root = tiny_model_dir
    result = run(
        "prune",
        root / "tiny",
        "--ratio",
        "0.2",
        "--metric",
        "l2",
        "--calibration",
        "nowhere.txt",
        "--layers",
        "0:4",
        "--output",
        root / "out",
    )
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--ratio", "1.5"], "outside (0, 1)"),
        (["--ratio", "0.6"], "cannot be reached inside layers 1:3"),
        (["--ratio", "0"], "outside (0, 1)"),
        (["--metric", "taylor"], "unknown metric 'taylor'"),
        (["--aggregation", "median"], "unknown aggregation"),
        (["--layers", "0:99"], "outside the model's 4 layers"),
        (["--layers", "three"], "START:END"),
        (["--num-samples", "5000"], "windows of 16 tokens"),
        (["--calibration", "missing.txt"], "missing.txt"),
        (["--calibration", "nosuchsource"], "unknown"),
        (["--metric", "wanda_sp", "--activation-calibration", "8by16"], "must look like 128x128"),
        (["--metric", "wanda_sp", "--activation-calibration", "5000x16"], "windows of 16 tokens"),
        (["--refit", "magic"], "unknown --refit 'magic'"),
        (["--refit", "lsq", "--refit-calibration", "2x8"], "saw 16 calibration tokens for 48 input features"),
        (["--refit", "lsq", "--refit-calibration", "many"], "must look like 128x128"),
        (["--refit", "lsq", "--refit-damping", "-1"], "--refit-damping -1.0 must lie in"),
        (["--metric", "obs", "--ranking", "global"], "--metric obs chooses units inside each layer"),
        (["--metric", "obs", "--refit", "bias"], "--metric obs refits by least squares"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(tiny_model_dir, extra, message):
    root = tiny_model_dir
    result = run(*prune_args(root, "--output", root / "out"), *extra)
    assert result.exit_code == 2, result.output
    assert message in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0]
    assert not (root / "out").exists()
    assert not [p for p in root.iterdir() if p.name.startswith(".out")]


def test_existing_output_needs_overwrite(tiny_model_dir):
    root = tiny_model_dir
    (root / "out").mkdir()
    (root / "out" / "other.txt").write_text("x")
    result = run(*prune_args(root, "--output", root / "out"))
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert run(*prune_args(root, "--output", root / "out", "--overwrite")).exit_code == 0
    assert not (root / "out" / "other.txt").exists()


def test_unwritable_output(tiny_model_dir):
    root = tiny_model_dir
    result = run(*prune_args(root, "--output", root / "corpus.txt" / "out"))
    assert result.exit_code == 2 and "not writable" in result.output


def test_missing_model_path(tmp_path):
    result = run("prune", tmp_path / "nope", "--ratio", "0.2", "--output", tmp_path / "out")
    assert result.exit_code == 2 and "does not exist" in result.output


def test_not_a_model_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run("evaluate", tmp_path / "empty")
    assert result.exit_code == 2 and "not a model directory" in result.output


def test_unsupported_architecture_lists_families(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp_path / "gpt2")
    result = run("prune", tmp_path / "gpt2", "--ratio", "0.2", "--output", tmp_path / "out")
    assert result.exit_code == 2
    assert "unsupported model type 'gpt2'" in result.output and "llama" in result.output


def test_hub_id_offline_is_explained(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = run("prune", "some-org/some-model", "--ratio", "0.2", "--output", tmp_path / "out")
    assert result.exit_code == 2 and "smollm2-135m" in result.output


def test_info_on_non_adapruner_dir(tmp_path):
    result = run("info", tmp_path)
    assert result.exit_code == 2 and "adapruner.json" in result.output


@pytest.mark.parametrize(
    "extra",
    [
        ["--metric", "element2", "--aggregation", "max"],
        ["--metric", "vector", "--aggregation", "last"],
        ["--metric", "wanda_sp", "--global-ranking"],
        ["--metric", "flap", "--head-mode", "kv-group"],
        ["--metric", "second", "--aggregation", "prod", "--no-gradient-checkpointing"],
        ["--metric", "element1", "--batch-size", "3", "--num-samples", "7"],
        ["--metric", "mix", "--mix", "element1=0.5,wanda_sp=0.5", "--aggregation", "mean"],
    ],
)
def test_every_metric_prunes_from_the_cli(tiny_model_dir, extra):
    root = tiny_model_dir
    result = run(*prune_args(root, "--output", root / "out", *extra))
    assert result.exit_code == 0, result.output
    record = json.loads((root / "out" / "adapruner.json").read_text())
    assert _typed_options_recorded(extra, record["recipe"] | record["runtime"])


def _typed_options_recorded(extra: list[str], config: dict) -> bool:
    """Every flag typed in ``extra`` reached the recorded recipe with its value (older spellings as the
    one field they now set): what the command did, not only that it exited 0."""
    older = {"--global-ranking": ("ranking", "global"), "--compensate": ("refit", "bias")}
    i = 0
    while i < len(extra):
        flag = extra[i]
        if flag in older:
            field, value = older[flag]
            i += 1
        elif flag.startswith("--no-"):
            field, value = flag[5:].replace("-", "_"), False
            i += 1
        else:
            field, value, i = flag[2:].replace("-", "_"), extra[i + 1], i + 2
        recorded = config[field]
        if isinstance(recorded, dict):  # --mix a=0.5,b=0.5
            value = {k: float(v) for k, v in (item.split("=") for item in value.split(","))}
        elif isinstance(recorded, bool) or recorded is None:
            pass
        else:
            value = type(recorded)(value)
        assert recorded == value, (flag, recorded, value)
    return True


@pytest.mark.parametrize(
    "extra",
    [
        ["--refit", "lsq"],
        ["--metric", "wifv", "--ranking", "global-all", "--refit", "lsq", "--no-refit-bias", "--refit-damping", "0.1"],
        ["--metric", "obs", "--obs-rounds", "4"],
        ["--metric", "obs", "--head-mode", "kv-group"],
    ],
)
def test_refit_and_obs_prune_from_the_cli(tiny_model_dir, extra):
    """The layer-by-layer engine from the CLI: a smaller, reloadable model and what the refit did in the record."""
    from adapruner import load_pruned

    root = tiny_model_dir
    result = run(*prune_args(root, "--output", root / "out", "--refit-calibration", "40x16", *extra))
    assert result.exit_code == 0, result.output
    record = json.loads((root / "out" / "adapruner.json").read_text())
    local = record["local"]
    assert local["tokens"] == 640 and set(local["relative_errors"]) and 0 <= local["mean_relative_error"] < 1
    assert _typed_options_recorded(extra, record["recipe"] | record["runtime"])
    assert record["recipe"]["refit"] == ("none" if record["recipe"]["metric"] == "obs" else "lsq")
    assert bool(local["curves"]) == (record["recipe"]["metric"] == "obs")  # OBS records its error curves
    assert record["params"]["pruned"] < record["params"]["dense"] and abs(record["achieved_ratio"] - 0.15) < 0.03
    bias = load_pruned(root / "out").model.layers[1].mlp.down_proj.bias
    assert (bias is None) == ("--no-refit-bias" in extra)


def test_default_refit_windows_fit_a_source_of_short_documents(tiny_model_dir):
    """Like books (passages of ~80 tokens: 17 windows of 128), a source without 128 windows of 128 tokens
    refits on as many tokens in 64-token windows, instead of failing after the scoring (issue 26)."""
    from conftest import write_corpus

    root = tiny_model_dir
    write_corpus(root / "short.txt", documents=400, words=30)  # ~90 tokens a document
    result = run(*prune_args(root, "--output", root / "out", "--refit", "lsq"), "--calibration", root / "short.txt")
    assert result.exit_code == 0, result.output
    record = json.loads((root / "out" / "adapruner.json").read_text())
    assert record["recipe"]["refit_calibration"] == "256x64" and record["local"]["tokens"] == 256 * 64


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--refit", "lsq"], "too little text for the default refit windows (16,384 tokens"),
        (["--metric", "obs"], "give a smaller --refit-calibration NxL or another --calibration"),
        (["--refit", "lsq", "--refit-calibration", "100x128"], "--refit-calibration 100x128 needs 100: give"),
        (["--refit", "lsq", "--refit-calibration", "100x128"], "give --refit-calibration 200x64, or another"),
        (
            ["--refit", "lsq", "--refit-calibration", "1x16", "--calibration", "{corpus},{corpus}"],
            "--refit-calibration 1x16 cannot cover the 2 sources of --calibration",
        ),
        (["--num-samples", "100", "--seq-len", "128"], "use --seq-len 64 or fewer --num-samples, or another"),
        (["--metric", "wanda_sp", "--activation-calibration", "100x128"], "give --activation-calibration 200x64"),
    ],
)
def test_too_small_calibration_fails_before_the_weights_load(tiny_model_dir, monkeypatch, extra, message):
    """Every window draw is checked on the tokenizer alone: the one-line error names the option to change,
    and no weights are loaded (a real model would have loaded and scored for minutes first)."""

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights were loaded before the calibration was checked")

    prune_room = importlib.import_module("adapruner.recipe.prune")  # the module (the package exports the function)
    monkeypatch.setattr(prune_room, "load_causal_lm", no_weights)
    root = tiny_model_dir
    extra = [arg.format(corpus=root / "corpus.txt") for arg in extra]
    result = run(*prune_args(root, "--output", root / "out"), *extra)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert not (root / "out").exists()


def test_importance_command_writes_scores(tiny_model_dir):
    root = tiny_model_dir
    result = run(
        "importance",
        root / "tiny",
        "--metric",
        "element1",
        "--calibration",
        root / "corpus.txt",
        "--seq-len",
        "16",
        "--layers",
        "1:3",
        "--output",
        root / "scores.json",
    )
    assert result.exit_code == 0, result.output
    report = json.loads((root / "scores.json").read_text())
    assert set(report["scores"]) == {"1.attention", "1.mlp", "2.attention", "2.mlp"}
    assert len(report["scores"]["1.attention"]) == 6 and len(report["scores"]["1.mlp"]) == 40  # GQA -> query heads
    assert len(report["plan"]["layers"]) == 4


def test_calibration_from_two_sources(tiny_model_dir):
    root = tiny_model_dir
    from conftest import write_corpus

    write_corpus(root / "other.txt", seed=5)
    result = run(
        *prune_args(root, "--output", root / "out", "--num-samples", "5"),
        "--calibration",
        f"{root / 'corpus.txt'},{root / 'other.txt'}",
    )
    assert result.exit_code == 0, result.output


def test_mix_without_weights_is_refused(tiny_model_dir):
    root = tiny_model_dir
    result = run(*prune_args(root, "--output", root / "out", "--metric", "mix"))
    assert result.exit_code == 2 and "positive weight" in result.output


@pytest.mark.parametrize("family", ["mistral-gqa", "qwen2-gqa", "qwen2-mha", "llama-mha"])
@pytest.mark.parametrize("metric", ["element2", "flap", "vector"])
def test_metrics_on_every_family_from_the_cli(tiny_model_dir, family, metric):
    from conftest import save_tiny

    root = tiny_model_dir
    save_tiny(root / family, family)
    result = run(
        "prune",
        root / family,
        "--ratio",
        "0.15",
        "--metric",
        metric,
        "--calibration",
        root / "corpus.txt",
        "--seq-len",
        "16",
        "--layers",
        "1:3",
        "--output",
        root / "out",
    )
    assert result.exit_code == 0, result.output
    assert run("evaluate", root / "out", "--ppl", root / "corpus.txt", "--seq-len", "16").exit_code == 0


def test_pool_command_writes_per_sample_statistics(tiny_model_dir):
    import csv

    root = tiny_model_dir
    result = run(
        "pool",
        root / "tiny",
        "--calibration",
        root / "corpus.txt",
        "--per-source",
        "6",
        "--seq-len",
        "16",
        "--output",
        root / "pool.csv",
    )
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((root / "pool.csv").open()))
    assert len(rows) == 6 and {"source", "loss", "grad_norm", "tokens"} <= set(rows[0])
    assert all(float(r["loss"]) > 0 and float(r["grad_norm"]) > 0 for r in rows)
    assert list((root / "cache" / "stats").glob("*.safetensors"))
    result = run(
        "pool",
        root / "tiny",
        "--calibration",
        root / "corpus.txt",
        "--per-source",
        "999",
        "--seq-len",
        "16",
        "--output",
        root / "pool2.csv",
    )
    assert result.exit_code == 2 and "windows of 16 tokens" in result.output
    assert not (root / "pool2.csv").exists()


def test_bfloat16_pruning_keeps_the_dtype(tiny_model_dir):
    import torch

    from adapruner import load_pruned

    root = tiny_model_dir
    result = run(*prune_args(root, "--output", root / "out", "--dtype", "bfloat16", "--metric", "element2"))
    assert result.exit_code == 0, result.output
    assert load_pruned(root / "out", dtype="bfloat16").model.embed_tokens.weight.dtype == torch.bfloat16


def test_search_then_prune_from_run(tiny_model_dir, monkeypatch):
    from adapruner.export import gguf_layers
    from conftest import name_tokenizer_for_llama_cpp

    root = tiny_model_dir
    name_tokenizer_for_llama_cpp(root / "tiny", monkeypatch)
    corpus = str(root / "corpus.txt")
    (root / "space.yaml").write_text("metrics: [element1, l2]\nnum_samples: [4, 10]\n")
    result = run(
        "search",
        root / "tiny",
        "--ratio",
        "0.15",
        "--trials",
        "3",
        "--config",
        root / "space.yaml",
        "--sources",
        corpus,
        "--metrics",
        "element1,wanda_sp",
        "--pool-per-source",
        "10",
        "--pruner",
        "none",
        "--objective-data",
        corpus,
        "--objective-tokens",
        "512",
        "--layers",
        "1:3",
        "--align",
        "4",
        "--export",
        "gguf",
        "--quant",
        "f32",
        "--output",
        root / "run",
    )
    assert result.exit_code == 0, result.output
    assert {"study.db", "best.json", "trials.csv", "pruned"} <= {p.name for p in (root / "run").iterdir()}
    space = json.loads((root / "run" / "best.json").read_text())["space"]
    assert space["metrics"] == ["element1", "wanda_sp"] and space["num_samples"] == [4, 10]  # flag beats file
    assert space["align"] == 4
    winner = json.loads((root / "run" / "pruned" / "adapruner.json").read_text())  # --export: the winner, pruned
    channels = gguf_layers(root / "run" / "pruned" / "model-f32.gguf")["channels"]
    assert channels == [layer["intermediate_size"] for layer in winner["layer_shapes"]]
    assert all(c % 4 == 0 for c in channels) and min(channels) < max(channels)
    result = run("prune", root / "tiny", "--from-run", root / "run", "--output", root / "pruned", "--batch-size", "2")
    assert result.exit_code == 0, result.output
    record = json.loads((root / "pruned" / "adapruner.json").read_text())
    assert record["search"]["run"] == str(root / "run") and record["recipe"]["align"] == 4
    assert record["layer_shapes"] == winner["layer_shapes"]
    # the search's recipe and allocation, the prune's runtime
    assert record["runtime"]["batch_size"] == 2 and winner["runtime"]["batch_size"] is None
    assert {k: v for k, v in record["recipe"].items() if k != "model"} == {
        k: v for k, v in winner["recipe"].items() if k != "model"
    }
    assert record["allocation"] == winner["allocation"]
    result = run("search", root / "tiny", "--ratio", "0.15", "--output", root / "run2", "--space", "both")
    assert result.exit_code == 2 and "unknown --space" in result.output
    assert run("prune", root / "tiny", "--output", root / "x").exit_code == 2


def test_activation_statistics_from_fresh_windows(tiny_model_dir):
    """--activation-calibration draws its own windows for activation statistics; gradients keep theirs."""
    root = tiny_model_dir
    from adapruner import load_pruned

    biases = {}
    for name, extra in (("same", []), ("fresh", ["--activation-calibration", "12x16"])):
        out = root / name
        result = run(*prune_args(root, "--metric", "wanda_sp", "--compensate", "--output", out, *extra))
        assert result.exit_code == 0, result.output
        record = json.loads((out / "adapruner.json").read_text())
        biases[name] = load_pruned(out).model.layers[1].mlp.down_proj.bias.detach()
    assert record["recipe"]["activation_calibration"] == "12x16"
    assert not biases["same"].allclose(biases["fresh"])  # the compensation reads other activations


def test_every_prune_config_field_has_a_flag_and_every_flag_a_field():
    """CLI <-> PruneConfig parity: a new field without a flag (or a flag `_config_options` would silently
    drop) fails here. The exceptions are named: what a search sets per trial, and command-level flags."""
    import inspect

    from adapruner import cli
    from adapruner.recipe.config import Recipe, Runtime, field_names

    config = field_names(Recipe) | field_names(Runtime)  # an Allocation is a search's, never typed
    per_trial = {"activation_seed"}  # set by --from-run, never typed
    command = {"ctx", "output", "overwrite", "device_map", "from_run", "export", "quant"}
    flags = set(inspect.signature(cli.prune).parameters)
    assert config - flags == per_trial
    assert flags - config == command | {"global_ranking", "compensate"}  # older spellings, hidden
    scoring_only = set(inspect.signature(cli.importance).parameters)  # importance scores, never refits or saves
    assert config - scoring_only == per_trial | {
        "method",
        "refit",
        "refit_bias",
        "refit_calibration",
        "refit_damping",
        "refit_device",
        "obs_rounds",
        "uniform",
    }
    assert scoring_only - config == {"output", "device_map", "global_ranking"}
