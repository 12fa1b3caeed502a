"""Side-by-side table of ``adapruner evaluate`` result files, with retention against a reference.

One row per file; columns: parameters, each perplexity (``source@seq_len``), each zero-shot task
(the metric that task is averaged with: ``acc`` or ``acc_norm``, in %), and the zero-shot average.
Every cell of a non-reference row also gives the retention in % of the reference row: value / ref
for parameters and accuracies, ref / value for perplexity (lower is better), so 100% means "as good
as the reference" in every column.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import AdaPrunerError

MISSING = "–"


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


def _row_values(results: dict[str, Any], ppl: list[str], tasks: list[tuple[str, str]]) -> list[float | None]:
    zs = results.get("zero_shot", {})
    values: list[float | None] = [float(results["params"])]
    values += [results.get("perplexity", {}).get(key) for key in ppl]
    values += [zs.get("tasks", {}).get(task, {}).get(metric) for task, metric in tasks]
    values.append(zs.get("average"))
    return values


def _format(kind: str, value: float) -> str:
    if kind == "params":
        return f"{value / 1e6:.1f}M"
    if kind == "ppl":
        return f"{value:.2f}"
    return f"{100 * value:.2f}"


def retention(kind: str, value: float | None, reference: float | None) -> float | None:
    """% of the reference: higher is better in every column (perplexity inverted)."""
    if value is None or reference is None or value == 0 or reference == 0:
        return None
    return 100 * (reference / value if kind == "ppl" else value / reference)


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
    ref_values = _row_values(ref_results, ppl, tasks)
    labels = [_label(results) for results in runs]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for path, label, results in zip(paths, labels, runs, strict=True):
        if labels.count(label) > 1:
            label = f"{label} ({Path(path).name})"
        is_reference = reference is None and results is runs[0]
        cells = []
        for kind, value, ref in zip(kinds, _row_values(results, ppl, tasks), ref_values, strict=True):
            if value is None:
                cells.append(MISSING)
                continue
            kept = retention(kind, value, ref)
            cell = _format(kind, value)
            cells.append(cell if is_reference or kept is None else f"{cell} ({kept:.1f}%)")
        lines.append("| " + " | ".join([label.replace("|", "\\|"), *cells]) + " |")
    return "\n".join([*lines, "", *_notes(paths, runs, reference, ref_results)]) + "\n"


def _notes(paths: list, runs: list[dict], reference: Any, ref_results: dict) -> list[str]:
    ref_name = str(reference) if reference is not None else f"{paths[0]} (first row)"
    notes = [
        f"Accuracies in %; (x%) = retention against {ref_name} ({_label(ref_results)}): value / reference, "
        "reference / value for perplexity."
    ]
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
