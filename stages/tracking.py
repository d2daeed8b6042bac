"""MLflow tracking for stage runs (the library in diamond/ knows nothing of MLflow).

One MLflow run per (stage, game, seed), tagged so that the UI can group and compare them.
The default store is local (sqlite:///mlflow.db in the working directory); MLFLOW_TRACKING_URI
points it at a shared server instead. Issue 6 owns and hardens this module.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow

from diamond.config import flatten, params_hash, to_dict

EXPERIMENT = "diamond-atari100k"
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"


@contextmanager
def stage_run(
    stage: str,
    sections: dict[str, Any],
    game: str | None = None,
    seed: int | None = None,
    inputs: list[Path] | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """Start one MLflow run for a stage; `sections` are the config parts this stage reads."""
    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI))
    mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT))
    name = stage if game is None else f"{stage}/{game}-{seed}"
    tags = {"stage": stage, "git_commit": git_commit(), "params_hash": params_hash_of(sections)}
    if game is not None:
        tags.update(game=game, seed=str(seed))
    with mlflow.start_run(run_name=name, tags=tags) as run:
        mlflow.log_params(flatten({k: to_dict(v) if hasattr(v, "__dataclass_fields__") else v for k, v in sections.items()}))
        yield run


def params_hash_of(sections: dict[str, Any]) -> str:
    import hashlib
    import json

    parts = {k: (params_hash(v) if hasattr(v, "__dataclass_fields__") else v) for k, v in sections.items()}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
