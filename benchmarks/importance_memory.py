"""Peak memory of the importance gradient pass: AdaPruner's collector vs a naive ``loss.backward()``.

Each variant runs in a fresh subprocess on the same samples; the figure is the growth of peak memory
over the loaded model (CPU: peak RSS; CUDA: ``max_memory_allocated``), plus the total peak. The naive
pass is what LLM-Pruner does: every parameter requires grad and all ``.grad`` tensors stay alive.

    python benchmarks/importance_memory.py                       # SmolLM2, 10 x 128 tokens, CPU
    python benchmarks/importance_memory.py --model llama-7b-random --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch

GIB = 1024**3


def peak_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def load(name: str, dtype: str, device: str):
    from adapruner.models.loading import DTYPES, load_model

    if name == "llama-7b-random":  # LLaMA-7B shapes, random weights: no download needed
        from transformers import AutoModelForCausalLM, LlamaConfig

        config = LlamaConfig(
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            vocab_size=32000,
        )
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
        return model.eval(), None
    model, tokenizer = load_model(name, dtype)
    return model.to(device), tokenizer


def run_variant(args: argparse.Namespace) -> dict:
    from adapruner.models import get_adapter
    from adapruner.pruning.plan import default_layer_range

    model, _ = load(args.model, args.dtype, args.device)
    samples = torch.randint(100, 30_000, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(0))
    samples = samples.to(args.device)
    base = peak_bytes(args.device)
    if args.variant == "naive":
        model(input_ids=samples, labels=samples).loss.backward()
        held = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    else:
        from adapruner.importance import collect_statistics

        adapter = get_adapter(model)
        layers = range(*default_layer_range(adapter.num_layers))
        modules = adapter.projection_names(layers)
        stats = collect_statistics(
            model, samples, modules, {"grad"}, batch_size=args.samples, checkpointing=args.checkpointing
        )
        held = sum(
            v.numel() * v.element_size() for t in (stats.grads, stats.unit_abs_wg, stats.unit_wg) for v in t.values()
        )
    peak = peak_bytes(args.device)
    return {
        "variant": args.variant,
        "base_gib": base / GIB,
        "peak_gib": peak / GIB,
        "growth_gib": (peak - base) / GIB,
        "held_statistics_gib": held / GIB,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--no-checkpointing",
        dest="checkpointing",
        action="store_false",
        help="measure the collector without gradient checkpointing (on by default, as in prune)",
    )
    parser.add_argument("--variant", choices=["naive", "adapruner"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    results = {}
    for variant in ("naive", "adapruner"):
        cmd = [sys.executable, __file__, "--variant", variant, *sys.argv[1:]]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[variant] = json.loads(out.strip().splitlines()[-1])
    print(
        f"model {args.model} ({args.dtype}, {args.device}), {args.samples} x {args.seq_len} tokens"
        f"{', gradient checkpointing' if args.checkpointing else ''}"
    )
    print(f"{'variant':10} {'model loaded':>13} {'peak':>9} {'growth':>9} {'kept stats':>11}")
    for name, r in results.items():
        print(
            f"{name:10} {r['base_gib']:12.2f}G {r['peak_gib']:8.2f}G {r['growth_gib']:8.2f}G "
            f"{r['held_statistics_gib']:10.3f}G"
        )
    naive, ours = results["naive"], results["adapruner"]
    print(
        f"peak ratio adapruner/naive: {ours['peak_gib'] / naive['peak_gib']:.2f}x "
        f"(growth over the loaded model: {ours['growth_gib'] / naive['growth_gib']:.2f}x); target <= 0.6x"
    )


if __name__ == "__main__":
    main()
