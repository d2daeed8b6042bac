"""What `dvc.yaml` and the `Snakefile` share, so that the two pipelines cannot drift apart.

- the runs (game, seed) of a params file and the per-run artifact paths, and the games of the
  authors' released agents (`released.games`, artifacts under runs/released/G);
- the params keys each stage reads (DVC `params:`, the provenance key below);
- the source files each stage runs (DVC `deps:`, the provenance key), found from the stage
  module's imports so that nothing is forgotten.

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

Command line, used by dvc.yaml (DVC templating has no cartesian product) and the Snakefile:

    python -m stages.pipeline score-files --params params.yaml   # runs/G-S/score.json ...
    python -m stages.pipeline done --params params.yaml --stage evaluate --game G --seed S --tool dvc
    python -m stages.pipeline done --params params.yaml --stage study --game G --variant V --seed S --tool dvc
    python -m stages.pipeline stale --params params.yaml         # the jobs that must run, and why

It imports only the standard library and PyYAML: the Snakefile loads it on every invocation.
"""

from __future__ import annotations

import argparse
import ast
import fcntl
import functools
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
RUNS_DIR = "runs"
REPORTS_DIR = "reports"
PROJECT_PACKAGES = ("diamond", "stages")

# Stage name (as in dvc.yaml, Snakemake rules use underscores) -> its entry-point module.
STAGE_MODULES: dict[str, str] = {
    "collect": "stages.collect",
    "train-world-model": "stages.train_world_model",
    "train-agent": "stages.train_agent",
    "evaluate": "stages.evaluate",
    "aggregate": "stages.aggregate",
    # the authors' released agents, per game of released.games: the same evaluate code
    "import-released": "stages.import_released",
    "evaluate-released": "stages.evaluate",
    # the world-model study (paper section 5.1), its own product: per study game, variant and
    # seed, then one report per game; in neither `aggregate` nor the Snakefile's `all`
    "study": "stages.study",
    "study-report": "stages.study_report",
}

from stages.stage_params import STAGE_PARAMS  # noqa: E402  (one declaration, read by the stages too)

# Data files read by a stage besides code and params.
STAGE_DATA: dict[str, list[str]] = {"aggregate": ["diamond/reference_data"]}

# The output whose presence means a job has run (its other outputs are written before it or
# with it), relative to the job's directory (runs/G-S, runs/released/G or reports).
PRIMARY_OUTPUT: dict[str, str] = {
    "collect": "dataset_initial", "train-world-model": "world_model.pt", "train-agent": "agent.pt",
    "evaluate": "score.json", "import-released": "agent.pt", "evaluate-released": "score.json",
    "aggregate": "atari100k_table.md", "study": "metrics.json", "study-report": "study_table.md",
}
# Every output of a job (the Snakefile's rule outputs), relative to the job's directory.
STAGE_OUTPUTS: dict[str, list[str]] = {
    "collect": ["dataset_initial", "collect.json"],
    "train-world-model": ["world_model.pt", "world_model.json", "world_model_curve.csv", "world_model_media"],
    "train-agent": ["agent.pt", "dataset", "agent.json", "agent_curve.csv"],
    "evaluate": ["score.json", "evaluate_fidelity.json", "evaluate_media"],
    "import-released": ["world_model.pt", "agent.pt", "source.json"],
    "evaluate-released": ["score.json", "evaluate_fidelity.json", "evaluate_media"],
    "aggregate": ["atari100k_table.md", "atari100k_table.csv", "atari100k_table.tex", "atari100k_aggregate.json",
                  "released_vs_paper.md"],
    "study": ["denoiser.pt", "errors.npz", "metrics.json"],
    "study-report": ["study_table.md", "study_table.csv", "study.json", "study_error_vs_horizon.png", "study_frames.png"],
}
PROVENANCE_DIR = ".provenance"
SNAKEMAKE_FLAG_FILE = ".snakemake_timestamp"  # Snakemake marks a finished folder output with it
HASHED_MAX_BYTES = 1 << 20  # outputs up to 1 MiB are checked by content when planning, larger by size
STUDY_DIR = "study"  # study jobs' outputs: study/G/VARIANT-S (outside runs/, which `aggregate` depends on)
STUDY_REPORTS_DIR = f"{REPORTS_DIR}/study"
DVC_PARAMS_FILE = "params.yaml"  # the params file dvc.yaml's stages read


