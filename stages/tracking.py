"""MLflow tracking for stage runs (the library in diamond/ knows nothing of MLflow).

One MLflow run per (stage, game, seed). Every run is tagged with what makes it comparable and
traceable: `stage`, `game`, `seed`, the git commit, a hash of the config sections the stage
read, the DVC md5 of each input, and a `pipeline_id` shared by all runs of one pipeline
invocation (search `tags.pipeline_id = '...'` to find them together).

The default store is local: sqlite:///mlflow.db in the working directory. `snakemake -j N`
runs stages in parallel processes against that one file, so this module makes SQLite safe
for that: creating the store (schema migrations, the experiment) happens under a file lock
(unguarded, concurrent first runs fail with "table ... already exists"), writers wait for each
other (busy timeout) instead of failing with "database is locked", and the calls made here
retry on a locked database as a last resort.
MLFLOW_TRACKING_URI points everything at a shared tracking server instead.

A server that goes away mid-run loses no training. Stages log through the functions below
(`log_metrics`, `log_params`, `set_tags`, `log_artifact`, ...), not mlflow's own: the first call
that fails on a server that no longer answers (after MLflow's HTTP retries, cut here to a few
seconds: PENDING_HTTP_ENV; a server that still answers /health is waited for a while longer:
BUSY_SERVER_RETRIES) prints one warning line, and from then on that call and every later one, the end of the run
included, is appended to a journal, DIR/.mlflow_pending/STAGE-ID.jsonl beside the stage's outputs
(DIR: `stage_run(job_dir=...)`), with each metric's step and timestamp. The stage carries on and
ends normally. `python -m stages.mlflow_sync DIR...` replays journals into the server once it
answers again (stages/mlflow_sync.py); replaying twice duplicates nothing.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import mlflow
import sqlalchemy
from sqlalchemy import event

from diamond.config import flatten, params_hash, to_dict

EXPERIMENT = "diamond-atari100k"
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
PIPELINE_ID_ENV = "DIAMOND_PIPELINE_ID"
# How long a writer waits for another process's transaction before giving up (milliseconds).
SQLITE_BUSY_TIMEOUT_MS = 120_000
# Retries for the calls made here, on top of the busy timeout (backoff doubles from 0.1 s).
LOCKED_RETRIES = 8
INPUT_TAG_PREFIX = "dvc_md5."
PENDING_DIR = ".mlflow_pending"  # beside a stage's outputs: what a lost server did not get
JOURNAL_TAG = "diamond.journal_id"  # on a run that `stages.mlflow_sync` had to create
# MLflow's HTTP client retries a failed request 7 times with a 2 s backoff factor (minutes); a stage
# talking to a server cuts that to seconds, unless these variables are set (docs: mlflow.environment_variables).
SERVER_PROBE_SECONDS = 5.0
# After a failed call, while the server still answers /health (busy, not gone): retries here,
# 2, 4, 8, 16 s apart, before journaling anyway.
BUSY_SERVER_RETRIES = 4
PENDING_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}

T = TypeVar("T")


# ---------------------------------------------------------------------------------------
# SQLite under parallel processes
# ---------------------------------------------------------------------------------------


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


_install_sqlite_hardening()


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


# ---------------------------------------------------------------------------------------
# What identifies a run: commit, pipeline invocation, input hashes
# ---------------------------------------------------------------------------------------


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return None


def git_commit() -> str:
    return _git("rev-parse", "HEAD") or "unknown"


def git_dirty() -> bool:
    """Uncommitted changes to tracked files; dvc.lock, which `dvc repro` rewrites as it goes,
    does not count (generated artifacts are gitignored)."""
    return bool(_git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)dvc.lock"))


def params_file_from_argv(argv: list[str] | None = None) -> Path:
    """The params file a stage was started with (`--params PATH`, default params.yaml)."""
    argv = sys.argv if argv is None else argv
    for i, a in enumerate(argv):
        if a == "--params" and i + 1 < len(argv):
            return Path(argv[i + 1])
        if a.startswith("--params="):
            return Path(a.split("=", 1)[1])
    return Path("params.yaml")


def pipeline_id(params_file: Path | None = None) -> str:
    """The id shared by all stage runs of one pipeline invocation.

    Snakemake sets DIAMOND_PIPELINE_ID once per invocation; users may set it too. Without it
    (`dvc repro`), runs of the same commit and the same params file share one id.
    """
    explicit = os.environ.get(PIPELINE_ID_ENV)
    if explicit:
        return explicit
    path = params_file or params_file_from_argv()
    digest = hashlib.md5(path.read_bytes()).hexdigest()[:10] if path.is_file() else "noparams"
    return f"{git_commit()[:10]}-{digest}"


def file_md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def dvc_md5(path: str | Path) -> str:
    """The md5 DVC 3 records for `path` in dvc.lock: the file's md5, or for a directory the
    md5 of its sorted (relpath, md5) listing as JSON, suffixed `.dir`."""
    path = Path(path)
    if path.is_file():
        return file_md5(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: input not found")
    entries = [
        {"md5": file_md5(p), "relpath": p.relative_to(path).as_posix()}
        for p in path.rglob("*")
        if p.is_file()
    ]
    entries.sort(key=lambda e: e["relpath"])
    listing = json.dumps(entries, sort_keys=True).encode("utf-8")
    return hashlib.md5(listing).hexdigest() + ".dir"


def input_tag_key(path: str | Path) -> str:
    """A valid MLflow tag key naming an input: its path relative to the working directory."""
    p = Path(path)
    try:
        rel = p.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        rel = "/".join(p.resolve().parts[-2:])
    return INPUT_TAG_PREFIX + rel


def params_hash_of(sections: dict[str, Any]) -> str:
    parts = {k: (params_hash(v) if _is_dataclass(v) else v) for k, v in sections.items()}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _is_dataclass(v: Any) -> bool:
    return hasattr(v, "__dataclass_fields__")


def run_tags(
    stage: str,
    sections: dict[str, Any],
    game: str | None,
    seed: int | None,
    inputs: list[Path] | None,
    params_file: Path | None = None,
) -> dict[str, str]:
    commit = git_commit()
    tags = {
        "stage": stage,
        "git_commit": commit,
        "git_dirty": str(git_dirty()).lower(),
        "mlflow.source.git.commit": commit,  # shown by the MLflow UI
        "params_hash": params_hash_of(sections),
        "params_sections": ",".join(sorted(sections)),
        "pipeline_id": pipeline_id(params_file),
    }
    if game is not None:
        tags.update(game=game, seed=str(seed), run=f"{game}-{seed}")
    for path in inputs or []:
        tags[input_tag_key(path)] = dvc_md5(path)
    return tags


# ---------------------------------------------------------------------------------------
# The stage run
# ---------------------------------------------------------------------------------------


def is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def server_problem(uri: str, timeout: float = SERVER_PROBE_SECONDS) -> str | None:
    """None if the tracking server at `uri` answers its /health endpoint, else why not."""
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as reply:
            reply.read()
        return None
    except (OSError, ValueError) as e:  # URLError, HTTPError, timeouts, malformed URLs
        return str(getattr(e, "reason", None) or e)


def now_ms() -> int:
    return int(time.time() * 1000)


class _Tracker:
    """The stage run in progress: sends to MLflow, or, once a server has failed, to the journal."""

    def __init__(self, uri: str, job_dir: Path, stage: str, start: dict[str, Any]) -> None:
        self.remote = is_remote(uri)
        self.start = start  # the run's identity, the journal's first line if one is needed
        self.journal: Path | None = None
        self.job_dir, self.stage = Path(job_dir), stage

    def send(self, record: dict[str, Any], call: Callable[[], Any]) -> None:
        attempt = 0
        while self.journal is None:
            try:
                retry_locked(call)
                return
            except Exception as e:  # a lost server surfaces as requests' or MLflow's exceptions
                if not self.remote or _is_client_error(e):
                    raise
                # A server that still answers is busy, not gone: wait for it a while longer.
                if attempt == BUSY_SERVER_RETRIES or server_problem(self.start["tracking_uri"]) is not None:
                    self.go_offline(e)
                else:
                    time.sleep(2.0 * 2**attempt)
                    attempt += 1
        self.append(record)

    def go_offline(self, error: BaseException) -> None:
        jid = self.start["journal_id"]
        self.journal = self.job_dir / PENDING_DIR / f"{self.stage}-{jid}.jsonl"
        self.journal.parent.mkdir(parents=True, exist_ok=True)
        self.append(self.start)
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        print(f"warning: MLflow server {self.start['tracking_uri']} lost ({first}); the stage goes on, "
              f"logging to {self.journal}; upload it later: python -m stages.mlflow_sync {self.journal}",
              file=sys.stderr, flush=True)

    def append(self, record: dict[str, Any]) -> None:
        assert self.journal is not None
        if not record:
            return
        with open(self.journal, "a") as f:  # one line per record, flushed: a kill loses at most the last
            f.write(json.dumps(record, sort_keys=True, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _is_client_error(e: BaseException) -> bool:
    """A request the server refused as invalid (a bug to raise), not a server that is gone."""
    code = getattr(e, "error_code", None)
    return code in {"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "RESOURCE_ALREADY_EXISTS", "INVALID_STATE",
                    "PERMISSION_DENIED", "UNAUTHENTICATED", "RESOURCE_DOES_NOT_EXIST"}


_ACTIVE: _Tracker | None = None


def _send(record: dict[str, Any], call: Callable[[], Any]) -> None:
    if _ACTIVE is None:  # outside a stage run (tests, notebooks): plain MLflow
        call()
    else:
        _ACTIVE.send(record, call)


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    """mlflow.log_metrics for a stage; the timestamp is fixed here, so a replay matches it exactly."""
    metrics = {k: float(v) for k, v in metrics.items()}
    ts = now_ms()
    _send({"op": "metrics", "metrics": metrics, "step": step, "timestamp": ts},
          lambda: mlflow.log_metrics(metrics, step=step, timestamp=ts))


def log_metric(key: str, value: float, step: int | None = None) -> None:
    log_metrics({key: value}, step=step)


def log_params(params: dict[str, Any]) -> None:
    params = {k: str(v) for k, v in params.items()}
    _send({"op": "params", "params": params}, lambda: mlflow.log_params(params))


def log_param(key: str, value: Any) -> None:
    log_params({key: value})


def set_tags(tags: dict[str, Any]) -> None:
    tags = {k: str(v) for k, v in tags.items()}
    _send({"op": "tags", "tags": tags}, lambda: mlflow.set_tags(tags))


def set_tag(key: str, value: Any) -> None:
    set_tags({key: value})


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    """A file; a journal keeps its absolute path, so it must still be there at upload time."""
    path = str(Path(path).resolve())
    _send({"op": "artifact", "path": path, "artifact_path": artifact_path},
          lambda: mlflow.log_artifact(path, artifact_path=artifact_path))


def log_artifacts(directory: str | Path, artifact_path: str | None = None) -> None:
    directory = str(Path(directory).resolve())
    _send({"op": "artifacts", "path": directory, "artifact_path": artifact_path},
          lambda: mlflow.log_artifacts(directory, artifact_path=artifact_path))


@contextmanager
def stage_run(
    stage: str,
    sections: dict[str, Any],
    game: str | None = None,
    seed: int | None = None,
    inputs: list[Path] | None = None,
    params_file: Path | None = None,
    job_dir: Path | None = None,
) -> Iterator[mlflow.ActiveRun | None]:
    """Start one MLflow run for a stage; `sections` are the config parts this stage reads.

    The run ends FINISHED, or FAILED if the stage raises. `params_file` defaults to the
    stage's `--params` argument. `job_dir` (the stage's output directory, default the working
    directory) holds the journal of what a lost server did not get (module docstring); the run
    is then None if the server was lost before it could be created.
    """
    global _ACTIVE
    uri = tracking_uri()
    if is_remote(uri):
        for k, v in PENDING_HTTP_ENV.items():
            os.environ.setdefault(k, v)
    tags = run_tags(stage, sections, game, seed, inputs, params_file)
    name = stage if game is None else f"{stage}/{game}-{seed}"
    experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
    start = {"op": "start", "journal_id": uuid.uuid4().hex[:12], "tracking_uri": uri, "experiment": experiment,
             "run_name": name, "tags": tags, "start_time": now_ms(), "run_id": None}
    tracker = _Tracker(uri, job_dir or Path.cwd(), stage.replace("/", "-"), start)
    run: mlflow.ActiveRun | None = None

    def begin() -> None:
        nonlocal run
        with store_lock(uri):
            create_sqlite_store(uri)
            mlflow.set_tracking_uri(uri)
            retry_locked(mlflow.set_experiment, experiment)
            run = retry_locked(mlflow.start_run, run_name=name, tags=tags)
        start["run_id"] = run.info.run_id

    tracker.send({}, begin)  # a server lost here: the journal starts with no run id
    _ACTIVE = tracker
    status = "FAILED"
    try:
        logged = {k: to_dict(v) if _is_dataclass(v) else v for k, v in sections.items()}
        log_params(flatten(logged))
        yield run
        status = "FINISHED"
    finally:
        _ACTIVE = None
        end = {"op": "end", "status": status, "end_time": now_ms()}
        if run is not None and tracker.journal is None:
            tracker.send(end, lambda: mlflow.end_run(status))
        else:
            if run is not None:
                _drop_active_run()
            tracker.append(end)


def _drop_active_run() -> None:
    """Forget the active run without a call to the lost server (mlflow.end_run would retry it)."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="2")
    try:
        mlflow.end_run()  # pops the run first, then fails fast on the server
    except Exception:  # noqa: BLE001 - the server is gone; the journal ends the run later
        pass
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
