"""Shared test fixtures: the tiniest params that still run every code path for real."""

from __future__ import annotations

import copy
import os
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


# Under pytest-xdist (pyproject.toml's addopts: `-n 3 --dist loadscope --no-loadscope-reorder`) a
# worker takes a whole group at a time (GroupScheduling below), so a module's fixtures are built
# once: a group is a test file, the files that copy the session's tiny runs go together (built
# once too), and each learning test is a group of its own (they share no fixture), so the two run
# side by side. The longest groups start first (durations: docs/results.md, "The test suite's
# time"; tests/test_suite_groups.py checks that each name still exists); xdist hands a worker its
# next group while the current one has two tests or fewer left. Three workers on two cores: the
# SLURM test and the MLflow server tests spend half their time waiting (polling, server starts),
# and the third worker fills that time (four: slower, docs/results.md).
SHARED_TINY_RUNS = {"test_pipeline_dvc", "test_provenance", "test_sharing"}
OWN_GROUP_PER_TEST = {"test_world_model_learning"}
LONGEST_FIRST = ["test_slurm", "tiny_runs", "test_world_model_learning::test_denoiser_beats_repeat_last_frame",
                 "test_pipeline_snakemake", "test_world_model_learning::test_reward_model_puts_rewards_where_the_real_ones_are",
                 "test_tracking_server", "test_train_agent_resume", "test_released", "test_bench", "test_fault_campaign",
                 "test_export_official", "test_import_official", "test_compiled_step", "test_train_agent_e2e",
                 "test_gpu_smoke", "test_study", "test_imagination"]
# Torch in a worker, and the processes it starts, take one thread: the workers share the cores.
UNDER_XDIST = bool(os.environ.get("PYTEST_XDIST_WORKER"))


def xdist_group(nodeid: str) -> str:
    """The group of a test id ("tests/test_x.py::test_y[param]")."""
    path, _, rest = nodeid.partition("::")
    name = Path(path).stem
    if name in OWN_GROUP_PER_TEST:
        return f"{name}::{rest.split('[')[0]}"
    return "tiny_runs" if name in SHARED_TINY_RUNS else name


def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """xdist's loadscope scheduling with the groups above as scopes. (Its loadgroup mode marks
    the groups by appending to each test's id, which pytest 9 no longer reads: the groups were
    ignored and the tests spread one by one.)"""
    if config.getoption("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_group(nodeid)

    return GroupScheduling(config, log)


def pytest_configure(config: pytest.Config) -> None:
    if UNDER_XDIST:
        os.environ["OMP_NUM_THREADS"] = "1"
        import torch
        torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if UNDER_XDIST:  # the workers' order is the order of the groups in xdist's queue
        rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
        items.sort(key=lambda item: rank.get(xdist_group(item.nodeid), len(rank)))  # stable: file order otherwise
