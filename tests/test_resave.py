"""Frames re-saved per episode write, as the official models read them (row C9,
docs/official-parity.md; diamond/data/resave.py), against the official Dataset/Episode classes."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import gymnasium
import numpy as np
import pytest
import torch

from diamond.data import Episode, EpisodeStore, SegmentSampler
from diamond.data.resave import ResavedEpisodes, resave_table, training_episodes, write_counts
from diamond.env.collector import Collector, UniformPolicy
from diamond.io import ArtifactError

OFFICIAL_WRITES = Path(__file__).parent / "fixtures" / "official" / "c9_writes.pt"


def test_one_write_lowers_levels_1_to_63_by_one_and_keeps_the_rest():
    table = resave_table().astype(int)
    levels = np.arange(256)
    np.testing.assert_array_equal(table[0], levels)
    np.testing.assert_array_equal(table[1], np.where((levels >= 1) & (levels <= 63), levels - 1, levels))
    for w in range(len(table)):  # row C9: max(0, u - w) for u <= 63, exact above
        np.testing.assert_array_equal(table[w], np.where(levels <= 63, np.maximum(0, levels - w), levels))
    assert len(table) == 64  # after 63 writes every dark level is 0: the fixed point


def test_write_counts_count_the_writes_that_stored_each_frame():
    # Writes at 4, 8 and 9 steps: frames 0-3 in all three, 4-7 in two, 8 in one, frame 9 (after
    # the last step: final_observation) in none.
    np.testing.assert_array_equal(write_counts([4, 8, 9], 10), [3, 3, 3, 3, 2, 2, 2, 2, 1, 0])
    np.testing.assert_array_equal(write_counts([5], 6), [1, 1, 1, 1, 1, 0])


def fixture_frame(fx: dict, episode: int, j: int) -> np.ndarray:
    """Frame j of the fixture's episode: every level 0..255 in each frame (the recipe's formula)."""
    h, w = fx["height"], fx["width"]
    return ((np.arange(3 * h * w) + 5 * j + 97 * episode) % 256).astype(np.uint8).reshape(3, h, w)


class ReplayEnv(gymnasium.Env):
    """The fixture's episodes back to back (HWC frames, as an Atari env gives them); the last one
    never ends."""

    def __init__(self, fx: dict) -> None:
        self.fx, self.lengths = fx, fx["lengths"]
        self.episode, self.j = -1, 0
        h, w = fx["height"], fx["width"]
        self.observation_space = gymnasium.spaces.Box(0, 255, (h, w, 3), dtype=np.uint8)
        self.action_space = gymnasium.spaces.Discrete(1)

    def _obs(self) -> np.ndarray:
        return fixture_frame(self.fx, self.episode, self.j).transpose(1, 2, 0)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        self.episode, self.j = self.episode + 1, 0
        return self._obs(), {}

    def step(self, action: int):
        self.j += 1
        ended = self.episode < len(self.lengths) and self.j == self.lengths[self.episode]
        return self._obs(), 0.0, ended, False, {}


def replay_official_schedule(tmp_path: Path, training_frames: str):
    """The fixture's collection calls with our collectors; yields, after each epoch's call, the
    episodes D, R and the imagination starts read, with the official snapshot of that epoch."""
    fx = torch.load(OFFICIAL_WRITES, weights_only=True)
    store = EpisodeStore(tmp_path / "ds", game="Breakout", num_actions=1)
    env, policy = ReplayEnv(fx), UniformPolicy(1, np.random.default_rng(0))
    initial = Collector(env, policy, store)  # stages/collect.py: episodes stored once, when they end
    for n in fx["initial_calls"]:
        initial.collect(n)
    assert initial.flush() is None and len(store) == 1  # the initial collection ended with its episode
    agent = Collector(env, policy, store, store_in_progress=True, record_writes=training_frames == "resaved_per_write")
    for n, snapshot in zip(fx["epoch_calls"], fx["snapshots"]):
        agent.collect(n)
        yield fx, training_episodes(store, training_frames), snapshot


def test_resaved_frames_are_the_official_ones_after_every_write(tmp_path):
    darkened = 0
    for fx, episodes, snapshot in replay_official_schedule(tmp_path, "resaved_per_write"):
        assert len(episodes) == len(snapshot["obs"])
        for i, (official, ended) in enumerate(zip(snapshot["obs"], snapshot["ended"])):
            ep, t = episodes[i], len(official)
            np.testing.assert_array_equal(ep.obs[:t], official.numpy())
            if ended:  # final_observation stays exact
                np.testing.assert_array_equal(ep.obs[t], fixture_frame(fx, i, t))
            exact = np.stack([fixture_frame(fx, i, j) for j in range(t)])
            darkened = max(darkened, int((exact.astype(int) - ep.obs[:t].astype(int)).max()))
    assert darkened == 5  # the oldest frames of the last episode were written five times


def test_exact_frames_are_the_emulator_ones(tmp_path):
    differs = False
    for fx, episodes, snapshot in replay_official_schedule(tmp_path, "exact"):
        for i, official in enumerate(snapshot["obs"]):
            exact = np.stack([fixture_frame(fx, i, j) for j in range(len(episodes[i].obs))])
            np.testing.assert_array_equal(episodes[i].obs, exact)
            differs |= not np.array_equal(exact[:len(official)], official.numpy())
    assert differs


def test_write_history_is_in_the_manifest_and_survives_reopening_and_a_resume(tmp_path):
    fx = torch.load(OFFICIAL_WRITES, weights_only=True)
    store = EpisodeStore(tmp_path / "ds", game="Breakout", num_actions=1)
    env, policy = ReplayEnv(fx), UniformPolicy(1, np.random.default_rng(0))
    agent = Collector(env, policy, store, store_in_progress=True, record_writes=True)
    for _ in range(3):
        agent.collect(4)
    # a checkpoint: the collector's and the env's states, and the dataset as it is now
    state, env_state = agent.get_state(), copy.deepcopy(env)
    saved = store.copy_to(tmp_path / "checkpointed")
    for _ in range(2):
        agent.collect(4)
    uninterrupted = [store.write_history(i) for i in range(len(store))]
    assert uninterrupted == [[4, 8, 12], [4, 8]]  # the first episode (12 steps) ended in the third call
    assert json.loads((tmp_path / "ds" / "manifest.json").read_text())["episodes"][0]["writes"] == [4, 8, 12]
    reopened = EpisodeStore(tmp_path / "ds")
    assert [reopened.write_history(i) for i in range(len(reopened))] == uninterrupted

    resumed = Collector(env_state, policy, saved, store_in_progress=True, record_writes=True)
    resumed.set_state(state)
    for _ in range(2):
        resumed.collect(4)
    assert [saved.write_history(i) for i in range(len(saved))] == uninterrupted


def test_a_resume_mid_episode_rewrites_it_without_another_write(tmp_path):
    fx = torch.load(OFFICIAL_WRITES, weights_only=True)
    store = EpisodeStore(tmp_path / "ds", game="Breakout", num_actions=1)
    env, policy = ReplayEnv(fx), UniformPolicy(1, np.random.default_rng(0))
    agent = Collector(env, policy, store, store_in_progress=True, record_writes=True)
    agent.collect(4)
    state, env_state = agent.get_state(), copy.deepcopy(env)
    agent.collect(4)  # the killed run grew the episode after its checkpoint
    assert store.write_history(0) == [4, 8]
    resumed = Collector(env_state, policy, store, store_in_progress=True, record_writes=True)
    resumed.set_state(state)  # the store's copy is put back as it was at the checkpoint
    assert store.write_history(0) == [4] and store[0].num_steps == 4
    resumed.collect(4)
    resumed.collect(4)  # A ends at 12 steps
    assert store.write_history(0) == [4, 8, 12]


def test_a_cut_right_after_an_in_progress_write_is_not_another_write(tmp_path):
    fx = torch.load(OFFICIAL_WRITES, weights_only=True)
    store = EpisodeStore(tmp_path / "ds", game="Breakout", num_actions=1)
    agent = Collector(ReplayEnv(fx), UniformPolicy(1, np.random.default_rng(0)), store, store_in_progress=True,
                      record_writes=True)
    agent.collect(5)
    agent.flush()  # diamond/agent/loop.py cuts the game where the budget runs out
    assert store.write_history(0) == [5] and store[0].truncated[-1]


def test_exact_stores_record_no_writes_and_read_as_written_once(tmp_path):
    fx = torch.load(OFFICIAL_WRITES, weights_only=True)
    store = EpisodeStore(tmp_path / "ds", game="Breakout", num_actions=1)
    agent = Collector(ReplayEnv(fx), UniformPolicy(1, np.random.default_rng(0)), store, store_in_progress=True)
    agent.collect(7)
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert "writes" not in manifest["episodes"][0] and store.write_history(0) is None
    ep = ResavedEpisodes(store)[0]
    np.testing.assert_array_equal(ep.obs[:7], resave_table()[1][store[0].obs[:7]])
    np.testing.assert_array_equal(ep.obs[7], store[0].obs[7])


def test_segments_of_resaved_episodes_hold_the_resaved_frames(tmp_path):
    fx = torch.load(OFFICIAL_WRITES, weights_only=True)
    store = EpisodeStore(tmp_path / "ds", game="Breakout", num_actions=1)
    agent = Collector(ReplayEnv(fx), UniformPolicy(1, np.random.default_rng(0)), store, store_in_progress=True,
                      record_writes=True)
    for _ in range(3):
        agent.collect(3)
    exact = SegmentSampler(store, np.random.default_rng(1)).sample(6, 2)
    resaved = SegmentSampler(ResavedEpisodes(store), np.random.default_rng(1)).sample(6, 2)
    np.testing.assert_array_equal(resaved.act, exact.act)
    table = resave_table()
    for r, e in zip(resaved.obs.reshape(-1, *resaved.obs.shape[2:]), exact.obs.reshape(-1, *exact.obs.shape[2:])):
        assert any(np.array_equal(r, table[w][e]) for w in range(4))  # each frame written 0 to 3 times
    assert (resaved.obs <= exact.obs).all() and (resaved.obs < exact.obs).any()


def test_bad_write_histories_are_clear_errors(tmp_path):
    ep = Episode(obs=np.zeros((4, 3, 2, 2), np.uint8), act=np.zeros(3, np.int64), rew=np.zeros(3, np.float32),
                 terminated=np.zeros(3, bool), truncated=np.zeros(3, bool))
    store = EpisodeStore(tmp_path / "ds", game="Breakout", num_actions=1)
    with pytest.raises(ValueError, match=r"writes \[2, 2, 3\]: must be increasing step counts ending at the episode's 3 steps"):
        store.append(ep, writes=[2, 2, 3])
    store.append(ep, writes=[1, 3])
    manifest_path = tmp_path / "ds" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["episodes"][0]["writes"] = [1, 4]
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"writes \[1, 4\] must be increasing step counts ending at its 3 steps"):
        EpisodeStore(tmp_path / "ds")


def test_unknown_training_frames_is_a_clear_error(tmp_path):
    store = EpisodeStore(tmp_path / "ds", game="Breakout", num_actions=1)
    with pytest.raises(ValueError, match="training_frames: 'dark' is not 'exact' or 'resaved_per_write'"):
        training_episodes(store, "dark")


def _first_epoch_denoiser(tmp_path: Path, store: EpisodeStore, training_frames: str) -> dict[str, torch.Tensor]:
    """D's weights after two train-world-model steps on `store` (diamond/world_model/loop.py)."""
    from conftest import tiny_params_dict
    from diamond.world_model import loop as world_model_loop
    from diamond.config import params_from_dict

    d = tiny_params_dict()
    d["world_model"].update(denoiser_steps=2, reward_end_steps=2, checkpoint_every_steps=100, training_frames=training_frames)
    c = params_from_dict(d).world_model
    out = tmp_path / f"{store.root.name}-{training_frames}.pt"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic reductions
    try:
        run = world_model_loop.train(world_model_loop.start_or_resume(
            c, "Breakout", 0, store, store.num_actions, store[0].obs.shape[-1], out, torch.device("cpu")))
    finally:
        torch.set_num_threads(threads)
    return run.world_model.denoiser.state_dict()


