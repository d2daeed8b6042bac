"""Provenance: one record per job, for both pipeline tools, travelling with the outputs.

Provenance (one record for both tools, travelling with the outputs): every job has a key, the
hash of the params keys it reads, of its source files and of its upstream jobs' keys
(`stage_key`). When a stage command succeeds, both dvc.yaml and the Snakefile run `python -m
stages.pipeline done ...`, which writes DIR/.provenance/STAGE.json: the key, and the size and
md5 of every output file. The record is one of the job's outputs in both tools, so `dvc push`,
`dvc pull`, `dvc checkout` and copies move it with the outputs it vouches for; a stage that
starts removes it (stages.common), so the outputs of an unfinished run have none. `plan` is the
one decision, made from file contents alone: a job must run when its outputs are missing, have
no record, were built under another key or differ from their record, or when a job it reads
runs. Snakemake follows it through the Snakefile: every input is `ancient` (no file time counts)
and a job that must run although its outputs are on disk gets a stale marker as an input, which
says why (`stale_markers`). DVC decides from dvc.lock, which records the same
params, code and output hashes; under Snakemake with params.yaml, `done` also runs `dvc commit`
for the stage, so that dvc.lock records what Snakemake built.

It imports only the standard library and PyYAML: the Snakefile loads it on every invocation.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from stages.layout import (
    DVC_PARAMS_FILE, PROVENANCE_DIR, ROOT, STAGE_OUTPUTS, Job, all_jobs, code_digest, dvc_stage_name, job_dir,
    load_raw, params_digest, study_variant, upstream,
)

SNAKEMAKE_FLAG_FILE = ".snakemake_timestamp"  # Snakemake marks a finished folder output with it
HASHED_MAX_BYTES = 1 << 20  # outputs up to 1 MiB are checked by content when planning, larger by size


def stage_key(params: dict[str, Any], stage: str, game: str | None = None, seed: int | None = None) -> str:
    """What a job's outputs depend on: its params keys, its source files, its upstream jobs' keys
    (and a study job's variant definition, which comes on its command line)."""
    h = hashlib.sha256(f"{stage}\0{game}\0{seed}\0".encode())
    h.update(params_digest(params, stage).encode() + code_digest(stage).encode())
    if stage == "study":
        h.update(json.dumps(study_variant(params, str(game).split("/", 1)[1])[1], sort_keys=True).encode())
    for job in upstream(params, stage, game, seed):
        h.update(stage_key(params, *job).encode())
    return h.hexdigest()[:16]


def provenance_path(stage: str, game: str | None, seed: int | None) -> Path:
    """The job's provenance record, itself one of the job's outputs in both tools."""
    return Path(job_dir(stage, game, seed)) / PROVENANCE_DIR / f"{stage}.json"


def stale_marker_path(stage: str, game: str | None, seed: int | None, tag: str) -> str:
    """The Snakefile's input that makes Snakemake rerun a job the provenance check finds not
    current; `tag` names the Snakemake invocation, so a marker left by an interrupted one is never
    taken for this one's."""
    return f"{job_dir(stage, game, seed)}/{PROVENANCE_DIR}/{stage}.stale-{tag}"


def _output_files(stage: str, game: str | None, seed: int | None) -> list[Path]:
    """The files of the job's outputs, without Snakemake's own flag file in folder outputs
    (written after the job, left out by .dvcignore too)."""
    files: list[Path] = []
    for name in STAGE_OUTPUTS[stage]:
        path = Path(job_dir(stage, game, seed)) / name
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.name != SNAKEMAKE_FLAG_FILE)
        else:
            files.append(path)
    return files


