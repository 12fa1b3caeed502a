"""A LLaMA-7B-shaped model on this machine's CPU, in bf16: what AdaPruner's heavy steps cost in memory and time.

The model is built from a config (32 layers, hidden 4096, MLP 11008, 32 heads, vocabulary 32000; random
weights, nothing downloaded) in bfloat16 on the CPU, and then, in one process, in order:

1. **gradient statistics** for every projection of every layer (first-order Taylor: what ``element1``,
   ``vector`` and LLM-Pruner read) on ``--samples`` x ``--seq-len`` tokens, gradient checkpointing on (as
   ``adapruner prune`` runs it);
2. **one search trial's evaluation path**: the model masked to a 20%-per-layer plan, the mean NLL over
   ``--eval-windows`` validation windows of 128 tokens (what a trial does, on fewer windows);
3. **the local refit** (``--refit lsq``, the engine of ``flap-refit``/``local-obs``): the first
   ``--refit-layers`` decoder layers of the full model pruned 20% (random heads and channels) and their
   o_proj/down_proj refitted by least squares, layer by layer, on ``--refit-tokens`` random tokens. A
   least-squares refit needs at least as many tokens as its widest input (11,008 MLP channels), so it
   cannot run on the 2 x 64 tokens of the gradient pass (the engine refuses with a one-line error);
   the peak is one layer's (the engine holds one layer's statistics at a time), and the time for all
   32 layers is extrapolated from the layers run;
4. **the per-layer search's supernet**: built for the first ``--supernet-layers`` layers on
   ``--refit-tokens`` tokens (structured OBS's removal order and the input moments of o_proj and
   down_proj, each layer's Gram matrices written to disk as soon as they exist), then one trial's
   candidates assembled (20% of every built layer, each refitted from its matrix read back from disk):
   what a 7B per-layer search holds. The build time for 32 layers is extrapolated.

Each phase runs in a fresh process (the model built, then the step: what one ``adapruner`` command
holds at that point); RSS is sampled every 5 ms while the step runs; the target (issue 16) is peak <=
weights + 3 GiB. The trial time is scaled to the search's default objective (4 sources x 1024 tokens)
on this CPU and, by FLOP count, to a GPU sustaining ``--gpu-tflops`` (an assumption, printed as such).

    python benchmarks/llama7b_cpu.py          # ~13 GiB of weights: needs ~17 GiB free
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from local_memory import PeakSampler, weights_bytes

GIB = 2**30
OBJECTIVE_TOKENS = 4 * 1024  # the search's default objective: 1024 validation tokens of each of 4 sources


def build_model(layers: int) -> torch.nn.Module:
    """LLaMA-7B shapes in bf16 with random N(0, 0.02) weights, built without an fp32 copy."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        max_position_embeddings=4096,
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model = model.to_empty(device="cpu").eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float32).mul_(0.02))
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)  # computed buffers, not weights
    return model


def random_plan(adapter, rate: float = 0.2):
    """The same fraction of every layer's heads and channels, chosen at random (the refit's cost does not
    depend on which)."""
    from adapruner.models import attention_group, mlp_group
    from adapruner.pruning import plan_from_scores
    from adapruner.pruning.plan import KeepCounts

    gen = torch.Generator().manual_seed(0)
    counts, scores = [], {}
    for i in range(adapter.num_layers):
        attn, mlp = attention_group(adapter, i), mlp_group(adapter, i)
        counts.append((round(attn.num_units * (1 - rate)), round(mlp.num_units * (1 - rate))))
        scores[(i, "attention")] = torch.rand(attn.num_units, generator=gen)
        scores[(i, "mlp")] = torch.rand(mlp.num_units, generator=gen)
    return plan_from_scores(adapter, scores, KeepCounts(counts, rate, 0, 1), "auto")


