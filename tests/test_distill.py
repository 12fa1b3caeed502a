"""Recovery by distillation: the losses, the teacher, the top-k teacher cache, LoRA and full training."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import adapruner
from adapruner.cli import app
from adapruner.errors import AdaPrunerError
from adapruner.models import get_adapter
from adapruner.recovery import checkpoints, distill, recover
from adapruner.recovery.config import FinetuneConfig
from adapruner.recovery.trainer import Collator
from conftest import make_tokenizer, pruned_tiny, save_tiny, write_corpus

runner = CliRunner()
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning"),
    pytest.mark.usefixtures("one_thread"),
]

FAST = {
    "precision": "fp32",  # numerical comparisons: no bf16 autocast, whatever the CPU
    "max_steps": 3,
    "batch_size": 4,
    "micro_batch_size": 2,
    "cutoff_len": 32,
    "val_set_size": 2,
    "warmup_steps": 0,
    "lr": 1e-3,
    "logging_steps": 1,
}
# lr 5 on every parameter: the loss blows up within a few steps
HOT = FAST | {"max_steps": 6, "logging_steps": 1, "lr": 5.0, "full": True, "val_set_size": 0, "save_steps": 1}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """``tiny/`` (the dense teacher), ``pruned/`` (30% off layers 1-3, mixed sizes) and two corpora."""
    base = pruned_tiny(tmp_path_factory.mktemp("distill"))
    write_corpus(base / "other.txt", seed=1)
    return base


def logits_pair(seed: int = 0, vocab: int = 11) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    student, teacher = torch.randn(2, 5, vocab, generator=gen), torch.randn(2, 5, vocab, generator=gen) * 2
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    return student, teacher, mask


# --- losses ----------------------------------------------------------------------------------------


def test_kd_loss_is_the_forward_kl_over_masked_positions():
    student, teacher, mask = logits_pair()
    for temperature in (1.0, 2.0):
        p = torch.softmax(teacher / temperature, -1)
        kl = (p * (p.log() - torch.log_softmax(student / temperature, -1))).sum(-1)
        expected = kl[mask].mean() * temperature**2
        torch.testing.assert_close(distill.kd_loss(student, teacher, mask, temperature), expected)
    assert distill.kd_loss(teacher, teacher, mask).abs() < 1e-6


def test_topk_loss_with_every_token_equals_the_full_loss_and_its_gradient():
    student, teacher, mask = logits_pair(vocab=11)
    for k, temperature in ((11, 1.0), (11, 1.7)):
        cached = distill.top_k_outputs(teacher, k, temperature)
        full_s = student.clone().requires_grad_(True)
        top_s = student.clone().requires_grad_(True)
        full = distill.kd_loss(full_s, teacher, mask, temperature)
        top = distill.kd_loss_topk(
            top_s, cached["teacher_idx"], cached["teacher_val"], cached["teacher_rest"], mask, temperature
        )
        full.backward()
        top.backward()
        torch.testing.assert_close(top, full, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(top_s.grad, full_s.grad, atol=1e-6, rtol=1e-4)


def test_topk_loss_lumps_the_tail_and_is_zero_for_the_teacher_itself():
    student, teacher, mask = logits_pair(vocab=50)
    cached = distill.top_k_outputs(teacher, 5, 1.0)
    args = (cached["teacher_idx"], cached["teacher_val"], cached["teacher_rest"], mask)
    assert distill.kd_loss_topk(teacher, *args).abs() < 1e-5
    lumped = distill.kd_loss_topk(student, *args)
    assert 0 < lumped < distill.kd_loss(student, teacher, mask)  # merging buckets can only lower a KL


def test_hidden_loss_cosine_ignores_scale_and_mse_does_not():
    gen = torch.Generator().manual_seed(0)
    states = [torch.randn(2, 4, 6, generator=gen) for _ in range(3)]
    mask = torch.ones(2, 4)
    scaled = [s * 3 for s in states]
    assert distill.hidden_loss(scaled, states, [1, 2], "cosine", mask).abs() < 1e-6
    mse = distill.hidden_loss(scaled, states, [1, 2], "mse", mask)
    torch.testing.assert_close(mse, torch.tensor(4.0))  # (3h - h)^2 / h^2
    assert distill.parse_hidden_layers("all", 3) == [1, 2, 3]
    assert distill.parse_hidden_layers("0,-1", 3) == [1, 3]
    with pytest.raises(AdaPrunerError, match="does not exist"):
        distill.parse_hidden_layers("5", 3)


def test_collator_pads_teacher_fields_with_the_batch():
    rows = [
        {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [5, 6, 7], "teacher_val": torch.ones(3, 2)},
        {"input_ids": [5], "attention_mask": [1], "labels": [5], "teacher_val": torch.ones(1, 2)},
    ]
    batch = Collator(pad_token_id=0, multiple=4)(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [5, 0, 0, 0]]
    assert batch["labels"][1].tolist() == [5, -100, -100, -100]
    assert batch["teacher_val"].shape == (2, 4, 2) and batch["teacher_val"][1, 1:].abs().sum() == 0


def test_tokens_set_the_steps():
    cfg = FinetuneConfig(tokens=1000, batch_size=4, micro_batch_size=2)
    assert cfg.steps(tokens_per_example=32) == 8  # ceil(1000 / (4 * 32))
    assert FinetuneConfig(max_steps=5).steps(32) == 5
    assert FinetuneConfig(tokens=1000, max_steps=5, batch_size=4, micro_batch_size=2).steps(32) == 8


# --- runs ------------------------------------------------------------------------------------------


def kl_to_teacher(student_dir: Path, teacher_dir: Path, corpus: Path) -> float:
    """Mean KL(teacher || student) on the corpus's test text, the quantity distillation lowers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    ids = tokenizer(corpus.read_text().split("\n\n")[-1], return_tensors="pt").input_ids[:, :64]
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    student = adapruner.load_pruned(student_dir)
    with torch.no_grad():
        mask = torch.ones_like(ids, dtype=torch.bool)
        return float(distill.kd_loss(student(ids).logits, teacher(ids).logits, mask))


