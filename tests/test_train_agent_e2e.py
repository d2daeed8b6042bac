"""End to end at the smallest size on real Breakout: collect -> train-world-model -> train-agent ->
evaluate, through the stage command lines, with a real MLflow store."""

from __future__ import annotations

import csv
from pathlib import Path

import mlflow
import numpy as np
import pytest

from agent_helpers import agent_params_dict, agent_paths, prepare_run, run_stage
from diamond.data import EpisodeStore
from diamond.io import read_json
from diamond.results.scores import load_result

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    tmp = tmp_path_factory.mktemp("e2e")
    params, run = prepare_run(tmp, agent_params_dict(), train_world_model=True)
    done = run_stage("train_agent", params, tmp, **agent_paths(run))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "started fresh (no saved state)" in done.stdout
    return tmp, params, run


def test_train_agent_spends_the_budget_and_keeps_the_initial_data(trained: tuple[Path, Path, Path]) -> None:
    _, _, run = trained
    metrics = read_json(run / "agent.json")
    initial = EpisodeStore(run / "dataset_initial")
    final = EpisodeStore(run / "dataset")
    assert metrics["env_steps"] == final.num_steps == 300
    assert metrics["initial_env_steps"] == initial.num_steps
    # The final dataset extends the initial one episode for episode.
    assert len(final) > len(initial)
    for i in range(len(initial)):
        assert np.array_equal(final[i].act, initial[i].act) and np.array_equal(final[i].obs, initial[i].obs)
    # epoch 0 (actor-critic only) + ceil((300 - initial) / 50) collecting epochs + 1 final epoch
    epochs = 1 + -(-(300 - initial.num_steps) // 50) + 1
    assert metrics["epochs"] == epochs
    rows = list(csv.DictReader((run / "agent_curve.csv").open()))
    assert [int(r["epoch"]) for r in rows] == list(range(epochs))
    assert metrics["actor_critic_steps"] == 2 + 2 * (epochs - 1)
    assert np.isfinite(float(rows[-1]["actor_critic/loss_value"]))


def test_evaluate_writes_the_score_fidelity_and_gifs(trained: tuple[Path, Path, Path]) -> None:
    tmp, params, run = trained
    done = run_stage("evaluate", params, tmp, agent=run / "agent.pt", dataset=run / "dataset",
                     out_score=run / "score.json", out_fidelity=run / "evaluate_fidelity.json",
                     out_media=run / "evaluate_media")
    assert done.returncode == 0, done.stderr[-3000:]
    score = load_result(run / "score.json")  # aggregate's own checks of the contract
    assert score.game == "Breakout" and score.num_episodes == 2
    fidelity = read_json(run / "evaluate_fidelity.json")
    assert set(fidelity["open_loop"]["horizons"]) == {"1", "3"}
    for gif in ("agent_real.gif", "agent_imagination.gif", "world_model_real_vs_imagined.gif"):
        assert (run / "evaluate_media" / gif).stat().st_size > 0
    mlflow.set_tracking_uri(f"sqlite:///{tmp / 'mlflow.db'}")
    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.stage = 'evaluate'")
    assert len(runs) == 1 and runs.iloc[0]["status"] == "FINISHED"
    assert runs.iloc[0]["metrics.mean_return"] == pytest.approx(score.mean_return)
    agent_runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.stage = 'train-agent'")
    assert len(agent_runs) >= 1 and "metrics.actor_critic.loss_value" in agent_runs.columns


def test_rerun_of_a_finished_run_resumes_without_training(trained: tuple[Path, Path, Path]) -> None:
    tmp, params, run = trained
    before = read_json(run / "agent.json")
    done = run_stage("train_agent", params, tmp, **agent_paths(run))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout and "epoch 0/" not in done.stdout
    after = read_json(run / "agent.json")
    assert {k: v for k, v in after.items() if k != "wall_seconds_this_process"} == {
        k: v for k, v in before.items() if k != "wall_seconds_this_process"}


def test_bad_agent_checkpoint_is_a_one_line_error(trained: tuple[Path, Path, Path]) -> None:
    tmp, params, run = trained
    done = run_stage("evaluate", params, tmp, agent=run / "world_model.pt", dataset=run / "dataset",
                     out_score=tmp / "x.json", out_fidelity=tmp / "y.json", out_media=tmp / "m")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: ") and "not an agent checkpoint" in done.stderr
