"""Perplexity over non-overlapping windows (LLM-Pruner's protocol: 128-token windows of the test split)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.nn import functional
from tqdm.auto import tqdm

from ..errors import AdaPrunerError


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    seq_len: int = 128,
    batch_size: int = 8,
    progress: bool = True,
) -> float:
    """exp(mean next-token NLL) over ``len(tokens) // seq_len`` windows; the tail is dropped."""
    total_nll, total_tokens = 0.0, 0
    for nll, count in windowed_nll(model, windows_of(tokens, seq_len), batch_size, progress):
        total_nll += nll
        total_tokens += count
    return math.exp(total_nll / total_tokens)


GEOMEAN = "geomean"  # key prefix of the geometric mean over sources in evaluate's results ("geomean@128")


def geometric_mean(values: list[float]) -> float:
    """exp(mean log): the average of perplexities over sources, each source weighted equally."""
    if not values:
        raise AdaPrunerError("no perplexity to average")
    return math.exp(sum(math.log(v) for v in values) / len(values))


def windows_of(tokens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """``[len(tokens) // seq_len, seq_len]`` non-overlapping windows (the tail is dropped)."""
    if seq_len < 2:
        raise AdaPrunerError(f"--seq-len {seq_len} is too short for perplexity: use at least 2 (e.g. 128)")
    num_windows = tokens.numel() // seq_len
    if num_windows == 0:
        raise AdaPrunerError(f"only {tokens.numel()} tokens of text: perplexity at --seq-len {seq_len} needs more")
    return tokens[: num_windows * seq_len].view(num_windows, seq_len)


@torch.no_grad()
def windowed_nll(
    model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 8, progress: bool = False
) -> Iterator[tuple[float, int]]:
    """(summed next-token NLL, predicted tokens) per batch of windows, so callers can stop early."""
    device = next(model.parameters()).device
    batches = windows.split(batch_size)
    for batch in tqdm(batches, desc=f"perplexity@{windows.shape[1]}", disable=not progress, leave=False):
        batch = batch.to(device)
        logits = model(input_ids=batch).logits[:, :-1].float()
        nll = functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        yield nll.item(), batch[:, 1:].numel()
