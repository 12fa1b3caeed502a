"""Peak memory of the layer-by-layer refit against one layer's statistics, each case in a fresh process.

The engine holds the model, the calibration hidden states of the current layer (inputs and outputs),
one projection's input Gram matrix at a time (fp64) and the temporaries of one layer's forward pass.
The target (issue: local refit) is peak ≤ model + 1.5 × one layer's statistics, where one layer's
statistics are the fp64 Gram matrices of its o_proj and down_proj inputs (n_o² + n_d² × 8 bytes).

Cases:

* ``smollm2``: ``--method flap-refit`` on SmolLM2-135M at 0.2 (FLAP's 128 wiki windows of 128 tokens);
  the memory is sampled while the engine runs (FLAP's scoring pass before it is not counted);
* ``llama7b-layers``: LLaMA-7B-shaped decoder layers (hidden 4096, MLP 11008, 32 heads), built from a
  config with random weights (nothing downloaded), ``--layers`` of them (default 2: the per-layer peak
  does not depend on depth, only the weights do), fp32, 20% of every layer's heads and channels
  removed at random and refitted on ``--tokens`` random calibration tokens (≥ 11008, the MLP width).

RSS is read from /proc every 5 ms in a thread while the engine runs; "growth" is peak minus the RSS
just before it started (model and calibration windows loaded).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


class PeakSampler:
    def __init__(self) -> None:
        self.peak, self._stop = 0, threading.Event()

    def __enter__(self) -> PeakSampler:
        self.start = self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def layer_statistics_bytes(adapter, index: int) -> int:
    mods = adapter.layer(index)
    return 8 * (mods.o_proj.in_features**2 + mods.down_proj.in_features**2)


def weights_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def child_smollm2() -> dict:
    from dataclasses import replace

    from adapruner.local import local_prune
    from adapruner.models import get_adapter
    from adapruner.models.loading import load_model
    from adapruner.recipe import PlanInputs, PruneConfig, plan_recipe, refit_windows

    model, tokenizer = load_model("smollm2-135m")
    refit = PruneConfig.from_method("smollm2-135m", 0.2, method="flap-refit").recipe
    selection = replace(refit, refit="none")  # its units, chosen but not yet refitted
    plan = plan_recipe(model, selection, PlanInputs(model, tokenizer)).plan
    windows = refit_windows(tokenizer, refit)
    adapter = get_adapter(model)
    hidden = windows.numel() * adapter.hidden_size * 4
    with PeakSampler() as sampler:
        result = local_prune(model, windows, refit.local_settings(), plan=plan, head_mode=refit.head_mode)
    return report("SmolLM2-135M, flap-refit at 0.2", model, adapter, sampler, hidden, result)


def child_llama7b(layers: int, tokens: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from adapruner.local import LocalSettings, local_prune
    from adapruner.models import attention_group, get_adapter, mlp_group
    from adapruner.pruning import plan_from_scores
    from adapruner.pruning.plan import KeepCounts

    config = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_attention_heads=32,
        num_key_value_heads=32,
        num_hidden_layers=layers,
        vocab_size=32000,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    adapter = get_adapter(model)
    counts = [(26, 8806)] * layers  # 20% of the 32 heads and 11008 channels of every layer
    gen = torch.Generator().manual_seed(0)
    scores = {}
    for i in range(layers):
        scores[(i, "attention")] = torch.rand(attention_group(adapter, i).num_units, generator=gen)
        scores[(i, "mlp")] = torch.rand(mlp_group(adapter, i).num_units, generator=gen)
    plan = plan_from_scores(adapter, scores, KeepCounts(counts, 0.2, 0, 1), "auto")
    windows = torch.randint(0, 32000, (tokens // 128, 128), generator=gen)
    hidden = windows.numel() * adapter.hidden_size * 4
    with PeakSampler() as sampler:
        result = local_prune(model, windows, LocalSettings(), plan=plan)
    return report(f"LLaMA-7B-shaped, {layers} layers, fp32, 20% per layer", model, adapter, sampler, hidden, result)


def report(name: str, model, adapter, sampler: PeakSampler, hidden: int, result) -> dict:
    stats = max(layer_statistics_bytes(adapter, i) for i in range(adapter.num_layers))
    growth = sampler.peak - sampler.start
    return {
        "case": name,
        "weights_gib": weights_bytes(model) / 2**30,
        "rss_before_gib": sampler.start / 2**30,
        "peak_gib": sampler.peak / 2**30,
        "growth_gib": growth / 2**30,
        "layer_statistics_gib": stats / 2**30,
        "hidden_states_gib": hidden / 2**30,
        "growth_over_statistics": growth / stats,
        "tokens": result.tokens,
        "seconds": round(result.seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="smollm2,llama7b-layers")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=12288)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "smollm2":
        print(json.dumps(child_smollm2()))
        return
    if args.child == "llama7b-layers":
        print(json.dumps(child_llama7b(args.layers, args.tokens)))
        return
    rows = []
    for case in args.cases.split(","):
        started = time.perf_counter()
        command = [sys.executable, __file__, "--child", case, "--layers", str(args.layers)]
        command += ["--tokens", str(args.tokens)]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]) | {"wall": time.perf_counter() - started})
    print("| case | weights | RSS before | peak | growth | one layer's statistics | hidden states | growth / stats |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['case']} | {r['weights_gib']:.2f} GiB | {r['rss_before_gib']:.2f} GiB | {r['peak_gib']:.2f} GiB | "
            f"{r['growth_gib']:.3f} GiB | {r['layer_statistics_gib']:.3f} GiB | {r['hidden_states_gib']:.3f} GiB | "
            f"{r['growth_over_statistics']:.2f}× |"
        )
    print("\ntarget: growth <= 1.5x one layer's statistics (the hidden states of the calibration tokens come on top)")


if __name__ == "__main__":
    main()
