"""A supernet of per-layer pruned candidates: every layer's attention and MLP at any keep count, refitted.

Týr-the-Pruner and EvoPress search the per-layer sparsity over *prebuilt* candidates, so a trial only
assembles a model. Here one pass of the dense model over calibration windows gathers, for every pruned
layer, the input moments of o_proj and down_proj (fp64, centred) and walks structured OBS
(``obs_select``) down to the smallest allowed keep count, which gives a *removal order*: the units OBS
drops first. Keeping ``c`` units keeps the last ``c`` of that order (nested candidates, as OBS's greedy
path), and the candidate's o_proj/down_proj are the least-squares refit of those columns on the layer's
moments (``refit_columns``): a few milliseconds per candidate, memoised, no model pass. Every candidate
reproduces the dense layer on the dense model's own inputs (each layer is independent, so any per-layer
assignment can be assembled; the sequential engine of :mod:`adapruner.local.engine` instead refits on the
inputs of the layers pruned before it).

The moments and the orders are stored in one safetensors file per setting under the cache
(``supernets/``), named by a fingerprint of the model, the windows, the layers and the solver settings;
a file whose recorded fingerprint differs is recomputed, never reused.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from ..errors import AdaPrunerError
from ..models.base import ModelAdapter, get_adapter
from ..models.groups import HeadMode, attention_group, mlp_group
from ..paths import cache_dir
from ..pruning.plan import PrunePlan, layer_plan
from ..util import log, save_tensors_atomic
from .engine import capture_inputs, input_moments, run_layer
from .solve import Refit, gram_parts, obs_select, solve_refit

SUPERNET_VERSION = "1"
MEMO_SIZE = 256  # refitted candidates kept in memory (a trial changes a few layers; the rest are hits)


@dataclass
class Candidates:
    """One projection's candidates: its input moments and the order in which OBS removes its units."""

    name: str  # the projection (o_proj or down_proj) whose input columns the units own
    unit_width: int  # input columns per unit
    blocks: int  # the keep count is a multiple of this (one unit per block and OBS step, GQA query heads)
    order: list[int]  # units, first removed first; the last ``min_keep`` never removed
    gram: torch.Tensor  # centred covariance of the input (stored fp32: half the memory; solved in fp64)
    mean: torch.Tensor  # mean input
    tokens: int

    @property
    def num_units(self) -> int:
        return self.gram.shape[0] // self.unit_width

    @property
    def min_keep(self) -> int:
        return self.num_units - len(self.order)

    def kept_units(self, keep: int) -> list[int]:
        """The units a candidate with ``keep`` units keeps (sorted)."""
        if not self.min_keep <= keep <= self.num_units or keep % self.blocks:
            raise AdaPrunerError(
                f"{self.name}: no candidate keeps {keep} of {self.num_units} units (the supernet holds "
                f"{self.min_keep}..{self.num_units} in steps of {self.blocks})"
            )
        removed = set(self.order[: self.num_units - keep])
        return [u for u in range(self.num_units) if u not in removed]

    def refit(self, weight: torch.Tensor, bias: torch.Tensor | None, keep: int, damping: float) -> Refit:
        kept_units = self.kept_units(keep)
        kept = torch.cat([torch.arange(u * self.unit_width, (u + 1) * self.unit_width) for u in kept_units])
        gram = self.gram.double()  # a copy, freed before the solve
        parts = gram_parts(weight, gram, kept)
        del gram
        return solve_refit(weight, bias, parts, self.mean.double(), kept, damping, self.name)


@dataclass
class SupernetSettings:
    """How the candidates are built (all part of the fingerprint)."""

    damping: float = 1e-3
    rounds: int = 32  # OBS batches for MLP channels (finer than the engine's 16: the order is walked far)
    max_removal: float = 0.9  # the deepest candidate removes this fraction of a layer's units
    batch_size: int = 16

    def __post_init__(self) -> None:
        if not 0.0 < self.max_removal < 1.0:
            raise AdaPrunerError(f"the supernet's max_removal {self.max_removal} must lie in (0, 1), e.g. 0.9")


