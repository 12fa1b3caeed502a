"""Saving pruned models as ordinary Hugging Face directories, atomically.

A pruned model directory holds safetensors weights, config, tokenizer and generation config, plus
``adapruner.json`` (what was done). Mixed per-layer sizes add ``modeling_adapruner.py`` and an
``auto_map`` so ``trust_remote_code=True`` loads it without AdaPruner installed.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ..errors import AdaPrunerError
from . import hf_modeling

RECORD_FILE = "adapruner.json"
MODELING_FILE = "modeling_adapruner.py"


def check_output_dir(output: Path, overwrite: bool) -> None:
    """Fail before any work if ``output`` cannot be (re)written."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise AdaPrunerError(f"output {output} exists and is not a directory: choose another --output")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise AdaPrunerError(
            f"output directory {output} already holds another run: choose a new --output or pass --overwrite"
        )
    parent = output.resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise AdaPrunerError(
            f"output {output} is not writable (no write permission on {parent}): choose another --output"
        )


@contextmanager
def atomic_output_dir(output: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``output``; it replaces ``output`` only if the block succeeds."""
    output = Path(output)
    check_output_dir(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        yield tmp
        if output.exists():
            old = output.with_name(f".{output.name}.old-{os.getpid()}")
            output.rename(old)
            tmp.rename(output)
            shutil.rmtree(old)
        else:
            tmp.rename(output)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temporary file and rename it, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def write_csv_atomic(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())


def _add_modeling_file(directory: Path, model_type: str) -> None:
    cls = hf_modeling.PRUNED_CLASSES[model_type]
    shutil.copyfile(hf_modeling.__file__, directory / MODELING_FILE)
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
