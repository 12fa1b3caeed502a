"""The calibration text a recipe draws, checked before any weight loads: gradient samples, fresh
activation windows and the layer-by-layer refit's windows, each against what its sources hold."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from ..data import sample_mixture
from ..data.calibration import WindowCounts, split_sources
from ..errors import AdaPrunerError
from ..importance import Statistics
from ..importance.fresh import FreshWindows
from ..util import log
from .config import REFIT_LENGTHS, REFIT_TOKENS, Allocation, Recipe, parse_windows


def activation_statistics(
    model: torch.nn.Module, tokenizer: Any, modules: list[str], sources: str, windows: str, seed: int
) -> Statistics:
    """Input sums and squares of ``modules`` over fresh calibration windows: forward passes, no gradient.

    The batches a search's shared ``FreshWindows`` runs, without the sharing.
    """
    return FreshWindows(model, tokenizer, modules, reuse=False).statistics(sources, *parse_windows(windows), seed)


def refit_windows(tokenizer: Any, cfg: Recipe) -> torch.Tensor:
    """The calibration windows of the layer-by-layer engine: ``refit_calibration`` of ``calibration``."""
    count, length = parse_windows(cfg.refit_calibration or default_refit_calibration(tokenizer, cfg.calibration))
    return sample_mixture(tokenizer, cfg.calibration, count, length, seed=cfg.fresh_seed)


def default_refit_calibration(tokenizer: Any, sources: str, windows: WindowCounts | None = None) -> str:
    """The refit windows when ``--refit-calibration`` is not given: REFIT_TOKENS tokens of ``sources`` in the
    longest of REFIT_LENGTHS that they offer enough windows of. 128x128 suits wiki, news and squad, but
    books' passages hold ~80 tokens (17 windows of 128), so its refit runs on 256x64."""
    windows = windows or WindowCounts(tokenizer)
    for length in REFIT_LENGTHS:
        if windows.fits(sources, REFIT_TOKENS // length, length):
            return f"{REFIT_TOKENS // length}x{length}"
    lengths = ", ".join(map(str, REFIT_LENGTHS))
    raise AdaPrunerError(
        f"--calibration {sources} has too little text for the default refit windows ({REFIT_TOKENS:,} tokens in "
        f"windows of {lengths} tokens): give a smaller --refit-calibration NxL or another --calibration"
    )


def check_calibration(
    tokenizer: Any,
    cfg: Recipe,
    allocation: Allocation | None = None,
    samples_given: bool = False,
    refit: bool = True,
) -> Recipe:
    """``cfg`` with its default refit windows chosen, once every calibration draw it will make fits its sources.

    It needs only the tokenizer, so a source too small for the asked windows fails before the weights load
    and the scoring runs, with a one-line error naming the option that fixes it. ``samples_given``: the
    gradient samples come from a search's pool (``--from-run``), not from ``calibration``; ``refit=False``:
    scores only (``importance``), no refit windows are drawn. A per-layer ``allocation`` scores nothing: only
    its refit windows are drawn.
    """
    windows = WindowCounts(tokenizer)
    if allocation is None:
        fresh = cfg.fresh_activations()
        if not samples_given and cfg.statistic_needs() - ({"activations"} if fresh else set()):
            _check_draw(windows, cfg.calibration, cfg.num_samples, cfg.seq_len, None)
        if fresh:
            count, length = parse_windows(cfg.activation_calibration)
            _check_draw(windows, cfg.calibration, count, length, "--activation-calibration")
    if not refit or (allocation is None and not cfg.uses_local_engine):
        return cfg
    if cfg.refit_calibration is not None:
        _check_draw(windows, cfg.calibration, *parse_windows(cfg.refit_calibration), "--refit-calibration")
        return cfg
    chosen = default_refit_calibration(tokenizer, cfg.calibration, windows)
    log(f"refit windows: {chosen} of {cfg.calibration} (--refit-calibration NxL to change)")
    return replace(cfg, refit_calibration=chosen)


def _check_draw(windows: WindowCounts, sources: str, count: int, length: int, option: str | None) -> None:
    """``count`` windows of ``length`` tokens of ``sources`` exist, or a one-line error that names the option
    to change: ``option`` (an NxL option), or --num-samples/--seq-len for the gradient samples (None)."""
    asked = f"{option} {count}x{length}" if option else f"--num-samples {count} x --seq-len {length}"
    names = split_sources(sources)
    if count < len(names):
        raise AdaPrunerError(f"{asked} cannot cover the {len(names)} sources of --calibration: ask for more windows")
    missing = windows.shortfall(sources, count, length)
    if missing is None:
        return
    source, have, need = missing
    shorter = [length // 2**k for k in range(1, length.bit_length()) if length // 2**k >= 2]
    if option:  # as many tokens in shorter windows
        sizes = [(count * length // n, n) for n in shorter]
        fit = next((f"{c}x{n}" for c, n in sizes if windows.fits(sources, c, n)), None)
        fix = f"give {option} {fit}" if fit else f"give a smaller {option}"
    else:
        fit = next((f"{n}" for n in shorter if windows.fits(sources, count, n)), None)
        fix = f"use --seq-len {fit} or fewer --num-samples" if fit else "use fewer --num-samples or a shorter --seq-len"
    raise AdaPrunerError(
        f"source '{source}' has only {have} windows of {length} tokens in its calibration split and {asked} needs "
        f"{need}: {fix}, or another --calibration"
    )
