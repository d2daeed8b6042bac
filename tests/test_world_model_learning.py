"""Real learning checks of the world model on a real game (small networks, 32x32 frames, CPU).

Both train on the paper's minimum initial collection (5,000 uniform-random steps of Boxing,
whole games) with the network sizes of configs/small_learning.yaml, and are measured on a
held-out games (another seed) against the baselines the issue names:
- the denoiser's one-step open-loop MSE (2 Euler steps as in small_learning.yaml, 8-bit quantized)
  is clearly below "repeat the last real frame";
- the reward/termination model beats the majority-class predictor on recall of the minority
  (non-zero reward) classes.
The denoiser check runs in every suite (slow, ~4 minutes on 2 threads). The reward check is
opt-in (DIAMOND_LONG_LEARNING_TESTS=1): with ~1.5% reward steps per sign and the paper's plain
cross-entropy, R leaves the majority class abruptly, after a number of steps that depends on the
initialisation (measured on these data: 600 steps for one init, none by 1,000 for another), so
a CPU-suite budget does not make it a reliable check.
"""

from __future__ import annotations

from pathlib import Path

import os

import numpy as np
import pytest
import torch

from conftest import tiny_params_dict
from diamond.collector import Collector, UniformPolicy
from diamond.config import Params, params_from_dict
from diamond.data import EpisodeStore, SegmentSampler
from diamond.env import make_env, num_actions
from diamond.fidelity import heldout_episodes, open_loop_metrics, reward_end_metrics
from diamond.world_model import build_world_model

pytestmark = pytest.mark.slow

GAME = "Boxing"
COLLECT_STEPS = 5000
DENOISER_STEPS = 1500
REWARD_STEPS = 1500
BATCH = 16
LONG = os.environ.get("DIAMOND_LONG_LEARNING_TESTS") == "1"


def learning_params() -> Params:
    d = tiny_params_dict()
    d["env"].update(obs_size=32, max_episode_frames=108_000)  # whole Boxing games
    # configs/small_learning.yaml's networks: a 4-level 32-channel U-Net; R of 4 levels of 16
    # channels with an LSTM of 64 (the 2-level 8-channel test R stays at the majority class).
    d["world_model"]["denoiser"].update(
        channels=[32, 32, 32, 32], depths=[1, 1, 1, 1], attention=[False] * 4, num_groups_channels=32,
    )
    d["world_model"]["sampler"]["num_steps"] = 2  # as in small_learning.yaml
    d["world_model"]["reward_end"].update(
        channels=[16, 16, 16, 16], depths=[1, 1, 1, 1], cond_channels=32, num_groups_channels=16,
        lstm_dim=64, segment_length=19,  # the paper's segments (10 steps: R stays at the majority class)
    )
    for opt in ("denoiser_optimizer", "reward_end_optimizer"):
        d["world_model"][opt].update(lr=1e-3, warmup_steps=20)
    return params_from_dict(d)


@pytest.fixture(scope="module")
def boxing(tmp_path_factory) -> tuple[Params, EpisodeStore, list]:
    """(params, 5,000 random steps of Boxing, two held-out random games)."""
    p = learning_params()
    n = num_actions(GAME)
    store = EpisodeStore(tmp_path_factory.mktemp("boxing") / "episodes", game=GAME, num_actions=n)
    collector = Collector(make_env(GAME, 0, True, p.env), UniformPolicy(n, np.random.default_rng(0)), store)
    collector.collect(COLLECT_STEPS)
    collector.flush()
    return p, store, heldout_episodes(GAME, 0, p.env, 2)


@pytest.fixture(autouse=True)
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def test_denoiser_beats_repeat_last_frame(boxing):
    p, store, held = boxing
    torch.manual_seed(0)
    wm = build_world_model(p.world_model, store.num_actions, torch.device("cpu"))
    L = p.world_model.denoiser.num_conditioning_frames
    segments = SegmentSampler(store, np.random.default_rng(0))

    def one_step() -> dict[str, float]:
        wm.denoiser.eval()
        gen = torch.Generator().manual_seed(0)
        m = open_loop_metrics(wm.sampler, held, L, [1], torch.device("cpu"), gen)["horizons"]["1"]
        wm.denoiser.train()
        return m

    untrained = one_step()
    for _ in range(DENOISER_STEPS):
        loss, _ = wm.denoiser.compute_loss(segments.sample(BATCH, L).to_torch("cpu"))
        wm.denoiser_trainer.step(loss)
    trained = one_step()
    print(f"one-step MSE untrained {untrained['mse']:.6f}, after {DENOISER_STEPS} steps {trained['mse']:.6f}, "
          f"repeat-last {trained['mse_repeat_last']:.6f} ({trained['mse'] / trained['mse_repeat_last']:.2f}x)")
    assert trained["mse"] < 0.8 * trained["mse_repeat_last"]


@pytest.mark.skipif(not LONG, reason="set DIAMOND_LONG_LEARNING_TESTS=1 (about 8 minutes of CPU)")
def test_reward_model_recalls_minority_classes(boxing):
    """Landed and taken punches are ~1.5% of random-play steps each; each changes the player's
    (left) or the opponent's (right) score digits between frame t and t+1. R generalises the
    player's digits first; at 32x32 the opponent's sit next to the ticking clock and take longer."""
    p, store, held = boxing
    torch.manual_seed(0)
    wm = build_world_model(p.world_model, store.num_actions, torch.device("cpu"))
    segments = SegmentSampler(store, np.random.default_rng(0))
    T = p.world_model.reward_end.segment_length
    for _ in range(REWARD_STEPS):
        loss, _ = wm.reward_end.compute_loss(segments.sample(BATCH, T).to_torch("cpu"))
        wm.reward_end_trainer.step(loss)
    rep = reward_end_metrics(wm.reward_end, held, T, torch.device("cpu"))["reward"]
    recall = rep["recall"]
    print(f"reward recall {recall} support {rep['support']}")
    assert rep["support"]["negative"] >= 10 and rep["support"]["positive"] >= 10
    # The majority-class predictor: recall 1 on "zero", 0 on both reward classes.
    assert recall["zero"] >= 0.9
    assert recall["positive"] >= 0.3
    assert (recall["positive"] + recall["negative"]) / 2 >= 0.2
