"""stages.import_official: official weights -> this project's checkpoints, which train-agent and
evaluate accept; bad checkpoints are one-line errors. Real stage processes, a real MLflow store."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch

from agent_helpers import stage_env
from conftest import ROOT, write_params
from diamond.agent.checkpoint import read_agent_checkpoint
from diamond.io import ArtifactError, atomic_save_torch
from diamond.world_model.model import load_world_model
from test_official_parity import FIXTURE, fixture_params, fixture_params_dict

# The fixture's official agent has 3 actions: Freeway's minimal action set (no-op, up, down).
GAME = "Freeway"
OFFICIAL = FIXTURE / "tiny_agent.pt"


def stage(name: str, tmp: Path, params: Path, game: str = GAME, **paths: Path) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", f"stages.{name}", "--params", str(params), "--game", game, "--seed", "0"]
    for key, value in paths.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return subprocess.run(args, cwd=ROOT, env=stage_env(tmp), capture_output=True, text=True, timeout=900)


def import_official(tmp: Path, params: Path, checkpoint: Path, game: str = GAME) -> subprocess.CompletedProcess:
    return stage("import_official", tmp, params, game, checkpoint=checkpoint,
                 out_world_model=tmp / "world_model.pt", out_agent=tmp / "agent.pt")


def one_line_error(done: subprocess.CompletedProcess, *needles: str) -> None:
    assert done.returncode == 2, done.stderr[-2000:]
    # The emulator prints its banner on stderr when the game's action set is read.
    lines = [line for line in done.stderr.strip().splitlines() if not line.startswith(("A.L.E:", "[Powered by"))]
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("import")
    params = write_params(tmp / "params.yaml", fixture_params_dict())
    done = import_official(tmp, params, OFFICIAL)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "import-official Freeway" in done.stdout
    return tmp, params


def test_imported_checkpoints_give_the_official_outputs(imported: tuple[Path, Path]) -> None:
    tmp, _ = imported
    io = torch.load(FIXTURE / "tiny_io.pt", weights_only=True)
    wm = load_world_model(tmp / "world_model.pt", torch.device("cpu"), fixture_params().world_model)
    with torch.no_grad():
        denoised = wm.denoiser.eval().denoise(io["den_noisy_next_obs_a"], io["den_sigma_a"], io["den_obs"], io["den_act"])
    torch.testing.assert_close(denoised, io["den_denoised_a"], atol=1e-5, rtol=0)
    agent = read_agent_checkpoint(tmp / "agent.pt", GAME)
    digest = hashlib.sha256(OFFICIAL.read_bytes()).hexdigest()
    assert agent["imported_from"]["sha256"] == digest == torch.load(tmp / "world_model.pt", weights_only=False)["imported_from"]["sha256"]
    official = torch.load(OFFICIAL, weights_only=True)
    assert torch.equal(agent["actor_critic"]["actor.weight"], official["actor_critic.actor_linear.weight"])
    mlflow.set_tracking_uri(f"sqlite:///{tmp / 'mlflow.db'}")
    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.stage = 'import-official'")
    assert len(runs) == 1 and runs.iloc[0]["tags.official_checkpoint_sha256"] == digest


def test_wrong_game_truncated_file_and_foreign_state_dict_are_one_line_errors(imported: tuple[Path, Path], tmp_path: Path) -> None:
    _, params = imported
    one_line_error(import_official(tmp_path, params, OFFICIAL, game="Breakout"), "official agent has 3 actions, Breakout has 4")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(OFFICIAL.read_bytes()[:5000])
    one_line_error(import_official(tmp_path, params, truncated), "truncated.pt: corrupt or truncated checkpoint")
    foreign = tmp_path / "foreign.pt"
    atomic_save_torch(foreign, {"fc.weight": torch.zeros(2, 2)})
    one_line_error(import_official(tmp_path, params, foreign), "foreign.pt", "not an official DIAMOND agent state dict")
    one_line_error(import_official(tmp_path, params, tmp_path / "missing.pt"), "missing.pt: checkpoint not found")
    assert not (tmp_path / "world_model.pt").exists() and not (tmp_path / "agent.pt").exists()


def test_agent_checkpoints_of_the_old_format_name_it(tmp_path: Path) -> None:
    old = tmp_path / "agent.pt"
    atomic_save_torch(old, {"game": GAME, "actor_critic": {}, "world_model": {}})  # format 1 had no format key
    with pytest.raises(ArtifactError, match="agent.pt: not an agent checkpoint of format 'diamond-agent/2' .found None."):
        read_agent_checkpoint(old, GAME)


@pytest.mark.slow
def test_train_agent_continues_and_evaluate_scores_an_imported_agent(imported: tuple[Path, Path]) -> None:
    tmp, params = imported
    run = tmp / "run"
    done = stage("collect", tmp, params, out_dataset=run / "dataset_initial", out_stats=run / "collect.json")
    assert done.returncode == 0, done.stderr[-3000:]
    done = stage("train_agent", tmp, params, dataset=run / "dataset_initial", world_model=tmp / "world_model.pt",
                 init_agent=tmp / "agent.pt", out_checkpoint=run / "agent.pt", out_dataset=run / "dataset",
                 out_metrics=run / "agent.json", out_curve=run / "agent_curve.csv", state_dir=run / "agent_state")
    assert done.returncode == 0, done.stderr[-3000:]
    done = stage("evaluate", tmp, params, agent=run / "agent.pt", dataset=run / "dataset", out_score=run / "score.json",
                 out_fidelity=run / "fidelity.json", out_media=run / "media")
    assert done.returncode == 0, done.stderr[-3000:]
    # evaluate accepts the imported agent as it is, too
    done = stage("evaluate", tmp, params, agent=tmp / "agent.pt", dataset=run / "dataset_initial",
                 out_score=tmp / "score.json", out_fidelity=tmp / "fidelity.json", out_media=tmp / "media")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "mean return" in done.stdout
