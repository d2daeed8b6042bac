"""What every stage entry point shares: arguments, params, device, errors."""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diamond.config import ConfigError, Params, load_params, to_dict
from diamond.env.games import ATARI_100K_GAMES
from diamond.io import ArtifactError
from stages.stage_params import STAGE_PARAMS
from stages.tracking import is_remote, server_problem

if TYPE_CHECKING:
    import torch


def base_parser(description: str, per_run: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    if per_run:
        p.add_argument("--game", required=True, help="Atari 100k game, e.g. Breakout")
        p.add_argument("--seed", required=True, type=int, help="run seed")
    return p


def check_tracking_server() -> None:
    """Fail in seconds, before any work, when MLFLOW_TRACKING_URI names a server that does not
    answer (the MLflow client would retry for minutes, and only after the stage's work)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not is_remote(uri):
        return
    reason = server_problem(uri)
    if reason is not None:
        raise ConfigError(
            f"MLFLOW_TRACKING_URI {uri}: no MLflow server answers ({reason}); start it "
            "(mlflow server ...) or unset the variable to use the local store"
        )


def load_checked_params(args: argparse.Namespace) -> Params:
    params = load_params(args.params)
    check_tracking_server()
    game = getattr(args, "game", None)
    if game is not None:
        if game not in ATARI_100K_GAMES:
            raise ConfigError(f"--game: unknown game {game!r}; allowed: {', '.join(ATARI_100K_GAMES)}")
    return params


def stage_sections(params: Params, stage: str) -> dict[str, Any]:
    """The params `stage` reads (stages/stage_params.py STAGE_PARAMS): whole sections as their
    dataclasses, dotted keys as nested dicts of YAML data under their section."""
    out: dict[str, Any] = {}
    for key in STAGE_PARAMS[stage]:
        section, *rest = key.split(".")
        value = getattr(params, section)
        if not rest:
            out[section] = value
            continue
        node = out.setdefault(section, {})
        for part in rest[:-1]:
            value = getattr(value, part)
            node = node.setdefault(part, {})
        value = getattr(value, rest[-1] + ("_" if rest[-1] == "lambda" else ""))
        node[rest[-1]] = to_dict(value) if dataclasses.is_dataclass(value) else value
    return out


PROVENANCE_DIR = ".provenance"  # stages/provenance.py records there which params and code built a job


def forget_provenance(job_dir: Path, stage: str) -> None:
    """Called when a stage starts: its outputs in `job_dir` are about to change, so their record
    goes until `python -m stages.pipeline done` writes the new one (stages/provenance.py)."""
    (Path(job_dir) / PROVENANCE_DIR / f"{stage}.json").unlink(missing_ok=True)


def resolve_device(params: Params) -> torch.device:
    import torch  # here: aggregate, which runs no network, then starts without torch (~1 s)

    if params.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if params.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' was asked for but no CUDA device is available; use 'cpu' or 'auto'")
    return torch.device(params.device)


def _terminated(signum: int, frame) -> None:
    print(f"error: stopped by {signal.Signals(signum).name} (a time limit, scancel, the workflow stopping)",
          file=sys.stderr)
    raise SystemExit(128 + signum)


def run_main(main: Callable[[], None]) -> None:
    """Run a stage; bad input exits with status 2 and one line on stderr, not a traceback.

    SIGTERM, which SLURM sends a job at its time limit (KillWait seconds before SIGKILL) and
    Snakemake its jobs when it stops, unwinds the stage as an error would: its MLflow run ends
    FAILED (stages.tracking.stage_run) instead of staying RUNNING forever, and the exit status
    is 143 as for an unhandled SIGTERM."""
    signal.signal(signal.SIGTERM, _terminated)
    try:
        main()
    except (ConfigError, ArtifactError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
