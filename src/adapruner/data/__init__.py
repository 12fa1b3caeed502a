"""Text sources (offline, hub, local files) and the token tensors built from them."""

from adapruner.data.calibration import (
    WindowCounts,
    mixture_counts,
    sample_calibration,
    sample_mixture,
    split_sources,
    token_stream,
)
from adapruner.data.sources import (
    HUB_SOURCES,
    OFFLINE_SOURCES,
    SOURCES,
    SPLITS,
    available_sources,
    load_documents,
    split_documents,
)

__all__ = [
    "HUB_SOURCES",
    "OFFLINE_SOURCES",
    "SOURCES",
    "SPLITS",
    "WindowCounts",
    "available_sources",
    "load_documents",
    "mixture_counts",
    "sample_calibration",
    "sample_mixture",
    "split_documents",
    "split_sources",
    "token_stream",
]
