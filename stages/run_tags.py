"""What identifies a stage's MLflow run (stages/tracking.py logs them as tags).

One MLflow run per (stage, game, seed). Every run is tagged with what makes it comparable and
traceable: `stage`, `game`, `seed`, the git commit, a hash of the config sections the stage
read, the DVC md5 of each input, and a `pipeline_id` shared by all runs of one pipeline
invocation (search `tags.pipeline_id = '...'` to find them together).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from diamond.config import params_hash

PIPELINE_ID_ENV = "DIAMOND_PIPELINE_ID"
INPUT_TAG_PREFIX = "dvc_md5."


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
    parts = {k: (params_hash(v) if is_dataclass_instance(v) else v) for k, v in sections.items()}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def is_dataclass_instance(v: Any) -> bool:
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
