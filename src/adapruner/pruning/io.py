"""Saving pruned models as ordinary Hugging Face directories, atomically.

A pruned model directory holds safetensors weights, config, tokenizer and generation config, plus
``adapruner.json`` (what was done). Mixed per-layer sizes add ``modeling_adapruner.py`` and an
``auto_map`` so ``trust_remote_code=True`` loads it without AdaPruner installed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from ..errors import AdaPrunerError
from ..files import atomic_output_dir, write_json_atomic
from ..models import modeling as pruned_modeling

RECORD_FILE = "adapruner.json"
MODELING_FILE = "modeling_adapruner.py"


def _add_modeling_file(directory: Path, model_type: str) -> None:
    cls = pruned_modeling.PRUNED_CLASSES[model_type]
    shutil.copyfile(pruned_modeling.__file__, directory / MODELING_FILE)
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    config["auto_map"] = {"AutoModelForCausalLM": f"{MODELING_FILE.removesuffix('.py')}.{cls.__name__}"}
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def save_pruned(model: torch.nn.Module, tokenizer: Any, record: dict, output: Path, overwrite: bool = False) -> Path:
    """Save model + tokenizer + ``adapruner.json`` to ``output`` (complete or not at all)."""
    with atomic_output_dir(output, overwrite) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if getattr(model.config, "pruned_layers", None):
            _add_modeling_file(tmp, model.config.model_type)
        write_json_atomic(tmp / RECORD_FILE, record)
    return Path(output)


def read_record(directory: Path) -> dict:
    path = Path(directory) / RECORD_FILE
    if not path.is_file():
        raise AdaPrunerError(f"{directory} is not an AdaPruner output ({RECORD_FILE} is missing)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise AdaPrunerError(f"{path} is corrupted ({exc.msg}): prune the model again") from None
