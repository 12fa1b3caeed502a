"""Does the search pay? Test-split perplexity of LLM-Pruner's recipe vs random search vs the ablations
vs joint TPE, at equal trial budgets, over several seeds (SmolLM2 by default).

For every ratio and seed one pool is built (its statistics are cached and shared by all methods); each
method runs its own study in ``RUN_ROOT/r{ratio}/{method}/seed{seed}`` (rerunning the script continues
finished work instead of redoing it), the winner is pruned physically with ``prune --from-run``, and
its perplexity is measured on the *test* splits (wiki, news, books, squad and their geometric mean),
which the search never sees. LLM-Pruner's recipe is
trial 0 of every study (same seed, same pool). Prints one table per ratio: mean ± half-range over
seeds, the change against the recipe, the geometric mean over FLAP's per seed (target <= 0.85 at 0.2)
and, per method, on how many seeds it beats random search over the same space (per-layer counts drawn
at random after the same starts) on the validation objective and on the test geometric mean. FLAP,
FLAP refitted (``prune --method flap-refit``) and structured OBS (``local-obs``) are reference rows: the
strongest recipes here, the first two warm starts of the joint space. ``uniform TPE`` is the search with
``--uniform`` (one size for every layer: the stock architecture), what that constraint costs;
``joint TPE one-level`` the search with one-level per-layer moves throughout (``coarse_to_fine: 1``, the
default before 2026-12-03), what coarse-to-fine moves (the default, 4) gain.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from adapruner import prune
from adapruner.data import token_stream
from adapruner.evaluation import perplexity
from adapruner.evaluation.perplexity import GEOMEAN, geometric_mean
from adapruner.files import write_json_atomic
from adapruner.models.loading import load_model
from adapruner.search import SearchSpace, search

METHODS = {  # name -> (sampler, SearchSpace options)
    "random": ("random", {}),
    "data-only": ("tpe", {"space": "data"}),
    "metric-only": ("tpe", {"space": "metric"}),
    "joint TPE": ("tpe", {}),
    "uniform TPE": ("tpe", {"uniform": True}),  # --uniform: every layer one size, the stock architecture
    "joint TPE one-level": ("tpe", {"coarse_to_fine": 1}),  # one MLP level per move, not 4, 2, then 1
    "joint TPE 3 profile": ("tpe", {"profile_trials": 3}),  # only the three starts before the per-layer stage
}


def test_perplexities(model, tokens: dict[str, object], seq_len: int) -> dict[str, float]:
    """Test perplexity per source and, with several sources, their geometric mean (``geomean``)."""
    values = {name: perplexity(model, ids, seq_len, progress=False) for name, ids in tokens.items()}
    return values | ({GEOMEAN: geometric_mean(list(values.values()))} if len(values) > 1 else {})


def run_method(args, ratio: float, method: str, seed: int, run_dir: Path, tokens) -> dict:
    """The study (continued if it exists), then the winner pruned for real and scored on test text.

    A row measured at another trial budget is measured again: the study continues up to ``--trials``.
    """
    done = run_dir / "test.json"
    finished = studied_trials(run_dir)
    if finished > args.trials:
        raise SystemExit(f"{run_dir} holds {finished} trials, more than --trials {args.trials}: use another --run-root")
    earlier = json.loads(done.read_text()) if done.is_file() else {}
    if earlier and finished == args.trials:
        return earlier
    sampler, options = METHODS[method]
    started = time.perf_counter()
    result = search(
        args.model,
        ratio,
        trials=args.trials,
        output=run_dir,
        space=SearchSpace(**options),
        sampler=sampler,
        seed=seed,
        objective_tokens=args.objective_tokens,
        pruner=args.pruner,
    )
    seconds = time.perf_counter() - started + earlier.get("search_seconds", 0.0)  # a continued study: both runs
    pruned = prune(args.model, from_run=run_dir)
    row = {
        "method": method,
        "seed": seed,
        "ratio": ratio,
        "validation": result["best"]["value"],
        "baseline_validation": result["baseline"]["value"],
        "test": test_perplexities(pruned.model, tokens, args.seq_len),
        "search_seconds": round(seconds, 1),
        "trials": result["finished"],
        "config": result["best"]["config"],
    }
    write_json_atomic(done, row)
    return row


def studied_trials(run_dir: Path) -> int:
    """Finished trials of the study in ``run_dir`` when its outputs were last written (0 if none)."""
    best = run_dir / "best.json"
    return json.loads(best.read_text())["finished"] if best.is_file() else 0


RECIPES = {  # row name -> `adapruner prune --method` preset, pruned as users run it
    "LLM-Pruner recipe": "llm-pruner-element1",  # element1, sum, 10 books windows of 64 tokens
    "FLAP": "flap",  # WIFV, joint ranking over all layers, bias compensation, 128 wiki windows of 128 tokens
    "FLAP-refit": "flap-refit",  # FLAP's units, refitted layer by layer by least squares
    "local-obs": "local-obs",  # structured OBS + refit, uniform rate over LLM-Pruner's layer range
}


def run_recipe(args, ratio: float, seed: int, run_dir: Path, tokens, name: str = "LLM-Pruner recipe") -> dict:
    """A published method as users run it (``prune --method``), calibration drawn with ``seed``."""
    done = run_dir / "test.json"
    if done.is_file():
        return json.loads(done.read_text())
    started = time.perf_counter()
    pruned = prune(args.model, ratio, method=RECIPES[name], seed=seed)
    row = {"method": name, "seed": seed, "ratio": ratio, "validation": None}
    row |= {"test": test_perplexities(pruned.model, tokens, args.seq_len)}
    row["search_seconds"] = round(time.perf_counter() - started, 1)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(done, row)
    return row


def spread(values: list[float | None]) -> str:
    if None in values:
        return "—"
    mean = statistics.fmean(values)
    half_range = (max(values) - min(values)) / 2
    return f"{mean:.1f} ± {half_range:.1f}"


def change_cells(mine: list[dict], reference: list[dict], sources: list[str]) -> list[str]:
    """Mean test perplexity against the reference's mean, per source (negative = lower = better)."""
    if not reference or mine is reference:
        return ["—"] * len(sources)
    cells = []
    for s in sources:
        ref = statistics.fmean(r["test"][s] for r in reference)
        cells.append(f"{100 * (statistics.fmean(r['test'][s] for r in mine) / ref - 1):+.0f}%")
    return cells


