"""Rotary embeddings as llama.cpp reads them: the theta and scaling a config asks for (refused in one line
where llama.cpp's export is not written yet), Llama 3.1's per-frequency factors, and q/k rows moved between
transformers' rotate-half order and the pair order of llama.cpp's "normal" rotary embedding."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..errors import AdaPrunerError


def rope_settings(config: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """(rope theta, scaling parameters) from transformers 5's ``rope_parameters`` or the older keys."""
    params = dict(config.get("rope_parameters") or {})
    scaling = dict(config.get("rope_scaling") or {})
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    merged = scaling | params | {"rope_type": kind}
    if kind not in ("default", "linear", "llama3"):
        raise AdaPrunerError(
            f"rotary scaling '{kind}' is not exported yet (default, linear and llama3 are): "
            "open an issue with the model id"
        )
    return float(theta), merged


def llama3_rope_factors(rope: dict[str, Any], head_dim: int, theta: float) -> np.ndarray:
    """Per-frequency divisors of Llama 3.1's rotary scaling, the ``rope_freqs`` tensor llama.cpp reads."""
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    original = float(rope.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = original / low, original / high
    divisors = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi / (1.0 / theta ** (i / head_dim))
        if wavelen < high_wavelen:
            divisors.append(1.0)
        elif wavelen > low_wavelen:
            divisors.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            divisors.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(divisors, dtype=np.float32)


def to_pair_rope(rows: np.ndarray, heads: int) -> np.ndarray:
    """Reorder each head's rows from rotate-half order (x0..x_{d/2-1}, y0..) to pairs (x0, y0, x1, y1, ...)."""
    shape = rows.shape
    return rows.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def from_pair_rope(rows: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of :func:`to_pair_rope` (the tests read exported q/k rows back with it)."""
    shape = rows.shape
    return rows.reshape(heads, shape[0] // heads // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)
