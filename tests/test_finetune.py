"""LoRA recovery with LM loss (LLM-Pruner's, `adapruner finetune --loss lm`) on a tiny pruned model with mixed
per-layer sizes; distillation has its own tests in test_distill.py."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import adapruner
from adapruner.cli import app
from adapruner.errors import AdaPrunerError, OfflineError
from adapruner.models import get_adapter
from adapruner.recovery import checkpoints, recover
from adapruner.recovery import data as ft_data
from adapruner.recovery.config import FinetuneConfig
from conftest import pruned_tiny, save_tiny, write_corpus

runner = CliRunner()
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning"),  # PEFT on transformers v5
    pytest.mark.usefixtures("one_thread"),
]

# A few small steps: 2 examples per forward pass, 4 per optimizer step.
FAST = {
    "precision": "fp32",  # numerical comparisons: no bf16 autocast, whatever the CPU
    "loss": "lm",
    "full": False,
    "max_steps": 3,
    "batch_size": 4,
    "micro_batch_size": 2,
    "cutoff_len": 64,
    "val_set_size": 2,
    "warmup_steps": 0,
    "lr": 1e-3,
    "logging_steps": 1,
}
RECORDS = [
    {"instruction": "Name what pruning removes.", "input": "", "output": "the model prunes heads and channels"},
    {"instruction": "Complete the text.", "input": "calibration text", "output": "guides which weights matter most"},
    {"instruction": "Say where it runs.", "input": "", "output": "small models run fast on two cores"},
    {"instruction": "Describe the data.", "input": "held out", "output": "data for language modelling"},
]


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.fixture(scope="module")
def pruned_root(tmp_path_factory):
    """``pruned/``: a tiny LLaMA-GQA pruned by 30% in layers 1..3 (layer 0 dense: mixed sizes), plus data."""
    root = pruned_tiny(tmp_path_factory.mktemp("finetune"))
    write_jsonl(root / "alpaca.jsonl", RECORDS * 2)
    return root


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def layer_shapes(model):
    return get_adapter(model).layer_shapes()


def no_leftovers(directory, name: str) -> bool:
    """Neither ``name`` nor its temporary/work siblings exist."""
    return not [p for p in directory.iterdir() if p.name == name or p.name.startswith((f".{name}", f"{name}."))]


def test_merged_model_loads_keeps_shapes_and_equals_the_adapter(pruned_root, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    pruned = pruned_root / "pruned"
    assert json.loads((pruned / "config.json").read_text())["pruned_layers"]  # really mixed sizes
    result = adapruner.finetune(pruned, pruned_root / "alpaca.jsonl", tmp_path / "out", keep_adapter=True, **FAST)
    out = tmp_path / "out"
    assert result.output == out and no_leftovers(tmp_path, "out.work")

    base = adapruner.load_pruned(pruned)
    merged = adapruner.load_pruned(out)
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert layer_shapes(merged) == layer_shapes(base) == layer_shapes(remote)
    out_config, in_config = (json.loads((d / "config.json").read_text()) for d in (out, pruned))
    assert out_config == in_config and out_config["pruned_layers"]  # same sizes, class, cache setting, dtype

    base_weights, merged_weights = base.state_dict(), merged.state_dict()
    assert set(base_weights) == set(merged_weights)
    changed = [k for k in base_weights if not torch.equal(base_weights[k], merged_weights[k])]
    assert changed and all(k.endswith("proj.weight") for k in changed)  # LoRA touched the projections only
    assert torch.equal(base_weights["lm_head.weight"], merged_weights["lm_head.weight"])

    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(pruned.resolve())
    assert set(adapter_config["target_modules"]) == {f"{p}_proj" for p in ("q", "k", "v", "o", "gate", "up", "down")}
    with_adapter = PeftModel.from_pretrained(base, out / "adapter").eval()
    ids = torch.randint(0, base.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = with_adapter(ids).logits
        for model in (merged, remote.eval()):
            torch.testing.assert_close(model(ids).logits, expected, atol=1e-5, rtol=0)

    record = json.loads((out / "adapruner.json").read_text())
    source = json.loads((pruned / "adapruner.json").read_text())
    assert {k: record[k] for k in source} == source  # the pruning record is kept as it was
    ft = record["finetune"]
    assert ft["steps"] == 3 and ft["resumed_from_step"] is None and ft["input"] == str(pruned.resolve())
    assert ft["config"]["lora_r"] == 8 and ft["config"]["lora_alpha"] == 16 and ft["config"]["keep_adapter"]
    assert ft["data"]["kind"] == "instructions" and len(ft["data"]["fingerprint"]) == 16
    assert ft["data"]["train_examples"] == 6 and ft["data"]["val_examples"] == 2
    assert ft["train_loss"] > 0 and ft["val_loss"] > 0 and ft["seconds"] > 0
    assert [e["step"] for e in ft["loss_history"]] == [1, 2, 3]
    assert "peft" in ft["versions"] and ft["precision"] == "fp32"


def test_cli_plain_text(pruned_root, tmp_path):
    out = tmp_path / "out"
    result = run(
        "finetune",
        pruned_root / "pruned",
        "--data",
        pruned_root / "corpus.txt",
        "--output",
        out,
        "--max-steps",
        "2",
        "--cutoff-len",
        "32",
        "--batch-size",
        "4",
        "--micro-batch-size",
        "4",
        "--val-set-size",
        "3",
    )
    assert result.exit_code == 0, result.output
    assert "train loss" in result.output
    ft = json.loads((out / "adapruner.json").read_text())["finetune"]
    assert ft["data"]["kind"] == "text" and ft["data"]["val_examples"] == 3
    assert ft["gradient_accumulation_steps"] == 1 and ft["steps"] == 2 and ft["adapter"] is None
    assert not (out / "adapter").exists() and no_leftovers(tmp_path, "out.work")
    assert layer_shapes(adapruner.load_pruned(out)) == layer_shapes(adapruner.load_pruned(pruned_root / "pruned"))


def test_training_loss_decreases_on_repeated_data(pruned_root, tmp_path):
    path = tmp_path / "same.json"  # the .json list format
    path.write_text(json.dumps([RECORDS[0]] * 8))
    options = FAST | {"max_steps": 10, "lr": 2e-2, "val_set_size": 0}
    result = adapruner.finetune(pruned_root / "pruned", path, tmp_path / "out", **options)
    losses = [e["loss"] for e in result.record["finetune"]["loss_history"]]
    assert len(losses) == 10
    assert losses[-1] < losses[0] - 0.3 and sum(losses[-3:]) < sum(losses[:3]), losses
    assert result.record["finetune"]["val_loss"] is None


def test_interrupted_run_resumes_from_its_checkpoint(pruned_root, tmp_path, monkeypatch):
    pruned, data, out = pruned_root / "pruned", pruned_root / "alpaca.jsonl", tmp_path / "out"
    options = FAST | {"save_steps": 1}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(recover, "_merge_and_save", interrupted)
        with pytest.raises(KeyboardInterrupt):
            adapruner.finetune(pruned, data, out, **options | {"max_steps": 2})
    work = tmp_path / "out.work"
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    assert (work / "checkpoint-2").is_dir() and (work / checkpoints.WORK_MARKER).is_file()

    with pytest.raises(AdaPrunerError, match="holds another fine-tune"):  # other settings never mix
        adapruner.finetune(pruned, data, out, **options | {"max_steps": 4, "lr": 5e-4})

    result = adapruner.finetune(pruned, data, out, **options | {"max_steps": 4})
    ft = result.record["finetune"]
    assert ft["resumed_from_step"] == 2 and ft["steps"] == 4
    assert [e["step"] for e in ft["loss_history"]] == [1, 2, 3, 4]  # steps 1-2 come from the checkpoint's state
    assert not work.exists()
    state = json.loads((out / "adapruner.json").read_text())["finetune"]
    assert state == json.loads(json.dumps(ft))


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no-output-key", "has no 'output' key"),
        ("empty", "holds no examples"),
        ("missing-file", "does not exist"),
        ("not-a-model", "not a model directory"),
        ("not-pruned", "adapruner.json is missing"),
        ("val-too-large", "leaves none for training"),
        ("bad-lr", "--lr must be > 0"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(pruned_root, tmp_path, case, message):
    model, data, extra = pruned_root / "pruned", tmp_path / "data.jsonl", []
    write_jsonl(data, RECORDS)
    if case == "no-output-key":
        write_jsonl(data, [*RECORDS[:2], {"instruction": "x", "input": ""}])
        message = f"{data}:3 has no 'output' key"
    elif case == "empty":
        data.write_text("")
        message = f"{data} holds no examples"
    elif case == "missing-file":
        data = tmp_path / "nowhere.jsonl"
    elif case == "not-a-model":
        model = tmp_path / "empty"
        model.mkdir()
    elif case == "not-pruned":
        model = pruned_root / "tiny"
    elif case == "val-too-large":
        extra = ["--val-set-size", "4"]
    elif case == "bad-lr":
        extra = ["--lr", "0"]
    result = run("finetune", model, "--data", data, "--output", tmp_path / "out", "--max-steps", "1", *extra)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert no_leftovers(tmp_path, "out")


def test_existing_output_needs_overwrite(pruned_root, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    result = run(
        "finetune", pruned_root / "pruned", "--data", pruned_root / "alpaca.jsonl", "--output", tmp_path / "out"
    )
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert (tmp_path / "out" / "keep.txt").exists()


def test_alpaca_hub_offline_is_explained(pruned_root, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OfflineError, match=r"cannot be downloaded.*local Alpaca"):
        ft_data.load_alpaca_hub()
    result = run("finetune", pruned_root / "pruned", "--data", "alpaca", "--output", tmp_path / "out")
    assert result.exit_code == 2 and "yahma/alpaca-cleaned cannot be downloaded" in result.output
    assert no_leftovers(tmp_path, "out")


def test_prompt_template_and_response_only_labels():
    from conftest import make_tokenizer

    assert ft_data.alpaca_prompt("Do it.", "", "ok") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nDo it.\n\n### Response:\nok"
    )
    assert "### Input:\nctx\n\n### Response:\n" in ft_data.alpaca_prompt("Do it.", "ctx")
    tokenizer = make_tokenizer()
    record = {"instruction": "the model", "input": "", "output": "prunes heads"}
    full = ft_data.tokenize_instruction(tokenizer, record, 256, train_on_inputs=True)
    masked = ft_data.tokenize_instruction(tokenizer, record, 256, train_on_inputs=False)
    assert full["input_ids"] == masked["input_ids"] and full["input_ids"][-1] == tokenizer.eos_token_id
    assert full["labels"] == full["input_ids"]
    prompt_len = len(tokenizer(ft_data.alpaca_prompt("the model"))["input_ids"])
    assert masked["labels"][:prompt_len] == [-100] * prompt_len
    assert masked["labels"][prompt_len:] == full["input_ids"][prompt_len:]
    assert len(ft_data.tokenize_instruction(tokenizer, record, 8)["input_ids"]) == 8  # truncated, no EOS
    blocks = ft_data.text_blocks(tokenizer, ["the model prunes heads"] * 20, 16)
    assert blocks and all(len(b["input_ids"]) == 16 == len(b["labels"]) for b in blocks)


def test_lora_defaults_are_llm_pruners():
    cfg = FinetuneConfig()
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout) == (8, 16, 0.05)
    # measured defaults (benchmarks/recovery.py): KD + LM on every parameter, lr by mode (LLM-Pruner's 1e-4 lost)
    assert (cfg.loss, cfg.full, cfg.learning_rate) == ("kd+lm", True, 3e-4)
    assert FinetuneConfig(full=False).learning_rate == 1e-3 and FinetuneConfig(lr=1e-4).learning_rate == 1e-4
    assert (cfg.cutoff_len, cfg.epochs, cfg.batch_size, cfg.micro_batch_size) == (256, 2, 64, 4)
    assert cfg.warmup_steps == 0.05 and cfg.max_steps is None and cfg.train_on_inputs  # LLM-Pruner: 100 of ~1,600
    assert cfg.accumulation_steps() == 16 and cfg.accumulation_steps(world_size=4) == 4


@pytest.mark.parametrize("family", ["qwen2-gqa", "mistral-gqa"])
def test_other_families_merge_exactly(tmp_path, monkeypatch, family):
    from peft import PeftModel

    monkeypatch.setenv("ADAPRUNER_CACHE", str(tmp_path / "cache"))
    save_tiny(tmp_path / "tiny", family)
    write_corpus(tmp_path / "corpus.txt")
    corpus = str(tmp_path / "corpus.txt")
    adapruner.prune(str(tmp_path / "tiny"), 0.15, output=tmp_path / "pruned", calibration=corpus, seq_len=16)
    options = FAST | {"max_steps": 1, "cutoff_len": 32, "val_set_size": 0, "keep_adapter": True}
    adapruner.finetune(tmp_path / "pruned", corpus, tmp_path / "out", **options)
    base = adapruner.load_pruned(tmp_path / "pruned")
    merged = adapruner.load_pruned(tmp_path / "out")
    assert layer_shapes(merged) == layer_shapes(base)
    with_adapter = PeftModel.from_pretrained(base, tmp_path / "out" / "adapter").eval()
    ids = torch.randint(0, base.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, with_adapter(ids).logits, atol=1e-5, rtol=0)
