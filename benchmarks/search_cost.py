"""What a search trial costs, split into importance / masking / evaluation, against one evaluation pass.

Runs (or continues) a search on SmolLM2 at ratio 0.2 in a fresh run directory, then reads the per-trial
timings each trial records (``seconds`` user attribute) and times one plain evaluation pass of the
dense model over the same validation windows: the floor, since a trial must at least evaluate.
Per-layer trials (the supernet stage) are their own kinds; the supernet build is printed apart (it is
paid once per calibration choice, then cached on disk). Targets: median cache-served trial <= 1.5x one
evaluation pass; supernet build + 50 trials on 2 CPU cores <= 20 min (a fresh run directory; statistics
and supernet caches of earlier runs are reused unless ``--fresh-caches``).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

import optuna

from adapruner.data import OFFLINE_SOURCES, token_stream
from adapruner.evaluation import perplexity
from adapruner.models.loading import load_model
from adapruner.paths import cache_dir
from adapruner.recipe import Recipe
from adapruner.search import search


def trial_kind(config: dict) -> str:
    """Where a completed trial's scores come from: the statistics cache alone, a gradient pass on its
    subset (non-decomposable metrics), or activations of fresh windows (forward passes that each source's
    windows pay once per search, shared by every source mix that draws them); a least-squares refit
    (a layer-by-layer pass over the refit windows) is a kind of its own, and so is a per-layer trial
    (candidates of the supernet assembled, then evaluated)."""
    if config.get("allocation") == "per-layer":
        return "per-layer (supernet), completed"
    if config.get("refit", "none") == "lsq":
        return "least-squares refit, completed"
    if config.get("activation_calibration", "pool") != "pool":
        return "fresh activation windows, completed"
    cfg = Recipe(
        model="", ratio=0.2, metric=config["metric"], attention_metric=config["attention_metric"], mix=config["mix"]
    )
    return "cache-served, completed" if cfg.build_metric().decomposable else "gradient pass, completed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--objective-tokens", type=int, default=1024, help="per objective source")
    parser.add_argument("--fresh-caches", action="store_true", help="rebuild the statistics and supernet caches")
    parser.add_argument("--run-dir", type=Path, default=Path("runs/bench/search_cost"))
    parser.add_argument("--keep", action="store_true", help="continue the study in --run-dir instead of a fresh one")
    parser.add_argument("--report-only", action="store_true", help="only report the study already in --run-dir")
    args = parser.parse_args()

    wall = None
    if not args.report_only:
        if args.run_dir.exists() and not args.keep:
            shutil.rmtree(args.run_dir)
        if args.fresh_caches:  # what a first search on a machine pays: statistics and supernet from scratch
            for name in ("stats", "supernets"):
                shutil.rmtree(cache_dir() / name, ignore_errors=True)
        started = time.perf_counter()
        search(args.model, args.ratio, trials=args.trials, output=args.run_dir, objective_tokens=args.objective_tokens)
        wall = time.perf_counter() - started

    model, tokenizer = load_model(args.model)
    valid = [token_stream(tokenizer, s, "validation", args.objective_tokens) for s in OFFLINE_SOURCES]
    perplexity(model, valid[0][:256], 128, progress=False)  # warm-up
    clock = time.perf_counter()
    for tokens in valid:
        perplexity(model, tokens, 128, progress=False)
    floor = time.perf_counter() - clock

    study = optuna.load_study(study_name="adapruner", storage=f"sqlite:///{(args.run_dir / 'study.db').resolve()}")
    trials = [t for t in study.trials if "seconds" in t.user_attrs]
    groups: dict[str, list] = {}
    for t in trials:  # a pruned trial also has a value (its last report): group by state first
        kind = trial_kind(t.user_attrs["config"]) if t.state.name == "COMPLETE" else "stopped early (pruner)"
        groups.setdefault(kind, []).append(t)
    timing = f"this run's wall time {wall / 60:.1f} min" if wall is not None else "wall time: see the run that made it"
    print(f"{args.model} at ratio {args.ratio}: {len(study.trials)} trials; {timing}")
    supernets = [t.user_attrs.get("supernet_seconds") for t in study.trials if t.user_attrs.get("supernet_seconds")]
    built = f"{sum(supernets):.1f}s" if supernets else "taken from the cache"
    print(f"supernet build (inside the first per-layer trial's refit time): {built}")
    print(f"one evaluation pass ({args.objective_tokens} validation tokens per source x 4 @128, dense): {floor:.2f}s\n")
    print("| trials | n | importance (s) | refit (s) | masking (s) | evaluation (s) | total (s) | total / eval pass |")
    print("|---|---|---|---|---|---|---|---|")
    for name, group in groups.items():
        if not group:
            continue
        parts = {
            k: statistics.median(t.user_attrs["seconds"].get(k, 0.0) for t in group)
            for k in ("importance", "refit", "masking", "evaluation")
        }
        total = statistics.median(sum(t.user_attrs["seconds"].values()) for t in group)
        print(
            f"| {name} | {len(group)} | {parts['importance']:.2f} | {parts['refit']:.2f} | {parts['masking']:.3f} | "
            f"{parts['evaluation']:.2f} | {total:.2f} | {total / floor:.2f}x |"
        )
    print(
        "\nmedians per group; targets: cache-served total <= 1.5x the evaluation pass, supernet + 50 trials <= 20 min"
    )


if __name__ == "__main__":
    main()
