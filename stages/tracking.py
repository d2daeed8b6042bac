"""MLflow tracking for stage runs (the library in diamond/ knows nothing of MLflow): one MLflow run
per (stage, game, seed), tagged as stages/run_tags.py says, in the store stages/tracking_store.py
keeps safe for parallel processes (default sqlite:///mlflow.db in the working directory;
MLFLOW_TRACKING_URI points everything at a shared tracking server instead).

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

import json
import os
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow

from diamond.config import flatten, to_dict
from stages.run_tags import is_dataclass_instance, run_tags
from stages.tracking_store import create_sqlite_store, experiment_id, retry_locked, store_lock, tracking_uri

EXPERIMENT = "diamond-atari100k"
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
            exp_id = experiment_id(mlflow.MlflowClient(uri), experiment)
            run = retry_locked(mlflow.start_run, experiment_id=exp_id, run_name=name, tags=tags)
        start["run_id"] = run.info.run_id

    tracker.send({}, begin)  # a server lost here: the journal starts with no run id
    _ACTIVE = tracker
    status = "FAILED"
    try:
        logged = {k: to_dict(v) if is_dataclass_instance(v) else v for k, v in sections.items()}
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