@dataclass
class Supernet:
    """Per pruned layer: the attention and the MLP candidates; refits memoised (least recently used out)."""

    attention: dict[int, Candidates]
    mlp: dict[int, Candidates]
    settings: SupernetSettings
    fingerprint: str
    seconds: float = 0.0
    _memo: OrderedDict = field(default_factory=OrderedDict, repr=False)

    def limits(self, layer: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """(min keep, dense count, step) for the layer's attention units and MLP channels."""
        a, m = self.attention[layer], self.mlp[layer]
        return (a.min_keep, a.num_units, a.blocks), (m.min_keep, m.num_units, m.blocks)

    def candidate(self, adapter: ModelAdapter, layer: int, kind: str, keep: int) -> Refit | None:
        """The refitted projection of ``layer``'s ``kind`` keeping ``keep`` units (None: nothing removed)."""
        cands = (self.attention if kind == "attention" else self.mlp)[layer]
        if keep == cands.num_units:
            return None
        key = (layer, kind, keep)
        if key in self._memo:
            self._memo.move_to_end(key)
            return self._memo[key]
        module = adapter.model.get_submodule(cands.name)
        refit = cands.refit(module.weight, module.bias, keep, self.settings.damping)
        self._memo[key] = refit
        if len(self._memo) > MEMO_SIZE:
            self._memo.popitem(last=False)
        return refit

    def assemble(
        self, adapter: ModelAdapter, counts: dict[int, tuple[int, int]], head_mode: HeadMode = "auto"
    ) -> tuple[PrunePlan, dict[str, Refit]]:
        """The plan and the refitted projections of the per-layer keep counts ``counts`` (layer -> (attn, mlp))."""
        plan = PrunePlan.keep_all(adapter)
        refits: dict[str, Refit] = {}
        for layer, (attn_keep, mlp_keep) in counts.items():
            attn, mlp = self.attention[layer], self.mlp[layer]
            group = attention_group(adapter, layer, head_mode)
            channels = mlp.kept_units(mlp_keep)
            plan.layers[layer] = layer_plan(adapter.layer_shape(layer), group, attn.kept_units(attn_keep), channels)
            for kind, keep, cands in (("attention", attn_keep, attn), ("mlp", mlp_keep, mlp)):
                refit = self.candidate(adapter, layer, kind, keep)
                if refit is not None:
                    refits[cands.name] = refit
        plan.validate(adapter)
        return plan, refits


def supernet_fingerprint(
    model_fp: str, windows: torch.Tensor, layers: list[int], head_mode: str, settings: SupernetSettings
) -> str:
    """What the candidates depend on: the model, the windows' tokens, the layers and the solver settings."""
    digest = hashlib.sha256(f"{SUPERNET_VERSION}:{model_fp}:{layers}:{head_mode}".encode())
    digest.update(json.dumps(settings.__dict__, sort_keys=True).encode())
    digest.update(windows.to(torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def min_keep(num_units: int, blocks: int, max_removal: float) -> int:
    per_block = num_units // blocks
    return max(1, per_block - int(per_block * max_removal)) * blocks


@torch.no_grad()
def build_supernet(
    model: torch.nn.Module,
    windows: torch.Tensor,
    layers: list[int],
    settings: SupernetSettings | None = None,
    head_mode: HeadMode = "auto",
    directory: Path | None = None,
) -> Supernet:
    """The candidates of ``layers`` on the dense model's inputs over ``windows`` [N, L] (cached on disk)."""
    from ..importance.cache import model_fingerprint

    settings = settings or SupernetSettings()
    adapter = get_adapter(model)
    fingerprint = supernet_fingerprint(model_fingerprint(model), windows, layers, head_mode, settings)
    path = (directory or cache_dir() / "supernets") / f"{fingerprint}.safetensors"
    if path.is_file():
        loaded = _load(path, fingerprint, settings)
        if loaded is not None:
            return loaded
    start = time.perf_counter()
    attention: dict[int, Candidates] = {}
    mlp: dict[int, Candidates] = {}
    inputs = capture_inputs(adapter, windows, settings.batch_size)
    last = max(layers)
    for index in tqdm(range(last + 1), desc="supernet", leave=False):
        layer = adapter.decoder_layers()[index]
        if index in layers:
            mods, names = adapter.layer(index), adapter.prunable_module_names(index)
            group = attention_group(adapter, index, head_mode)
            for kind, module, name, units, blocks in (
                ("attention", mods.o_proj, names["o_proj"], group.num_units, group.blocks),
                ("mlp", mods.down_proj, names["down_proj"], mlp_group(adapter, index).num_units, 1),
            ):
                moments = input_moments(layer, module, inputs, next(module.parameters()).device)
                moments.check(name)
                width = module.in_features // units
                gram = moments.finalise(centred=True)
                deepest = min_keep(units, blocks, settings.max_removal)
                selection = obs_select(
                    module.weight, gram, width, deepest, blocks, settings.rounds, settings.damping, name
                )
                order = selection.removed  # first removed first; a batch in its cost order
                gram, mean = gram.float(), moments.mean.float()
                cands = Candidates(name, width, blocks, order, gram, mean, moments.tokens)
                (attention if kind == "attention" else mlp)[index] = cands
        if index < last:
            inputs = run_layer(layer, inputs)
    supernet = Supernet(attention, mlp, settings, fingerprint, time.perf_counter() - start)
    _save(supernet, path)
    return supernet


def _save(supernet: Supernet, path: Path) -> None:
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, dict] = {}
    for kind, table in (("attention", supernet.attention), ("mlp", supernet.mlp)):
        for layer, c in table.items():
            key = f"{kind}.{layer}"
            tensors[f"{key}.gram"] = c.gram.contiguous()
            tensors[f"{key}.mean"] = c.mean.contiguous()
            tensors[f"{key}.order"] = torch.tensor(c.order, dtype=torch.int64)
            meta[key] = {"name": c.name, "unit_width": c.unit_width, "blocks": c.blocks, "tokens": c.tokens}
    metadata = {"fingerprint": supernet.fingerprint, "candidates": json.dumps(meta), "seconds": str(supernet.seconds)}
    save_tensors_atomic(tensors, path, metadata)


def _load(path: Path, fingerprint: str, settings: SupernetSettings) -> Supernet | None:
    """The stored supernet, or None (logged) when the file is damaged or was made for another setting."""
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("fingerprint") != fingerprint:
                log(f"supernet cache {path.name} was made for another model, data or setting: rebuilding it")
                return None
            meta = json.loads(metadata["candidates"])
            tables: dict[str, dict[int, Candidates]] = {"attention": {}, "mlp": {}}
            for key, info in meta.items():
                kind, layer = key.split(".")
                tables[kind][int(layer)] = Candidates(
                    info["name"],
                    int(info["unit_width"]),
                    int(info["blocks"]),
                    f.get_tensor(f"{key}.order").tolist(),
                    f.get_tensor(f"{key}.gram"),
                    f.get_tensor(f"{key}.mean"),
                    int(info["tokens"]),
                )
    except (SafetensorError, OSError, ValueError, KeyError):
        log(f"supernet cache {path.name} is damaged: rebuilding it")
        return None
    return Supernet(tables["attention"], tables["mlp"], settings, fingerprint, float(metadata.get("seconds", 0)))


__all__ = ["Candidates", "Supernet", "SupernetSettings", "build_supernet", "supernet_fingerprint"]
