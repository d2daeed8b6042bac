"""Real learning checks of the world model on real games (small networks, 32x32 frames, CPU).

Both train on the paper's minimum initial collection (5,000 uniform-random steps, whole games)
with the network sizes of configs/small_learning.yaml, and are measured on held-out games
(another seed) against the baselines the issue names:
- the denoiser, on Boxing: one-step open-loop MSE (2 Euler steps as in small_learning.yaml,
  8-bit quantized) clearly below "repeat the last real frame";
- the reward/termination model, on Frostbite, started as train-world-model starts it on the
  small path (heads at the class frequencies, channels_last): where the real rewards are, the
  rewards imagination would sample from it, against the predictor of the class frequencies.
Why two games: on Boxing R leaves the majority class abruptly, after a number of steps that
depends on the initialisation (600 for one init, none by 1,000 for another, measured before the
prior init: its reward events are score digits a few pixels wide at 32x32, the opponent's next to
the ticking clock); on Frostbite a reward turns a whole ice-floe row from white to blue. Both run
in every suite (slow, on one thread: D ~3 minutes, R ~2.5; the suite's pytest-xdist workers
run them side by side). Curves of both, with their seconds: tests/learning_curves.py
(docs/results.md, "The learning tests' curves").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_params_dict
from diamond.config import Params, params_from_dict
from diamond.data import EpisodeStore, SegmentSampler
from diamond.env.atari import make_env, num_actions
from diamond.env.collector import Collector, UniformPolicy
from diamond.training import apply_speed_switches, training_step
from diamond.world_model.fidelity import heldout_episodes, open_loop_metrics, reward_end_metrics
from diamond.world_model.loop import init_reward_end_priors
from diamond.world_model.model import WorldModel, build_world_model

pytestmark = pytest.mark.slow

GAME = "Boxing"
REWARD_GAME = "Frostbite"
COLLECT_STEPS = 5000
# One-step MSE over repeat-last, inits 0/1/2 (tests/learning_curves.py, 2026-12-07): 0.782/0.791/0.860
# at 700 steps, 0.761/0.722/0.751 at 800, 0.759/0.692/0.698 at 900, 0.768/0.679/0.702 at 1,000 (the
# test's init is 0; channels_last moved inits 0 and 1 by at most 0.001: 0.762 and 0.722 at 800).
DENOISER_STEPS = 800
REWARD_STEPS = 400  # R leaves the class frequencies at 150-350 steps here (four inits measured)
BATCH = 16


def learning_params() -> Params:
    d = tiny_params_dict()
    d["env"].update(obs_size=32, max_episode_frames=108_000)  # whole Boxing games
    # configs/small_learning.yaml's networks: a 4-level 32-channel U-Net; R of 4 levels of 16
    # channels with an LSTM of 64 (the 2-level 8-channel test R stays at the majority class).
    d["world_model"]["denoiser"].update(
        channels=[32, 32, 32, 32], depths=[1, 1, 1, 1], attention=[False] * 4, num_groups_channels=32,
    )
    d["world_model"]["sampler"]["num_steps"] = 2  # as in small_learning.yaml
    # One target per segment, as when its threshold was set: this test is about learning at all,
    # and the autoregressive target (tested in test_denoiser.py) would double its CPU time.
    d["world_model"]["denoiser"]["num_autoregressive_steps"] = 0
    d["world_model"]["reward_end"].update(
        channels=[16, 16, 16, 16], depths=[1, 1, 1, 1], cond_channels=32, num_groups_channels=16,
        lstm_dim=64,
    )
    # R's segments are horizon + 4 conditioning frames: 19, the paper's (10 steps: R stays at the majority class)
    d["actor_critic"]["horizon"] = 15
    for opt in ("denoiser_optimizer", "reward_end_optimizer"):
        d["world_model"][opt].update(lr=1e-3, warmup_steps=20)
    return params_from_dict(d)


def random_play(game: str, root: Path, p: Params, heldout: int) -> tuple[EpisodeStore, list]:
    """5,000 uniform-random steps of `game` (seed 0) and `heldout` random episodes on another seed."""
    n = num_actions(game)
    store = EpisodeStore(root / "episodes", game=game, num_actions=n)
    collector = Collector(make_env(game, 0, True, p.env), UniformPolicy(n, np.random.default_rng(0)), store)
    collector.collect(COLLECT_STEPS)
    collector.flush()
    return store, heldout_episodes(game, 0, p.env, heldout)


@pytest.fixture(scope="module")
def boxing(tmp_path_factory) -> tuple[Params, EpisodeStore, list]:
    """(params, 5,000 random steps of Boxing, two held-out random games)."""
    p = learning_params()
    return (p, *random_play(GAME, tmp_path_factory.mktemp("boxing"), p, 2))


@pytest.fixture(scope="module")
def frostbite(tmp_path_factory) -> tuple[Params, EpisodeStore, list]:
    """(params, 5,000 random steps of Frostbite, 12 held-out random lives)."""
    p = learning_params()
    return (p, *random_play(REWARD_GAME, tmp_path_factory.mktemp("frostbite"), p, 12))


@pytest.fixture(autouse=True)
def one_thread():
    """One thread, as tests/learning_curves.py measures (the same float reductions, so the same
    curve), and one core per test when pytest-xdist runs the two side by side."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fresh_world_model(p: Params, store: EpisodeStore, seed: int = 0) -> WorldModel:
    """A world model as train-world-model starts one on params.yaml's small path
    (diamond/world_model/loop.py start_or_resume): torch seeded, R's heads at the dataset's class
    frequencies (world_model.reward_end_prior_init), then the stages' speed switches
    (channels_last: NHWC convolutions, the same results up to rounding)."""
    assert p.world_model.reward_end_prior_init and p.channels_last
    torch.manual_seed(seed)
    wm = build_world_model(p.world_model, store.num_actions, p.env.obs_size, torch.device("cpu"))
    init_reward_end_priors(wm, store)
    apply_speed_switches(p, (wm.denoiser, wm.reward_end), None)
    return wm


