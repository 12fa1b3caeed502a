"""Distributed search on PostgreSQL: two workers share one study, its budget and its baseline.

The tests run a throwaway PostgreSQL server (initdb + pg_ctl, as the ``postgres`` user when run as
root) on 127.0.0.1 and a free port. Without server binaries they fail (``make postgres`` installs
them); ``ADAPRUNER_SKIP_POSTGRES=1`` skips them instead.
"""

from __future__ import annotations

import glob
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from adapruner.cli import app

SKIP = os.environ.get("ADAPRUNER_SKIP_POSTGRES") == "1"
RUNNING_STATES = {"RUNNING", "WAITING"}
FINISHED_STATES = {"COMPLETE", "PRUNED"}


def _server_binaries() -> Path | None:
    """The directory with initdb, pg_ctl and postgres: from PATH, else the newest Debian install."""
    found = shutil.which("initdb")
    if found and (Path(found).resolve().parent / "pg_ctl").exists():
        return Path(found).resolve().parent
    installs = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    if installs:
        return Path(max(installs, key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)).parent
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_server():
    """A PostgreSQL server for this module: yields ``postgresql://postgres@127.0.0.1:PORT``."""
    if SKIP:
        pytest.skip("ADAPRUNER_SKIP_POSTGRES=1")
    pytest.importorskip("psycopg2", reason="psycopg2 is in the dev extra: pip install -e '.[dev]'")
    bin_dir = _server_binaries()
    if bin_dir is None:
        pytest.fail(
            "PostgreSQL server binaries (initdb, pg_ctl) not found in PATH nor /usr/lib/postgresql/*/bin: "
            "run `make postgres` (apt-get install postgresql) or set ADAPRUNER_SKIP_POSTGRES=1 to skip",
            pytrace=False,
        )
    as_postgres: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="adapruner-pg-"))  # not under pytest's 0700 tmp: postgres must enter it
    if os.geteuid() == 0:  # postgres refuses to run as root
        runuser = shutil.which("runuser")
        as_postgres = [runuser, "-u", "postgres", "--"] if runuser else ["su", "postgres", "-s", "/bin/sh", "-c"]
        shutil.chown(root, "postgres")

    def run_pg(*args: str) -> subprocess.CompletedProcess:
        cmd = [str(a) for a in args]
        cmd = [*as_postgres, shlex.join(cmd)] if as_postgres[:1] == ["su"] else [*as_postgres, *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)

    data, port = root / "data", _free_port()
    init = run_pg(bin_dir / "initdb", "-D", data, "-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C", "-N")
    assert init.returncode == 0, f"initdb failed: {init.stderr}"
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off -c synchronous_commit=off"
    start = run_pg(bin_dir / "pg_ctl", "-D", data, "-l", root / "server.log", "-w", "-t", "60", "-o", options, "start")
    if start.returncode != 0:
        log = (root / "server.log").read_text() if (root / "server.log").exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"pg_ctl start failed: {start.stderr}{start.stdout}\n{log}", pytrace=False)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}"
    finally:
        run_pg(bin_dir / "pg_ctl", "-D", data, "stop", "-m", "immediate")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def database(postgres_server) -> str:
    """A new, empty database on the server: its URL."""
    import psycopg2

    name = f"adapruner_{uuid.uuid4().hex[:12]}"
    conn = psycopg2.connect(f"{postgres_server}/postgres")
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name}")
    conn.close()
    return f"{postgres_server}/{name}"


def _space_file(root: Path) -> Path:
    """The small space of tests/test_search.py, as a --config file."""
    path = root / "space.yaml"
    path.write_text(
        f"sources: ['{root / 'corpus.txt'}']\nnum_samples: [4, 10]\nmetrics: [element1, vector, wanda_sp, l2]\n"
    )
    return path


