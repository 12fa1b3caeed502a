"""Token tensors for pruning: random calibration windows and contiguous streams for perplexity."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import torch

from adapruner.data.sources import load_documents
from adapruner.errors import AdaPrunerError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def sample_calibration(
    tokenizer: PreTrainedTokenizerBase, source: str, num_samples: int, seq_len: int, seed: int = 0
) -> torch.LongTensor:
    """``[num_samples, seq_len]`` token windows drawn LLM-Pruner style from the calibration split.

    Every document offers its non-overlapping ``seq_len`` windows (``doc_len // seq_len`` slots);
    ``num_samples`` slots are drawn without replacement with ``random.Random(seed)``, so samples
    never span two documents, never repeat, and the same seed gives the same batch.
    """
    if num_samples < 1 or seq_len < 1:
        raise AdaPrunerError(f"num_samples and seq_len must be at least 1, got {num_samples} and {seq_len}")
    documents = _encode(tokenizer, load_documents(source, "calibration"))
    slots = [(doc, start) for doc, ids in enumerate(documents) for start in range(0, len(ids) - seq_len + 1, seq_len)]
    if len(slots) < num_samples:
        raise AdaPrunerError(
            f"source '{source}' has only {len(slots)} windows of {seq_len} tokens in its calibration split; "
            "ask for fewer samples or shorter --seq-len"
        )
    chosen = random.Random(seed).sample(slots, num_samples)
    return torch.tensor([documents[doc][start : start + seq_len] for doc, start in chosen], dtype=torch.long)


def split_sources(spec: str | list[str]) -> list[str]:
    """``"books,wiki"`` -> ["books", "wiki"]; an empty spec is an error."""
    sources = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    sources = [s for s in sources if s]
    if not sources:
        raise AdaPrunerError("no calibration source given: use e.g. --calibration books or books,wiki")
    return sources


def sample_mixture(
    tokenizer: PreTrainedTokenizerBase, sources: str | list[str], num_samples: int, seq_len: int, seed: int = 0
) -> torch.LongTensor:
    """``num_samples`` windows spread evenly over several sources (the first ones take the remainder)."""
    parts = [sample_calibration(tokenizer, name, n, seq_len, seed) for name, n in mixture_counts(sources, num_samples)]
    return torch.cat(parts)


def mixture_counts(sources: str | list[str], num_samples: int) -> list[tuple[str, int]]:
    """How many of ``num_samples`` windows each source gives: an even share, the first ones take the remainder."""
    names = split_sources(sources)
    if num_samples < len(names):
        raise AdaPrunerError(f"{num_samples} samples cannot cover {len(names)} sources: ask for more samples")
    share, extra = divmod(num_samples, len(names))
    return [(name, share + (i < extra)) for i, name in enumerate(names)]


class WindowCounts:
    """How many ``sample_calibration`` windows each source offers, from its calibration split tokenized once.

    It needs only the tokenizer, so a prune can check every draw before loading the weights: a source too
    small for the asked windows would otherwise fail only after the model is loaded and scored.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self._lengths: dict[str, list[int]] = {}

    def available(self, source: str, seq_len: int) -> int:
        """Non-overlapping ``seq_len`` windows of the calibration split (windows never span two documents)."""
        if source not in self._lengths:
            documents = _encode(self.tokenizer, load_documents(source, "calibration"))
            self._lengths[source] = [len(ids) for ids in documents]
        return sum(length // seq_len for length in self._lengths[source])

    def shortfall(self, sources: str | list[str], num_samples: int, seq_len: int) -> tuple[str, int, int] | None:
        """The first source that cannot give its share of ``num_samples`` windows: (source, has, needs)."""
        for name, share in mixture_counts(sources, num_samples):
            have = self.available(name, seq_len)
            if have < share:
                return name, have, share
        return None

    def fits(self, sources: str | list[str], num_samples: int, seq_len: int) -> bool:
        return len(split_sources(sources)) <= num_samples and self.shortfall(sources, num_samples, seq_len) is None


def token_stream(
    tokenizer: PreTrainedTokenizerBase, source: str, split: str, max_tokens: int | None = None
) -> torch.LongTensor:
    """The split's documents joined with blank lines as one 1-D token tensor, for perplexity."""
    if max_tokens is not None and max_tokens < 1:
        raise AdaPrunerError(f"max_tokens must be at least 1 or None, got {max_tokens}")
    text = "\n\n".join(load_documents(source, split))
    if not text.strip():
        raise AdaPrunerError(f"source '{source}' has no text in its {split} split: use a source with more text")
    ids = _encode(tokenizer, [text])[0]
    return torch.tensor(ids[:max_tokens], dtype=torch.long)


def _encode(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Token ids without special tokens; ``verbose=False`` silences the max-length warning for long docs."""
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
