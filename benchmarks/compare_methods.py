"""The results table: every baseline of ``adapruner prune --method`` and AdaPruner, with and without LoRA.

Grid (default): SmolLM2-135M (``smollm2-135m``) at ratios 0.2 and 0.5, Qwen2.5-0.5B (``qwen2.5-0.5b``,
fetched with ``adapruner.assets.fetch`` when missing) at 0.2. For each model × ratio every method of
:mod:`adapruner.methods` (random, l2, llm-pruner-element1/element2/vector, wanda-sp, flap, flap-refit,
local-obs) is pruned with
its preset, and AdaPruner searches ``--trials`` trials (TPE, the default space, LLM-Pruner's recipe as
trial 0) and prunes with the winner (``prune --from-run``). Every pruned model is then

* evaluated as is: perplexity on the wiki, news, books and squad *test* splits (128-token windows, the
  first ``--eval-tokens`` tokens of each) with their geometric mean, and the seven zero-shot tasks
  (BoolQ, PIQA, HellaSwag, WinoGrande, ARC-e, ARC-c, OpenBookQA) on the first ``--limit`` documents of each;
* LoRA-recovered with the same budget for all: ``--finetune-steps`` optimizer steps of 8 examples
  (micro-batches of 4) of ``--cutoff-len`` tokens of ``--finetune-data`` (default ``wiki``, its train
  split), 5 warm-up steps, LLM-Pruner's LoRA settings otherwise (r 8, alpha 16, lr 1e-4, all seven
  projections), and evaluated again.

The dense model of each model is evaluated the same way (the retention reference). ``--full`` is the
GPU setting: no document limit, whole test splits, and LLM-Pruner's own LoRA budget (FinetuneConfig's
defaults: 2 epochs, batch 64, micro-batch 4, 256 tokens, 100 warm-up steps, 2,000 validation blocks;
``--finetune-data alpaca`` for the paper's data, which needs the hub).

Every unit of work (search, prune, fine-tune, evaluation) writes its output atomically under
``--run-root`` (default ``runs/bench/compare``) and is skipped when that output exists, so an
interrupted run continues where it stopped; the search is an Optuna study that continues from its last
trial. Output names carry the settings that decide them (trials, fine-tuning budget, evaluation tokens,
limit, tasks), so runs with other settings sit beside each other and the report only shows the current
ones. Layout::

    RUN_ROOT/<model>/dense/eval-<tag>.json
    RUN_ROOT/<model>/r<ratio>/<method>/model/                 pruned model (adapruner prune --output)
    RUN_ROOT/<model>/r<ratio>/<method>/<lora>/                LoRA-recovered model (merged)
    RUN_ROOT/<model>/r<ratio>/<method>/eval-<tag>.json        evaluate --output, and <lora>.eval-<tag>.json
    RUN_ROOT/<model>/r<ratio>/<method>/times.json             wall seconds of each unit
    RUN_ROOT/<model>/r<ratio>/adapruner-src4-search/          the study (shared by every --trials budget;
                                                              other --pool-per-source/--objective-tokens
                                                              are named: adapruner-src4-pool10-obj512-search)
    RUN_ROOT/results.md, results.csv, ppl_vs_ratio_<model>.png, retention_<model>_r<ratio>.png

``results.md`` holds one table per model × ratio (method, recovery, params, the four perplexities, their
geometric mean and its ratio to FLAP's, the seven accuracies, their average, its retention in % of the
dense average, and the wall time of pruning or search, fine-tuning and evaluation); ``results.csv`` one
row per model × ratio × method × recovery.
The markdown is printed to stdout at the end. Units that fail are reported and the run goes on (exit
status 1 at the end); ``--report-only`` rebuilds the report from what exists, ``--dry-run`` lists the
units still to run.

Budgets. Each model has its own budget, the same for every method of that model (a flag given on the
command line replaces it for every model): SmolLM2 ``--trials 20 --finetune-steps 10 --eval-tokens
8192``; Qwen2.5-0.5B (``MODEL_BUDGETS``) ``--trials 20 --finetune-steps 5 --eval-tokens 4096``; both
``--limit 5``. Output names carry the budget, so the two models' outputs never mix.

Wall time, measured on 2 CPU cores (fp32, 2026-12-03, the sum of the units' times). SmolLM2 ~55 min:
evaluation 25-60 s (4 × 8,192 tokens + 35 zero-shot documents), LoRA 30-60 s, pruning 1-150 s, a
20-trial search ~4 min, the 50-document retention check included. Qwen2.5-0.5B (~4× SmolLM2's cost
per token) ~73 min: evaluation 60-95 s (4 × 4,096 tokens), LoRA 5 steps ~1 min, pruning 5-250 s, the
20-trial search ~22 min (8 profile trials 12 min, the supernet build ~6 min, 12 per-layer trials ~4
min). The default grid ~2 h 10 min. On busier cores everything takes longer (the smoke run of
2026-11-28, on 2 cores loaded ~3× over, ran 5-20× slower). At ``--limit 5`` one task accuracy has a
standard error of ~±22 points and the seven-task average ~±8: small-limit accuracies are indicative
only; ``--full`` on a GPU gives the numbers to publish.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from adapruner import api
from adapruner.assets import MODELS as ASSET_MODELS
from adapruner.assets import fetch, model_dir
from adapruner.data.pool import DEFAULT_POOL_PER_SOURCE
from adapruner.errors import AdaPrunerError
from adapruner.files import write_json_atomic, write_text_atomic
from adapruner.methods import METHODS
from adapruner.pipeline import SEVEN_TASKS
from adapruner.stages import Stages, StageTimes

TIMES = "times.json"  # each result directory's wall seconds per unit (adapruner.stages.StageTimes)

ADAPRUNER = "adapruner"
DEFAULT_GRID = {"smollm2-135m": [0.2, 0.5], "qwen2.5-0.5b": [0.2]}
DISPLAY = {"smollm2-135m": "SmolLM2-135M-Instruct", "qwen2.5-0.5b": "Qwen2.5-Coder-0.5B-Instruct"}
PPL_SOURCES = ("wiki", "news", "books", "squad")
GEOMEAN = "geomean"  # their geometric mean (evaluate's "geomean@128")
REFERENCE = "flap"  # the "x FLAP" column: geometric mean / FLAP's (same model, ratio and recovery)
PPL_SEQ_LEN = 128
TASK_SHORT = {
    "boolq": "BoolQ",
    "piqa": "PIQA",
    "hellaswag": "HellaS.",
    "winogrande": "WinoG.",
    "arc_easy": "ARC-e",
    "arc_challenge": "ARC-c",
    "openbookqa": "OBQA",
}
# The equal recovery budget of every method (``--finetune-steps`` sets max_steps).
# LLM-Pruner's LoRA (LM loss, lr 1e-4) for every method, as in the tables of 2026-12-03; recovery.py measures the rest
LLM_PRUNER_LORA = {"loss": "lm", "full": False, "lr": 1e-4, "warmup_steps": 100, "precision": "fp32"}
FINETUNE_FIXED = LLM_PRUNER_LORA | {"batch_size": 8, "micro_batch_size": 4, "warmup_steps": 5, "val_set_size": 0}
# Budgets of the CPU grid: the defaults, and per model what replaces them when the flag is not given
# (Qwen2.5-0.5B costs ~4x SmolLM2 per token: a smaller budget keeps the whole grid near 4 h 20 min on 2 cores).
BUDGET_DEFAULTS = {"trials": 20, "finetune_steps": 10, "eval_tokens": 8192}
MODEL_BUDGETS = {"qwen2.5-0.5b": {"trials": 20, "finetune_steps": 5, "eval_tokens": 4096}}


# --- settings and names -----------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(DEFAULT_GRID), help="comma-separated model assets")
    parser.add_argument(
        "--ratios",
        default=None,
        help="comma-separated ratios for every selected model (default: 0.2,0.5 for SmolLM2, 0.2 for Qwen2.5)",
    )
    parser.add_argument(
        "--methods",
        default=",".join([*METHODS, ADAPRUNER]),
        help=f"comma-separated subset of {', '.join([*METHODS, ADAPRUNER])}",
    )
    parser.add_argument(
        "--trials", type=int, default=None, help="AdaPruner's search budget (trials per study; default 20 for both)"
    )
    parser.add_argument(
        "--pool-per-source", type=int, default=DEFAULT_POOL_PER_SOURCE, help="search pool windows per source"
    )
    parser.add_argument(
        "--objective-tokens", type=int, default=1024, help="validation tokens per objective source per search trial"
    )
    parser.add_argument(
        "--finetune-steps",
        type=int,
        default=None,
        help="LoRA optimizer steps of 8 examples (default 10, Qwen2.5 5)",
    )
    parser.add_argument("--cutoff-len", type=int, default=128, help="tokens per LoRA training example")
    parser.add_argument("--finetune-data", default="wiki", help="LoRA data: a text source, alpaca or a file")
    parser.add_argument("--no-finetune", action="store_true", help="skip the LoRA rows")
    parser.add_argument(
        "--eval-tokens",
        type=int,
        default=None,
        help="test tokens per perplexity source (default 8192, Qwen2.5 4096)",
    )
    parser.add_argument("--tasks", default=",".join(SEVEN_TASKS), help="zero-shot tasks, or 'none'")
    parser.add_argument("--limit", type=int, default=5, help="documents per zero-shot task")
    parser.add_argument("--batch-size", type=int, default=8, help="evaluation batch size")
    parser.add_argument(
        "--retention-limit",
        type=int,
        default=50,
        help="documents per task of the zero-shot retention check (0: no check)",
    )
    parser.add_argument(
        "--retention-grid",
        default="smollm2-135m@0.2",
        help="model@ratio pairs of the retention check (dense, AdaPruner and the best baseline, recovered)",
    )
    parser.add_argument(
        "--full",
        action="store_true",
        help="GPU setting: no --limit, whole test splits, LLM-Pruner's LoRA budget (FinetuneConfig defaults)",
    )
    parser.add_argument("--run-root", type=Path, default=Path("runs/bench/compare"))
    parser.add_argument("--report-only", action="store_true", help="only rebuild the report from existing outputs")
    parser.add_argument("--dry-run", action="store_true", help="list the units still to run, run nothing")
    args = parser.parse_args(argv)

    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in ASSET_MODELS]
    if unknown or not args.models:
        parser.error(f"--models: unknown {unknown or '(none)'}; choose from {', '.join(ASSET_MODELS)}")
    ratios = [float(r) for r in args.ratios.split(",")] if args.ratios else None
    args.grid = [(m, r) for m in args.models for r in (ratios or DEFAULT_GRID.get(m, [0.2]))]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS and m != ADAPRUNER]
    if unknown:
        parser.error(f"--methods: unknown {unknown}; choose from {', '.join([*METHODS, ADAPRUNER])}")
    args.methods = [m for m in [*METHODS, ADAPRUNER] if m in args.methods]  # the registry's order
    args.tasks = [] if args.tasks.strip().lower() in ("", "none") else [t.strip() for t in args.tasks.split(",")]
    args.explicit = {name for name in BUDGET_DEFAULTS if getattr(args, name) is not None}
    for name, value in BUDGET_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.full:
        args.limit, args.eval_tokens = None, None
    if not args.tasks:
        args.limit = None
    args.retention = []
    if args.retention_limit and args.tasks and not args.full:
        for pair in (p.strip() for p in args.retention_grid.split(",") if p.strip()):
            model, _, ratio = pair.partition("@")
            if (model, float(ratio or 0)) in args.grid:
                args.retention.append((model, float(ratio)))
    for name in ("trials", "finetune_steps", "pool_per_source", "objective_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def for_model(args, model: str) -> argparse.Namespace:
    """The settings one model runs with: its budget (MODEL_BUDGETS) where the flag was not given."""
    budget = {} if args.full else MODEL_BUDGETS.get(model, {})
    return argparse.Namespace(**(vars(args) | {k: v for k, v in budget.items() if k not in args.explicit}))


def finetune_options(args) -> dict[str, Any]:
    if args.full:
        return dict(LLM_PRUNER_LORA)  # LLM-Pruner's post-training: FinetuneConfig's budget defaults
    return FINETUNE_FIXED | {"max_steps": args.finetune_steps, "cutoff_len": args.cutoff_len}


def steps_text(args) -> str:
    return f"{args.finetune_steps} step" + ("s" if args.finetune_steps != 1 else "")


def slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "-" for c in str(text)).strip("-") or "x"


def lora_name(args) -> str:
    """The fine-tuned model's directory name: data and budget."""
    data = slug(Path(args.finetune_data).stem if os.sep in args.finetune_data else args.finetune_data)
    return f"lora-{data}-llm-pruner" if args.full else f"lora-{data}-s{args.finetune_steps}-c{args.cutoff_len}"


