"""Loading any model the user names: a fetched asset name, a local directory or a hub id."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..errors import AdaPrunerError, OfflineError
from .base import adapter_class_for
from .modeling import PRUNED_CLASSES
from .registry import resolve_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
OFFLINE_HINT = "use a fetched model (smollm2-135m, qwen2.5-0.5b: `adapruner assets fetch NAME`) or a local directory"


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).exists()


def resolve_location(name_or_path: str) -> str:
    """Asset name -> cache dir; local path -> checked path; anything else is a hub id."""
    location = resolve_model(name_or_path)
    if _looks_like_path(location):
        path = Path(location).expanduser()
        if not path.exists():
            raise AdaPrunerError(f"model path {path} does not exist: give a model directory, hub id or asset name")
        if not (path / "config.json").is_file():
            raise AdaPrunerError(f"{path} is not a model directory (no config.json): point at a saved HF model")
        return str(path)
    return location


def parse_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise AdaPrunerError(f"unknown dtype '{dtype}': choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _load_config(location: str) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(location)
    except OSError as exc:
        if Path(location).exists():
            raise AdaPrunerError(f"cannot read the config in {location}: {str(exc).splitlines()[0]}") from None
        raise OfflineError(
            f"model '{location}' is not a local directory and the Hugging Face hub could not give it "
            f"(offline or unknown id): {OFFLINE_HINT}"
        ) from None
    except ValueError as exc:  # unknown model_type and the like
        raise AdaPrunerError(f"cannot load {location}: {str(exc).splitlines()[0]}") from None


def is_pruned_dir(location: str) -> bool:
    config = Path(location) / "config.json"
    return config.is_file() and bool(json.loads(config.read_text()).get("pruned_layers"))


def load_causal_lm(name_or_path: str, dtype: str = "float32", device_map: str | dict | None = None) -> torch.nn.Module:
    """Load a causal LM; pruned directories with mixed layer sizes use the shipped pruned classes."""
    from transformers import AutoModelForCausalLM

    location = resolve_location(name_or_path)
    config = _load_config(location)
    adapter_class_for(config.model_type)  # fail early, before loading weights
    kwargs: dict[str, Any] = {"dtype": parse_dtype(dtype)}
    if device_map is not None:
        kwargs["device_map"] = device_map
    model_class = PRUNED_CLASSES[config.model_type] if is_pruned_dir(location) else AutoModelForCausalLM
    return model_class.from_pretrained(location, **kwargs).eval()


def load_tokenizer(name_or_path: str) -> Any:
    """The tokenizer alone, after the checks that need no weights (location, config, family).

    ``prune`` checks its calibration windows with it before loading the weights (fail fast).
    """
    from transformers import AutoTokenizer

    location = resolve_location(name_or_path)
    adapter_class_for(_load_config(location).model_type)
    return AutoTokenizer.from_pretrained(location)


def load_model(
    name_or_path: str, dtype: str = "float32", device_map: str | dict | None = None
) -> tuple[torch.nn.Module, Any]:
    """Load a causal LM and its tokenizer."""
    from transformers import AutoTokenizer

    model = load_causal_lm(name_or_path, dtype, device_map)
    return model, AutoTokenizer.from_pretrained(resolve_location(name_or_path))
