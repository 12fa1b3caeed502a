"""Writing outputs so that a reader never sees half of one: every file and directory AdaPruner writes is
built under a temporary name beside its destination and renamed when complete. Below every room (the
CLI, the pipeline, the search, pruning, recovery and export all write through it)."""

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

from .errors import AdaPrunerError


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


def save_tensors_atomic(tensors: dict, path: Path, metadata: dict[str, str]) -> None:
    """A safetensors file written to a temporary sibling and renamed: complete or absent, never half-written."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def temporary_file(output: Path) -> Iterator[Path]:
    """A fresh name beside ``output`` (same file system, so the final rename is atomic), removed on exit."""
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".partial", dir=output.resolve().parent)
    os.close(fd)
    try:
        yield Path(tmp)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
