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

The moments and the orders are stored under the cache (``supernets/<fingerprint>/``: one safetensors
file per layer and projection, the orders in ``candidates.json``), named by a fingerprint of the model,
the windows, the layers and the solver settings; a directory whose recorded fingerprint differs, or that
is damaged, is recomputed, never reused. The Gram matrices stay on disk: a refit reads its projection's
matrix and drops it, so memory holds one matrix at a time (a 7B model's are ~17 GB in fp32), while
building (each written before OBS runs) as well as searching.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..errors import AdaPrunerError
from ..models.base import ModelAdapter, get_adapter
from ..models.fingerprint import model_fingerprint
from ..models.groups import HeadMode, attention_group, mlp_group
from ..paths import cache_dir
from ..pruning.plan import PrunePlan, layer_plan
from ..util import log
from .engine import capture_inputs, input_moments, run_layer
from .solve import Refit, gram_parts, obs_select, solve_refit

SUPERNET_VERSION = "3"  # 3: a directory, one file per layer and projection, Gram matrices read on demand
# refitted candidates kept in memory, in bytes of their weights (a trial changes a few layers; the rest
# are hits): all of a small model's, a few layers' of a 7B model's
MEMO_BYTES = 1 << 30
META_FILE = "candidates.json"


@dataclass
class Candidates:
    """One projection's candidates: its input moments and the order in which OBS removes its units."""

    name: str  # the projection (o_proj or down_proj) whose input columns the units own
    unit_width: int  # input columns per unit
    blocks: int  # the keep count is a multiple of this (one unit per block and OBS step, GQA query heads)
    order: list[int]  # units, first removed first; the last ``min_keep`` never removed
    mean: torch.Tensor  # mean input
    tokens: int
    columns: int  # input columns of the projection
    # the file holding the centred input covariance (fp32; solved in fp64) under "gram"
    gram_file: Path | None = None

    @property
    def num_units(self) -> int:
        return self.columns // self.unit_width

    def load_gram(self) -> torch.Tensor:
        """The Gram matrix, read from the supernet's layer file (not kept: one in memory at a time)."""
        try:
            with safe_open(str(self.gram_file), "pt") as f:
                return f.get_tensor("gram")
        except (SafetensorError, OSError, TypeError) as exc:
            where = self.gram_file.parent if self.gram_file else "the supernet cache"
            raise AdaPrunerError(
                f"{self.name}: cannot read its supernet matrix ({exc}): delete {where} and rerun to rebuild it"
            ) from None

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
        device = weight.device if weight.device.type != "meta" else torch.device("cpu")  # solved where W lives
        gram = self.load_gram().to(device=device, dtype=torch.float64)
        parts = gram_parts(weight, gram, kept)
        del gram  # freed before the solve
        return solve_refit(
            weight, bias, parts, self.mean.to(device=device, dtype=torch.float64), kept, damping, self.name
        )


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
    _memo_bytes: int = field(default=0, repr=False)

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
        self._memo_bytes += _nbytes(refit)
        while self._memo_bytes > MEMO_BYTES and len(self._memo) > 1:
            _, dropped = self._memo.popitem(last=False)
            self._memo_bytes -= _nbytes(dropped)
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


def _nbytes(refit: Refit) -> int:
    return refit.weight.nbytes + (0 if refit.bias is None else refit.bias.nbytes)


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
    settings = settings or SupernetSettings()
    adapter = get_adapter(model)
    fingerprint = supernet_fingerprint(model_fingerprint(model), windows, layers, head_mode, settings)
    root = directory or cache_dir() / "supernets"
    path = root / fingerprint
    if path.exists():
        loaded = _load(path, fingerprint, settings)
        if loaded is not None:
            return loaded
    root.mkdir(parents=True, exist_ok=True)
    for old in root.glob("*.safetensors"):  # single files of the first layout (version 1): never read again
        old.unlink(missing_ok=True)
    start = time.perf_counter()
    tables: dict[str, dict[int, Candidates]] = {"attention": {}, "mlp": {}}
    partial = Path(tempfile.mkdtemp(prefix=f".{fingerprint}.", dir=root))  # renamed when complete
    try:
        inputs = capture_inputs(adapter, windows, settings.batch_size)
        last = max(layers)
        for index in tqdm(range(last + 1), desc="supernet", leave=False):
            layer = adapter.decoder_layers()[index]
            if index in layers:
                _layer_candidates(adapter, index, inputs, settings, head_mode, tables, partial, path)
            if index < last:
                inputs = run_layer(layer, inputs)
        supernet = Supernet(tables["attention"], tables["mlp"], settings, fingerprint, time.perf_counter() - start)
        meta = {"fingerprint": fingerprint, "seconds": supernet.seconds, "candidates": _describe(supernet)}
        (partial / META_FILE).write_text(json.dumps(meta))
        _publish(partial, path)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return supernet


def _layer_candidates(
    adapter: ModelAdapter,
    index: int,
    inputs,
    settings: SupernetSettings,
    head_mode: HeadMode,
    tables: dict[str, dict[int, Candidates]],
    partial: Path,
    final: Path,
) -> None:
    """The attention and MLP candidates of one layer, added to ``tables``; each projection's moments are
    written to its file in ``partial`` before OBS runs (so its fp32 copy leaves memory first), and the
    candidates point at ``final``, the name ``partial`` is renamed to once the build is complete."""
    layer = adapter.decoder_layers()[index]
    mods, names = adapter.layer(index), adapter.prunable_module_names(index)
    group = attention_group(adapter, index, head_mode)
    for kind, module, name, units, blocks in (
        ("attention", mods.o_proj, names["o_proj"], group.num_units, group.blocks),
        ("mlp", mods.down_proj, names["down_proj"], mlp_group(adapter, index).num_units, 1),
    ):
        moments = input_moments(layer, module, inputs, next(module.parameters()).device)
        moments.check(name)
        width = module.in_features // units
        mean = moments.mean.float().cpu()
        file = _layer_file(index, kind)
        tensors = {"gram": moments.finalise(centred=True).float().cpu().contiguous(), "mean": mean.contiguous()}
        save_file(tensors, str(partial / file))
        del tensors
        deepest = min_keep(units, blocks, settings.max_removal)
        # OBS takes the moments' Gram matrix over and frees it once factored
        selection = obs_select(module.weight, moments, width, deepest, blocks, settings.rounds, settings.damping, name)
        order = selection.removed  # first removed first; a batch in its cost order
        tables[kind][index] = Candidates(
            name, width, blocks, order, mean, moments.tokens, module.in_features, final / file
        )


def _layer_file(index: int, kind: str) -> str:
    return f"layer-{index}.{kind}.safetensors"


def _describe(supernet: Supernet) -> dict[str, dict]:
    return {
        f"{kind}.{layer}": {
            "name": c.name,
            "unit_width": c.unit_width,
            "blocks": c.blocks,
            "tokens": c.tokens,
            "order": c.order,
        }
        for kind, table in (("attention", supernet.attention), ("mlp", supernet.mlp))
        for layer, c in table.items()
    }


def _publish(partial: Path, path: Path) -> None:
    """Rename the complete directory into place. When another builder of the same fingerprint (a worker on
    this machine) finished first, its directory, of the same content, stays and this one is dropped."""
    try:
        os.rename(partial, path)
    except OSError:
        if not (path / META_FILE).is_file():
            raise


def _load(path: Path, fingerprint: str, settings: SupernetSettings) -> Supernet | None:
    """The stored supernet (its Gram matrices left on disk), or None (logged, the directory removed) when
    it is damaged or was made for another setting."""
    try:
        meta = json.loads((path / META_FILE).read_text())
        if meta.get("fingerprint") != fingerprint:
            log(f"supernet cache {path.name} was made for another model, data or setting: rebuilding it")
            shutil.rmtree(path, ignore_errors=True)
            return None
        tables: dict[str, dict[int, Candidates]] = {"attention": {}, "mlp": {}}
        for key, info in meta["candidates"].items():
            kind, layer = key.split(".")
            file = path / _layer_file(int(layer), kind)
            with safe_open(str(file), "pt") as f:
                columns = f.get_slice("gram").get_shape()[0]  # the header only
                tables[kind][int(layer)] = Candidates(
                    info["name"],
                    int(info["unit_width"]),
                    int(info["blocks"]),
                    [int(u) for u in info["order"]],
                    f.get_tensor("mean"),
                    int(info["tokens"]),
                    int(columns),
                    file,
                )
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, AttributeError):
        log(f"supernet cache {path.name} is damaged: rebuilding it")
        shutil.rmtree(path, ignore_errors=True)
        return None
    return Supernet(tables["attention"], tables["mlp"], settings, fingerprint, float(meta.get("seconds", 0)))


__all__ = ["Candidates", "Supernet", "SupernetSettings", "build_supernet", "supernet_fingerprint"]
