"""What recovery buys: LM-loss LoRA, KD LoRA and KD full-parameter training, side by side, on held-out text.

For each model × ratio the student is AdaPruner's pruned model (a ``--trials`` search, then ``prune
--from-run``; or ``--student DIR``), its teacher the dense model. Every recovery configuration
(``--configs``, each ``MODE[:key=value;...]`` with FinetuneConfig fields) runs at every budget
(``--tokens``) and seed (``--seeds``) through ``adapruner finetune`` in a child process (so its wall time
and peak memory are its own), on the four offline sources' calibration splits (never their test
splits), and is evaluated on the four sources' *test* splits (128-token windows, the first
``--eval-tokens`` tokens of each) with their geometric mean. The dense model and the student before
recovery are evaluated the same way.

Modes: ``lm-lora`` (today's LLM-Pruner recovery: LM loss, LoRA), ``kd-lora`` (forward KL from the
teacher, LoRA), ``kd-full`` (forward KL, every parameter), ``kdlm-full`` (``kd+lm``, every parameter),
``kd-full-cache`` (``kd-full`` reading a teacher cache of ``--cache-top-k`` logits, built once per model
and data). Shared settings: batch 8 × ``--cutoff-len`` tokens, the mode's learning rate (``lr=`` in a
config overrides it), linear decay after 5% warmup, seed per ``--seeds``.

Every unit writes its output atomically under ``--run-root`` (default ``runs/bench/recovery``) and is
skipped when it exists (``stages.json`` keeps the wall times), so an interrupted run continues.
Layout::

    RUN_ROOT/<model>/dense.eval.json
    RUN_ROOT/<model>/r<ratio>/search/, student/, student.eval.json
    RUN_ROOT/<model>/r<ratio>/<config>-t<tokens>-s<seed>/  (the recovered model), and .eval.json, .run.json
    RUN_ROOT/<model>/teacher-cache-k<k>/                    (kd-full-cache)
    RUN_ROOT/results.md, results.csv

The report prints one table per model × ratio (configuration, tokens, the four perplexities, the
geometric mean, its ratio to the dense model's, the change against the student before recovery, wall
time, tokens/s and peak memory) and the checks of issue 26's targets.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from adapruner import api
from adapruner.data.sources import ALL_OFFLINE, OFFLINE_SOURCES
from adapruner.files import write_csv_atomic, write_json_atomic, write_text_atomic
from adapruner.search.study import search
from adapruner.stages import Stages

SOURCES, DATA = OFFLINE_SOURCES, ALL_OFFLINE
MODES: dict[str, dict[str, Any]] = {
    "lm-lora": {"loss": "lm", "full": False, "lr": 1e-4},
    "lm-full": {"loss": "lm", "full": True, "lr": 1e-4},
    "kd-lora": {"loss": "kd", "full": False, "lr": 1e-3},
    "kd-full": {"loss": "kd", "full": True, "lr": 1e-4},
    "kdlm-full": {"loss": "kd+lm", "full": True, "lr": 1e-4},
    "kd-full-cache": {"loss": "kd", "full": True, "lr": 1e-4, "cache": True},
}
DEFAULT_CONFIGS = "lm-lora,kd-lora,kd-full"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2-135m")
    parser.add_argument("--ratios", default="0.2,0.5")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help="MODE[:key=value;...] joined by commas")
    parser.add_argument("--tokens", default="32768,131072,524288", help="training-token budgets")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--trials", type=int, default=20, help="search trials for the student")
    parser.add_argument("--student", type=Path, default=None, help="use this pruned directory (one model × ratio)")
    parser.add_argument("--cutoff-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--cache-top-k", type=int, default=64)
    parser.add_argument("--data", default=DATA, help="recovery text (finetune --data)")
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--run-root", type=Path, default=Path("runs/bench/recovery"))
    parser.add_argument("--report-only", action="store_true")
    return parser.parse_args(argv)


def parse_config(text: str) -> tuple[str, dict[str, Any]]:
    """``kd-full:lr=3e-4;temperature=2`` -> (its name, FinetuneConfig options)."""
    mode, _, extra = text.partition(":")
    if mode not in MODES:
        raise SystemExit(f"unknown mode {mode}: choose among {', '.join(MODES)}")
    options = dict(MODES[mode])
    for item in filter(None, extra.split(";")):
        key, _, value = item.partition("=")
        options[key] = json.loads(value) if value[:1].isdigit() or value in ("true", "false") else value
    name = mode + "".join(f"-{k}{v}" for k, v in sorted(options.items()) if k not in MODES[mode] or MODES[mode][k] != v)
    return name, options


def finetune_command(student: Path, output: Path, options: dict[str, Any], args, tokens: int, seed: int, cache: Path):
    command = [sys.executable, "-m", "adapruner.cli", "finetune", str(student), "--output", str(output)]
    settings = {
        "data": args.data,
        "tokens": tokens,
        "seed": seed,
        "cutoff_len": args.cutoff_len,
        "batch_size": args.batch_size,
        "micro_batch_size": args.batch_size,
        "warmup_steps": 0.05,
        "val_set_size": 0,
        "logging_steps": 5,
        "save_steps": 50,
    }
    settings |= {k: v for k, v in options.items() if k not in ("full", "cache")}
    if options.get("cache"):
        settings |= {"teacher_cache": cache, "cache_top_k": args.cache_top_k}
    for key, value in settings.items():
        command += [f"--{key.replace('_', '-')}", str(value)]
    command.append("--full" if options.get("full") else "--lora")
    return command


def run_child(command: list[str], record: Path) -> None:
    """Run ``command``; its wall time and peak resident memory (the child's own) go to ``record``."""
    start = time.perf_counter()
    process = subprocess.Popen(command)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:6])} ... failed with exit code {process.returncode}")
    write_json_atomic(
        record, {"seconds": round(time.perf_counter() - start, 1), "peak_rss_gib": usage.ru_maxrss / 2**20}
    )


