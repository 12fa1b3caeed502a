"""Where a study lives: SQLite in the run directory or a shared RDB (PostgreSQL) with advisory locks,
heartbeats and retries of trials a dead worker left; and the search space's fingerprint, so a study is
only ever continued with the space it was made with."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import inspect
import json
import warnings
from dataclasses import asdict
from typing import Any

import optuna
import sqlalchemy

from ..errors import AdaPrunerError
from .space import (
    SearchSpace,
)

HEARTBEAT_INTERVAL = 60  # seconds between the heartbeats a running trial writes to a shared storage
GRACE_PERIOD = 180  # a RUNNING trial silent for this long belongs to a dead worker: failed, then retried
MAX_RETRY = 3  # how many times the parameters of such a trial are run again
CONNECT_TIMEOUT = 10  # seconds to wait for a PostgreSQL server before giving up


# SearchSpace fields added after studies existed, with the value those studies ran with: at that value a
# field leaves the fingerprint as it was, so such a study continues (the default coarse_to_fine became 4
# after studies ran with 1: continue one of those with `coarse_to_fine: 1` in the space config)
LATER_FIELDS = {"uniform": False, "coarse_to_fine": 1, "align": 1}


def _fingerprinted_fields(space: SearchSpace) -> dict[str, Any]:
    return {k: v for k, v in asdict(space).items() if k not in LATER_FIELDS or v != LATER_FIELDS[k]}


def space_fields_text(space: SearchSpace) -> str:
    """The fingerprinted fields as JSON: hashed by :func:`space_fingerprint`, stored in the study."""
    return json.dumps(_fingerprinted_fields(space), sort_keys=True, default=str)


def space_fingerprint(space: SearchSpace) -> str:
    """A short hash of the search space: a study continued with another space is refused."""
    return hashlib.sha256(space_fields_text(space).encode()).hexdigest()[:12]


# the study attribute holding the space's fields, so a refusal can name what changed
SPACE_FIELDS_ATTR = "search_space_fields"


def space_change(stored_text: str | None, space: SearchSpace) -> str:
    """Why a study's space differs from ``space``: the changed fields, or (a study made before the fields
    were recorded) the likeliest cause."""
    if not stored_text:
        return (
            "search space changed; a study made before 2026-12-03 with one-level per-layer moves continues "
            "with 'coarse_to_fine: 1' in the --config space"
        )
    before = json.loads(stored_text)
    now = json.loads(space_fields_text(space))
    changed = [
        f"{k} {before.get(k, LATER_FIELDS.get(k))} -> {now.get(k, LATER_FIELDS.get(k))}"
        for k in sorted(before.keys() | now.keys())
        if before.get(k) != now.get(k)
    ]
    return "search space: " + "; ".join(changed)


def _lock_id(key: str) -> int:
    """The 64-bit PostgreSQL advisory lock id of ``key`` (the same in every worker)."""
    return int.from_bytes(hashlib.sha256(f"adapruner:{key}".encode()).digest()[:8], "big", signed=True)


@contextlib.contextmanager
def _database_lock(engine: sqlalchemy.engine.Engine, key: str):
    """A PostgreSQL advisory lock held for the block, so concurrent workers take turns.

    Held on its own connection; the server releases it when that connection closes, so a worker
    killed inside the block leaves no stale lock. No-op on other databases.
    """
    if engine.dialect.name != "postgresql":
        yield
        return
    lock_id = _lock_id(key)
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:id)"), {"id": lock_id})
        try:
            yield
        finally:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:id)"), {"id": lock_id})


def _missing(module: str) -> bool:
    return importlib.util.find_spec(module) is None


def connect(url: str) -> optuna.storages.RDBStorage:
    """A shared storage with heartbeats, connected now so that a bad URL fails before the model loads.

    Trials of a worker that stops writing heartbeats (killed, machine lost) are failed by the next
    worker that starts a trial, and their parameters queued again (at most MAX_RETRY times).
    """
    shown = url
    try:
        parsed = sqlalchemy.engine.make_url(url)
        shown = parsed.render_as_string(hide_password=True)
        engine_kwargs: dict[str, Any] = {}
        if parsed.drivername == "postgresql" and _missing("psycopg") and not _missing("psycopg2"):
            # SQLAlchemy >= 2.1 reads a bare postgresql:// as psycopg 3; adapruner[postgres] installs psycopg2
            parsed = parsed.set(drivername="postgresql+psycopg2")
            url = parsed.render_as_string(hide_password=False)
        if parsed.get_backend_name() == "postgresql":
            engine_kwargs["pool_pre_ping"] = True  # trials are long: the connection may idle out between them
            if "connect_timeout" not in parsed.query:
                engine_kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT}
        retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or (
            optuna.storages.RetryFailedTrialCallback  # optuna < 4.9
        )
        callback_arg = (
            "heartbeat_stale_trial_callback"
            if "heartbeat_stale_trial_callback" in inspect.signature(optuna.storages.RDBStorage).parameters
            else "failed_trial_callback"
        )
        probe = sqlalchemy.create_engine(parsed, **engine_kwargs)
        try:
            # Two workers creating the tables of an empty database at once collide in PostgreSQL's
            # catalog (duplicate key in pg_type): they take turns.
            with _database_lock(probe, "schema"), warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=HEARTBEAT_INTERVAL,
                    grace_period=GRACE_PERIOD,
                    **{callback_arg: retry(max_retry=MAX_RETRY)},
                )
        finally:
            probe.dispose()
    except Exception as exc:
        missing_driver = isinstance(exc, ImportError)
        cause = (exc.__cause__ or exc) if missing_driver else (getattr(exc, "orig", None) or exc)
        lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
        reason = lines[0] if lines else type(cause).__name__
        hint = (
            ('pip install "adapruner[postgres]"' if "postgres" in shown else "install its database driver")
            if missing_driver
            else "check that the server runs, that the database exists and the URL "
            "(dialect://user[:password]@host[:port]/database)"
        )
        raise AdaPrunerError(f"cannot reach storage URL {shown}: {reason}; {hint}") from None


def open_study(
    storage: str | optuna.storages.RDBStorage,
    name: str,
    sampler,
    identity: dict[str, str],
    starts: list[dict[str, Any]],
    space: SearchSpace,
) -> optuna.Study:
    """Create or load the study, check it was made for this setting, enqueue the start trials if it is new.

    ``starts`` are Optuna parameters: LLM-Pruner's recipe (trial 0), then the warm starts.

    Workers that start together would each see an empty study and enqueue the baseline (a check,
    then a write: a race). On PostgreSQL they take turns under an advisory lock, so the baseline is
    enqueued exactly once and always becomes trial 0, before any worker asks for a trial; the lock
    also makes writing the identity attributes race-free. (A study user attribute cannot serve as
    the lock: setting one is an upsert, not a compare-and-set.) Other shared databases get no lock:
    there two workers starting within milliseconds may both enqueue the baseline, run twice, harmlessly.
    """
    engine = getattr(storage, "engine", None)
    lock = _database_lock(engine, f"study:{name}") if engine is not None else contextlib.nullcontext()
    with lock:
        try:
            study = optuna.create_study(
                storage=storage, study_name=name, direction="minimize", sampler=sampler, load_if_exists=True
            )
        except Exception as exc:
            shown = storage if isinstance(storage, str) else storage.engine.url.render_as_string(hide_password=True)
            raise AdaPrunerError(f"cannot open the study in {shown}: {str(exc).splitlines()[0]}") from None
        stored = {k: study.user_attrs.get(k) for k in identity}
        if all(v is None for v in stored.values()):
            for key, value in {**identity, SPACE_FIELDS_ATTR: space_fields_text(space)}.items():
                study.set_user_attr(key, value)
        elif stored != identity:
            diff = [f"{k}: {stored[k]} != {identity[k]}" for k in identity if stored[k] != identity[k]]
            if stored.get("search_space") != identity.get("search_space"):
                diff.append(space_change(study.user_attrs.get(SPACE_FIELDS_ATTR), space))
            raise AdaPrunerError(
                f"study '{name}' was made for another setting ({', '.join(diff)}): use a new --output or --study"
            )
        if not study.get_trials(deepcopy=False):
            for params in starts:
                study.enqueue_trial(params)
    return study


def retry_interrupted(study: optuna.Study) -> None:
    """Trials left RUNNING by a killed process are failed and their parameters queued again.

    Only for the run directory's own SQLite study, which one process uses at a time; on a shared
    storage a RUNNING trial may belong to a live worker.
    """
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        study.enqueue_trial(trial.params, skip_if_exists=False)
