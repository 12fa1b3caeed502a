"""Where AdaPruner keeps fetched models and data (outside git)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Root of the asset cache: ``$ADAPRUNER_CACHE`` or ``~/.cache/adapruner``."""
    root = os.environ.get("ADAPRUNER_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "adapruner"


def models_dir() -> Path:
    return cache_dir() / "models"


def data_dir() -> Path:
    return cache_dir() / "data"
