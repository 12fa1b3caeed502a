"""Small shared helpers: user-facing status lines, option files."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from .errors import AdaPrunerError

console = Console(stderr=True, highlight=False)


def log(message: str) -> None:
    """A status line on stderr, so stdout stays clean for tables and JSON."""
    console.print(f"[dim]adapruner[/dim] {message}")


def read_options_file(path: str | Path, options: type, what: str) -> dict[str, Any]:
    """The mapping in a YAML file whose keys must be fields of the dataclass ``options``."""
    path = Path(path)
    if not path.is_file():
        raise AdaPrunerError(f"{what} {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise AdaPrunerError(f"{path} is not valid YAML ({str(exc).splitlines()[0]})") from None
    known = {f.name for f in fields(options)}
    unknown = sorted(set(data) - known) if isinstance(data, dict) else ["(not a mapping)"]
    if unknown:
        raise AdaPrunerError(f"{path}: unknown key(s) {unknown}; known: {', '.join(sorted(known))}")
    return data


def versions() -> dict[str, str]:
    """Library versions recorded in every output (adapruner.json, fine-tuning records)."""
    import platform

    import torch
    import transformers

    from . import __version__

    return {
        "adapruner": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
