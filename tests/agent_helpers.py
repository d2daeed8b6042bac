"""Shared by the train-agent end-to-end and resume tests: smallest params and stage subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, tiny_params_dict, write_params

GAME, SEED = "Breakout", 0


def agent_params_dict(**agent: object) -> dict:
    d = tiny_params_dict()
    # Four U-Net levels keep the middle self-attention at 8x8 (two levels would put it at 32x32,
    # which dominates the run time on a CPU).
    d["world_model"]["denoiser"].update(channels=[16, 16, 16, 16], depths=[1, 1, 1, 1], attention=[False] * 4)
    d["agent"].update(
        total_env_steps=300, collect_steps_per_epoch=50, first_epoch_actor_critic_steps=2,
        denoiser_steps_per_epoch=2, reward_end_steps_per_epoch=2, actor_critic_steps_per_epoch=2,
        final_epochs_without_collection=1, test_every_epochs=2, test_episodes=1, checkpoint_every_epochs=2,
    )
    d["agent"].update(agent)
    return d


def stage_env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
    # One thread per process: the CPU is shared, and oversubscribed threads slow torch down tenfold.
    env["OMP_NUM_THREADS"] = "1"
    return env


def stage_args(stage: str, params: Path, run: Path, **paths: Path) -> list[str]:
    args = [sys.executable, "-m", f"stages.{stage}", "--params", str(params), "--game", GAME, "--seed", str(SEED)]
    for key, value in paths.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def run_stage(stage: str, params: Path, tmp: Path, timeout: float = 600, **paths: Path) -> subprocess.CompletedProcess:
    return subprocess.run(stage_args(stage, params, tmp, **paths), cwd=tmp, env=stage_env(tmp),
                          capture_output=True, text=True, timeout=timeout)


def agent_paths(run: Path) -> dict[str, Path]:
    return dict(
        dataset=run / "dataset_initial", world_model=run / "world_model.pt", out_checkpoint=run / "agent.pt",
        out_dataset=run / "dataset", out_metrics=run / "agent.json", out_curve=run / "agent_curve.csv",
        state_dir=run / "agent_state",
    )


def prepare_run(tmp: Path, params: dict, train_world_model: bool) -> tuple[Path, Path]:
    """Params file and run dir with a collected dataset and a world-model checkpoint."""
    params_file = write_params(tmp / "params.yaml", params)
    run = tmp / f"{GAME}-{SEED}"
    done = run_stage("collect", params_file, tmp, out_dataset=run / "dataset_initial", out_stats=run / "collect.json")
    assert done.returncode == 0, done.stderr[-3000:]
    if train_world_model:
        done = run_stage("train_world_model", params_file, tmp, dataset=run / "dataset_initial",
                         out_checkpoint=run / "world_model.pt", out_metrics=run / "world_model.json",
                         out_curve=run / "world_model_curve.csv", out_media=run / "world_model_media")
        assert done.returncode == 0, done.stderr[-3000:]
    else:
        # An untrained world model, in the checkpoint format train-world-model writes.
        import torch

        from diamond.config import params_from_dict
        from diamond.env.atari import num_actions
        from diamond.world_model.model import build_world_model, save_world_model

        torch.manual_seed(0)
        p = params_from_dict(params)
        save_world_model(run / "world_model.pt", build_world_model(p.world_model, num_actions(GAME), p.env.obs_size, torch.device("cpu")))
    return params_file, run


__all__ = ["GAME", "ROOT", "SEED", "agent_params_dict", "agent_paths", "prepare_run", "run_stage", "stage_args", "stage_env"]