def eval_tag(args) -> str:
    """What decides an evaluation file: test tokens, document limit, tasks."""
    tag = f"eval-src{len(PPL_SOURCES)}-tok{args.eval_tokens or 'all'}-lim{args.limit or 'all'}"
    if not args.tasks:
        return tag + "-nozs"
    if list(args.tasks) != list(SEVEN_TASKS):
        tag += "-" + "+".join(slug(t) for t in args.tasks)
    return tag


def search_name(args) -> str:
    """The study's directory: the search settings other than the budget (defaults: not named)."""
    name = ADAPRUNER + "-src4"  # the four-source objective with its per-layer stage (older studies: wiki only)
    if args.pool_per_source != DEFAULT_POOL_PER_SOURCE:
        name += f"-pool{args.pool_per_source}"
    if args.objective_tokens != 1024:
        name += f"-obj{args.objective_tokens}"
    return name


def variant(method: str, args) -> str:
    """The directory of one method's pruned model; AdaPruner's name holds its search settings and budget."""
    return f"{search_name(args)}-t{args.trials}" if method == ADAPRUNER else method


def method_label(method: str, args) -> str:
    if method == ADAPRUNER:
        return f"AdaPruner (TPE, {args.trials} trials)"
    return method


# --- units of work ----------------------------------------------------------------------------------