def evaluate(location: str | Path, output: Path, args) -> None:
    results = api.evaluate(str(location), ppl=list(SOURCES), seq_len=[128], max_tokens=args.eval_tokens, tasks=None)
    write_json_atomic(output, results)


def build_student(stages: Stages, args, model: str, ratio: float, directory: Path) -> Path:
    if args.student is not None:
        return args.student
    search_dir, student = directory / "search", directory / "student"
    stages.run(
        f"search {model} {ratio}",
        search_dir / "best.json",
        lambda: search(model, ratio, trials=args.trials, output=search_dir, seed=0),
    )
    stages.run(f"prune {model} {ratio}", student, lambda: api.prune(model, from_run=search_dir, output=student))
    return student


def run_model_ratio(args, model: str, ratio: float) -> None:
    root = args.run_root / model
    directory = root / f"r{ratio}"
    stages = Stages.in_dir(directory)
    stages.run(
        f"evaluate dense {model}", root / "dense.eval.json", lambda: evaluate(model, root / "dense.eval.json", args)
    )
    student = build_student(stages, args, model, ratio, directory)
    before = directory / "student.eval.json"
    stages.run("evaluate student", before, lambda: evaluate(student, before, args))
    cache = root / f"teacher-cache-k{args.cache_top_k}{data_tag(args)}"
    for text in args.configs.split(","):
        name, options = parse_config(text)
        for tokens in [int(t) for t in args.tokens.split(",")]:
            for seed in [int(s) for s in args.seeds.split(",")]:
                unit = directory / f"{name}{data_tag(args)}-t{tokens}-s{seed}"
                command = finetune_command(student, unit, options, args, tokens, seed, cache)
                stages.run(f"recover {unit.name}", unit, lambda c=command, u=unit: run_child(c, _run_file(u)))
                evaluation = unit.with_name(f"{unit.name}.eval.json")
                stages.run(f"evaluate {unit.name}", evaluation, lambda u=unit, e=evaluation: evaluate(u, e, args))


def data_tag(args) -> str:
    """Units trained on other text than the four sources carry it in their names."""
    return "" if args.data == DATA else "-data" + args.data.replace(",", "+").replace("/", "_")


