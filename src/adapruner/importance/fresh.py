"""Activation statistics of fresh calibration windows, one pass per source, shared by every source mix.

A mix of sources takes an even share of windows from each (``data.mixture_counts``), so its
statistics are the rows of its sources' passes put together. Each source's windows are run in
batches of ``BATCH`` from its first window; a draw with the same seed whose first batches are the
same windows (a smaller share of a source, e.g. 64 of 128 wiki windows, when the sampler draws a
prefix) reuses those batches' rows, and a larger share only runs the batches it adds. Over a search
each source therefore costs about one pass of its largest share, whatever mixes the trials ask for.
``adapruner prune`` runs the same code without reuse: same batches, same rows, so a search trial
and its ``prune --from-run`` read bitwise-equal activations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..data import mixture_counts, sample_calibration
from .base import Statistics
from .collector import collect_statistics

BATCH = 16  # windows per forward pass; also the unit of reuse between draws


@dataclass
class _Run:
    """Windows already run for one (source, length, seed), a whole number of batches, and their rows."""

    ids: torch.Tensor
    stats: Statistics


def concat_rows(parts: list[Statistics]) -> Statistics:
    """The activation step tables of several passes as one (rows stacked in order)."""
    if len(parts) == 1:
        return parts[0]
    modules = parts[0].act_sum.keys()
    return Statistics(
        act_sum={m: torch.cat([p.act_sum[m] for p in parts]) for m in modules},
        act_sq={m: torch.cat([p.act_sq[m] for p in parts]) for m in modules},
        tokens=torch.cat([p.tokens for p in parts]),
        num_samples=sum(p.num_samples for p in parts),
    )


def _head(stats: Statistics, batches: int, samples: int) -> Statistics:
    return Statistics(
        act_sum={m: v[:batches] for m, v in stats.act_sum.items()},
        act_sq={m: v[:batches] for m, v in stats.act_sq.items()},
        tokens=stats.tokens[:batches],
        num_samples=samples,
    )


class FreshWindows:
    """Input sums and squares of ``modules`` over fresh windows (forward passes only), memoised if ``reuse``."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, modules: list[str], reuse: bool = True) -> None:
        self.model, self.tokenizer, self.modules, self.reuse = model, tokenizer, modules, reuse
        self._runs: dict[tuple[str, int, int], list[_Run]] = {}
        self._tails: dict[tuple[str, int, int, int], Statistics] = {}
        self.windows_run = 0  # forward-passed windows so far: what reuse saves shows here

    def _pass(self, windows: torch.Tensor) -> Statistics:
        self.windows_run += windows.shape[0]
        return collect_statistics(self.model, windows, self.modules, {"activations"}, batch_size=BATCH)

    def statistics(self, sources: str | list[str], count: int, length: int, seed: int) -> Statistics:
        """``count`` windows of ``length`` tokens spread over ``sources`` (as ``sample_mixture`` draws them)."""
        parts = [self.for_source(name, n, length, seed) for name, n in mixture_counts(sources, count)]
        return concat_rows(parts)

    def for_source(self, source: str, count: int, length: int, seed: int) -> Statistics:
        windows = sample_calibration(self.tokenizer, source, count, length, seed)
        whole = count - count % BATCH
        parts = [self._whole_batches(source, length, seed, windows[:whole])] if whole else []
        if whole < count:  # the last, partial batch: a pass of its own, as collect_statistics makes it
            key = (source, length, seed, count)
            tail = self._tails.get(key) if self.reuse else None
            if tail is None:
                tail = self._pass(windows[whole:])
                if self.reuse:
                    self._tails[key] = tail
            parts.append(tail)
        return concat_rows(parts)

    def _whole_batches(self, source: str, length: int, seed: int, windows: torch.Tensor) -> Statistics:
        if not self.reuse:
            return self._pass(windows)
        runs = self._runs.setdefault((source, length, seed), [])
        for run in runs:
            shared = min(run.ids.shape[0], windows.shape[0])
            if torch.equal(run.ids[:shared], windows[:shared]):  # this draw starts with the windows run so far
                if windows.shape[0] > shared:
                    run.stats = concat_rows([run.stats, self._pass(windows[shared:])])
                    run.ids = windows
                return _head(run.stats, windows.shape[0] // BATCH, windows.shape[0])
        runs.append(_Run(windows, self._pass(windows)))  # another draw (the sampler's k-dependent path)
        return runs[-1].stats