def load_raw(params_file: str | Path) -> dict[str, Any]:
    """The params file as plain data (the stages validate it; here only the keys are read)."""
    data = yaml.safe_load(Path(params_file).read_text())
    if not isinstance(data, dict) or "games" not in data or "seeds" not in data:
        raise ValueError(f"{params_file}: expected a mapping with 'games' and 'seeds'")
    return data


def runs(params: dict[str, Any]) -> list[tuple[str, int]]:
    return [(str(g), int(s)) for g in params["games"] for s in params["seeds"]]


def run_dir(game: str, seed: int) -> str:
    return f"{RUNS_DIR}/{game}-{seed}"


def released_games(params: dict[str, Any]) -> list[str]:
    return [str(g) for g in params.get("released", {}).get("games", [])]


def released_dir(game: str) -> str:
    return f"{RUNS_DIR}/released/{game}"


def score_jobs(params: dict[str, Any]) -> list[tuple[str, tuple[str, str, int | None]]]:
    """Every score file `aggregate` reads, with the job that writes it: the trained runs', then
    the released agents'."""
    return [(f"{run_dir(g, s)}/score.json", ("evaluate", g, s)) for g, s in runs(params)] + [
        (f"{released_dir(g)}/score.json", ("evaluate-released", g, None)) for g in released_games(params)
    ]


def score_files(params: dict[str, Any]) -> list[str]:
    return [path for path, _ in score_jobs(params)]


def study_games(params: dict[str, Any]) -> list[str]:
    return [str(g) for g in params.get("study", {}).get("games", [])]


def study_job(game: str, variant: str) -> str:
    """A study job's `game` in (stage, game, seed): GAME/VARIANT, which is also its directory
    under study/ (the variant is a third coordinate that the other stages do not have)."""
    return f"{game}/{variant}"


def study_variant(params: dict[str, Any], variant: str) -> tuple[int, dict[str, Any]]:
    """Index and definition of a variant of `study.variants`, by name."""
    for i, v in enumerate(params["study"]["variants"]):
        if v["name"] == variant:
            return i, v
    names = [v["name"] for v in params["study"]["variants"]]
    raise KeyError(f"study variant {variant!r} not in study.variants; allowed: {', '.join(names)}")


def study_jobs(params: dict[str, Any]) -> list[tuple[str, str, int]]:
    """(game, variant, seed) of every study job."""
    s = params.get("study", {})
    return [(g, v["name"], int(seed)) for g in study_games(params) for v in s["variants"] for seed in s["seeds"]]


def study_job_dir(game: str, variant: str, seed: int) -> str:
    return f"{STUDY_DIR}/{study_job(game, variant)}-{seed}"


def param_value(params: dict[str, Any], key: str) -> Any:
    value: Any = params
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(f"params key {key!r} not found")
        value = value[part]
    return value