def _run_file(unit: Path) -> Path:
    return unit.with_name(f"{unit.name}.run.json")


# --- report ----------------------------------------------------------------------------------------


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def perplexities(evaluation: dict) -> dict[str, float]:
    values = {s: evaluation["perplexity"][f"{s}@128"] for s in SOURCES}
    values["geo"] = math.exp(sum(math.log(v) for v in values.values()) / len(SOURCES))
    return values


def rows_for(args, model: str, ratio: float) -> list[dict[str, Any]]:
    root = args.run_root / model
    directory = root / f"r{ratio}"
    dense, before = read_json(root / "dense.eval.json"), read_json(directory / "student.eval.json")
    if dense is None or before is None:
        return []
    dense_ppl, before_ppl = perplexities(dense), perplexities(before)
    rows = [
        {"model": model, "ratio": ratio, "config": "dense", "tokens": 0, **dense_ppl},
        {"model": model, "ratio": ratio, "config": "student (no recovery)", "tokens": 0, **before_ppl},
    ]
    for evaluation_path in sorted(directory.glob("*.eval.json")):
        name = evaluation_path.name.removesuffix(".eval.json")
        if name == "student":
            continue
        unit = directory / name
        record = read_json(unit / "adapruner.json") or {}
        finetune, run = record.get("finetune", {}), read_json(_run_file(unit)) or {}
        ppl = perplexities(read_json(evaluation_path))
        config, _, seed = name.rpartition("-s")
        config, _, tokens = config.rpartition("-t")
        rows.append(
            {
                "model": model,
                "ratio": ratio,
                "config": config,
                "tokens": int(tokens),
                "seed": int(seed),
                **ppl,
                "x_dense": ppl["geo"] / dense_ppl["geo"],
                "change": ppl["geo"] / before_ppl["geo"] - 1,
                "worse_sources": [s for s in SOURCES if ppl[s] > before_ppl[s]],
                "seconds": run.get("seconds"),
                "tokens_per_s": finetune.get("tokens_per_s"),
                "precision": finetune.get("precision"),
                "peak_rss_gib": run.get("peak_rss_gib"),
            }
        )
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    head = "| config | tokens | seed | wiki | news | books | squad | **geo** | × dense | Δ | s | tok/s | GiB | prec |"
    lines = []
    for key in dict.fromkeys((r["model"], r["ratio"]) for r in rows):
        lines += ["", f"### {key[0]} at {key[1]}", "", head, "|---" * 14 + "|"]
        for r in (r for r in rows if (r["model"], r["ratio"]) == key):
            cells = [r["config"], f"{r['tokens']:,}" if r["tokens"] else "", str(r.get("seed", ""))]
            cells += [f"{r[s]:.2f}" for s in SOURCES] + [f"**{r['geo']:.2f}**"]
            cells += [f"{r['x_dense']:.2f}×" if "x_dense" in r else "", f"{r['change']:+.1%}" if "change" in r else ""]
            cells += [_num(r.get("seconds"), "{:.0f}"), _num(r.get("tokens_per_s"), "{:.0f}")]
            cells += [_num(r.get("peak_rss_gib"), "{:.2f}"), r.get("precision") or ""]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _num(value: Any, pattern: str) -> str:
    return pattern.format(value) if value is not None else ""


def report(args) -> str:
    rows = [
        row
        for model in args.models.split(",")
        for ratio in [float(r) for r in args.ratios.split(",")]
        for row in rows_for(args, model, ratio)
    ]
    text = markdown(rows)
    write_text_atomic(args.run_root / "results.md", text)
    if rows:
        write_csv_atomic(
            args.run_root / "results.csv", [r | {"worse_sources": " ".join(r.get("worse_sources", []))} for r in rows]
        )
    return text


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    failed = []
    if not args.report_only:
        for model in args.models.split(","):
            for ratio in [float(r) for r in args.ratios.split(",")]:
                try:
                    run_model_ratio(args, model, ratio)
                except Exception as exc:  # report and go on with the next model × ratio
                    failed.append(f"{model} {ratio}: {exc}")
    print(report(args))
    for line in failed:
        print(f"failed: {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
