"""Why structured pruning: latency and throughput of pruned models vs the dense one, on this machine.

Prints ratios measured in one run (dense and pruned timed back to back): prefill of 512 tokens and greedy
generation of 64 tokens, at batch 1 and 8. Pruning uses the l2 metric (speed does not depend on which
units are removed, only on how many), so no calibration pass is needed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

import adapruner
from adapruner.models.loading import load_model


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) if repeats < 3 else statistics.median(times)


@torch.no_grad()
def measure(model, batch: int, prefill: int, new_tokens: int, repeats: int) -> dict[str, float]:
    ids = torch.randint(100, 20_000, (batch, prefill), generator=torch.Generator().manual_seed(0))
    short = ids[:, :16]
    t_prefill = best_time(lambda: model(input_ids=ids), repeats)
    t_generate = best_time(
        lambda: model.generate(
            short,
            attention_mask=torch.ones_like(short),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
        ),
        repeats,
    )
    return {
        "prefill_tok_s": batch * prefill / t_prefill,
        "generate_tok_s": batch * new_tokens / t_generate,
        "prefill_s": t_prefill,
        "generate_s": t_generate,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratios", default="0.2,0.5")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    ratios = [float(r) for r in args.ratios.split(",")]
    batches = [int(b) for b in args.batches.split(",")]

    dense, _ = load_model(args.model)
    dense.generation_config.pad_token_id = dense.generation_config.eos_token_id
    pruned = {}
    for ratio in ratios:
        model = adapruner.prune(args.model, ratio, metric="l2").model
        model.generation_config.pad_token_id = model.generation_config.eos_token_id
        pruned[ratio] = model
    table = Table(title=f"{args.model} on {torch.get_num_threads()} CPU threads: pruned / dense")
    for col in ("ratio", "batch", "prefill tok/s", "prefill speedup", "generate tok/s", "generate speedup"):
        table.add_column(col, justify="right")
    for batch in batches:
        base = measure(dense, batch, args.prefill, args.new_tokens, args.repeats)
        table.add_row(
            "dense", str(batch), f"{base['prefill_tok_s']:.0f}", "1.00x", f"{base['generate_tok_s']:.1f}", "1.00x"
        )
        for ratio, model in pruned.items():
            m = measure(model, batch, args.prefill, args.new_tokens, args.repeats)
            table.add_row(
                f"{ratio:.0%}",
                str(batch),
                f"{m['prefill_tok_s']:.0f}",
                f"{m['prefill_tok_s'] / base['prefill_tok_s']:.2f}x",
                f"{m['generate_tok_s']:.1f}",
                f"{m['generate_tok_s'] / base['generate_tok_s']:.2f}x",
            )
    Console().print(table)


if __name__ == "__main__":
    main()
