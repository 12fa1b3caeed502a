"""Side-by-side table of ``adapruner evaluate`` result files, with retention against a reference.

One row per file; columns: parameters, each perplexity (``source@seq_len``), each zero-shot task
(the metric that task is averaged with: ``acc`` or ``acc_norm``, in %), and the zero-shot average.
Accuracies and the average read ``value ± standard error`` (lm-eval's, in points). Every cell of a
non-reference row also gives the retention in % of the reference row: value / ref for parameters
and accuracies, ref / value for perplexity (lower is better), so 100% means "as good as the
reference" in every column. An accuracy's retention is printed only when the difference from the
reference is outside its 95% interval; otherwise ``(~)``: on a few documents per task a 333%
"retention" is noise, not a result. Files without standard errors (older versions) print the
accuracy alone and its retention unchecked.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..errors import AdaPrunerError
from .zeroshot import average_stderr

MISSING = "–"
WITHIN_NOISE = "(~)"  # printed instead of an accuracy's retention when the difference is within noise
Z95 = 1.96  # two-sided 95% normal quantile
Cell = tuple[float | None, float | None]  # value, standard error (None: not known / not applicable)


def load_results(path: str | Path) -> dict[str, Any]:
    """An ``evaluate`` results file, or a one-line error."""
    path = Path(path)
    try:
        results = json.loads(path.read_text())
    except FileNotFoundError:
        raise AdaPrunerError(f"results file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdaPrunerError(f"{path} is not a JSON results file ({exc})") from None
    if not isinstance(results, dict) or "params" not in results or "model" not in results:
        raise AdaPrunerError(f"{path} is not written by `adapruner evaluate --output` (no model/params)")
    return results


def _label(results: dict[str, Any]) -> str:
    if results.get("label"):  # set by `adapruner run` (dense, AdaPruner + LoRA, ...)
        return str(results["label"])
    name = str(results["model"])
    return (Path(name).name or name) if name.startswith(("/", ".", "~")) else name


def _columns(runs: list[dict[str, Any]]) -> tuple[list[str], list[tuple[str, str]]]:
    """Perplexity keys in first-seen order; (task, metric) in the order the tasks are first seen."""
    ppl: dict[str, None] = {}
    tasks: dict[str, str] = {}
    for results in runs:
        ppl.update(dict.fromkeys(results.get("perplexity", {})))
        for task, entry in results.get("zero_shot", {}).get("tasks", {}).items():
            tasks.setdefault(task, entry["metric"])
    return list(ppl), list(tasks.items())


def _row_cells(results: dict[str, Any], ppl: list[str], tasks: list[tuple[str, str]]) -> list[Cell]:
    """(value, standard error) per column; the average's error is rebuilt from the tasks' when the
    file predates ``average_stderr``."""
    zs = results.get("zero_shot", {})
    entries = zs.get("tasks", {})
    cells: list[Cell] = [(float(results["params"]), None)]
    cells += [(results.get("perplexity", {}).get(key), None) for key in ppl]
    for task, metric in tasks:
        entry = entries.get(task, {})
        cells.append((entry.get(metric), entry.get(f"{metric}_stderr")))
    average_se = zs.get("average_stderr")
    if average_se is None and entries:
        metrics = zs.get("average_metric") or {task: entry.get("metric") for task, entry in entries.items()}
        average_se = average_stderr(entries, metrics)
    cells.append((zs.get("average"), average_se))
    return cells


def _format(kind: str, value: float, stderr: float | None = None) -> str:
    if kind == "params":
        return f"{value / 1e6:.1f}M"
    if kind == "ppl":
        return f"{value:.2f}"
    return f"{100 * value:.2f}" + ("" if stderr is None else f" ± {100 * stderr:.1f}")


def retention(kind: str, value: float | None, reference: float | None) -> float | None:
    """% of the reference: higher is better in every column (perplexity inverted)."""
    if value is None or reference is None or value == 0 or reference == 0:
        return None
    return 100 * (reference / value if kind == "ppl" else value / reference)


def differs(value: float, stderr: float | None, reference: float, ref_stderr: float | None) -> bool | None:
    """Whether the 95% interval of ``value - reference``, ``± 1.96 * sqrt(se**2 + se_ref**2)``, excludes 0
    (equivalently: retention's interval excludes 100%); None when a standard error is unknown.

    The errors are combined as if independent; the models answer the same documents, whose positive
    correlation would narrow the true interval, so this errs towards "(~)".
    """
    if stderr is None or ref_stderr is None:
        return None
    return abs(value - reference) > Z95 * math.hypot(stderr, ref_stderr)


def compare_table(paths: list[str | Path] | tuple[str | Path, ...], *, reference: str | Path | None = None) -> str:
    """Markdown: one row per results file, retention (%) of ``reference`` (default: the first file)."""
    if not paths:
        raise AdaPrunerError("give at least one results file written by `adapruner evaluate --output`")
    runs = [load_results(path) for path in paths]
    ref_results = load_results(reference) if reference is not None else runs[0]
    ppl, tasks = _columns([ref_results, *runs])
    kinds = ["params"] + ["ppl"] * len(ppl) + ["acc"] * len(tasks) + ["acc"]
    header = ["model", "params", *(f"{key} ppl" for key in ppl)]
    header += [f"{task} ({metric})" for task, metric in tasks] + ["average"]
    ref_cells = _row_cells(ref_results, ppl, tasks)
    labels = [_label(results) for results in runs]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    unchecked = False  # an accuracy printed without a standard error
    for path, label, results in zip(paths, labels, runs, strict=True):
        if labels.count(label) > 1:
            label = f"{label} ({Path(path).name})"
        is_reference = reference is None and results is runs[0]
        cells = []
        for kind, (value, se), (ref, ref_se) in zip(kinds, _row_cells(results, ppl, tasks), ref_cells, strict=True):
            if value is None:
                cells.append(MISSING)
                continue
            unchecked |= kind == "acc" and se is None
            kept = retention(kind, value, ref)
            cell = _format(kind, value, se)
            if is_reference or kept is None:
                cells.append(cell)
            elif kind == "acc" and differs(value, se, ref, ref_se) is False:
                cells.append(f"{cell} {WITHIN_NOISE}")
            else:
                cells.append(f"{cell} ({kept:.1f}%)")
        lines.append("| " + " | ".join([label.replace("|", "\\|"), *cells]) + " |")
    return "\n".join([*lines, "", *_notes(paths, runs, reference, ref_results, unchecked)]) + "\n"


def _notes(paths: list, runs: list[dict], reference: Any, ref_results: dict, unchecked: bool = False) -> list[str]:
    ref_name = str(reference) if reference is not None else f"{paths[0]} (first row)"
    notes = [
        f"Accuracies in %, ± lm-eval's standard error in points; (x%) = retention against {ref_name} "
        f"({_label(ref_results)}): value / reference, reference / value for perplexity. An accuracy's "
        "retention is shown only when its difference from the reference is outside the 95% interval "
        f"±1.96·√(se² + se_ref²); {WITHIN_NOISE} = within it, not distinguishable from the reference."
    ]
    if unchecked:
        notes.append(
            "Accuracies without ± come from files without standard errors (older versions): "
            "their retention is shown unchecked."
        )
    settings = {
        (
            zs.get("settings", {}).get("limit"),
            zs.get("settings", {}).get("source"),
            tuple(zs.get("tasks", {})),
        )
        for zs in (results.get("zero_shot") for results in [ref_results, *runs])
        if zs
    }
    if len(settings) > 1:
        notes.append(
            "Warning: the files differ in zero-shot tasks, --limit or task source, so their accuracies and "
            "averages are not directly comparable: "
            + "; ".join(
                f"limit {limit}, {source}, {len(names)} tasks" for limit, source, names in sorted(settings, key=str)
            )
            + "."
        )
    return notes
