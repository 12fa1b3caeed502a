"""Resumable stages: a stage runs unless its output exists, and its wall time is kept in a JSON file.

``adapruner run`` and the benchmark scripts share this runner, so an interrupted pipeline or a
multi-hour benchmark continues where it stopped by running the same command again.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .errors import AdaPrunerError
from .files import write_json_atomic
from .util import log


class StageTimes:
    """Wall seconds of named stages in one JSON file, written after each stage. A missing or unreadable
    file is an empty record: only timings are lost, the outputs decide what is done."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            data = {}
        self.data: dict[str, Any] = data if isinstance(data, dict) else {}

    def get(self, key: str) -> float | None:
        value = self.data.get(key)
        return float(value) if isinstance(value, int | float) else None

    def set(self, key: str, seconds: float) -> None:
        self.data[key] = round(seconds, 1)
        write_json_atomic(self.path, self.data)


class Stages:
    """Runs each stage unless it is done, and times it.

    ``keep_going``: a stage that fails (or whose inputs are missing) is listed in ``failures`` and the
    others still run (a benchmark grid); otherwise the error ends the run. ``dry_run``: nothing runs,
    the stages that would are listed in ``pending``.
    """

    def __init__(self, times: StageTimes | None = None, *, keep_going: bool = False, dry_run: bool = False) -> None:
        self.times, self.keep_going, self.dry_run = times, keep_going, dry_run
        self.failures: list[str] = []
        self.pending: list[str] = []
        self.ran = 0

    @classmethod
    def in_dir(cls, directory: Path, **options: Any) -> Stages:
        """Stages whose times go to ``directory/stages.json``."""
        return cls(StageTimes(Path(directory) / "stages.json"), **options)

    def run(
        self,
        name: str,
        done: Path | bool,
        action: Callable[[], Any],
        needs: Iterable[Path] = (),
        *,
        times: StageTimes | None = None,
        key: str | None = None,
    ) -> bool:
        """Run ``action`` unless ``done`` (an output that exists, or True); True when the stage's output
        exists now. Its seconds go to ``times`` (default: the runner's) under ``key`` (default: ``name``)."""
        if done.exists() if isinstance(done, Path) else done:
            log(f"stage {name}: done already" + (f" ({done})" if isinstance(done, Path) else ""))
            return True
        if self.dry_run:
            self.pending.append(name)
            return False
        missing = [str(p) for p in needs if not p.exists()]
        if missing:
            return self._failed(name, AdaPrunerError(f"its input {', '.join(missing)} is missing"))
        log(f"stage {name} ...")
        start = time.perf_counter()
        try:
            action()
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # with keep_going one failed stage must not end a multi-hour run
            return self._failed(name, exc)
        record = times or self.times
        if record is not None:
            record.set(key or name, time.perf_counter() - start)
        self.ran += 1
        return True

    def _failed(self, name: str, exc: Exception) -> bool:
        if not self.keep_going:
            raise exc
        if not isinstance(exc, AdaPrunerError):
            traceback.print_exc(file=sys.stderr)
        self.failures.append(f"{name}: {type(exc).__name__}: {exc}")
        return False
