"""Calibration pools: candidate samples from several sources, with per-sample statistics.

The search does not pick "10 random samples from books": it picks a *subset of a pool*. A pool holds
token windows from each source (drawn as ``sample_calibration`` draws them), and after one pass of the
dense model, per sample: source, token length, dense-model loss and gradient norm. Selection helpers
turn a description (source mix, count, random seed, quantile window on a statistic) into indices.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..errors import AdaPrunerError
from .calibration import sample_calibration, split_sources

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

SAMPLE_STATS = ("loss", "grad_norm", "tokens")
# The search's pool: windows per source. With 40 x 64 wiki tokens FLAP's activation statistics (the
# search's warm start) score within a few % of FLAP's own 128 x 128 on SmolLM2; 20 windows read ~11% worse.
DEFAULT_POOL_PER_SOURCE = 40


@dataclass
class CalibrationPool:
    input_ids: torch.Tensor  # [N, seq_len]
    sources: list[str]  # per sample
    seq_len: int
    seed: int
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [N]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def fingerprint(self) -> str:
        """Identifies the exact token content (and order) of the pool."""
        digest = hashlib.sha256(self.input_ids.to(torch.int64).contiguous().numpy().tobytes())
        digest.update(",".join(self.sources).encode())
        return digest.hexdigest()[:16]

    def source_names(self) -> list[str]:
        return list(dict.fromkeys(self.sources))

    def describe(self) -> list[dict]:
        """One row per sample: index, source, and every statistic gathered so far."""
        rows = []
        for i, source in enumerate(self.sources):
            row = {"index": i, "source": source}
            row |= {name: float(values[i]) for name, values in self.stats.items()}
            rows.append(row)
        return rows

    def truncated(self, seq_len: int) -> CalibrationPool:
        """The same samples cut to their first ``seq_len`` tokens (the search's sequence-length choice)."""
        if not 2 <= seq_len <= self.seq_len:
            raise AdaPrunerError(f"cannot cut {self.seq_len}-token pool samples to {seq_len} tokens")
        if seq_len == self.seq_len:
            return self
        pool = CalibrationPool(self.input_ids[:, :seq_len].clone(), list(self.sources), seq_len, self.seed)
        pool.stats["tokens"] = torch.full((len(pool),), float(seq_len))
        return pool

    # -- selection helpers -----------------------------------------------------------------------
    def by_sources(self, mix: dict[str, int], seed: int = 0) -> list[int]:
        """``mix[source]`` random samples of each source."""
        chosen: list[int] = []
        for source, count in mix.items():
            candidates = [i for i, s in enumerate(self.sources) if s == source]
            if not candidates and count > 0:
                raise AdaPrunerError(f"the pool has no '{source}' samples: it holds {', '.join(self.source_names())}")
            chosen += self.random_subset(count, seed, candidates)
        return sorted(chosen)

    def random_subset(self, count: int, seed: int = 0, candidates: list[int] | None = None) -> list[int]:
        candidates = list(range(len(self))) if candidates is None else candidates
        if count > len(candidates):
            raise AdaPrunerError(
                f"the pool offers only {len(candidates)} samples here but {count} were asked: "
                "build a larger pool or ask for fewer samples"
            )
        return sorted(random.Random(seed).sample(candidates, count))

    def quantile_window(self, stat: str, low: float, high: float, candidates: list[int] | None = None) -> list[int]:
        """Samples whose ``stat`` lies between its ``low`` and ``high`` quantiles (over the candidates)."""
        if stat not in self.stats:
            known = ", ".join(self.stats) or "none yet (run the statistics pass)"
            raise AdaPrunerError(f"no per-sample statistic '{stat}' in the pool: available {known}")
        if not 0.0 <= low < high <= 1.0:
            raise AdaPrunerError(f"quantile window [{low}, {high}] must satisfy 0 <= low < high <= 1")
        candidates = list(range(len(self))) if candidates is None else candidates
        values = self.stats[stat][candidates].double()
        lo, hi = torch.quantile(values, low), torch.quantile(values, high)
        return [c for c, v in zip(candidates, values.tolist(), strict=True) if lo <= v <= hi]

    def select(
        self,
        count: int,
        *,
        sources: list[str] | None = None,
        window: tuple[str, float, float] | None = None,
        seed: int = 0,
    ) -> list[int]:
        """The search's unit: restrict to ``sources``, then to a quantile ``window``, then draw ``count``."""
        candidates = list(range(len(self)))
        if sources:
            missing = set(sources) - set(self.sources)
            if missing:
                raise AdaPrunerError(f"the pool has no {sorted(missing)} samples: it holds {self.source_names()}")
            candidates = [i for i in candidates if self.sources[i] in sources]
        if window:
            candidates = self.quantile_window(window[0], window[1], window[2], candidates)
        return self.random_subset(count, seed, candidates)


def build_pool(
    tokenizer: PreTrainedTokenizerBase,
    sources: str | list[str],
    per_source: int,
    seq_len: int,
    seed: int = 0,
) -> CalibrationPool:
    """``per_source`` windows of ``seq_len`` tokens from the calibration split of each source."""
    names = split_sources(sources)
    parts = [sample_calibration(tokenizer, name, per_source, seq_len, seed) for name in names]
    labels = [name for name in names for _ in range(per_source)]
    ids = torch.cat(parts)
    pool = CalibrationPool(ids, labels, seq_len, seed)
    pool.stats["tokens"] = torch.full((len(pool),), float(seq_len))
    return pool