def paired_wins(rows: list[dict], method: str, other: str, source: str) -> str:
    """Seeds on which ``method`` has the lower test perplexity than ``other`` (same seed, same pool)."""
    mine = {r["seed"]: r["test"][source] for r in rows if r["method"] == method}
    theirs = {r["seed"]: r["test"][source] for r in rows if r["method"] == other}
    seeds = sorted(mine.keys() & theirs.keys())
    return f"{sum(mine[k] < theirs[k] for k in seeds)}/{len(seeds)}" if seeds else "—"


def paired_validation_wins(rows: list[dict], method: str, other: str) -> str:
    """Seeds on which ``method``'s best trial has the lower validation objective than ``other``'s."""
    mine = {r["seed"]: r["validation"] for r in rows if r["method"] == method and r["validation"] is not None}
    theirs = {r["seed"]: r["validation"] for r in rows if r["method"] == other and r["validation"] is not None}
    seeds = sorted(mine.keys() & theirs.keys())
    return f"{sum(mine[k] < theirs[k] for k in seeds)}/{len(seeds)}" if seeds else "—"


def ratio_to(rows: list[dict], method: str, other: str, source: str) -> str:
    """Per seed, ``method``'s test perplexity over ``other``'s (same seed), e.g. 0.80/0.82/0.79."""
    mine = {r["seed"]: r["test"][source] for r in rows if r["method"] == method}
    theirs = {r["seed"]: r["test"][source] for r in rows if r["method"] == other}
    seeds = sorted(mine.keys() & theirs.keys())
    return "/".join(f"{mine[k] / theirs[k]:.3f}" for k in seeds) if seeds else "—"


