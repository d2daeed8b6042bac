"""The local MLflow store: SQLite made safe for stage processes that run in parallel.

The default store is local: sqlite:///mlflow.db in the working directory. `snakemake -j N`
runs stages in parallel processes against that one file, so this module makes SQLite safe
for that: creating the store (schema migrations, the experiment) happens under a file lock
(unguarded, concurrent first runs fail with "table ... already exists"), writers wait for each
other (busy timeout) instead of failing with "database is locked", and the calls made here
retry on a locked database as a last resort.
MLFLOW_TRACKING_URI points everything at a shared tracking server instead.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy
from sqlalchemy import event

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
# How long a writer waits for another process's transaction before giving up (milliseconds).
SQLITE_BUSY_TIMEOUT_MS = 120_000
# Retries for the calls made here, on top of the busy timeout (backoff doubles from 0.1 s).
LOCKED_RETRIES = 8
T = TypeVar("T")


def _sqlite_on_connect(dbapi_conn: Any, _record: Any) -> None:
    # Wait for another process's write transaction instead of failing after pysqlite's 5 s.
    # pysqlite begins a transaction only at its first write, so a waiting writer holds no
    # read lock and SQLite always invokes this wait (it refuses to wait, returning "database
    # is locked" at once, only for a reader upgrading to a writer, which would deadlock).
    if isinstance(dbapi_conn, sqlite3.Connection):
        dbapi_conn.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")


def _install_sqlite_hardening() -> None:
    """Apply to every SQLAlchemy engine of this process (MLflow creates its own)."""
    if not event.contains(sqlalchemy.engine.Engine, "connect", _sqlite_on_connect):
        event.listen(sqlalchemy.engine.Engine, "connect", _sqlite_on_connect)


def is_locked_error(e: BaseException) -> bool:
    return "database is locked" in str(e) or "database is busy" in str(e)


def retry_locked(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call `fn`, retrying with backoff while SQLite reports a locked database."""
    for attempt in range(LOCKED_RETRIES):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # MLflow wraps the SQLAlchemy error in its own exception types
            if not is_locked_error(e) or attempt == LOCKED_RETRIES - 1:
                raise
            time.sleep(0.1 * 2**attempt)
    raise AssertionError("unreachable")


def experiment_id(client: Any, name: str) -> str:
    """The id of experiment `name` (an MlflowClient's), created if missing. Another process may
    create it between the lookup and the creation (parallel first jobs on a new server): the
    creation then fails with RESOURCE_ALREADY_EXISTS and the lookup is repeated.
    (`mlflow.set_experiment` returns early in that case without making the experiment active,
    MLflow 3.17.2 tracking/fluent.py, so the next `mlflow.start_run` went to experiment 0.)"""
    from mlflow.exceptions import MlflowException

    found = retry_locked(client.get_experiment_by_name, name)
    if found is not None:
        return found.experiment_id
    try:
        return retry_locked(client.create_experiment, name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    return retry_locked(client.get_experiment_by_name, name).experiment_id


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///").split("?", 1)[0])


@contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """An exclusive file lock beside a local SQLite store (no-op for servers).

    Held while the store is opened, so that two processes never create the schema or the
    experiment at the same time; the lock file name matches the `/mlflow.db-*` ignore rule.
    """
    path = _sqlite_path(uri)
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}-lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def create_sqlite_store(uri: str) -> None:
    """Create a local SQLite store atomically: schema built in `<db>-init-<pid>`, then renamed.

    Creating the store runs MLflow's schema migrations, several seconds on a 2-core CPU; a stage
    killed in the middle (a time limit, a SIGKILL) used to leave a half-migrated mlflow.db that
    every later stage refused ("Detected out-of-date database schema"). Found by
    scripts/fault_campaign.py. Call under `store_lock`: an `-init-` file is then a killed creator's
    and is removed. No-op for servers and existing stores.
    """
    path = _sqlite_path(uri)
    if path is None:
        return
    for stale in path.parent.glob(f"{path.name}-init-*"):  # a killed creator's (we hold the lock)
        stale.unlink(missing_ok=True)
    if path.exists():
        return
    from mlflow.store.tracking import DEFAULT_LOCAL_FILE_AND_ARTIFACT_PATH
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    tmp = path.with_name(f"{path.name}-init-{os.getpid()}")  # matches the `/mlflow.db-*` ignore rule
    tmp_uri = f"sqlite:///{tmp}"
    store = SqlAlchemyStore(tmp_uri, DEFAULT_LOCAL_FILE_AND_ARTIFACT_PATH)
    store.engine.dispose()  # no connection left open on the file being renamed
    SqlAlchemyStore._engine_map.pop(tmp_uri, None)
    os.replace(tmp, path)
