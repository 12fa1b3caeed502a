"""Scoring a new calibration subset from the statistics cache vs a fresh statistics pass (SmolLM2).

The cache is built once per (model, pool); after that, decomposable metrics of any subset need no model
pass. Prints, per metric, the mean time to score a new random subset both ways and the speed-up
(target >= 20x), plus the one-time cost of building the cache.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from adapruner.data.pool import build_pool
from adapruner.importance import collect_statistics, get_metric, score_groups
from adapruner.importance.cache import StatisticsCache
from adapruner.models import get_adapter, layer_groups
from adapruner.models.loading import load_model
from adapruner.pruning.plan import default_layer_range


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sources", default="wiki,news")
    parser.add_argument("--per-source", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--subset", type=int, default=10)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--metrics", default="vector,second,wanda_sp,flap")
    args = parser.parse_args()

    model, tokenizer = load_model(args.model)
    adapter = get_adapter(model)
    layers = list(range(*default_layer_range(adapter.num_layers)))
    modules = adapter.projection_names(layers)
    groups = layer_groups(adapter, layers)
    pool = build_pool(tokenizer, args.sources, args.per_source, args.seq_len)
    with tempfile.TemporaryDirectory() as tmp:
        cache = StatisticsCache(model, pool, modules, directory=Path(tmp))
        _, build_s = timed(cache.per_sample)
        print(
            f"{args.model}: pool of {len(pool)} x {args.seq_len} tokens ({args.sources}); "
            f"cache built once in {build_s:.1f}s ({build_s / len(pool):.2f}s per sample)"
        )
        print(f"{'metric':10} {'cache (s)':>10} {'fresh pass (s)':>15} {'speed-up':>9}")
        for name in args.metrics.split(","):
            metric = get_metric(name)
            cached_s = fresh_s = 0.0
            for trial in range(args.trials):
                subset = pool.random_subset(args.subset, seed=100 + trial)
                _, t = timed(lambda s=subset, m=metric: score_groups(model, groups, m, cache.statistics_for(s, m)))
                cached_s += t
                samples = pool.input_ids[subset]
                _, t = timed(
                    lambda x=samples, m=metric: score_groups(
                        model, groups, m, collect_statistics(model, x, modules, m.needs, batch_size=args.subset)
                    )
                )
                fresh_s += t
            cached_s, fresh_s = cached_s / args.trials, fresh_s / args.trials
            print(f"{name:10} {cached_s:10.3f} {fresh_s:15.2f} {fresh_s / cached_s:8.0f}x")


if __name__ == "__main__":
    main()