def print_table(ratio: float, rows: list[dict], sources: list[str]) -> None:
    print(f"\n### SmolLM2 at ratio {ratio}: test perplexity @128 (mean ± half-range over seeds)\n")
    head = ["method", "seeds", "validation", *(f"{s} test" for s in sources)]
    head += [f"{s} vs recipe" for s in sources]
    head += [f"{sources[-1]} × FLAP per seed", "validation: seeds better than random"]
    head += [f"{sources[-1]}: seeds better than random", "time"]
    print("| " + " | ".join(head) + " |")
    print("|---" * len(head) + "|")
    recipe = [r for r in rows if r["method"] == "LLM-Pruner recipe"]
    for method in [*RECIPES, *METHODS]:
        mine = [r for r in rows if r["method"] == method]
        if not mine:
            continue
        cells = [method, str(len(mine)), spread([r["validation"] for r in mine])]
        cells += [spread([r["test"][s] for r in mine]) for s in sources]
        cells += change_cells(mine, recipe if method != "LLM-Pruner recipe" else mine, sources)
        cells.append(ratio_to(rows, method, "FLAP", sources[-1]))
        cells.append(
            paired_validation_wins(rows, method, "random") if method in METHODS and method != "random" else "—"
        )
        cells.append(paired_wins(rows, method, "random", sources[-1]) if method != "random" else "—")
        seconds = [r.get("search_seconds") for r in mine if r.get("search_seconds")]
        cells.append(f"{statistics.fmean(seconds) / 60:.1f} min" if seconds else "—")  # recipes: pruning time
        print("| " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratios", default="0.2,0.5")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--trials", type=int, default=50, help="trials per study (equal for every method)")
    parser.add_argument("--methods", default="joint TPE,random", help=f"of: {', '.join(METHODS)}")
    parser.add_argument("--recipes", default=",".join(RECIPES), help=f"reference rows, of: {', '.join(RECIPES)}")
    parser.add_argument("--objective-tokens", type=int, default=1024, help="validation tokens per objective source")
    parser.add_argument("--pruner", default="percentile")
    parser.add_argument("--test-sources", default="wiki,news,books,squad")
    parser.add_argument("--test-tokens", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=128)
    # v2: the four-source objective and the per-layer stage (studies of the wiki-only objective are refused)
    parser.add_argument("--run-root", type=Path, default=Path("runs/bench/search_quality_v2"))
    args = parser.parse_args()

    _, tokenizer = load_model(args.model)
    sources = args.test_sources.split(",")
    tokens = {s: token_stream(tokenizer, s, "test", args.test_tokens) for s in sources}
    all_rows = []
    for ratio in map(float, args.ratios.split(",")):
        rows = []
        for seed in map(int, args.seeds.split(",")):
            for name in [n for n in RECIPES if n in args.recipes.split(",")]:
                folder = "recipe" if name == "LLM-Pruner recipe" else RECIPES[name]
                recipe_dir = args.run_root / f"r{ratio}" / folder / f"seed{seed}"
                rows.append(run_recipe(args, ratio, seed, recipe_dir, tokens, name))
            for method in args.methods.split(","):
                run_dir = args.run_root / f"r{ratio}" / method.replace(" ", "-") / f"seed{seed}"
                rows.append(run_method(args, ratio, method, seed, run_dir, tokens))
                print(f"r={ratio} seed={seed} {method}: {rows[-1]['test']}", flush=True)
        print_table(ratio, rows, [*sources, GEOMEAN] if len(sources) > 1 else sources)
        all_rows += rows
    out = args.run_root / "search_quality.json"
    write_json_atomic(out, all_rows)  # the rows of this invocation's ratios (finished units are reused)
    print(f"\nrows written to {out}")


if __name__ == "__main__":
    main()