def evaluate_unit(
    runner: Stages, args, name: str, model: str | Path, output: Path, times: StageTimes, needs: list[Path] = ()
) -> None:
    def action() -> None:
        api.evaluate(
            str(model),
            ppl=list(PPL_SOURCES),
            seq_len=[PPL_SEQ_LEN],
            max_tokens=args.eval_tokens,
            batch_size=args.batch_size,
            tasks=args.tasks or None,
            limit=args.limit,
            output=output,
        )

    runner.run(f"evaluate {name}", output.is_file(), action, needs, times=times, key=output.name)


def search_done(search_dir: Path, trials: int) -> bool:
    best = read_json(search_dir / "best.json")
    if best is None:
        return False
    finished = best.get("finished", 0)
    if finished > trials:
        raise AdaPrunerError(
            f"the study in {search_dir} already holds {finished} trials, more than --trials {trials}: "
            f"give --trials {finished} or more, or another --run-root"
        )
    return finished >= trials


def search_seconds(search_dir: Path, trials: int) -> float | None:
    """Wall time of the study up to ``trials`` trials (a continued study adds its runs' times)."""
    try:
        runs = json.loads((search_dir / "times.json").read_text())
    except (OSError, ValueError):
        return None
    seconds = [r["seconds"] for r in runs if r.get("trials", math.inf) <= trials]
    return round(sum(seconds), 1) if seconds else None


