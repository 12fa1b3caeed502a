"""Which refit design wins? Every design choice of the layer-by-layer engine, measured on the test splits.

On SmolLM2 (default) at each ratio, FLAP's selection (``--method flap``: wifv, global-all ranking, 128
wiki windows of 128 tokens) is computed once, then each variant is applied the way a search trial
applies it (refitted weights written in place, masks for the removed units; tested equal to the
physically pruned model) and scored on the first ``--test-tokens`` tokens of the wiki, news, books and
squad test splits (128-token windows) and their geometric mean:

* ``flap``: FLAP as published (bias compensation of the removed inputs);
* ``lsq-d<λ>``: least-squares refit of the kept o_proj/down_proj columns and a bias, damping λ;
* ``lsq-nobias``: the refit without a bias column (the old bias kept);
* ``lsq-256``: 256 instead of 128 wiki windows for the refit; ``lsq-mix``: 192 windows of wiki, news
  and squad (books passages are too short for 128-token windows);
* ``obs-flap-counts``: structured OBS choosing the units, at FLAP's per-layer counts;
* ``obs-uniform``: structured OBS at the same rate in every layer of LLM-Pruner's range (``local-obs``);
  ``obs-uniform-all``: the same over every layer.

Prints one table per ratio (and the ratio of each geometric mean to FLAP's); rows go to
``RUN_ROOT/refit_ablation.json``. Takes ~15 min per ratio on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from adapruner.data import sample_mixture, token_stream
from adapruner.evaluation import perplexity
from adapruner.evaluation.perplexity import geometric_mean
from adapruner.files import write_json_atomic
from adapruner.local import LocalSettings, applied, local_prune
from adapruner.models import attention_group, get_adapter
from adapruner.models.loading import load_model
from adapruner.pruning import Budget, masked, solve_keep_counts
from adapruner.pruning.plan import KeepCounts, count_params, default_layer_range
from adapruner.recipe import PlanInputs, PruneConfig, plan_recipe, refit_windows

SOURCES = ("wiki", "news", "books", "squad")
DEFAULT_DAMPING = 1e-3
VARIANTS = (
    "flap",
    "lsq-d0.1",
    "lsq-d0.01",
    "lsq-d0.001",
    "lsq-d0.0001",
    "lsq-nobias",
    "lsq-256",
    "lsq-mix",
    "obs-flap-counts",
    "obs-uniform",
    "obs-uniform-all",
)


def counts_of(adapter, plan) -> KeepCounts:
    """A plan's per-layer keep counts: attention units as the head mode counts them, and channels."""
    counts = []
    for index, (lp, dense) in enumerate(zip(plan.layers, adapter.layer_shapes(), strict=True)):
        per_query = attention_group(adapter, index).num_units == dense.num_attention_heads
        units = len(lp.query_heads) if per_query else len(lp.kv_heads)
        counts.append(None if lp.shape == dense else (units, len(lp.channels)))
    return KeepCounts(counts, 0.0, 0, 1)


def variant_state(name: str, model, tokenizer, ratio: float, plan, means, windows):
    """(plan, input means, refits) of one variant."""
    adapter = get_adapter(model)
    if name == "flap":
        return plan, means, {}
    settings = LocalSettings(damping=DEFAULT_DAMPING)
    given = {"plan": plan}
    if name.startswith("lsq-d"):
        settings = LocalSettings(damping=float(name.removeprefix("lsq-d")))
    elif name == "lsq-nobias":
        settings = LocalSettings(damping=DEFAULT_DAMPING, bias=False)
    elif name == "lsq-256":
        windows = sample_mixture(tokenizer, "wiki", 256, 128, seed=0)
    elif name == "lsq-mix":
        windows = sample_mixture(tokenizer, "wiki,news,squad", 192, 128, seed=0)
    elif name.startswith("obs"):
        settings = LocalSettings(selection="obs", damping=DEFAULT_DAMPING)
        if name == "obs-flap-counts":
            given = {"keep": counts_of(adapter, plan)}
        else:
            layers = (0, adapter.num_layers) if name == "obs-uniform-all" else default_layer_range(adapter.num_layers)
            given = {"keep": solve_keep_counts(adapter, Budget(ratio, layers), count_params(model))}
    result = local_prune(model, windows, settings, restore=True, **given)
    return result.plan, None, result.refits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratios", default="0.2,0.5")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--test-tokens", type=int, default=8192)
    parser.add_argument("--run-root", type=Path, default=Path("runs/bench/refit_ablation"))
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")

    model, tokenizer = load_model(args.model)
    adapter = get_adapter(model)
    tests = {s: token_stream(tokenizer, s, "test", args.test_tokens) for s in SOURCES}
    rows = []
    for ratio in map(float, args.ratios.split(",")):
        cfg = PruneConfig.from_method(args.model, ratio, method="flap").recipe
        planned = plan_recipe(model, cfg, PlanInputs(model, tokenizer))
        plan = planned.plan
        windows = refit_windows(tokenizer, cfg)  # FLAP's own 128 wiki windows of 128 tokens
        print(f"\n### {args.model} at ratio {ratio}: test perplexity @128, FLAP's selection unless named\n")
        print("| variant | " + " | ".join(SOURCES) + " | geo | × FLAP | engine (s) |")
        print("|---" * (len(SOURCES) + 4) + "|")
        flap_geo = None
        for name in variants:
            start = time.perf_counter()
            state_plan, means, refits = variant_state(name, model, tokenizer, ratio, plan, planned.input_means, windows)
            seconds = time.perf_counter() - start
            with torch.no_grad(), masked(adapter, state_plan, input_means=means), applied(model, refits):
                ppl = {s: perplexity(model, ids, 128, progress=False) for s, ids in tests.items()}
            geo = geometric_mean(list(ppl.values()))
            flap_geo = geo if name == "flap" else flap_geo
            versus = f"{geo / flap_geo:.3f}×" if flap_geo else "—"
            cells = [f"{ppl[s]:.2f}" for s in SOURCES]
            print(f"| {name} | " + " | ".join(cells) + f" | {geo:.2f} | {versus} | {seconds:.0f} |", flush=True)
            rows.append({"ratio": ratio, "variant": name, "test": ppl, "geomean": geo, "engine_seconds": seconds})
    write_json_atomic(args.run_root / "refit_ablation.json", rows)
    print(f"\nrows written to {args.run_root / 'refit_ablation.json'}")


if __name__ == "__main__":
    main()
