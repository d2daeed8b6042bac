"""Shared test fixtures: the tiniest params that still run every code path for real."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from diamond.config import Params, params_from_dict

ROOT = Path(__file__).resolve().parents[1]


def tiny_params_dict() -> dict:
    """params.yaml shrunk to seconds per stage; tests override further keys as they need."""
    d = yaml.safe_load((ROOT / "params.yaml").read_text())
    d = copy.deepcopy(d)
    d["games"], d["seeds"], d["device"] = ["Breakout"], [0], "cpu"
    d["env"].update(obs_size=32, max_episode_frames=2000)  # test episodes of an untrained agent end soon
    d["collect"].update(min_steps=200, max_steps=400, chunk_steps=100, min_minority_rewards=1)
    den = d["world_model"]["denoiser"]
    den.update(cond_channels=32, channels=[16, 16], depths=[1, 1], attention=[False, False], num_groups_channels=16)
    d["world_model"]["reward_end"].update(channels=[8, 8], depths=[1, 1], cond_channels=16, lstm_dim=16)
    d["world_model"].update(batch_size=4, denoiser_steps=6, reward_end_steps=6, checkpoint_every_steps=3, log_every_steps=2)
    d["actor_critic"].update(channels=[8, 8, 8, 8], lstm_dim=16, batch_size=4, horizon=4)
    d["agent"].update(
        total_env_steps=400, collect_steps_per_epoch=50, first_epoch_actor_critic_steps=4,
        denoiser_steps_per_epoch=2, reward_end_steps_per_epoch=2, actor_critic_steps_per_epoch=2,
        final_epochs_without_collection=1, test_every_epochs=1, test_episodes=1, checkpoint_every_epochs=1,
    )
    d["evaluate"].update(episodes=2, fidelity_episodes=1, fidelity_horizons=[1, 3], gif_frames=8)
    d["aggregate"].update(bootstrap_reps=50)
    return d


def write_params(path: Path, d: dict) -> Path:
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


def first_tiny_run(tmp_path_factory: pytest.TempPathFactory, *cmd: str) -> dict:
    """One run of the tiny pipeline (pipeline_repo.pipeline_params([0])) by `cmd` in a fresh
    clone: {"repo", "store" (its MLflow store), "out" (the tool's output)}. Several modules start
    from the same first run; each takes its own copy (pipeline_repo.copy_run) so that none sees
    another's changes, and the pipeline runs once per session instead of once per module."""
    from pipeline_repo import make_repo, pipeline_params, run_tool  # pipeline_repo imports this module

    tmp = tmp_path_factory.mktemp(f"{cmd[0]}_tiny_run")
    repo, store = make_repo(tmp / "repo", pipeline_params([0])), tmp / "mlflow.db"
    return {"repo": repo, "store": store, "out": run_tool(repo, store, *cmd)}


@pytest.fixture(scope="session")
def dvc_tiny_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tiny pipeline made by `dvc repro` (first_tiny_run)."""
    return first_tiny_run(tmp_path_factory, "dvc", "repro")


@pytest.fixture(scope="session")
def snakemake_tiny_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tiny pipeline made by `snakemake -j 2` (first_tiny_run)."""
    return first_tiny_run(tmp_path_factory, "snakemake", "-j", "2")


@pytest.fixture
def tiny_params() -> Params:
    return params_from_dict(tiny_params_dict())


@pytest.fixture
def tiny_params_file(tmp_path: Path) -> Path:
    return write_params(tmp_path / "params.yaml", tiny_params_dict())
