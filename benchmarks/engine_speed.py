"""Speed and perplexity in llama.cpp, the engine people deploy with: dense vs pruned SmolLM2 as GGUF.

For every model (dense; pruned at each ratio with free widths, ``--align 64``/``256`` and ``--uniform``; any
``--models LABEL=DIR`` such as the recovered AdaPruner models) and every type (F16, Q8_0, Q4_K_M):
file size, prefill tokens/s of a 512-token prompt, decode tokens/s over 128 tokens (best of
``--repeats``), and test perplexity from llama.cpp's own logits on the four sources' test splits
(``--tokens`` each, 128-token windows of transformers' token ids) beside transformers' perplexity of the
same directory. Speed-ups are measured in one run against the dense model in the same type; the
parameter-count limit (dense / pruned parameters in the file) is printed beside each.

The pruned variants use ``--method local-obs`` (structured OBS + least-squares refit at one rate over
LLM-Pruner's layers: one prune of about 90 s, no search), so the variants differ only in their widths.
Results: ``runs/bench/engine/results.{csv,md}``; models and GGUFs stay under ``--work`` for reruns.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

import numpy as np
from rich.console import Console

import adapruner
from adapruner.assets import model_dir
from adapruner.data import token_stream
from adapruner.data.sources import OFFLINE_SOURCES
from adapruner.errors import AdaPrunerError
from adapruner.evaluation.perplexity import geometric_mean, windows_of
from adapruner.export import engine, gguf_layers

VARIANTS = {
    "free": {},
    "align64": {"align": 64},
    "align256": {"align": 256},
    "uniform": {"uniform": True},
}
SEQ_LEN = 128
out = Console(highlight=False)


def build_models(args) -> dict[str, Path]:
    models = {"dense": model_dir(args.model)}
    for ratio in (float(r) for r in args.ratios.split(",") if r):
        for variant in args.variants.split(","):
            target = Path(args.work) / f"r{ratio}-{variant}"
            label = f"{ratio} {variant}"
            options = VARIANTS[variant]
            if not (target / "adapruner.json").is_file():
                try:
                    adapruner.prune(args.model, ratio, method="local-obs", output=target, overwrite=True, **options)
                except AdaPrunerError as exc:  # e.g. 256-channel steps cannot reach 0.5 inside LLM-Pruner's layers
                    out.print(f"{label}: {exc}; pruning every layer instead")
                    options = options | {"layers": "0:"}
                    adapruner.prune(args.model, ratio, method="local-obs", output=target, overwrite=True, **options)
            if variant != "uniform" and _recipe(target).get("layers") == "0:":
                label += " (all layers)"
            models[label] = target
    for entry in filter(None, args.models.split(",")):
        label, _, location = entry.partition("=")
        models[label] = Path(location)
    return models


def _recipe(directory: Path) -> dict:
    """The recipe a pruned directory records (``config`` in directories written before 2026-12-07)."""
    record = json.loads((directory / "adapruner.json").read_text())
    return record.get("recipe") or record["config"]


def cached(path: Path, compute) -> dict[str, float]:
    if path.is_file():
        return json.loads(path.read_text())
    values = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(values))
    return values


def transformers_ppl(directory: Path, tokens: int) -> dict[str, float]:
    results = adapruner.evaluate(str(directory), ppl=list(OFFLINE_SOURCES), seq_len=[SEQ_LEN], max_tokens=tokens)
    return {s: results["perplexity"][f"{s}@{SEQ_LEN}"] for s in OFFLINE_SOURCES}


def llama_ppl(path: Path, windows: dict[str, np.ndarray]) -> dict[str, float]:
    llm = engine.load(path, n_ctx=SEQ_LEN, threads=2)
    values = {source: engine.perplexity(llm, w) for source, w in windows.items()}
    llm.close()
    return values


def measure(path: Path, prompt: list[int], continuation: list[int], repeats: int) -> engine.Speed:
    llm = engine.load(path, n_ctx=len(prompt) + len(continuation) + 8, threads=2, logits_all=False)
    speed = engine.speed(llm, prompt, continuation, repeats)
    llm.close()
    return speed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratios", default="0.2,0.5")
    parser.add_argument("--variants", default="free,align64,align256,uniform")
    parser.add_argument("--models", default="", help="Extra LABEL=DIR entries, comma-separated.")
    parser.add_argument("--quants", default="f16,q8_0,q4_k_m")
    parser.add_argument("--tokens", type=int, default=8192, help="Test tokens per source for perplexity.")
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--decode", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", default="runs/bench/engine/models")
    parser.add_argument("--output", default="runs/bench/engine")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    models = build_models(args)
    tokenizer = AutoTokenizer.from_pretrained(models["dense"])
    streams = {s: token_stream(tokenizer, s, "test", args.tokens) for s in OFFLINE_SOURCES}
    windows = {s: windows_of(t, SEQ_LEN).numpy() for s, t in streams.items()}
    ids = streams["wiki"].tolist()
    prompt, continuation = ids[: args.prefill], ids[args.prefill : args.prefill + args.decode]
    work = Path(args.work)
    rows = []
    for label, directory in models.items():  # perplexities first, speeds last, all in one quiet stretch
        reference = cached(
            work / "ppl" / f"{slug(label)}-{args.tokens}.json", lambda d=directory: transformers_ppl(d, args.tokens)
        )
        for quant in args.quants.split(","):
            path = work / "gguf" / f"{slug(label)}-{quant}.gguf"
            if not path.is_file():
                path.parent.mkdir(parents=True, exist_ok=True)
                adapruner.export(directory, path, quant=quant)
            ppl = cached(work / "ppl" / f"{path.stem}-{args.tokens}.llama.json", lambda p=path: llama_ppl(p, windows))
            layers = gguf_layers(path)
            rows.append(
                {
                    "model": label,
                    "quant": quant,
                    "arch": layers["architecture"],
                    "parameters": layers["parameters"],
                    "mib": path.stat().st_size / 2**20,
                    **{f"llama_{s}": v for s, v in ppl.items()},
                    "llama_geo": geometric_mean(list(ppl.values())),
                    **{f"hf_{s}": v for s, v in reference.items()},
                    "hf_geo": geometric_mean(list(reference.values())),
                    "path": path,
                }
            )
            row = rows[-1]
            out.print(f"{label} {quant}: llama.cpp ppl {row['llama_geo']:.2f}, transformers {row['hf_geo']:.2f}")
    for row in rows:
        speed = measure(row.pop("path"), prompt, continuation, args.repeats)
        row["prefill_tok_s"], row["decode_tok_s"] = speed.prefill_tokens_per_s, speed.decode_tokens_per_s
        out.print(f"{row['model']} {row['quant']}: {row['decode_tok_s']:.1f} tok/s decode")
    add_ratios(rows)
    write(rows, Path(args.output), args)


def slug(label: str) -> str:
    return "".join(c if c.isalnum() or c == "." else "-" for c in label)


def add_ratios(rows: list[dict]) -> None:
    """Speed-ups against the dense model in the same type, the parameter limit, and quantisation costs."""
    by = {(r["model"], r["quant"]): r for r in rows}
    for row in rows:
        dense = by[("dense", row["quant"])]
        row["prefill_x"] = row["prefill_tok_s"] / dense["prefill_tok_s"]
        row["decode_x"] = row["decode_tok_s"] / dense["decode_tok_s"]
        row["param_limit_x"] = dense["parameters"] / row["parameters"]
        row["llama_vs_hf_pct"] = 100 * (row["llama_geo"] / row["hf_geo"] - 1)
        f16 = by.get((row["model"], "f16"))
        row["vs_f16_pct"] = 100 * (row["llama_geo"] / f16["llama_geo"] - 1) if f16 else math.nan


def write(rows: list[dict], output: Path, args) -> None:
    output.mkdir(parents=True, exist_ok=True)
    with (output / "results.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    header = (
        "| model | type | arch | MiB | prefill tok/s | decode tok/s | prefill × | decode × | param limit × | "
        "llama.cpp ppl (geo) | transformers ppl | llama.cpp vs HF | vs own F16 |"
    )
    lines = [
        f"# llama.cpp speed and perplexity ({args.model}; prefill {args.prefill}, decode {args.decode}, best of "
        f"{args.repeats}; perplexity: {args.tokens} test tokens per source, windows of {SEQ_LEN})",
        "",
        header,
        "|" + "---|" * 13,
    ]
    for r in rows:
        cells = [
            r["model"],
            r["quant"],
            r["arch"],
            f"{r['mib']:.1f}",
            f"{r['prefill_tok_s']:.0f}",
            f"{r['decode_tok_s']:.1f}",
            f"{r['prefill_x']:.2f}",
            f"{r['decode_x']:.2f}",
            f"{r['param_limit_x']:.2f}",
            f"{r['llama_geo']:.2f}",
            f"{r['hf_geo']:.2f}",
            f"{r['llama_vs_hf_pct']:+.2f}%",
            f"{r['vs_f16_pct']:+.2f}%",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Per source (llama.cpp / transformers):", ""]
    for r in rows:
        per = ", ".join(f"{s} {r[f'llama_{s}']:.2f}/{r[f'hf_{s}']:.2f}" for s in OFFLINE_SOURCES)
        lines.append(f"- {r['model']} {r['quant']}: {per}")
    (output / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))  # plain: a table this wide does not fit a terminal as rich draws it
    print(f"written to {output / 'results.md'}")


if __name__ == "__main__":
    main()