def test_train_world_model_reads_the_collect_stage_frames_written_once(tmp_path):
    from diamond.config import EnvConfig
    from diamond.env.atari import make_env, num_actions

    env_cfg = EnvConfig(frame_skip=4, max_noops=30, max_episode_frames=2000, obs_size=32, life_counter="every_step")
    store = EpisodeStore(tmp_path / "collected", game="Breakout", num_actions=num_actions("Breakout"))
    collector = Collector(make_env("Breakout", 0, True, env_cfg), UniformPolicy(store.num_actions, np.random.default_rng(0)), store)
    collector.collect(120)
    collector.flush()
    assert any(((store[i].obs >= 1) & (store[i].obs <= 63)).any() for i in range(len(store)))  # dark levels to lower
    # The same episodes with frames 0..T-1 saved once by hand, obs[T] (final_observation) exact.
    by_hand = EpisodeStore(tmp_path / "by_hand", game="Breakout", num_actions=store.num_actions)
    for i in range(len(store)):
        ep, obs = store[i], store[i].obs.copy()
        obs[:-1] = resave_table()[1][obs[:-1]]
        by_hand.append(dataclasses.replace(ep, obs=obs))
    resaved = _first_epoch_denoiser(tmp_path, store, "resaved_per_write")
    exact = _first_epoch_denoiser(tmp_path, store, "exact")
    expected = _first_epoch_denoiser(tmp_path, by_hand, "exact")
    assert all(torch.equal(resaved[k], expected[k]) for k in expected)
    assert not all(torch.equal(resaved[k], exact[k]) for k in exact)