def test_denoiser_beats_repeat_last_frame(boxing):
    p, store, held = boxing
    wm = fresh_world_model(p, store)
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
        batch = segments.sample(BATCH, p.world_model.denoiser.training_segment_steps).to_torch("cpu")
        training_step(wm.denoiser_trainer, wm.denoiser.compute_loss, batch)
    trained = one_step()
    print(f"one-step MSE untrained {untrained['mse']:.6f}, after {DENOISER_STEPS} steps {trained['mse']:.6f}, "
          f"repeat-last {trained['mse_repeat_last']:.6f} ({trained['mse'] / trained['mse_repeat_last']:.2f}x)")
    assert trained["mse"] < 0.8 * trained["mse_repeat_last"]


def test_reward_model_puts_rewards_where_the_real_ones_are(frostbite):
    """Frostbite under random play: ~2% of steps are rewarded (landing on a white ice-floe row
    turns the row blue: a wide band of pixels, visible at 32x32). Imagination samples R's
    categorical (official src/envs/world_model_env.py), so what the agent gets is R's probability
    of a reward where one happened (sampled recall) against where none did (false rate); a
    predictor of the class frequencies alone gives both the same ~2% and the log loss of the
    data's entropy. Four inits on these data (tests/learning_curves.py reward, 34 rewarded steps in
    12 held-out lives), at 400 steps: sampled recall 0.50/0.39/0.62/0.69, false rate
    0.008/0.004/0.011/0.006, log loss 0.64/0.66/0.37/0.32 of the constant's (the test's init is 0;
    init 1 was still at 0.08 recall at 300 steps)."""
    p, store, held = frostbite
    wm = fresh_world_model(p, store)
    segments = SegmentSampler(store, np.random.default_rng(0))
    T = p.world_model.reward_end.segment_length
    for _ in range(REWARD_STEPS):
        training_step(wm.reward_end_trainer, wm.reward_end.compute_loss, segments.sample(BATCH, T).to_torch("cpu"))
    rew = reward_end_metrics(wm.reward_end, held, T, torch.device("cpu"))["reward"]
    print(f"reward: sampled recall {rew['sampled_recall']['positive']:.3f}, false rate "
          f"{rew['sampled_false_rate']['positive']:.4f}, log loss {rew['log_loss']:.4f} (constant "
          f"{rew['log_loss_constant']:.4f}), recall {rew['recall']}, support {rew['support']}")
    assert rew["support"]["positive"] >= 10
    assert rew["sampled_recall"]["positive"] >= 0.25
    assert rew["sampled_recall"]["positive"] >= 10 * rew["sampled_false_rate"]["positive"]
    assert rew["log_loss"] <= 0.8 * rew["log_loss_constant"]
    assert rew["recall"]["zero"] >= 0.9