def run_search(runner: Stages, args, model: str, ratio: float, search_dir: Path) -> None:
    from adapruner.search.space import SearchSpace
    from adapruner.search.study import search

    def action() -> None:
        start = time.perf_counter()
        search(
            model,
            ratio,
            trials=args.trials,
            output=search_dir,
            space=SearchSpace(),
            sampler="tpe",
            seed=0,
            pool_per_source=args.pool_per_source,
            objective_tokens=args.objective_tokens,
        )
        path = search_dir / "times.json"
        try:
            runs = json.loads(path.read_text())
        except (OSError, ValueError):
            runs = []
        write_json_atomic(path, [*runs, {"trials": args.trials, "seconds": round(time.perf_counter() - start, 1)}])

    runner.run(f"search {model} r{ratio} ({args.trials} trials)", search_done(search_dir, args.trials), action)


def run_method(runner: Stages, args, model: str, ratio: float, method: str) -> None:
    ratio_dir = args.run_root / model / f"r{ratio}"
    directory = ratio_dir / variant(method, args)
    times = StageTimes(directory / TIMES)
    pruned = directory / "model"
    where = f"{model} r{ratio} {variant(method, args)}"
    if method == ADAPRUNER:
        search_dir = ratio_dir / f"{search_name(args)}-search"
        run_search(runner, args, model, ratio, search_dir)
        runner.run(
            f"prune {where}",
            pruned.is_dir(),
            lambda: api.prune(model, from_run=search_dir, output=pruned),
            [search_dir / "best.json"],
            times=times,
            key="prune",
        )
    else:
        runner.run(
            f"prune {where}",
            pruned.is_dir(),
            lambda: api.prune(model, ratio, method=method, output=pruned),
            times=times,
            key="prune",
        )
    tag = eval_tag(args)
    evaluate_unit(runner, args, where, pruned, directory / f"{tag}.json", times, [pruned])
    if args.no_finetune:
        return
    lora = directory / lora_name(args)
    runner.run(
        f"finetune {where} ({lora.name})",
        lora.is_dir(),
        lambda: api.finetune(pruned, args.finetune_data, lora, **finetune_options(args)),
        [pruned],
        times=times,
        key=lora.name,
    )
    evaluate_unit(runner, args, f"{where} {lora.name}", lora, directory / f"{lora.name}.{tag}.json", times, [lora])


def ensure_model(model: str) -> None:
    if not (model_dir(model) / "config.json").is_file():
        print(f"[compare_methods] fetching {model} (adapruner assets fetch {model}) ...", file=sys.stderr)
        fetch([model])