def test_kd_lowers_the_kl_to_the_recorded_dense_model(root, tmp_path):
    out = tmp_path / "kd"
    options = FAST | {"max_steps": 8, "lr": 5e-3, "val_set_size": 0, "loss": "kd", "full": False}
    result = adapruner.finetune(root / "pruned", root / "corpus.txt", out, **options)
    ft = result.record["finetune"]
    assert ft["loss"] == "kd" and ft["method"] == "lora" and ft["temperature"] == 1.0
    assert ft["teacher"] == str(root / "tiny")  # the source_model prune recorded
    assert ft["tokens"] == 8 * 4 * 32 and ft["tokens_per_s"] > 0 and ft["final_loss_parts"]["kd"] > 0
    before = kl_to_teacher(root / "pruned", root / "tiny", root / "corpus.txt")
    after = kl_to_teacher(out, root / "tiny", root / "corpus.txt")
    assert after < 0.9 * before, (before, after)


def test_full_training_changes_every_kind_of_parameter_and_keeps_the_sizes(root, tmp_path):
    out = tmp_path / "full"
    adapruner.finetune(root / "pruned", root / "corpus.txt", out, full=True, **FAST)
    before, after = adapruner.load_pruned(root / "pruned"), adapruner.load_pruned(out)
    assert get_adapter(after).layer_shapes() == get_adapter(before).layer_shapes()
    old, new = before.state_dict(), after.state_dict()
    changed = {k for k in old if not torch.equal(old[k], new[k])}
    assert "model.embed_tokens.weight" in changed and "model.norm.weight" in changed
    assert any(k.endswith("mlp.down_proj.weight") for k in changed)
    record = json.loads((out / "adapruner.json").read_text())["finetune"]
    assert record["method"] == "full" and record["adapter"] is None
    assert record["trainable_params"] == sum(p.numel() for p in after.parameters())


def test_cached_teacher_with_every_token_trains_the_same_student(root, tmp_path):
    """k = the vocabulary makes the cache lossless: the student must equal the live-teacher one."""
    vocab = len(make_tokenizer())
    options = FAST | {"full": True, "val_set_size": 0}
    live = adapruner.finetune(root / "pruned", root / "corpus.txt", tmp_path / "live", **options)
    cache = tmp_path / "teacher-cache"
    cached = adapruner.finetune(
        root / "pruned", root / "corpus.txt", tmp_path / "cached", teacher_cache=cache, cache_top_k=vocab, **options
    )
    assert (cache / distill.CACHE_FILE).is_file() and cached.record["finetune"]["teacher_cache"] == str(cache)
    for name, value in live.model.state_dict().items():
        torch.testing.assert_close(cached.model.state_dict()[name], value, atol=2e-5, rtol=1e-4)

    # a second student reads the cache without the teacher's weights
    def no_weights(*args, **kwargs):
        raise AssertionError("the teacher was loaded although the cache is complete")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(recover, "load_causal_lm", _only_student(no_weights))
        adapruner.finetune(
            root / "pruned", root / "corpus.txt", tmp_path / "again", teacher_cache=cache, cache_top_k=vocab, **options
        )


