"""Statistics cache: one per-sample pass over a pool, then importance for any subset without the model.

The per-sample statistics of a model over a pool are stored in one safetensors file keyed by the
model's and the pool's fingerprints (and the scored modules). A file made for another model or pool is
never reused: its name differs, and the fingerprints inside are checked on load; a damaged file is
recomputed. Decomposable metrics (vector, second, wanda_sp, flap, magnitudes) of a subset are row
selections of the cached numbers; element1/element2 need the subset's own summed gradient (and
per-sample squares), computed with one pass over just that subset and memoised by subset.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..data.pool import CalibrationPool
from ..files import save_tensors_atomic
from ..models.fingerprint import model_fingerprint
from ..paths import cache_dir
from ..util import log
from .base import Importance, Statistics
from .collector import collect_statistics

TABLES = ("act_sum", "act_sq", "unit_wg", "unit_wwgg", "sample")
SEP = "::"


def _save(stats: Statistics, path: Path, metadata: dict[str, str]) -> None:
    tensors = {f"{table}{SEP}{name}": v.contiguous() for table in TABLES for name, v in getattr(stats, table).items()}
    tensors["tokens"] = stats.tokens.contiguous()
    save_tensors_atomic(tensors, path, metadata)


def _load(path: Path, expected: dict[str, str]) -> Statistics | None:
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError):
        log(f"statistics cache {path.name} is damaged: recomputing")
        return None
    if any(metadata.get(k) != v for k, v in expected.items()):
        log(f"statistics cache {path.name} was made for another model or pool: recomputing")
        return None
    tables: dict[str, dict[str, torch.Tensor]] = {t: {} for t in TABLES}
    for key, value in tensors.items():
        if SEP in key:
            table, name = key.split(SEP, 1)
            tables[table][name] = value
    return Statistics(tokens=tensors["tokens"], num_samples=int(metadata["num_samples"]), per_sample=True, **tables)


class StatisticsCache:
    """Per-sample statistics of ``model`` over ``pool`` for ``modules``, on disk and in memory."""

    def __init__(
        self,
        model: torch.nn.Module,
        pool: CalibrationPool,
        modules: list[str],
        directory: Path | None = None,
        offload: bool = False,
    ) -> None:
        self.model, self.pool, self.modules, self.offload = model, pool, modules, offload
        modules_fp = hashlib.sha256(",".join(modules).encode()).hexdigest()[:8]
        self.key = {"model": model_fingerprint(model), "pool": pool.fingerprint, "modules": modules_fp}
        self.path = (
            directory or cache_dir() / "stats"
        ) / f"{self.key['model']}-{self.key['pool']}-{modules_fp}.safetensors"
        self._per_sample: Statistics | None = None
        self._memo: dict[tuple, Statistics] = {}

    def per_sample(self) -> Statistics:
        """Load the pool's per-sample statistics, or compute and store them (one backward per sample)."""
        if self._per_sample is None:
            stats = _load(self.path, self.key) if self.path.is_file() else None
            if stats is None:
                stats = collect_statistics(
                    self.model, self.pool.input_ids, self.modules, {"unit_sums", "activations"}, offload=self.offload
                )
                _save(stats, self.path, self.key | {"num_samples": str(stats.num_samples)})
            self._per_sample = stats
            self.pool.stats |= {k: v.float() for k, v in stats.sample.items()}
        return self._per_sample

    def statistics_for(self, indices: list[int], metric: Importance) -> Statistics:
        """What ``metric`` needs for the subset ``indices``: cached rows, plus a memoised pass if needed."""
        stats = self.per_sample().select(indices)
        extra = set() if metric.decomposable else metric.needs & {"grad", "fisher"}
        if extra:
            key = (tuple(sorted(indices)), frozenset(extra))
            if key not in self._memo:
                samples = self.pool.input_ids[list(key[0])]
                self._memo[key] = collect_statistics(self.model, samples, self.modules, extra, offload=self.offload)
            memo = self._memo[key]
            stats.grads, stats.fisher, stats.unit_abs_wg = memo.grads, memo.fisher, memo.unit_abs_wg
        return stats
