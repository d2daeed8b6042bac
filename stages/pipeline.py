"""What `dvc.yaml` and the `Snakefile` share, so that the two pipelines cannot drift apart.

- the runs (game, seed) of a params file and the per-run artifact paths, and the games of the
  authors' released agents (`released.games`, artifacts under runs/released/G);
- the params keys each stage reads (DVC `params:`, Snakemake rerun-on-params);
- the source files each stage runs (DVC `deps:`, Snakemake rerun-on-code), found from the
  stage module's imports so that nothing is forgotten.

Provenance (the same for both tools, so that neither takes the other's outputs for up to date
when they were built from other params or code): every job has a key, the hash of the params
keys it reads, of its source files and of its upstream jobs' keys (`stage_key`). When a stage
command succeeds, both dvc.yaml and the Snakefile run `python -m stages.pipeline done ...`,
which writes the key to DIR/.provenance/STAGE.json beside the outputs, and an empty
DIR/.provenance/STAGE.key-KEY; a stage that starts removes the record (stages.common), so the
outputs of an unfinished or unrecorded run have no provenance. Every Snakemake job takes the key
file of its current key as an input (`key_file`), dated so that Snakemake reruns the job, and
everything after it, exactly when its outputs were built under another key or none. Under Snakemake with
params.yaml, `done` also runs `dvc commit` for the stage, so that dvc.lock records what
Snakemake built and `dvc status` / `dvc repro` see it as DVC's own work.

Command line, used by dvc.yaml (DVC templating has no cartesian product) and the Snakefile:

    python -m stages.pipeline score-files --params params.yaml   # runs/G-S/score.json ...
    python -m stages.pipeline done --params params.yaml --stage evaluate --game G --seed S --tool dvc
    python -m stages.pipeline done --params params.yaml --stage study --game G --variant V --seed S --tool dvc
    python -m stages.pipeline stale --params params.yaml         # the stale jobs, one per line

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

# The params keys each stage reads (dotted keys for parts of a section). Changing any other
# key leaves the stage's outputs valid, so neither pipeline reruns it.
STAGE_PARAMS: dict[str, list[str]] = {
    "collect": ["env", "collect"],
    # fidelity of the trained world model is measured here, on held-out real episodes
    "train-world-model": [
        "device", "channels_last", "compile_denoiser", "reuse_freed_memory", "tf32", "env", "world_model",
        "evaluate.fidelity_episodes", "evaluate.fidelity_horizons", "evaluate.gif_frames",
    ],
    "train-agent": [
        "device", "channels_last", "compile_denoiser", "reuse_freed_memory", "tf32", "compile_imagination", "env",
        "world_model", "actor_critic", "agent",
    ],
    "evaluate": [
        "device", "channels_last", "compile_denoiser", "reuse_freed_memory", "tf32", "env", "world_model", "actor_critic",
        "evaluate", "aggregate.method_name",
    ],
    # games, seeds and released.games choose which score files enter the table
    "aggregate": ["games", "seeds", "aggregate", "released.games", "released.method_name"],
    # not released.games: adding a game must not rerun the others
    "import-released": [
        "env", "world_model", "actor_critic", "released.dir", "released.repo_id", "released.revision",
        "released.filename", "released.seed",
    ],
    "evaluate-released": [
        "device", "channels_last", "compile_denoiser", "reuse_freed_memory", "tf32", "env", "world_model", "actor_critic",
        "evaluate", "released.method_name", "released.seed",
    ],
    # not study.variants nor study.seeds: the job's variant comes on its command line, so that
    # adding a variant or a seed reruns no other job
    "study": [
        "device", "channels_last", "compile_denoiser", "reuse_freed_memory", "tf32", "world_model.denoiser",
        "world_model.sampler", "world_model.denoiser_optimizer", "world_model.batch_size", "study.dataset",
        "study.denoiser_steps", "study.heldout_episodes", "study.rollouts_per_episode", "study.horizons",
    ],
    "study-report": ["study"],
}

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


def score_files(params: dict[str, Any]) -> list[str]:
    """Every score file `aggregate` reads: the trained runs', then the released agents'."""
    return [f"{run_dir(g, s)}/score.json" for g, s in runs(params)] + [
        f"{released_dir(g)}/score.json" for g in released_games(params)
    ]


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
    return Path(job_dir(stage, game, seed)) / PROVENANCE_DIR / f"{stage}.json"


def stale_reason(params: dict[str, Any], stage: str, game: str | None = None, seed: int | None = None) -> str | None:
    """Why the job's existing outputs do not come from the current params and code; None when
    they do, or when there are none (then both tools run the job anyway)."""
    if not (Path(job_dir(stage, game, seed)) / PRIMARY_OUTPUT[stage]).exists():
        return None
    record = provenance_path(stage, game, seed)
    found = _recorded_key(record)
    if found is None:
        return f"{job_dir(stage, game, seed)}/{PRIMARY_OUTPUT[stage]} has no provenance record ({record})"
    expected = stage_key(params, stage, game, seed)
    if found != expected:
        return f"{job_dir(stage, game, seed)}/{PRIMARY_OUTPUT[stage]} was built under key {found}; current params and code give {expected}"
    return None


def key_file(params: dict[str, Any], stage: str, game: str | None = None, seed: int | None = None) -> str:
    """The Snakefile's provenance input of a job: DIR/.provenance/STAGE.key-KEY for the current key.

    `done` leaves the key file of the key a job's outputs were built under, dated 1970, beside
    the record STAGE.json. When the record holds another key, or none (a stage started and not
    recorded: killed, failed, or run by hand; or outputs never built), the key file of the
    current key is created here, dated now: newer than the outputs, so Snakemake reruns the job
    and everything after it (an input newer than the outputs reruns a job Snakemake has no
    record of; one it has a record of reruns because its input's name changed)."""
    key = stage_key(params, stage, game, seed)
    path = Path(job_dir(stage, game, seed)) / PROVENANCE_DIR / f"{stage}.key-{key}"
    if _recorded_key(provenance_path(stage, game, seed)) != key or not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        os.utime(path)  # now, also if it existed
    return path.as_posix()


def _recorded_key(record: Path) -> str | None:
    try:
        return str(json.loads(record.read_text())["key"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def all_jobs(params: dict[str, Any]) -> list[Job]:
    per_run = ("collect", "train-world-model", "train-agent", "evaluate")
    jobs: list[Job] = [(st, g, s) for g, s in runs(params) for st in per_run]
    jobs += [(st, g, None) for g in released_games(params) for st in ("import-released", "evaluate-released")]
    jobs += [("study", study_job(g, v), s) for g, v, s in study_jobs(params)]
    jobs += [("study-report", g, None) for g in study_games(params)]
    return jobs + [("aggregate", None, None)]


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
    """Write the job's provenance record; under Snakemake with dvc.yaml's params file, commit the
    job to dvc.lock as well."""
    params = load_raw(params_file)
    path = provenance_path(stage, game, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"stage": stage, "game": game, "seed": seed, "key": stage_key(params, stage, game, seed),
              "params_file": params_file, "tool": tool, "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    for old in path.parent.glob(f"{stage}.key-*"):
        old.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    key = path.parent / f"{stage}.key-{record['key']}"
    key.touch()
    # Older than any output: Snakemake compares timestamps for outputs it has no record of, and
    # a key file newer than the outputs would rerun the job it vouches for.
    os.utime(key, (0, 0))
    same_file = Path(params_file).resolve() == (ROOT / DVC_PARAMS_FILE).resolve()
    if tool == "snakemake" and same_file and (ROOT / ".dvc").is_dir():
        dvc_commit(dvc_stage_name(stage, game, seed, params))
    if tool != "snakemake" and Path(".snakemake", "metadata").is_dir():
        forget_snakemake_record(stage, game, seed)
    return path


def forget_snakemake_record(stage: str, game: str | None, seed: int | None) -> None:
    """Another tool rebuilt the job: drop Snakemake's own record of its outputs (official CLI),
    which would otherwise rerun the job for the params of Snakemake's last run; the provenance
    record now speaks for them."""
    outputs = [f"{job_dir(stage, game, seed)}/{name}" for name in STAGE_OUTPUTS[stage]]
    snakemake = Path(sys.executable).with_name("snakemake")
    subprocess.run([str(snakemake) if snakemake.exists() else "snakemake", "--cleanup-metadata", *outputs,
                    "--quiet", "all"], capture_output=True, text=True)


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
    st = sub.add_parser("stale", help="jobs whose outputs the current params and code did not produce")
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
        for job in all_jobs(params):
            if (why := stale_reason(params, *job)) is not None:
                print(f"{dvc_stage_name(*job, params)}: {why}")


if __name__ == "__main__":
    main()