def _md5(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def output_manifest(stage: str, game: str | None, seed: int | None) -> dict[str, dict[str, Any]]:
    """Size and md5 of every file of the job's outputs (what DVC records in dvc.lock, per file)."""
    return {f.as_posix(): {"size": f.stat().st_size, "md5": _md5(f)} for f in _output_files(stage, game, seed)}


def outputs_present(stage: str, game: str | None, seed: int | None) -> bool:
    """Whether anything of the job is on disk: an output or its record."""
    paths = [Path(job_dir(stage, game, seed)) / name for name in STAGE_OUTPUTS[stage]]
    return any(p.exists() for p in paths + [provenance_path(stage, game, seed)])


def _manifest_mismatch(manifest: dict[str, Any], stage: str, game: str | None, seed: int | None) -> str | None:
    """The first output file that is not the one the record lists. Files up to HASHED_MAX_BYTES
    are compared by md5, larger ones by size, so that planning 130 paper runs reads only small
    files; `dvc status` compares every byte."""
    on_disk = {f.as_posix(): f for f in _output_files(stage, game, seed)}
    for name, entry in sorted(manifest.items()):
        f = on_disk.get(name)
        if f is None:
            return f"{name} is missing"
        size = f.stat().st_size
        if size != entry.get("size"):
            return f"{name} is {size} bytes, its provenance record says {entry.get('size')}"
        if size <= HASHED_MAX_BYTES and _md5(f) != entry.get("md5"):
            return f"{name} differs from its provenance record (md5)"
    extra = sorted(set(on_disk) - set(manifest))
    return f"{extra[0]} is not in its provenance record" if extra else None


def own_reason(params: dict[str, Any], stage: str, game: str | None = None, seed: int | None = None) -> str | None:
    """Why the job's outputs, taken alone, are not current; None when they are. Current means: a
    record under the key of the current params and code, and every output file as it records."""
    where = job_dir(stage, game, seed)
    if not outputs_present(stage, game, seed):
        return "not built"
    missing = [name for name in STAGE_OUTPUTS[stage] if not (Path(where) / name).exists()]
    if missing:
        return f"{where}/{missing[0]} is missing"
    record = _read_record(provenance_path(stage, game, seed))
    if record is None:
        return f"{where} has no provenance record (a stage killed, failed, or run without `stages.pipeline done`)"
    expected = stage_key(params, stage, game, seed)
    if record.get("key") != expected:
        return f"{where} was built under key {record.get('key')}; current params and code give {expected}"
    manifest = record.get("outputs")
    if not isinstance(manifest, dict):
        return f"{provenance_path(stage, game, seed)} lists no outputs (written by an older version)"
    return _manifest_mismatch(manifest, stage, game, seed)


def _read_record(record: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(record.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def plan(params: dict[str, Any]) -> dict[Job, str]:
    """Every job that must run, with a one-line reason: its own outputs are not current
    (`own_reason`), or a job it reads runs."""
    reasons: dict[Job, str] = {}
    for job in all_jobs(params):
        why = own_reason(params, *job)
        if why is None:
            before = [up for up in upstream(params, *job) if up in reasons]
            why = f"{dvc_stage_name(*before[0], params)} runs before it" if before else None
        if why is not None:
            reasons[job] = why
    return reasons


def stale_markers(params: dict[str, Any], planned: dict[Job, str], tag: str) -> dict[str, str]:
    """Write the Snakefile's stale markers and return them, marker path -> reason: one for every
    job that must run although outputs of it are on disk.

    Snakemake reruns a job whose outputs exist only when an input is newer than them (or one it
    makes runs first, and it makes a missing intermediate file only for a job that runs). So the
    marker, an input of the job, is dated now, after every output once no output is dated in
    the future (`_no_future_dates`): the plan, made from contents, decides; the date only tells
    Snakemake."""
    if not planned:
        return {}
    now = time.time()
    _no_future_dates(params, now - 1)
    markers: dict[str, str] = {}
    for job, why in planned.items():
        if why == "not built" or not outputs_present(*job):
            continue
        marker = Path(stale_marker_path(*job, tag))
        for old in marker.parent.glob(f"{job[0]}.stale-*"):
            old.unlink(missing_ok=True)
        marker.parent.mkdir(parents=True, exist_ok=True)
        reason = f"{dvc_stage_name(*job, params)}: {why}"
        marker.write_text(reason + "\n")
        os.utime(marker, (now, now))
        markers[marker.as_posix()] = reason
    return markers


def _no_future_dates(params: dict[str, Any], latest: float) -> None:
    """Date back to `latest` every output file or folder dated after it. Snakemake fails a job
    whose new outputs are older than an input (its clock-skew check, which no setting turns
    off), and restored or copied files can carry any date: one from a machine whose clock runs
    ahead, or a test's random dates. Contents, and so every decision, stay as they are."""
    for job in all_jobs(params):
        for path in _output_tree(*job):
            if path.lstat().st_mtime > latest:
                os.utime(path, (latest, latest), follow_symlinks=False)


def _output_tree(stage: str, game: str | None, seed: int | None) -> list[Path]:
    """Every path of the job's outputs and record, folders included (Snakemake dates a folder
    output by the folder or its contents)."""
    paths: list[Path] = []
    for p in [Path(job_dir(stage, game, seed)) / n for n in STAGE_OUTPUTS[stage]] + [provenance_path(stage, game, seed)]:
        if p.exists():
            paths += [p] + (list(p.rglob("*")) if p.is_dir() else [])
    return paths


def record_done(params_file: str, stage: str, game: str | None, seed: int | None, tool: str) -> Path:
    """Write the job's provenance record (its key and the files it wrote); under Snakemake with
    dvc.yaml's params file, commit the job to dvc.lock as well. No time goes into the record:
    the same params, code and seed give the same record."""
    params = load_raw(params_file)
    path = provenance_path(stage, game, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"stage": stage, "game": game, "seed": seed, "key": stage_key(params, stage, game, seed),
              "params_file": params_file, "tool": tool, "outputs": output_manifest(stage, game, seed)}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    for marker in path.parent.glob(f"{stage}.stale-*"):  # served their purpose: this job has rerun
        marker.unlink(missing_ok=True)
    same_file = Path(params_file).resolve() == (ROOT / DVC_PARAMS_FILE).resolve()
    if tool == "snakemake" and same_file and (ROOT / ".dvc").is_dir():
        dvc_commit(dvc_stage_name(stage, game, seed, params))
    return path


def dvc_commit(name: str) -> None:
    """`dvc commit` one stage, one process at a time (parallel jobs would fight for DVC's lock)."""
    lock_path = ROOT / ".dvc" / "tmp" / "diamond-commit.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    dvc = Path(sys.executable).with_name("dvc")
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = subprocess.run([str(dvc) if dvc.exists() else "dvc", "commit", "--force", "--quiet", name],
                              cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"error: dvc commit {name} failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
