"""`make demo`: prune SmolLM2-135M by 20% with LLM-Pruner's recipe and compare it with the dense model.

Uses the public Python API only; the equivalent CLI commands are printed as it goes.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

import adapruner


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--output", type=Path, default=Path("runs/demo"))
    parser.add_argument("--max-tokens", type=int, default=40_960, help="test tokens per source")
    args = parser.parse_args()
    console = Console(highlight=False)
    pruned_dir = args.output / "pruned"
    ppl = {"ppl": ["wiki", "news"], "seq_len": [128], "max_tokens": args.max_tokens}

    console.print(f"[bold]1/3[/bold] dense model: adapruner evaluate {args.model}")
    dense, t_dense = timed(adapruner.evaluate, args.model, output=args.output / "dense.json", **ppl)
    console.print(f"[bold]2/3[/bold] prune: adapruner prune {args.model} --ratio {args.ratio} --output {pruned_dir}")
    result, t_prune = timed(adapruner.prune, args.model, args.ratio, output=pruned_dir, overwrite=True)
    console.print(f"[bold]3/3[/bold] pruned model, reloaded from disk: adapruner evaluate {pruned_dir}")
    pruned, t_eval = timed(adapruner.evaluate, str(pruned_dir), output=args.output / "pruned.json", **ppl)

    rec = result.record
    table = Table(title=f"{args.model}: dense vs {args.ratio:.0%} pruned (element1, 10x64 books samples)")
    for col in ("model", "params", "removed", "wiki ppl@128", "news ppl@128", "time (s)"):
        table.add_column(col, justify="right")
    for name, res, removed, seconds in (
        ("dense", dense, 0.0, t_dense),
        ("pruned", pruned, rec["achieved_ratio"], t_eval),
    ):
        p = res["perplexity"]
        table.add_row(
            name,
            f"{res['params']:,}",
            f"{removed:.1%}",
            f"{p['wiki@128']:.2f}",
            f"{p['news@128']:.2f}",
            f"eval {seconds:.0f}",
        )
    console.print(table)
    steps = ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items())
    console.print(f"pruning took {t_prune:.1f}s ({steps}); pruned model in {pruned_dir}")


if __name__ == "__main__":
    main()
