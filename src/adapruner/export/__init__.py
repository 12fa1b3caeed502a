"""Exports for inference engines: GGUF for llama.cpp (per-layer widths as its ``deci`` architecture)."""

from .gguf import ExportResult, check_export_request, default_gguf_name, export_gguf, gguf_layers

__all__ = ["ExportResult", "check_export_request", "default_gguf_name", "export_gguf", "gguf_layers"]
