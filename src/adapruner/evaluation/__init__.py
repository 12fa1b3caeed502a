"""Evaluation: perplexity now; zero-shot tasks through lm-evaluation-harness later."""

from .perplexity import perplexity

__all__ = ["perplexity"]