def _only_student(refuse):
    """A loader that loads the pruned student and refuses the teacher."""
    from adapruner.models.loading import load_causal_lm

    def load(location, *args, **kwargs):
        if "pruned" not in str(location):
            refuse()
        return load_causal_lm(location, *args, **kwargs)

    return load


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"cache_top_k": 8}, "built for another --cache-top-k:"),
        ({"data": "other"}, "built for another training windows:"),
        ({"teacher": "pruned"}, "built for another teacher:"),
    ],
)
def test_a_cache_of_other_settings_is_refused(root, tmp_path, change, message):
    cache = tmp_path / "cache"
    options = FAST | {"max_steps": 1, "val_set_size": 0, "teacher_cache": cache, "cache_top_k": 4}
    adapruner.finetune(root / "pruned", root / "corpus.txt", tmp_path / "first", **options)
    data = root / ("other.txt" if change.get("data") else "corpus.txt")
    teacher = {"teacher": str(root / "tiny2")} if change.get("teacher") else {}
    if teacher:  # the same weights and tokenizer elsewhere: another teacher all the same
        import shutil

        shutil.copytree(root / "tiny", root / "tiny2", dirs_exist_ok=True)
    extra = {k: v for k, v in change.items() if k == "cache_top_k"}
    with pytest.raises(AdaPrunerError, match=message):
        adapruner.finetune(root / "pruned", data, tmp_path / "second", **options | extra | teacher)
    assert not (tmp_path / "second").exists()


def test_teacher_none_falls_back_to_lm_loss_and_hidden_loss_is_recorded(root, tmp_path):
    lm = adapruner.finetune(root / "pruned", root / "corpus.txt", tmp_path / "lm", teacher="none", **FAST)
    assert lm.record["finetune"]["loss"] == "lm" and lm.record["finetune"]["teacher"] is None
    hidden = adapruner.finetune(
        root / "pruned", root / "corpus.txt", tmp_path / "hidden", hidden_loss="mse", hidden_layers="0,-1", **FAST
    )
    parts = hidden.record["finetune"]["final_loss_parts"]
    assert parts["hidden"] > 0 and parts["kd"] > 0 and hidden.record["finetune"]["hidden_loss"] == "mse"
    both = adapruner.finetune(root / "pruned", root / "corpus.txt", tmp_path / "both", loss="kd+lm", **FAST)
    parts = both.record["finetune"]["final_loss_parts"]
    assert set(parts) == {"kd", "lm"} and parts["lm"] > parts["kd"]


def test_mixed_text_sources_are_all_trained_on(root, tmp_path):
    data = f"{root / 'corpus.txt'},{root / 'other.txt'}"
    result = adapruner.finetune(root / "pruned", data, tmp_path / "mix", **FAST | {"val_set_size": 4})
    described = result.record["finetune"]["data"]
    assert list(described["train_blocks"]) == [str(root / "corpus.txt"), str(root / "other.txt")]
    assert all(count > 0 for count in described["train_blocks"].values()) and described["val_examples"] == 4


def test_interrupted_full_distillation_resumes(root, tmp_path, monkeypatch):
    out, options = tmp_path / "out", FAST | {"full": True, "save_steps": 1, "val_set_size": 0}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(recover, "_merge_and_save", interrupted)
        with pytest.raises(KeyboardInterrupt):
            adapruner.finetune(root / "pruned", root / "corpus.txt", out, **options | {"max_steps": 2})
    assert (tmp_path / "out.work" / "checkpoint-2").is_dir()
    result = adapruner.finetune(root / "pruned", root / "corpus.txt", out, **options | {"max_steps": 4})
    ft = result.record["finetune"]
    assert ft["resumed_from_step"] == 2 and ft["steps"] == 4 and ft["method"] == "full"
    assert not (tmp_path / "out.work").exists()


