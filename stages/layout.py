"""What `dvc.yaml` and the `Snakefile` share, so that the two pipelines cannot drift apart.

- the runs (game, seed) of a params file and the per-run artifact paths, and the games of the
  authors' released agents (`released.games`, artifacts under runs/released/G);
- the jobs and which jobs each one reads (`upstream`);
- the params keys each stage reads (DVC `params:`, the provenance key: stages/stage_params.py);
- the source files each stage runs (DVC `deps:`, the provenance key), found from the stage
  module's imports so that nothing is forgotten.

It imports only the standard library and PyYAML: the Snakefile loads it on every invocation.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

from stages.stage_params import STAGE_PARAMS  # one declaration, read by the stages too

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


# Data files read by a stage besides code and params.
STAGE_DATA: dict[str, list[str]] = {"aggregate": ["diamond/results/reference_data"]}


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


def job_dir(stage: str, game: str | None, seed: int | None) -> str:
    if stage == "aggregate":
        return REPORTS_DIR
    if stage == "study":
        return f"{STUDY_DIR}/{game}-{seed}"
    if stage == "study-report":
        return STUDY_REPORTS_DIR
    return released_dir(str(game)) if stage in ("import-released", "evaluate-released") else run_dir(str(game), int(seed))


def all_jobs(params: dict[str, Any]) -> list[Job]:
    """Every job of the params file, each after the jobs it reads."""
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