def _worker(root: Path, url: str, study: str, trials: int, output: str) -> subprocess.Popen:
    """``adapruner search`` in its own process, with the small settings of tests/test_search.py."""
    args = [
        *(sys.executable, "-m", "adapruner.cli", "search", root / "tiny", "--ratio", "0.15"),
        *("--trials", trials, "--output", root / output, "--config", _space_file(root)),
        *("--pool-per-source", 10, "--objective-data", root / "corpus.txt", "--objective-tokens", 512),
        *("--layers", "1:3", "--storage", url, "--study", study),
    ]
    env = os.environ | {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    with (root / f"{output}.log").open("w") as log:
        return subprocess.Popen([str(a) for a in args], stdout=log, stderr=subprocess.STDOUT, env=env)


def _wait(proc: subprocess.Popen, root: Path, output: str, timeout: float = 600) -> None:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log = (root / f"{output}.log").read_text()
    assert proc.returncode == 0, f"worker {output} exited with {proc.returncode}:\n{log[-4000:]}"


def _direct(url: str) -> str:
    """The URL for this process's own Optuna calls: SQLAlchemy >= 2.1 reads postgresql:// as psycopg 3."""
    return url.replace("postgresql://", "postgresql+psycopg2://", 1)


def _trials(url: str, study: str):
    import optuna

    return optuna.load_study(study_name=study, storage=_direct(url)).get_trials(deepcopy=False)


def _baseline(root: Path) -> dict:
    from adapruner.search import load_space
    from adapruner.search.space import baseline_params

    return baseline_params(load_space(_space_file(root)))


def test_two_workers_share_one_study_and_its_budget(tiny_model_dir, database):
    """Two workers started together: N finished trials in all (at most one over), baseline once, both work."""
    import psycopg2

    from adapruner.search.storage import _lock_id

    root, study, n = tiny_model_dir, "shared", 8
    # Hold the study's lock while the workers start: both then load the model and wait for it, and enter
    # the search within milliseconds of each other (the race on the baseline), whatever their start-up.
    lock = _lock_id(f"study:{study}")
    gate = psycopg2.connect(database)
    gate.autocommit = True
    with gate.cursor() as cur:
        cur.execute("SELECT pg_advisory_lock(%s)", (lock,))
    started = time.perf_counter()
    workers = {name: _worker(root, database, study, n, name) for name in ("run_a", "run_b")}
    try:
        waiting = 0
        while waiting < 2:
            assert time.perf_counter() - started < 300, "the workers never reached the study"
            for name, proc in workers.items():
                assert proc.poll() is None, f"{name} exited early:\n{(root / f'{name}.log').read_text()[-4000:]}"
            time.sleep(0.5)
            with gate.cursor() as cur:
                cur.execute(  # a 64-bit advisory lock shows as classid (high 32 bits) and objid (low 32 bits)
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                    " AND classid = %s::bigint::oid AND objid = %s::bigint::oid",
                    ((lock >> 32) & 0xFFFFFFFF, lock & 0xFFFFFFFF),
                )
                waiting = cur.fetchone()[0]
    finally:
        gate.close()  # releases the lock
    for name, proc in workers.items():
        _wait(proc, root, name)

    trials = _trials(database, study)
    states = [t.state.name for t in trials]
    finished = [t for t in trials if t.state.name in FINISHED_STATES]
    # each worker stops when the study holds n finished trials; the other's trial in flight still ends
    assert n <= len(finished) <= n + 1, states
    assert [t.number for t in trials] == list(range(len(trials)))  # unique and contiguous
    assert not RUNNING_STATES & set(states), states
    baseline = _baseline(root)
    assert trials[0].params == baseline and trials[0].state.name == "COMPLETE"
    assert sum(t.params == baseline for t in trials) == 1  # enqueued once, run once
    host = socket.gethostname()
    ran = [t.user_attrs.get("worker") for t in finished]
    for proc in workers.values():
        assert ran.count(f"{host}:{proc.pid}") >= 1, ran  # both workers ran trials
    assert set(ran) == {f"{host}:{proc.pid}" for proc in workers.values()}
    for name in workers:  # each worker's run directory describes the whole study
        assert (root / name / "best.json").exists() and (root / name / "trials.csv").exists()


def test_stale_trial_of_a_dead_worker_is_failed_and_retried(tiny_model_dir, database):
    """A RUNNING trial whose heartbeat stopped long ago is failed and its parameters run again."""
    import optuna
    import sqlalchemy

    root, study_name = tiny_model_dir, "stale"
    _wait(_worker(root, database, study_name, 2, "run_a"), root, "run_a")
    # a worker that died mid-trial: RUNNING, last heartbeat an hour ago
    study = optuna.load_study(study_name=study_name, storage=_direct(database))
    done = study.trials[-1]
    orphan = study.ask(fixed_distributions=done.distributions)
    storage = optuna.storages.RDBStorage(_direct(database))
    storage.record_heartbeat(orphan._trial_id)
    with storage.engine.begin() as conn:
        conn.execute(
            sqlalchemy.text("UPDATE trial_heartbeats SET heartbeat = now() - interval '1 hour' WHERE trial_id = :id"),
            {"id": orphan._trial_id},
        )
    storage.engine.dispose()

    _wait(_worker(root, database, study_name, 4, "run_b"), root, "run_b")
    trials = _trials(database, study_name)
    states = [t.state.name for t in trials]
    assert states[orphan.number] == "FAIL" and not RUNNING_STATES & set(states), states
    assert len([t for t in trials if t.state.name in FINISHED_STATES]) == 4  # the orphan is not counted
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == orphan.number]
    assert len(retries) == 1 and retries[0].state.name in FINISHED_STATES
    assert {k: retries[0].params[k] for k in orphan.params} == orphan.params  # its parameters were run again
    assert [t.number for t in trials] == list(range(len(trials)))


def test_unreachable_or_malformed_storage_fails_before_the_model_loads(tmp_path):
    """One line, exit 2, about the storage: the model path does not even exist."""
    import adapruner.search.study  # noqa: F401  (imported before the clock starts)

    runner = CliRunner()
    for url, reason in (
        ("postgresql://127.0.0.1:1/x", "Connection refused"),
        ("not a url", "Could not parse"),
    ):
        started = time.perf_counter()
        args = ["search", tmp_path / "no-model", "--ratio", 0.15, "--output", tmp_path / "run", "--storage", url]
        result = runner.invoke(app, [*map(str, args), "--study", "s"])
        assert result.exit_code == 2, result.output
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and errors[0].startswith(f"error: cannot reach storage URL {url}: "), result.output
        assert reason in errors[0] and "Traceback" not in result.output
        assert not (tmp_path / "run").exists()  # nothing half-written: no empty --output folder
        assert time.perf_counter() - started < 15