def test_cli_bad_teacher_input_is_one_line(root, tmp_path):
    other = tmp_path / "other-vocab"
    save_tiny(other)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(other)
    tokenizer.add_tokens(["zzzextra"])
    tokenizer.save_pretrained(other)
    cases = [
        (["--teacher", other], "another tokenizer or vocabulary"),
        (["--teacher", tmp_path / "missing"], "does not exist"),
        (["--teacher", "none", "--hidden-loss", "cosine"], "--hidden-loss needs a teacher"),
        (["--hidden-loss", "cosine", "--teacher-cache", tmp_path / "c"], "--teacher-cache does not keep"),
        (["--loss", "kl"], "--loss kl: choose one of"),
    ]
    for extra, message in cases:
        args = ["finetune", root / "pruned", "--data", root / "corpus.txt", "--output", tmp_path / "out", *extra]
        result = runner.invoke(app, [str(a) for a in [*args, "--max-steps", "1"]])
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert result.exit_code == 2 and len(errors) == 1 and message in errors[0], (extra, result.output)
        assert not (tmp_path / "out").exists()


def test_cli_prints_mode_loss_and_tokens(root, tmp_path):
    args = ["finetune", root / "pruned", "--data", root / "corpus.txt", "--output", tmp_path / "out", "--full"]
    args += [
        "--tokens",
        "300",
        "--cutoff-len",
        "32",
        "--batch-size",
        "4",
        "--micro-batch-size",
        "2",
        "--val-set-size",
        "0",
    ]
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    ft = json.loads((tmp_path / "out" / "adapruner.json").read_text())["finetune"]
    assert ft["steps"] == 3 and ft["tokens"] == 384 and ft["method"] == "full" and ft["loss"] == "kd+lm"
    assert ft["lr"] == 3e-4 and ft["teacher"] == str(root / "tiny")
    assert "full" in result.output and "384" in result.output