def params_digest(params: dict[str, Any], stage: str) -> str:
    """Hash of the params keys `stage` reads."""
    values = {k: param_value(params, k) for k in STAGE_PARAMS[stage]}
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _module_file(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def _project_imports(tree: ast.AST) -> list[str]:
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pkg import name` may import a submodule `pkg.name`
            names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return [n for n in names if n.split(".")[0] in PROJECT_PACKAGES]


def code_files(module: str) -> list[str]:
    """Project source files `module` imports, transitively (parent packages included).

    Empty files (bare `__init__.py`) are left out: DVC warns about empty dependencies, and a
    file that gains content is then listed, so the dvc.yaml check notices it."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        path = _module_file(name)
        if path is None or path in seen:
            continue
        seen.add(path)
        todo += _project_imports(ast.parse(path.read_text(), filename=str(path)))
    return sorted(p.relative_to(ROOT).as_posix() for p in seen if p.stat().st_size > 0)


def stage_code_files(stage: str) -> list[str]:
    return code_files(STAGE_MODULES[stage])


@functools.cache
def code_digest(stage: str) -> str:
    """Hash of the source and data files `stage` runs; changes when any of them does."""
    h = hashlib.sha256()
    for rel in stage_code_files(stage) + STAGE_DATA.get(stage, []):
        path = ROOT / rel
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            h.update(f.relative_to(ROOT).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------
# Provenance
# ---------------------------------------------------------------------------------------

Job = tuple[str, "str | None", "int | None"]  # (stage, game, seed); seed None for released, both for aggregate


def upstream(params: dict[str, Any], stage: str, game: str | None, seed: int | None) -> list[Job]:
    """The jobs whose outputs `stage` reads, for this game and seed."""
    if stage in ("collect", "import-released"):
        return []
    if stage == "train-world-model":
        return [("collect", game, seed)]
    if stage == "train-agent":
        return [("collect", game, seed), ("train-world-model", game, seed)]
    if stage == "evaluate":
        return [("train-agent", game, seed)]
    if stage == "evaluate-released":
        return [("import-released", game, None)]
    if stage == "aggregate":
        return [("evaluate", g, s) for g, s in runs(params)] + [("evaluate-released", g, None) for g in released_games(params)]
    if stage == "study":
        return dataset_producer(params)
    if stage == "study-report":
        return [("study", study_job(g, v), s) for g, v, s in study_jobs(params) if g == game]
    raise KeyError(f"unknown stage {stage!r}; allowed: {', '.join(STAGE_MODULES)}")


def dataset_producer(params: dict[str, Any]) -> list[Job]:
    """The job of this params file that writes `study.dataset`, if one does (else it is an
    imported or earlier store, versioned by its own hash)."""
    path = Path(params["study"]["dataset"]).as_posix().rstrip("/")
    for g, s in runs(params):
        for stage, name in (("train-agent", "dataset"), ("collect", "dataset_initial")):
            if path == f"{run_dir(g, s)}/{name}":
                return [(stage, g, s)]
    return []


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


def job_dir(stage: str, game: str | None, seed: int | None) -> str:
    if stage == "aggregate":
        return REPORTS_DIR
    if stage == "study":
        return f"{STUDY_DIR}/{game}-{seed}"
    if stage == "study-report":
        return STUDY_REPORTS_DIR
    return released_dir(str(game)) if stage in ("import-released", "evaluate-released") else run_dir(str(game), int(seed))


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


def all_jobs(params: dict[str, Any]) -> list[Job]:
    """Every job of the params file, each after the jobs it reads."""
    per_run = ("collect", "train-world-model", "train-agent", "evaluate")
    jobs: list[Job] = [(st, g, s) for g, s in runs(params) for st in per_run]
    jobs += [(st, g, None) for g in released_games(params) for st in ("import-released", "evaluate-released")]
    jobs += [("study", study_job(g, v), s) for g, v, s in study_jobs(params)]
    jobs += [("study-report", g, None) for g in study_games(params)]
    return jobs + [("aggregate", None, None)]


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


def dvc_stage_name(stage: str, game: str | None, seed: int | None, params: dict[str, Any] | None = None) -> str:
    if stage == "aggregate":
        return stage
    if stage == "study":
        # DVC names a matrix entry that is a mapping by its index: study@G-variantI-S
        g, variant = str(game).split("/", 1)
        index = study_variant(params, variant)[0] if params is not None else variant
        return f"study@{g}-variant{index}-{seed}"
    return f"{stage}@{game}" if seed is None else f"{stage}@{game}-{seed}"


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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    sf = sub.add_parser("score-files", help="the score.json of every run in the params file")
    sf.add_argument("--params", default="params.yaml")
    cf = sub.add_parser("code-files", help="the source files a stage runs")
    cf.add_argument("stage", choices=sorted(STAGE_MODULES))
    dn = sub.add_parser("done", help="record a job's provenance after its stage command succeeded")
    dn.add_argument("--params", default=DVC_PARAMS_FILE)
    dn.add_argument("--stage", required=True, choices=sorted(STAGE_MODULES))
    dn.add_argument("--game")
    dn.add_argument("--seed", type=int)
    dn.add_argument("--variant", help="study jobs: the variant's name")
    dn.add_argument("--tool", required=True, choices=["dvc", "snakemake", "manual"])
    st = sub.add_parser("stale", help="the jobs that must run, with why (the plan both tools follow)")
    st.add_argument("--params", default=DVC_PARAMS_FILE)
    args = p.parse_args(argv)
    if args.command == "score-files":
        print(" ".join(score_files(load_raw(args.params))))
    elif args.command == "code-files":
        print("\n".join(stage_code_files(args.stage)))
    elif args.command == "done":
        game = study_job(args.game, args.variant) if args.stage == "study" else args.game
        record_done(args.params, args.stage, game, args.seed, args.tool)
    else:
        params = load_raw(args.params)
        for job, why in plan(params).items():
            print(f"{dvc_stage_name(*job, params)}: {why}")


if __name__ == "__main__":
    main()