def run_phase(name: str, args: argparse.Namespace) -> dict:
    """One heavy step in this (fresh) process: what one ``adapruner`` command would hold at that point."""
    from adapruner.evaluation.perplexity import windowed_nll
    from adapruner.importance import collect_statistics
    from adapruner.local import LocalSettings, local_prune
    from adapruner.local.supernet import SupernetSettings, build_supernet
    from adapruner.models import get_adapter
    from adapruner.pruning import masked

    model = build_model(args.layers)
    adapter = get_adapter(model)
    gen = torch.Generator().manual_seed(1)
    plan = random_plan(adapter)
    if name == "statistics":
        label = f"gradient statistics, {args.samples} x {args.seq_len} tokens, every layer"
        samples = torch.randint(100, 32000, (args.samples, args.seq_len), generator=gen)
        modules = adapter.projection_names(range(adapter.num_layers))

        def action():
            return collect_statistics(model, samples, modules, {"grad"}, batch_size=args.samples, checkpointing=True)

        tokens = samples.numel()
    elif name == "trial":
        label = f"trial evaluation path, {args.eval_windows} x 128 tokens (masked model)"
        windows = torch.randint(100, 32000, (args.eval_windows, 128), generator=gen)

        def action():
            with torch.no_grad(), masked(adapter, plan):
                return list(windowed_nll(model, windows))

        tokens = windows.numel()
    elif name == "supernet":
        built = list(range(min(args.supernet_layers, adapter.num_layers)))
        windows = torch.randint(100, 32000, (args.refit_tokens // 128, 128), generator=gen)
        label = f"supernet: build layers 0-{built[-1]} + assemble a 20% trial, {windows.numel()} tokens"

        def action():
            with tempfile.TemporaryDirectory() as cache:
                net = build_supernet(model, windows, built, SupernetSettings(), directory=Path(cache))
                counts = {}
                for i in built:
                    (_, attn, step), (m_min, mlp, _) = net.limits(i)
                    counts[i] = (attn - step * max(1, round(0.2 * attn / step)), max(m_min, round(0.8 * mlp)))
                return net.assemble(adapter, counts)

        tokens = windows.numel()
    else:
        layers = min(args.refit_layers, adapter.num_layers)
        for index in range(layers, adapter.num_layers):  # only the first layers: the rest stay whole
            plan.layers[index] = type(plan).keep_all(adapter).layers[index]
        windows = torch.randint(100, 32000, (args.refit_tokens // 128, 128), generator=gen)
        label = f"local refit (lsq), 20% of layers 0-{layers - 1}, {windows.numel()} tokens"

        def action():
            return local_prune(model, windows, LocalSettings(damping=1e-3), plan=plan)

        tokens = windows.numel()
    started = time.perf_counter()
    with PeakSampler() as sampler:
        action()
    return {
        "phase": label,
        "seconds": time.perf_counter() - started,
        "before": sampler.start,
        "peak": sampler.peak,
        "weights": weights_bytes(model),
        "params": sum(p.numel() for p in model.parameters()),
        "tokens": tokens,
        "layers": adapter.num_layers,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--eval-windows", type=int, default=2, help="validation windows of 128 tokens")
    parser.add_argument("--refit-layers", type=int, default=4, help="layers pruned and refitted (from layer 0)")
    parser.add_argument("--refit-tokens", type=int, default=12288, help=">= 11008, the MLP width")
    parser.add_argument("--supernet-layers", type=int, default=2, help="layers of the supernet phase")
    parser.add_argument("--gpu-tflops", type=float, default=400.0, help="assumed sustained bf16 TFLOP/s of a GPU")
    parser.add_argument("--phases", default=",".join(PHASES))
    parser.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(run_phase(args.phase, args)))
        return
    rows = {}
    for name in args.phases.split(","):
        command = [sys.executable, __file__, *sys.argv[1:], "--phase", name]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        rows[name] = json.loads(out.strip().splitlines()[-1])
        print(f"{rows[name]['phase']}: {rows[name]['seconds']:.1f} s", flush=True)
    first = next(iter(rows.values()))
    weights, params = first["weights"], first["params"]
    print(
        f"\nLLaMA-7B-shaped, {args.layers} layers, {params / 1e9:.2f} B parameters, "
        f"bf16 weights {weights / GIB:.2f} GiB"
    )
    print("each phase in a fresh process (model built, then the step); target: peak RSS <= weights + 3 GiB\n")
    print("| phase | seconds | RSS before | peak RSS | peak - weights | target met |")
    print("|---|---|---|---|---|---|")
    for r in rows.values():
        over = (r["peak"] - weights) / GIB
        print(
            f"| {r['phase']} | {r['seconds']:.1f} | {r['before'] / GIB:.2f} GiB | {r['peak'] / GIB:.2f} GiB | "
            f"{over:+.2f} GiB | {'yes' if over <= 3 else 'no'} |"
        )
    if "trial" in rows:
        trial = rows["trial"]
        per_trial = trial["seconds"] / trial["tokens"] * OBJECTIVE_TOKENS
        flops = 2 * params * OBJECTIVE_TOKENS
        print(
            f"\none trial's evaluation ({OBJECTIVE_TOKENS} objective tokens, masked model): ~{per_trial:.0f} s on this "
            f"CPU ({2 * params * trial['tokens'] / trial['seconds'] / 1e9:.0f} GFLOP/s measured); {flops / 1e12:.0f} "
            f"TFLOP, so ~{flops / (args.gpu_tflops * 1e12):.2f} s on a GPU sustaining {args.gpu_tflops:.0f} TFLOP/s "
            "(assumed, not measured)"
        )
    if "refit" in rows:
        refit = rows["refit"]
        minutes = refit["seconds"] / min(args.refit_layers, refit["layers"]) * refit["layers"] / 60
        print(f"local refit of all {refit['layers']} layers on this CPU: ~{minutes:.0f} min (extrapolated)")
    if "supernet" in rows:
        net = rows["supernet"]
        minutes = net["seconds"] / min(args.supernet_layers, net["layers"]) * net["layers"] / 60
        print(f"supernet of all {net['layers']} layers on this CPU: ~{minutes:.0f} min (extrapolated, with one trial)")


PHASES = ("statistics", "trial", "refit", "supernet")


if __name__ == "__main__":
    main()
