"""Real learning checks on real games (small networks, 32x32 frames, CPU).

What runs in every suite (slow; 200 denoiser steps of a 274k-parameter U-Net on 2 threads):
- The denoiser learns the next frame: after 200 steps on Boxing its held-out one-step open-loop
  MSE (3 Euler steps, as the paper samples) is a small fraction of the untrained model's and
  within 1.5x of "repeat the last real frame". This catches broken preconditioning, conditioning
  or evaluation alignment (an unconditioned or misaligned model stays far above repeat-last).

The issue's full criteria need more optimiser steps than a CPU suite can afford, so they run
only with DIAMOND_LONG_LEARNING_TESTS=1 (measured, same code on a GPU, fp32, tiny nets,
batch 16): the one-step MSE falls below 0.8x repeat-last only after ~600-1000 steps
(Boxing 0.83 at 800, 0.77 at 1000; Breakout 0.47 at 1000); the reward model still predicts only
the majority class after 1000 steps on Pong, Boxing, MsPacman and Krull (32 and 64 pixels).
The reward check is therefore expected to fail today: it is a real, failing check, not an xfail.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_params_dict
from diamond.collector import Collector, UniformPolicy
from diamond.config import Params, params_from_dict
from diamond.data import EpisodeStore, SegmentSampler
from diamond.env import make_env, num_actions
from diamond.fidelity import heldout_episodes, open_loop_metrics, reward_end_metrics
from diamond.world_model import WorldModel, build_world_model

OBS_SIZE = 32
LONG = os.environ.get("DIAMOND_LONG_LEARNING_TESTS") == "1"
long_only = pytest.mark.skipif(not LONG, reason="set DIAMOND_LONG_LEARNING_TESTS=1 (minutes of CPU)")


def learning_params(lr: float) -> Params:
    d = tiny_params_dict()
    d["env"]["obs_size"] = OBS_SIZE
    d["world_model"]["denoiser"].update(channels=[32, 32], depths=[1, 1], attention=[False, False], num_groups_channels=32)
    for opt in ("denoiser_optimizer", "reward_end_optimizer"):
        d["world_model"][opt].update(lr=lr, warmup_steps=20)
    d["world_model"]["reward_end"]["segment_length"] = 10
    d["world_model"]["batch_size"] = 16
    return params_from_dict(d)


def collect(game: str, steps: int, p: Params, root: Path) -> EpisodeStore:
    store = EpisodeStore(root, game=game, num_actions=num_actions(game))
    c = Collector(make_env(game, 0, True, p.env), UniformPolicy(num_actions(game), np.random.default_rng(0)), store)
    c.collect(steps)
    c.flush()
    return store


@pytest.fixture(autouse=True)
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def one_step_mse(wm: WorldModel, held, L: int) -> dict[str, float]:
    wm.denoiser.eval()
    m = open_loop_metrics(wm.sampler, held, L, [1], torch.device("cpu"), torch.Generator().manual_seed(0))["horizons"]["1"]
    wm.denoiser.train()
    return m


def train_denoiser(game: str, steps: int, tmp_path: Path) -> tuple[dict, dict]:
    p = learning_params(lr=2e-3)
    store = collect(game, 1000, p, tmp_path / game)
    held = heldout_episodes(game, 0, p.env, 3)  # 48 one-step rollouts
    torch.manual_seed(0)
    wm = build_world_model(p.world_model, store.num_actions, torch.device("cpu"))
    L = p.world_model.denoiser.num_conditioning_frames
    untrained = one_step_mse(wm, held, L)
    segments = SegmentSampler(store, np.random.default_rng(0))
    for _ in range(steps):
        loss, _ = wm.denoiser.compute_loss(segments.sample(16, L).to_torch("cpu"))
        wm.denoiser_trainer.step(loss)
    trained = one_step_mse(wm, held, L)
    print(f"{game} one-step MSE untrained {untrained['mse']:.6f}, after {steps} steps {trained['mse']:.6f}, "
          f"repeat-last {trained['mse_repeat_last']:.6f}")
    return untrained, trained


@pytest.mark.slow
def test_denoiser_learns_next_frame(tmp_path):
    untrained, trained = train_denoiser("Boxing", 200, tmp_path)
    assert trained["mse"] < 0.2 * untrained["mse"]
    assert trained["mse"] < 1.5 * trained["mse_repeat_last"]


@pytest.mark.slow
@long_only
def test_denoiser_beats_repeat_last_frame(tmp_path):
    _, trained = train_denoiser("Boxing", 1200, tmp_path)
    assert trained["mse"] < 0.8 * trained["mse_repeat_last"]


@pytest.mark.slow
@long_only
def test_reward_model_recalls_minority_class(tmp_path):
    p = learning_params(lr=1e-3)
    store = collect("Pong", 2000, p, tmp_path / "pong")
    held = heldout_episodes("Pong", 0, p.env, 3)
    torch.manual_seed(0)
    wm = build_world_model(p.world_model, store.num_actions, torch.device("cpu"))
    segments = SegmentSampler(store, np.random.default_rng(0))
    T = p.world_model.reward_end.segment_length
    for _ in range(2000):
        loss, _ = wm.reward_end.compute_loss(segments.sample(16, T).to_torch("cpu"))
        wm.reward_end_trainer.step(loss)
    rep = reward_end_metrics(wm.reward_end, held, T, torch.device("cpu"))["reward"]
    print(f"reward recall {rep['recall']} support {rep['support']}")
    assert rep["support"]["negative"] >= 10
    # The majority-class predictor (always 0 reward) has recall 0 on the minority class.
    assert rep["recall"]["negative"] >= 0.3
    assert rep["recall"]["zero"] >= 0.8
