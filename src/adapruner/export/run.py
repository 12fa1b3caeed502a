"""``adapruner export``: a model directory as the file an inference engine runs."""

from __future__ import annotations

from pathlib import Path

from ..errors import AdaPrunerError
from ..models.loading import resolve_location
from ..pruning.io import read_record
from .gguf import ExportResult, check_export_request, export_gguf


def export(
    model_dir: str | Path,
    output: str | Path,
    *,
    format: str = "gguf",
    quant: str = "f16",
    tokenizer_gguf: str | Path | None = None,
    overwrite: bool = False,
) -> ExportResult:
    """Write a pruned (or plain) model directory as a file an inference engine runs: GGUF for llama.cpp.

    Per-layer widths become llama.cpp's ``deci`` architecture; uniform ones keep the family's. The
    tokenizer fields come from ``tokenizer_gguf``, else from the GGUF an offline asset was converted from
    (the recorded ``source_model``), else from the Hugging Face tokenizer. See :mod:`adapruner.export.gguf`.
    """
    check_export_request(format, quant)
    return export_gguf(
        model_dir,
        output,
        quant=quant,
        tokenizer_gguf=tokenizer_gguf,
        source_dir=dense_source(Path(model_dir)),
        overwrite=overwrite,
    )


def dense_source(model_dir: Path) -> Path | None:
    """The dense model's directory, resolved as ``prune`` resolved it, if it is on this disk (its GGUF, when
    an offline asset was converted from one, gives the tokenizer fields); None otherwise."""
    if not (model_dir / "adapruner.json").is_file():
        return None
    name = read_record(model_dir).get("source_model")
    try:
        location = Path(resolve_location(name)) if name else None
    except AdaPrunerError:  # an asset not fetched here: the Hugging Face tokenizer is the fallback
        return None
    return location if location is not None and location.is_dir() else None
