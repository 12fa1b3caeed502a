"""Which validation objective ranks pruned models like the test perplexity does: perplexity or KL?

Takes a finished search (default: seed 0 of ``search_quality.py`` at 0.2), picks ``--models`` of its
completed per-layer trials spread over their objective values, assembles each from the supernet (as the
trial did) and measures, on the same masked model: the validation perplexity over ``--objective-tokens``
tokens per source (the search's default objective), the mean KL divergence from the dense model on the
same windows, and the test geometric-mean perplexity (``--test-tokens`` per source). Prints both
objectives' Spearman rank correlation with the test figure, and that of a 4× larger validation set (is
the search's winner chosen on too few tokens?).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import optuna
import torch

from adapruner.data import OFFLINE_SOURCES, sample_mixture, token_stream
from adapruner.evaluation.divergence import dense_reference, windowed_kl
from adapruner.evaluation.perplexity import windowed_nll, windows_of
from adapruner.local import applied
from adapruner.local.supernet import SupernetSettings, build_supernet
from adapruner.models import get_adapter
from adapruner.models.loading import load_model
from adapruner.pruning import masked
from adapruner.search.objective import interleaved


def spearman(xs: list[float], ys: list[float]) -> float:
    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=values.__getitem__)
        out = [0.0] * len(values)
        for rank, index in enumerate(order):
            out[index] = float(rank)
        return out

    rx, ry = ranks(xs), ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))


def mean_loss(pairs) -> float:
    total, count = 0.0, 0
    for loss, n in pairs:
        total, count = total + loss, count + n
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run-dir", type=Path, default=Path("runs/bench/search_quality_v2/r0.2/joint-TPE/seed0"))
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--models", type=int, default=12)
    parser.add_argument("--objective-tokens", type=int, default=1024)
    parser.add_argument("--test-tokens", type=int, default=8192)
    args = parser.parse_args()

    best = json.loads((args.run_dir / "best.json").read_text())
    study = optuna.load_study(study_name="adapruner", storage=f"sqlite:///{(args.run_dir / 'study.db').resolve()}")
    done = sorted(
        (t for t in study.trials if t.state.name == "COMPLETE" and t.user_attrs.get("allocation") == "per-layer"),
        key=lambda t: t.value,
    )
    picked = [done[round(i * (len(done) - 1) / max(args.models - 1, 1))] for i in range(min(args.models, len(done)))]
    model, tokenizer = load_model(args.model)
    adapter = get_adapter(model)
    sources = picked[0].user_attrs["config"]["sources"]
    count, length = map(int, best["space"]["refit_calibration"].split("x"))
    windows = sample_mixture(tokenizer, sources, count, length, seed=0)
    settings = SupernetSettings(max_removal=best["space"]["max_removal"])
    net = build_supernet(model, windows, list(range(adapter.num_layers)), settings, best["head_mode"])

    def valid(tokens: int) -> torch.Tensor:
        return interleaved([windows_of(token_stream(tokenizer, s, "validation", tokens), 128) for s in OFFLINE_SOURCES])

    small, large = valid(args.objective_tokens), valid(4 * args.objective_tokens)
    reference = dense_reference(model, small)
    tests = {s: windows_of(token_stream(tokenizer, s, "test", args.test_tokens), 128) for s in OFFLINE_SOURCES}
    rows = []
    for trial in picked:
        counts = {i: (a, m) for i, a, m in trial.user_attrs["config"]["counts"]}
        plan, refits = net.assemble(adapter, counts, best["head_mode"])
        with torch.no_grad(), masked(adapter, plan), applied(model, refits):
            row = {"trial": trial.number, "search value": trial.value}
            row["val ppl"] = math.exp(mean_loss(windowed_nll(model, small)))
            row["val kl"] = mean_loss(windowed_kl(model, small, reference))
            row["val ppl 4x"] = math.exp(mean_loss(windowed_nll(model, large)))
            logs = [mean_loss(windowed_nll(model, w)) for w in tests.values()]
            row["test geo"] = math.exp(sum(logs) / len(logs))
        rows.append(row)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    test = [r["test geo"] for r in rows]
    print(f"\n{len(rows)} per-layer trials of {args.run_dir}; Spearman rank correlation with the test geometric mean:")
    for key in ("val ppl", "val kl", "val ppl 4x"):
        print(f"| {key} | {spearman([r[key] for r in rows], test):+.3f} |")


if __name__ == "__main__":
    main()
