"""Named baselines (``adapruner prune --method NAME``): the methods users would run instead, as presets.

Each method is a set of :class:`adapruner.recipe.PruneConfig` options reproducing a published structured
pruning method as closely as AdaPruner's building blocks allow, with its source and the settings it
fixes. Options the caller gives explicitly override the preset (``prune(..., method="flap",
num_samples=32)``, or ``--method flap --num-samples 32`` on the command line); everything else comes
from the preset or, where the preset is silent, from PruneConfig's defaults.

Differences from the original code, by design:

* the ratio is always the fraction of the *whole model's* parameters (FLAP's and Wanda-sp's
  ``pruning_ratio`` count the decoder layers only), and the pruned model is always physically smaller;
* calibration text comes from AdaPruner's offline sources (``wiki`` for WikiText2 and C4) and is kept
  CPU-sized: 128 samples x 128 tokens where FLAP uses 1024 (WikiText2) and Wanda-sp 128 (C4); pass
  ``--num-samples``/``--calibration`` to match the papers exactly (``c4``/``wikitext2`` need the hub);
* at least one attention unit per KV group and one MLP channel stay in every layer;
* GQA models (which the papers did not cover) prune query heads evenly per KV group (``head_mode auto``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import AdaPrunerError

LLM_PRUNER = "LLM-Pruner (Ma et al., NeurIPS 2023; github.com/horseee/LLM-Pruner, hf_prune.py)"
FLAP = "FLAP (An et al., AAAI 2024; github.com/CASIA-IVA-Lab/FLAP, lib/prune.py)"
# LLM-Pruner's block-wise defaults: 10 bookcorpus samples of 64 tokens for the gradients
LLM_PRUNER_CALIBRATION = {"calibration": "books", "num_samples": 10, "seq_len": 64}
# FLAP/Wanda-sp: forward-only statistics over 128-token samples, all decoder layers
FLAP_CALIBRATION = {"calibration": "wiki", "num_samples": 128, "seq_len": 128, "layers": "0:"}


@dataclass(frozen=True)
class Method:
    """One baseline: PruneConfig options plus where they come from."""

    name: str
    source: str
    summary: str
    options: dict[str, Any] = field(default_factory=dict)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "random",
            f"{LLM_PRUNER}: the random baseline",
            "uniform random unit scores (seeded by --seed); LLM-Pruner's layer range and uniform per-layer rate",
            {"metric": "random", "aggregation": "sum"},
        ),
        Method(
            "l2",
            f"{LLM_PRUNER}: --pruner_type l2 (MagnitudeImportance p=2, mean over the coupled layers)",
            "magnitude: sum of W^2 over each unit's rows/columns, averaged over the coupled layers; no data",
            {"metric": "l2", "aggregation": "mean"},
        ),
        Method(
            "llm-pruner-element1",
            f"{LLM_PRUNER}: --pruner_type taylor --taylor param_first (the paper's default)",
            "first-order Taylor |W*g| per element, summed; gradients of 10 books samples x 64 tokens",
            {"metric": "element1", "aggregation": "sum", **LLM_PRUNER_CALIBRATION},
        ),
        Method(
            "llm-pruner-element2",
            f"{LLM_PRUNER}: --taylor param_mix",
            "first plus second-order (diagonal Fisher) Taylor per element, summed; 10 x 64 books tokens",
            {"metric": "element2", "aggregation": "sum", **LLM_PRUNER_CALIBRATION},
        ),
        Method(
            "llm-pruner-vector",
            f"{LLM_PRUNER}: --taylor vectorize",
            "first-order Taylor of each whole weight vector |sum W*g|, summed; 10 x 64 books tokens",
            {"metric": "vector", "aggregation": "sum", **LLM_PRUNER_CALIBRATION},
        ),
        Method(
            "wanda-sp",
            f"Wanda-sp, the structured Wanda (Sun et al., ICLR 2024) of {FLAP}: prune_wanda_sp",
            "|W_ij| * ||X_j|| on the o_proj/down_proj columns of each unit (aggregation last); the same rate "
            "in every layer (FLAP's UL-UM); 128 wiki samples x 128 tokens (the paper: C4)",
            {"metric": "wanda_sp", "aggregation": "last", **FLAP_CALIBRATION},
        ),
        Method(
            "flap",
            f"{FLAP}: prune_flap with --metrics WIFV --structure AL-AM (the defaults)",
            "fluctuation Var(X_j) * ||W[:, j]||^2 of o_proj/down_proj inputs (wifv, standardised per layer "
            "and module); heads and channels of all layers ranked in one list by parameter cost "
            "(global-all); removed inputs compensated by a bias; 128 wiki samples x 128 tokens "
            "(the paper: 1024 of WikiText2)",
            {
                "metric": "wifv",
                "aggregation": "sum",
                "ranking": "global-all",
                "refit": "bias",
                **FLAP_CALIBRATION,
            },
        ),
        Method(
            "flap-refit",
            f"{FLAP}'s selection, refitted as ZipLM / SlimGPT / Týr-the-Pruner refit (adapruner.local)",
            "FLAP's units (wifv, global-all) on the same 128 wiki windows of 128 tokens; then, layer by layer on "
            "the pruned model's own inputs, the kept o_proj/down_proj columns and a bias refitted by least "
            "squares to the dense layer's outputs (--refit lsq)",
            {"metric": "wifv", "aggregation": "sum", "ranking": "global-all", "refit": "lsq", **FLAP_CALIBRATION},
        ),
        Method(
            "local-obs",
            "structured OBS (ZipLM, Kurtic et al., NeurIPS 2023; SlimGPT, Ling et al., NeurIPS 2024; "
            "Týr-the-Pruner, NeurIPS 2025: src/local_pruner.py)",
            "layer by layer on the pruned model's own inputs, heads and MLP channels removed a batch at a time "
            "by the least rise of the layer's reconstruction error, the rest refitted by least squares; the "
            "same rate in every layer of LLM-Pruner's range; 128 wiki windows of 128 tokens",
            {"metric": "obs", "aggregation": "sum", "refit": "lsq", **FLAP_CALIBRATION, "layers": None},
        ),
    )
}


# LLM-Pruner's recipe (its paper's default): the search's trial 0, `adapruner run`'s baseline row
LLM_PRUNER_RECIPE = "llm-pruner-element1"


def get_method(name: str) -> Method:
    """The named method, or a one-line error listing the known ones."""
    if name not in METHODS:
        raise AdaPrunerError(f"unknown method '{name}': choose one of {', '.join(METHODS)}")
    return METHODS[name]


def with_method(options: dict[str, Any]) -> dict[str, Any]:
    """PruneConfig options: the preset of ``options["method"]`` (if any) overridden by ``options``."""
    name = options.get("method")
    if name is None:
        return dict(options)
    return get_method(name).options | dict(options)


__all__ = ["LLM_PRUNER_RECIPE", "METHODS", "Method", "get_method", "with_method"]
