"""A throw-away copy of this repository for running the real pipelines (dvc, snakemake) on.

The copy holds the files git would commit (tracked plus untracked-but-not-ignored), tiny params
as params.yaml, and one commit, so git_commit tags and `dvc exp` work as in a real clone.
"""

from __future__ import annotations

import csv
import filecmp
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import torch
import yaml

from conftest import ROOT, tiny_params_dict, write_params

VENV_BIN = Path(sys.executable).parent
GIT_ENV = {"GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.org",
           "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.org"}
EXPERIMENT = "diamond-atari100k"
STAGES = ("collect", "train-world-model", "train-agent", "evaluate")


def pipeline_params(seeds: list[int]) -> dict:
    """tiny_params_dict() made smaller still where only the wiring is under test: every stage
    runs its real code path, in seconds."""
    d = tiny_params_dict()
    d["seeds"] = seeds
    d["env"]["max_episode_frames"] = 2000  # test episodes of an untrained agent end soon
    wm = d["world_model"]
    wm["denoiser"].update(channels=[8, 8], cond_channels=16, num_groups_channels=8)
    wm["sampler"]["num_steps"] = 1
    wm.update(denoiser_steps=4, reward_end_steps=4)
    d["actor_critic"].update(horizon=2, batch_size=2)
    d["agent"].update(total_env_steps=300, first_epoch_actor_critic_steps=1, denoiser_steps_per_epoch=1,
                      reward_end_steps_per_epoch=1, actor_critic_steps_per_epoch=1, test_every_epochs=100)
    d["evaluate"].update(episodes=2, fidelity_episodes=1, fidelity_horizons=[1, 2], gif_frames=4)
    return d


def project_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=ROOT, check=True, capture_output=True).stdout.decode()
    return [f for f in out.split("\0") if f and (ROOT / f).is_file()]


def make_repo(dest: Path, params: dict) -> Path:
    dest.mkdir(parents=True)
    for rel in project_files():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dest / rel)
    # generated results of the developer's own runs are not part of a fresh clone
    for rel in ("dvc.lock", "runs", "mlflow.db", ".snakemake"):
        p = dest / rel
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    write_params(dest / "params.yaml", params)
    git(dest, "init", "-q")
    commit_all(dest, "fresh clone")
    return dest


def copy_run(made: dict, dest: Path) -> tuple[Path, Path]:
    """A copy of a finished run's clone (git history, DVC cache, results) and of its MLflow store,
    under dest: (repo, store), as if the run had been made there. The copied store still names
    the original's artifact folder (MLflow fixes it when the experiment is created), which no
    test reads."""
    dest.mkdir(parents=True, exist_ok=True)
    repo, store = dest / made["repo"].name, dest / made["store"].name
    shutil.copytree(made["repo"], repo, symlinks=True)
    shutil.copy2(made["store"], store)
    return repo, store


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True,
                          env={**os.environ, **GIT_ENV}).stdout


def commit_all(repo: Path, message: str) -> None:
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "--allow-empty", "-m", message)


def tool_env(store: Path) -> dict[str, str]:
    # one torch thread per stage: oversubscribed threads on a shared CPU slow small models badly
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{store}", "OMP_NUM_THREADS": "1", **GIT_ENV}
    env.pop("DIAMOND_PIPELINE_ID", None)
    env.pop("MLFLOW_EXPERIMENT_NAME", None)
    return env


def run_tool(repo: Path, store: Path, *cmd: str, timeout: int = 600, stdout_only: bool = False,
             extra_env: dict[str, str] | None = None) -> str:
    """Run dvc/snakemake in `repo`; fail the test with the tool's output tail if it fails.
    Returns stdout and stderr together (the tools log to stderr), or stdout alone."""
    p = subprocess.run(list(cmd), cwd=repo, env={**tool_env(store), **(extra_env or {})}, capture_output=True,
                       text=True, timeout=timeout)
    out = p.stdout + p.stderr
    assert p.returncode == 0, f"{' '.join(cmd)} failed ({p.returncode}):\n{out[-4000:]}"
    return p.stdout if stdout_only else out


def dvc_stages_run(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def set_param(repo: Path, key: str, value) -> None:
    path = repo / "params.yaml"
    d = yaml.safe_load(path.read_text())
    node = d
    *parents, last = key.split(".")
    for k in parents:
        node = node[k]
    node[last] = value
    write_params(path, d)


def mlflow_runs(store: Path) -> pd.DataFrame:
    mlflow.set_tracking_uri(f"sqlite:///{store}")
    return mlflow.search_runs(experiment_names=[EXPERIMENT])


# Artifacts of two runs of the same params compared (tests/test_slurm.py, test_pipeline_snakemake.py)


def same_tensors(a: Path, b: Path) -> None:
    def flat(x, prefix=""):
        if isinstance(x, torch.Tensor):
            yield prefix, x
        elif isinstance(x, dict):
            for k, v in x.items():
                yield from flat(v, f"{prefix}.{k}")
    ta, tb = dict(flat(torch.load(a, weights_only=False))), dict(flat(torch.load(b, weights_only=False)))
    assert ta.keys() == tb.keys() and ta, a
    for k in ta:
        assert torch.equal(ta[k], tb[k]), f"{a}: {k} differs"


def same_tree(a: Path, b: Path) -> None:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()) and files, a
    _, mismatch, errors = filecmp.cmpfiles(a, b, [str(f) for f in files], shallow=False)
    assert not mismatch and not errors, f"{a}: {mismatch or errors} differ"


def curve_without_timing(path: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "epoch_seconds" and not k.startswith("seconds/")}
            for row in csv.DictReader(path.open())]


def assert_same_run(a: Path, b: Path) -> None:
    """Runs a and b (runs/G-S of two repos) made the same artifacts: datasets byte for byte, the
    weights' tensors, scores, fidelity, collection stats, metrics and curves but for timings."""
    for d in ("dataset_initial", "dataset"):
        same_tree(a / d, b / d)
    for f in ("world_model.pt", "agent.pt"):
        same_tensors(a / f, b / f)
    for f in ("score.json", "evaluate_fidelity.json", "collect.json"):
        assert json.loads((a / f).read_text()) == json.loads((b / f).read_text()), a / f
    m_a, m_b = (json.loads((r / "agent.json").read_text()) for r in (a, b))
    m_a.pop("wall_seconds_this_process"), m_b.pop("wall_seconds_this_process")
    assert m_a == m_b, a / "agent.json"
    assert curve_without_timing(a / "agent_curve.csv") == curve_without_timing(b / "agent_curve.csv")