@pytest.mark.parametrize(
    "options",
    ["max_steps=2, lr=1e-3", "max_steps=6, lr=5.0, logging_steps=1, save_steps=1, lr_retries=8"],
    ids=["plain", "diverging"],
)
def test_accelerate_two_processes_equal_one(root, tmp_path, options):
    """Data-parallel over 2 CPU processes (gradient accumulation halved) gives the single-process model; a
    run that diverges is retried at the same lower rates in both (every rank stops on the same loss, and no
    rank reads the diverged run's checkpoints)."""
    script = tmp_path / "run.py"
    script.write_text(
        "import sys, torch, adapruner\n"
        "torch.set_num_threads(1)\n"
        f"adapruner.finetune({str(root / 'pruned')!r}, {str(root / 'corpus.txt')!r}, sys.argv[1], full=True,"
        f" {options}, batch_size=4, micro_batch_size=2, cutoff_len=32, val_set_size=0, warmup_steps=0,"
        " precision='fp32')\n"
    )
    env = os.environ | {"ADAPRUNER_CACHE": str(root / "cache"), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    accelerate = Path(sys.executable).with_name("accelerate")
    # `accelerate launch --cpu` always starts one process (its simple launcher); `--multi_gpu` on a machine
    # without GPUs starts torch.distributed processes that train on the CPU over gloo.
    launch = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    launch += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    for command, out in (([sys.executable], "one"), (launch, "two")):
        done = subprocess.run([*command, str(script), str(tmp_path / out)], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = adapruner.load_pruned(tmp_path / "one"), adapruner.load_pruned(tmp_path / "two")
    record = json.loads((tmp_path / "two" / "adapruner.json").read_text())["finetune"]
    alone = json.loads((tmp_path / "one" / "adapruner.json").read_text())["finetune"]
    assert record["world_size"] == 2 and record["gradient_accumulation_steps"] == 1
    assert [b["lr"] for b in record["lr_backoff"]] == [b["lr"] for b in alone["lr_backoff"]]
    assert bool(record["lr_backoff"]) == ("lr=5.0" in options) and record["lr"] == alone["lr"]
    for name, value in one.state_dict().items():
        torch.testing.assert_close(two.state_dict()[name], value, atol=1e-5, rtol=1e-4)


def test_finetune_flags_match_the_config_fields():
    """Every FinetuneConfig field has a `finetune` flag with the same default, and every flag a field."""
    from dataclasses import fields

    import typer

    command = typer.main.get_command(app).commands["finetune"]
    flags = {p.name: p.default for p in command.params if p.param_type_name == "option"}
    not_fields = {"output", "data", "checkpoint_dir", "overwrite"}
    config = {f.name: f.default for f in fields(FinetuneConfig)}
    assert set(flags) - not_fields == set(config)
    for name, default in config.items():
        assert flags[name] == default, name


def test_auto_precision_uses_bf16_only_where_the_hardware_has_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(recover, "cpu_has_native_bf16", lambda n=native: n)
        assert recover._precision("auto") == expected
    assert recover._precision("fp32") == "fp32"
    with pytest.raises(AdaPrunerError, match="--precision"):
        FinetuneConfig(precision="fp8").validate()


def test_gradient_checkpointing_trains_the_same_model(root, tmp_path):
    """Recomputing activations in the backward pass saves memory and must not change the result."""
    options = FAST | {"val_set_size": 0, "max_steps": 2}
    plain = adapruner.finetune(root / "pruned", root / "corpus.txt", tmp_path / "plain", **options)
    saved = adapruner.finetune(
        root / "pruned", root / "corpus.txt", tmp_path / "ckpt", gradient_checkpointing=True, **options
    )
    assert saved.record["finetune"]["config"]["gradient_checkpointing"]
    for name, value in plain.model.state_dict().items():
        torch.testing.assert_close(saved.model.state_dict()[name], value, atol=1e-5, rtol=1e-4)


def test_shared_log_softmax_gives_the_same_losses():
    student, teacher, mask = logits_pair()
    labels = torch.randint(0, student.shape[-1], student.shape[:2], generator=torch.Generator().manual_seed(2))
    labels[1, 3:] = -100
    shared = torch.log_softmax(student, -1)
    torch.testing.assert_close(distill.lm_loss(student, labels, shared), distill.lm_loss(student, labels))
    torch.testing.assert_close(
        distill.kd_loss(student, teacher, mask, 1.0, shared), distill.kd_loss(student, teacher, mask)
    )


def test_a_diverging_run_stops_with_a_hint_to_lower_the_learning_rate(root, tmp_path):
    """Issue 26: full KD + LM at lr 3e-4 took Qwen2.5-0.5B's loss from 2.3 to ~4 and spent 13 min making the
    model worse. With no retries left, a loss past ``divergence`` x the first stops the run in one line naming
    --lr; nothing is written and the diverged checkpoints are gone, so a rerun with a lower --lr starts over."""
    out = tmp_path / "hot"
    options = HOT | {"lr_retries": 0}
    with pytest.raises(AdaPrunerError, match=r"training diverged: the loss rose from .* at lr 5: .*lower --lr than 5"):
        adapruner.finetune(root / "pruned", root / "corpus.txt", out, **options)
    assert not out.exists() and not out.with_name("hot.work").exists()
    calm = adapruner.finetune(root / "pruned", root / "corpus.txt", out, **options | {"divergence": 0})
    assert calm.record["finetune"]["steps"] == 6  # the guard off: the same run trains to the end


def test_a_diverging_run_starts_over_from_the_input_at_a_quarter_of_the_rate(root, tmp_path):
    """By default a diverged run is retried from the input's weights at lr / 4 (``lr_retries`` times): the
    result equals a run started at the rate that held, and the record lists the rates that diverged."""
    retried = adapruner.finetune(root / "pruned", root / "corpus.txt", tmp_path / "retried", **HOT | {"lr_retries": 8})
    record = retried.record["finetune"]
    rates = [b["lr"] for b in record["lr_backoff"]]
    assert rates and rates[0] == 5.0 and all(b == a / 4 for a, b in itertools.pairwise(rates))
    assert record["lr"] == rates[-1] / 4 and record["steps"] == 6
    direct = adapruner.finetune(
        root / "pruned", root / "corpus.txt", tmp_path / "direct", **HOT | {"lr": record["lr"], "lr_retries": 0}
    )
    assert direct.record["finetune"]["lr_backoff"] == []
    for (name, a), b in zip(retried.model.state_dict().items(), direct.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    with pytest.raises(AdaPrunerError, match=r"at lr 5, 1.25: rerun with a lower --lr than 1.25"):
        adapruner.finetune(root / "pruned", root / "corpus.txt", tmp_path / "spent", **HOT | {"lr_retries": 1})


def test_a_resumed_run_keeps_the_rate_its_retries_reached(tmp_path):
    """The work marker records the rates that diverged, so a run killed during a retry resumes at the lower
    rate; a marker of other settings is still refused."""
    work, identity = tmp_path / "x.work", {"config": {"lr": None}, "model_dir": "m"}
    tried = [{"lr": 3e-4, "step": 10, "loss": 4.2}]
    assert checkpoints.prepare_work_dir(work, identity, tried) == (None, tried)
    assert checkpoints.prepare_work_dir(work, identity, []) == (None, tried)  # what a rerun after kill -9 reads
    with pytest.raises(AdaPrunerError, match=r"holds another fine-tune \(different config"):
        checkpoints.prepare_work_dir(work, identity | {"config": {"lr": 1e-4}}, [])