def run_all(args) -> Stages:
    runner = Stages(keep_going=True, dry_run=args.dry_run)
    for model in args.models:
        if not args.dry_run:
            ensure_model(model)
        settings = for_model(args, model)
        dense = args.run_root / model / "dense"
        evaluate_unit(
            runner, settings, f"{model} dense", model, dense / f"{eval_tag(settings)}.json", StageTimes(dense / TIMES)
        )
        for grid_model, ratio in args.grid:
            if grid_model != model:
                continue
            for method in args.methods:
                try:
                    run_method(runner, settings, model, ratio, method)
                except AdaPrunerError as exc:  # e.g. a study with more trials than asked
                    runner.failures.append(f"{model} r{ratio} {method}: {exc}")
    for model, ratio in args.retention:
        run_retention(runner, for_model(args, model), model, ratio)
    return runner


# --- zero-shot retention check ----------------------------------------------------------------------


def retention_tag(args) -> str:
    tag = f"zs-lim{args.retention_limit}"
    return tag if list(args.tasks) == list(SEVEN_TASKS) else tag + "-" + "+".join(slug(t) for t in args.tasks)


def recovered(args, directory: Path) -> tuple[Path, str]:
    """The model a method's retention row evaluates (recovered unless --no-finetune) and its file prefix."""
    if args.no_finetune:
        return directory / "model", "model"
    return directory / lora_name(args), lora_name(args)


def best_baseline(args, model: str, ratio: float) -> str | None:
    """The baseline with the lowest geometric-mean test perplexity after recovery (before it, with --no-finetune)."""
    rows = [
        r
        for r in collect_rows(args)
        if r["model"] == model
        and r["ratio"] == ratio
        and r["method"] in METHODS
        and (r["recovery"] == "none") == args.no_finetune
        and r[f"{GEOMEAN}_ppl"] is not None
    ]
    return min(rows, key=lambda r: r[f"{GEOMEAN}_ppl"])["method"] if rows else None


def retention_methods(args, model: str, ratio: float) -> list[str]:
    methods = [ADAPRUNER] if ADAPRUNER in args.methods else []
    baseline = best_baseline(args, model, ratio)
    return methods + ([baseline] if baseline else [])


def run_retention(runner: Stages, args, model: str, ratio: float) -> None:
    """Zero-shot only, on more documents: dense, AdaPruner and the strongest baseline (all recovered)."""
    tag = retention_tag(args)

    def unit(name: str, target: str | Path, output: Path, times: StageTimes, needs: list[Path]) -> None:
        def action() -> None:
            api.evaluate(
                str(target),
                ppl=[],
                tasks=args.tasks,
                limit=args.retention_limit,
                batch_size=args.batch_size,
                output=output,
            )

        runner.run(f"retention check {name}", output.is_file(), action, needs, times=times, key=output.name)

    dense = args.run_root / model / "dense"
    unit(f"{model} dense", model, dense / f"{tag}.json", StageTimes(dense / TIMES), [])
    for method in retention_methods(args, model, ratio):
        directory = args.run_root / model / f"r{ratio}" / variant(method, args)
        target, prefix = recovered(args, directory)
        unit(
            f"{model} r{ratio} {variant(method, args)}",
            target,
            directory / f"{prefix}.{tag}.json",
            StageTimes(directory / TIMES),
            [target],
        )


def retention_markdown(args) -> str:
    tag = retention_tag(args)
    lines = []
    for model, ratio in args.retention:
        lines += retention_table(for_model(args, model), model, ratio, tag)
    return "\n".join(lines) + ("\n" if lines else "")


