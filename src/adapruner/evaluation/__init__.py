"""Evaluation: perplexity (``perplexity``), zero-shot tasks through lm-evaluation-harness (``zeroshot``),
and the side-by-side table of result files (``compare``)."""

from .perplexity import perplexity

__all__ = ["perplexity"]
