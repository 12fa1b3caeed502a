"""Exports for inference engines: GGUF for llama.cpp (per-layer widths as its ``deci`` architecture)."""

from .gguf import ExportResult, export_gguf, gguf_layers

__all__ = ["ExportResult", "export_gguf", "gguf_layers"]