def retention_table(args, model: str, ratio: float, tag: str) -> list[str]:
    """The retention check's table of one model × ratio, with that model's settings."""
    dense = read_json(args.run_root / model / "dense" / f"{tag}.json")
    rows = [("dense", dense)]
    for method in retention_methods(args, model, ratio):
        directory = args.run_root / model / f"r{ratio}" / variant(method, args)
        _, prefix = recovered(args, directory)
        rows.append((method_label(method, args), read_json(directory / f"{prefix}.{tag}.json")))
    recovery = "no recovery" if args.no_finetune else f"LoRA {steps_text(args)}"
    lines = [
        "",
        f"### Zero-shot retention check: {DISPLAY.get(model, model)} at ratio {ratio} ({recovery}), "
        f"first {args.retention_limit} documents per task",
        "",
    ]
    head = ["model", *(TASK_SHORT.get(t, t) for t in args.tasks), "average", "retention"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    reference = (dense or {}).get("zero_shot", {}).get("average")
    for label, results in rows:
        if results is None:
            lines.append(f"| {label} | " + " | ".join("–" for _ in head[1:]) + " |")
            continue
        row = row_from_eval(results, args.tasks)
        retention = 100 * row["average"] / reference if reference and row["average"] is not None else None
        cells = [label, *(fmt(row[t], "acc") for t in args.tasks), fmt(row["average"], "acc")]
        lines.append("| " + " | ".join([*cells, fmt(retention, "pct")]) + " |")
    return lines


# --- report -----------------------------------------------------------------------------------------


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def row_from_eval(results: dict, tasks: list[str]) -> dict[str, Any]:
    zs = results.get("zero_shot") or {}
    row: dict[str, Any] = {"params": results.get("params")}
    for source in (*PPL_SOURCES, GEOMEAN):
        row[f"{source}_ppl"] = results.get("perplexity", {}).get(f"{source}@{PPL_SEQ_LEN}")
    for task in tasks:
        entry = zs.get("tasks", {}).get(task)
        row[task] = entry[entry["metric"]] if entry else None
        row[f"{task}_metric"] = entry["metric"] if entry else None
    row["average"] = zs.get("average")
    return row


def collect_rows(args) -> list[dict[str, Any]]:
    """One row per model × ratio × method × recovery whose evaluation exists, plus the dense rows."""
    rows: list[dict[str, Any]] = []
    for model, ratio in args.grid:
        rows += model_rows(for_model(args, model), model, ratio)
    return rows


def model_rows(args, model: str, ratio: float) -> list[dict[str, Any]]:
    """The rows of one model × ratio table, read with that model's settings."""
    tag = eval_tag(args)
    lora = lora_name(args)
    recovery = "LoRA (LLM-Pruner budget)" if args.full else f"LoRA {steps_text(args)}"
    rows: list[dict[str, Any]] = []
    dense_path = args.run_root / model / "dense" / f"{tag}.json"
    dense = read_json(dense_path)
    dense_row = None
    if dense is not None:
        dense_row = {"model": model, "ratio": 0.0, "method": "dense", "recovery": "none", "table_ratio": ratio}
        dense_row |= row_from_eval(dense, args.tasks)
        dense_row |= {"achieved_ratio": 0.0, "eval_s": StageTimes(dense_path.parent / TIMES).get(dense_path.name)}
        dense_row["retention"] = 100.0 if dense_row["average"] else None
        rows.append(dense_row)
    for method in args.methods:
        directory = args.run_root / model / f"r{ratio}" / variant(method, args)
        times = StageTimes(directory / TIMES)
        record = read_json(directory / "model" / "adapruner.json") or {}
        search_s = None
        if method == ADAPRUNER:
            search_s = search_seconds(directory.parent / f"{search_name(args)}-search", args.trials)
        for kind, eval_name, tuned in (("none", f"{tag}.json", None), (recovery, f"{lora}.{tag}.json", lora)):
            results = read_json(directory / eval_name)
            if results is None or (tuned and args.no_finetune):
                continue
            row = {"model": model, "ratio": ratio, "method": method_label(method, args), "recovery": kind}
            row |= row_from_eval(results, args.tasks)
            row["achieved_ratio"] = record.get("achieved_ratio")
            row["search_trials"] = args.trials if method == ADAPRUNER else None
            row["search_s"] = search_s
            row["prune_s"] = times.get("prune")
            row["finetune_s"] = times.get(tuned) if tuned else None
            row["eval_s"] = times.get(eval_name)
            reference = dense_row["average"] if dense_row else None
            row["retention"] = 100 * row["average"] / reference if row["average"] is not None and reference else None
            row["table_ratio"] = ratio
            rows.append(row)
    for row in rows:  # geometric mean against FLAP's with the same recovery
        flap = next((r for r in rows if r["method"] == REFERENCE and r["recovery"] == row["recovery"]), None)
        ours, theirs = row.get(f"{GEOMEAN}_ppl"), flap and flap.get(f"{GEOMEAN}_ppl")
        row["vs_flap"] = ours / theirs if ours and theirs and row["method"] != "dense" else None
    return rows


def fmt(value: Any, kind: str) -> str:
    if value is None:
        return "–"
    if kind == "params":
        return f"{value / 1e6:.1f}M"
    if kind == "ppl":
        return f"{value:.2f}"
    if kind == "acc":
        return f"{100 * value:.1f}"
    if kind == "pct":
        return f"{value:.1f}%"
    if kind == "x":
        return f"{value:.3f}×"
    if kind == "s":
        return f"{value:.0f} s" if value < 600 else f"{value / 60:.0f} min"
    return str(value)


def time_cell(row: dict) -> str:
    parts = []
    if row.get("search_s") is not None or row.get("search_trials"):
        parts.append(f"search {fmt(row.get('search_s'), 's')}")
    if row["method"] != "dense":
        parts.append(f"prune {fmt(row.get('prune_s'), 's')}")
    if row["recovery"] != "none":
        parts.append(f"LoRA {fmt(row.get('finetune_s'), 's')}")
    parts.append(f"eval {fmt(row.get('eval_s'), 's')}")
    return ", ".join(parts)


def settings_text(args) -> str:
    """The budget one model's tables were measured with."""
    lora_text = (
        f"LLM-Pruner's LoRA budget on `{args.finetune_data}`"
        if args.full
        else f"LoRA {steps_text(args)} × 8 examples × {args.cutoff_len} tokens of `{args.finetune_data}`"
    )
    return (
        f"Settings: perplexity on the first {args.eval_tokens or 'all'} tokens of each test split"
        + (f"; zero-shot on the first {args.limit or 'all'} documents per task" if args.tasks else "")
        + ("; no recovery" if args.no_finetune else f"; recovery {lora_text}")
        + (f"; AdaPruner's search {args.trials} trials." if ADAPRUNER in args.methods else ".")
    )


def markdown(args, rows: list[dict[str, Any]]) -> str:
    lines = [
        "## Pruning methods compared",
        "",
        f"Perplexity: {PPL_SEQ_LEN}-token windows of the wiki, news, books and squad test splits and their geometric "
        "mean (geo); × FLAP = geo / FLAP's geo with the same recovery. "
        + (
            "Zero-shot: accuracy in % (acc or acc_norm as LLM-Pruner reports); retention = average / dense average. "
            if args.tasks
            else "No zero-shot tasks. "
        )
        + "Recovery: the same LoRA budget for every method of a model. AdaPruner: TPE search (LLM-Pruner's "
        "recipe is trial 0, FLAP trial 1, FLAP refitted trial 2), then `prune --from-run`. Times: wall seconds of "
        "each step.",
    ]
    task_heads = [TASK_SHORT.get(t, t) for t in args.tasks]
    for model, ratio in args.grid:
        mine = [r for r in rows if r["model"] == model and r["table_ratio"] == ratio]
        lines += [
            "",
            f"### {DISPLAY.get(model, model)} at ratio {ratio}",
            "",
            settings_text(for_model(args, model)),
            "",
        ]
        if not mine:
            lines.append("(no results yet)")
            continue
        ppl_heads = [f"{s} ppl" for s in PPL_SOURCES] + ["geo", "× FLAP"]
        zero_shot = ["average", "retention"] if args.tasks else []
        head = ["method", "recovery", "params", *ppl_heads, *task_heads, *zero_shot, "time"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in mine:
            cells = [r["method"], r["recovery"], fmt(r["params"], "params")]
            cells += [fmt(r[f"{s}_ppl"], "ppl") for s in (*PPL_SOURCES, GEOMEAN)] + [fmt(r.get("vs_flap"), "x")]
            cells += [fmt(r[t], "acc") for t in args.tasks]
            cells += [fmt(r["average"], "acc"), fmt(r["retention"], "pct")] if args.tasks else []
            cells.append(time_cell(r))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


CSV_FIELDS = [
    "model",
    "ratio",
    "method",
    "recovery",
    "params",
    "achieved_ratio",
    *(f"{s}_ppl" for s in (*PPL_SOURCES, GEOMEAN)),
    "vs_flap",
]


def write_csv(path: Path, args, rows: list[dict[str, Any]]) -> None:
    fields = [*CSV_FIELDS]
    for task in args.tasks:
        fields += [task, f"{task}_metric"]
    fields += ["average", "retention", "search_trials", "search_s", "prune_s", "finetune_s", "eval_s"]
    fields += ["eval_tokens", "limit", "finetune"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    seen = set()
    for row in rows:
        key = (row["model"], row["ratio"], row["method"], row["recovery"])
        if key in seen:  # the dense row heads every ratio's table, once in the CSV
            continue
        seen.add(key)
        settings = for_model(args, row["model"])
        finetune = None if row["recovery"] == "none" else lora_name(settings)
        writer.writerow(row | {"eval_tokens": settings.eval_tokens, "limit": settings.limit, "finetune": finetune})
    write_text_atomic(path, buffer.getvalue())


def readable(path: Path) -> None:
    """Temporary files are created 0600; give the outputs the usual permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def save_figure(fig, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
        readable(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


PLOTTED = (*PPL_SOURCES, GEOMEAN)


def plot_perplexity(args, rows: list[dict[str, Any]]) -> list[Path]:
    """Per model: perplexity vs ratio, one line per method; columns without / with LoRA, rows the sources + geo."""
    import matplotlib.pyplot as plt

    written = []
    for model in args.models:
        mine = [r for r in rows if r["model"] == model]
        recoveries = ["none", *sorted({r["recovery"] for r in mine if r["recovery"] != "none"})]
        dense = next((r for r in mine if r["method"] == "dense"), None)
        methods = [m for m in dict.fromkeys(r["method"] for r in mine) if m != "dense"]
        if not methods:
            continue
        fig, axes = plt.subplots(
            len(PLOTTED), len(recoveries), figsize=(5.5 * len(recoveries), 3.8 * len(PLOTTED)), squeeze=False
        )
        for i, source in enumerate(PLOTTED):
            for j, recovery in enumerate(recoveries):
                ax = axes[i][j]
                for method in methods:
                    points = sorted(
                        (r["ratio"], r[f"{source}_ppl"])
                        for r in mine
                        if r["method"] == method and r["recovery"] == recovery and r[f"{source}_ppl"]
                    )
                    if dense and dense[f"{source}_ppl"]:
                        points = [(0.0, dense[f"{source}_ppl"]), *points]
                    if points:
                        ax.plot(*zip(*points, strict=True), marker="o", label=method)
                ax.set_yscale("log")
                ax.set_xlabel("pruning ratio (fraction of parameters removed)")
                ax.set_ylabel(f"{source} test perplexity @{PPL_SEQ_LEN}")
                ax.set_title(f"{DISPLAY.get(model, model)}: {'no recovery' if recovery == 'none' else recovery}")
                ax.grid(True, which="both", alpha=0.3)
        axes[0][-1].legend(fontsize=7, loc="upper left")
        fig.tight_layout()
        path = args.run_root / f"ppl_vs_ratio_{model}.png"
        save_figure(fig, path)
        plt.close(fig)
        written.append(path)
    return written


def plot_retention(args, rows: list[dict[str, Any]]) -> list[Path]:
    """Per model × ratio: accuracy retention (% of dense) per task, one bar per method; without / with LoRA."""
    import matplotlib.pyplot as plt

    if not args.tasks:
        return []
    written = []
    labels = [*args.tasks, "average"]
    for model, ratio in args.grid:
        mine = [r for r in rows if r["model"] == model and r["table_ratio"] == ratio]
        dense = next((r for r in mine if r["method"] == "dense"), None)
        pruned = [r for r in mine if r["method"] != "dense"]
        if dense is None or not pruned:
            continue
        recoveries = list(dict.fromkeys(r["recovery"] for r in pruned))
        fig, axes = plt.subplots(len(recoveries), 1, figsize=(11, 3.8 * len(recoveries)), squeeze=False)
        for ax, recovery in zip(axes[:, 0], recoveries, strict=True):
            group = [r for r in pruned if r["recovery"] == recovery]
            width = 0.8 / len(group)
            for k, r in enumerate(group):
                values = [100 * r[t] / dense[t] if r.get(t) is not None and dense.get(t) else 0.0 for t in labels]
                xs = [x + (k - (len(group) - 1) / 2) * width for x in range(len(labels))]
                ax.bar(xs, values, width, label=r["method"])
            ax.axhline(100, color="black", linewidth=0.8)
            ax.set_xticks(range(len(labels)), [TASK_SHORT.get(t, t) for t in labels])
            ax.set_ylabel("accuracy retention (% of dense)")
            title = "no recovery" if recovery == "none" else recovery
            ax.set_title(f"{DISPLAY.get(model, model)} at ratio {ratio}: {title}")
            ax.legend(fontsize=7, ncol=3)
        fig.tight_layout()
        path = args.run_root / f"retention_{model}_r{ratio}.png"
        save_figure(fig, path)
        plt.close(fig)
        written.append(path)
    return written


def report(args) -> str:
    import matplotlib

    matplotlib.use("Agg")
    rows = collect_rows(args)
    args.run_root.mkdir(parents=True, exist_ok=True)
    text = markdown(args, rows) + retention_markdown(args)
    write_text_atomic(args.run_root / "results.md", text)
    write_csv(args.run_root / "results.csv", args, rows)
    for name in ("results.md", "results.csv"):
        readable(args.run_root / name)
    plots = plot_perplexity(args, rows) + plot_retention(args, rows)
    print(
        f"[compare_methods] wrote results.md, results.csv and {len(plots)} plot(s) to {args.run_root}", file=sys.stderr
    )
    return text


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    runner = Stages(keep_going=True, dry_run=args.dry_run)
    if not args.report_only:
        runner = run_all(args)
    if args.dry_run:
        print("\n".join(runner.pending) if runner.pending else "nothing to run: every output exists")
        return 0
    print(report(args))
    print(
        f"[compare_methods] {runner.ran} unit(s) run in {time.perf_counter() - start:.0f} s",
        file=sys.stderr,
    )
    if runner.failures:
        print("[compare_methods] failed units:\n  " + "\n  ".join(runner.failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
