"""What `dvc.yaml` and the `Snakefile` share, so that the two pipelines cannot drift apart.

- the runs (game, seed) of a params file and the per-run artifact paths, and the games of the
  authors' released agents (`released.games`, artifacts under runs/released/G);
- the params keys each stage reads (DVC `params:`, Snakemake rerun-on-params);
- the source files each stage runs (DVC `deps:`, Snakemake rerun-on-code), found from the
  stage module's imports so that nothing is forgotten.

Command line, used by dvc.yaml's aggregate stage (DVC templating has no cartesian product):

    python -m stages.pipeline score-files --params params.yaml   # runs/G-S/score.json ...

It imports only the standard library and PyYAML: the Snakefile loads it on every invocation.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
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
}

# The params keys each stage reads (dotted keys for parts of a section). Changing any other
# key leaves the stage's outputs valid, so neither pipeline reruns it.
STAGE_PARAMS: dict[str, list[str]] = {
    "collect": ["env", "collect"],
    # fidelity of the trained world model is measured here, on held-out real episodes
    "train-world-model": [
        "device", "channels_last", "compile_denoiser", "reuse_freed_memory", "env", "world_model",
        "evaluate.fidelity_episodes", "evaluate.fidelity_horizons", "evaluate.gif_frames",
    ],
    "train-agent": [
        "device", "channels_last", "compile_denoiser", "reuse_freed_memory", "env", "world_model", "actor_critic",
        "agent",
    ],
    "evaluate": [
        "device", "channels_last", "compile_denoiser", "reuse_freed_memory", "env", "world_model", "actor_critic",
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
        "device", "channels_last", "compile_denoiser", "reuse_freed_memory", "env", "world_model", "actor_critic",
        "evaluate", "released.method_name", "released.seed",
    ],
}

# Data files read by a stage besides code and params.
STAGE_DATA: dict[str, list[str]] = {"aggregate": ["diamond/reference_data"]}


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


def code_digest(stage: str) -> str:
    """Hash of the source and data files `stage` runs; changes when any of them does."""
    h = hashlib.sha256()
    for rel in stage_code_files(stage) + STAGE_DATA.get(stage, []):
        path = ROOT / rel
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            h.update(f.relative_to(ROOT).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    sf = sub.add_parser("score-files", help="the score.json of every run in the params file")
    sf.add_argument("--params", default="params.yaml")
    cf = sub.add_parser("code-files", help="the source files a stage runs")
    cf.add_argument("stage", choices=sorted(STAGE_MODULES))
    args = p.parse_args(argv)
    if args.command == "score-files":
        print(" ".join(score_files(load_raw(args.params))))
    else:
        print("\n".join(stage_code_files(args.stage)))


if __name__ == "__main__":
    main()
