"""A recovery run's work directory: checkpoints to resume from after ``kill -9``, and the marker that says
which run they belong to (its settings, and the learning rates that diverged so far)."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

from ..errors import AdaPrunerError
from ..files import write_json_atomic
from .config import FinetuneConfig
from .data import TrainingData

WORK_MARKER = "adapruner-finetune.json"
# Settings that may change between an interrupted run and its resumption.
RESUMABLE_CHANGES = (
    "max_steps",
    "tokens",
    "save_steps",
    "eval_steps",
    "logging_steps",
    "keep_adapter",
    "divergence",
    "lr_retries",
)
BACKOFF_KEY = "lr_backoff"  # in the work marker: the learning rates that diverged, so a resumed run keeps the lower one


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def run_identity(model_dir: Path, data: TrainingData, cfg: FinetuneConfig, targets: list[str], teacher: str | None):
    settings = {k: v for k, v in asdict(cfg).items() if k not in RESUMABLE_CHANGES}
    identity = {
        "model_dir": str(model_dir),
        "data": data.source,
        "data_fingerprint": data.fingerprint,
        "config": settings | {"target_modules": targets},
        "teacher": teacher,
        "world_size": world_size(),
    }
    return json.loads(json.dumps(identity))  # as it reads back from the marker file


def prepare_work_dir(work: Path, identity: dict, backoff: list[dict]) -> tuple[str | None, list[dict]]:
    """Check ``work`` belongs to this fine-tune: the last checkpoint to resume from, if any, and the learning
    rates that diverged so far (``backoff``, or those an interrupted run recorded)."""
    from transformers.trainer_utils import get_last_checkpoint

    marker = work / WORK_MARKER
    if marker.is_file():
        try:
            previous = json.loads(marker.read_text())
        except json.JSONDecodeError:
            previous = None
        stored = previous.pop(BACKOFF_KEY, []) if isinstance(previous, dict) else []
        if previous != identity:
            diff = sorted(k for k in identity if previous.get(k) != identity[k]) if isinstance(previous, dict) else []
            raise AdaPrunerError(
                f"checkpoint directory {work} holds another fine-tune (different {', '.join(diff) or 'settings'}): "
                "remove it to start over, or pass another --checkpoint-dir"
            )
        backoff = backoff or stored
    elif work.is_dir() and any(p.name.startswith("checkpoint-") for p in work.iterdir()):
        raise AdaPrunerError(
            f"checkpoint directory {work} holds checkpoints not written by `adapruner finetune`: "
            "remove it or pass another --checkpoint-dir"
        )
    last = get_last_checkpoint(str(work)) if work.is_dir() else None
    if is_main_process():
        write_json_atomic(marker, identity | {BACKOFF_KEY: backoff})
    return last, backoff


def remove_work_dir(work: Path) -> None:
    """Remove our checkpoints and marker; the directory itself only if nothing else is left in it."""
    if not work.is_dir():
        return
    for path in work.iterdir():
        if path.name.startswith("checkpoint-") and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
    (work / WORK_MARKER).unlink(missing_ok=True)
    if not any(work.iterdir()):
        work.rmdir()
