"""The Atari 100k environment on real ROMs (docs/architecture.md §2)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.wrappers import AtariPreprocessing

from diamond.config import ConfigError, EnvConfig
from diamond.env.atari import ATARI_100K_GAMES, make_env, num_actions, rom_id

CFG = EnvConfig(frame_skip=4, max_noops=30, max_episode_frames=108_000, obs_size=64, life_counter="every_step")
FIRE = 1  # Breakout's minimal action set: NOOP, FIRE, RIGHT, LEFT


def reference_env(game: str) -> gym.Env:
    """gymnasium's own preprocessing over raw ALE frames, configured as docs/architecture.md §2 describes."""
    raw = gym.make(f"ALE/{game}-v5", frameskip=1, repeat_action_probability=0.0, full_action_space=False,
                   max_num_frames_per_episode=CFG.max_episode_frames)
    return AtariPreprocessing(raw, noop_max=CFG.max_noops, frame_skip=CFG.frame_skip, screen_size=CFG.obs_size,
                              terminal_on_life_loss=False, grayscale_obs=False)


def test_observation_shape_dtype_and_spaces():
    env = make_env("MsPacman", 0, train=True, config=CFG)
    obs, info = env.reset()
    assert obs.shape == (64, 64, 3) and obs.dtype == np.uint8
    assert env.observation_space.contains(obs)
    assert env.action_space.n == num_actions("MsPacman") == 9
    obs, reward, terminated, truncated, info = env.step(0)
    assert obs.shape == (64, 64, 3) and obs.dtype == np.uint8
    assert isinstance(reward, float) and not terminated and not truncated
    assert obs.std() > 0  # a real frame, not a blank buffer


def test_every_game_resolves_to_a_rom():
    assert len(ATARI_100K_GAMES) == 26
    assert rom_id("MsPacman") == "ms_pacman" and rom_id("UpNDown") == "up_n_down"
    assert all(num_actions(g) >= 3 for g in ATARI_100K_GAMES)


def test_unknown_game_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"unknown game 'Pacman'; allowed: Alien, .*Breakout.*UpNDown"):
        make_env("Pacman", 0, train=True, config=CFG)


def test_noop_count_within_bounds_and_frames_counted():
    cfg = dataclasses.replace(CFG, max_noops=3)
    seen = set()
    for seed in range(12):
        env = make_env("Pong", seed, train=False, config=cfg)
        _, info = env.reset()
        assert 1 <= info["noops"] <= 3
        assert info["episode_frame_number"] == info["noops"]  # no-ops are raw frames
        seen.add(info["noops"])
        env.step(0)
        _, _, _, _, info2 = env.step(0)
        assert info2["episode_frame_number"] == info["noops"] + 2 * cfg.frame_skip  # action repeat 4
    assert seen == {1, 2, 3}
    _, info = make_env("Pong", 0, train=False, config=CFG).reset()
    assert 1 <= info["noops"] <= 30


def test_matches_gymnasium_atari_preprocessing_frame_for_frame():
    """Same seed and actions: the same no-ops, max-pooled repeats, 64x64 frames and rewards."""
    for seed in (0, 7):
        ours, ref = make_env("Breakout", seed, train=False, config=CFG), reference_env("Breakout")
        obs, info = ours.reset()
        ref_obs, ref_info = ref.reset(seed=seed)
        assert info["episode_frame_number"] == ref_info["episode_frame_number"]
        np.testing.assert_array_equal(obs, ref_obs)
        rng = np.random.default_rng(seed)
        total = 0.0
        for t in range(400):
            a = int(rng.integers(4))
            obs, r, term, trunc, info = ours.step(a)
            ref_obs, ref_r, ref_term, ref_trunc, ref_info = ref.step(a)
            assert (r, term, trunc) == (ref_r, ref_term, ref_trunc), f"step {t}"
            assert info["lives"] == ref_info["lives"]
            total += r
            if term or trunc:
                # AtariPreprocessing returns stale buffers when the game ends mid-repeat; skip that frame.
                break
            np.testing.assert_array_equal(obs, ref_obs, err_msg=f"seed {seed} step {t}")
        assert info["game_score"] == total


def test_same_seed_same_frames_other_seed_differs():
    def rollout(seed: int) -> np.ndarray:
        env = make_env("Breakout", seed, train=True, config=CFG)
        frames = [env.reset()[0]]
        frames += [env.step(a)[0] for a in [1, 2, 3, 2, 1, 3, 3, 2] * 5]
        return np.stack(frames)

    a, b = rollout(3), rollout(3)
    np.testing.assert_array_equal(a, b)
    noops = {make_env("Breakout", s, True, CFG).reset()[1]["noops"] for s in range(5)}
    assert len(noops) > 1  # the seed drives the no-ops


def play_until_life_loss(env: gym.Env, rng: np.random.Generator, limit: int = 2000):
    for t in range(limit):
        out = env.step(int(rng.choice([FIRE, 2, 3])))
        if out[4]["life_loss"] or out[2] or out[3]:
            return t, out
    raise AssertionError("no life lost")


def test_life_loss_terminates_in_train_only_and_the_game_goes_on():
    train_env, test_env = make_env("Breakout", 1, True, CFG), make_env("Breakout", 1, False, CFG)
    train_env.reset(), test_env.reset()
    t_train, (obs, _, term, trunc, info) = play_until_life_loss(train_env, np.random.default_rng(0))
    t_test, (_, _, test_term, _, test_info) = play_until_life_loss(test_env, np.random.default_rng(0))
    assert t_train == t_test
    assert term and not trunc and info["life_loss"] and info["lives"] == 4 and not info["game_over"]
    assert not test_term and test_info["life_loss"] and test_info["lives"] == 4
    # Next training episode: the same game, next life, no new no-ops.
    obs2, info2 = train_env.reset()
    assert info2["noops"] == 0 and info2["lives"] == 4
    assert info2["episode_frame_number"] == info["episode_frame_number"]
    np.testing.assert_array_equal(obs2, obs)


def test_game_score_spans_lives_and_game_over_resets():
    env = make_env("Breakout", 2, True, CFG)
    env.reset()
    rng = np.random.default_rng(1)
    episode_returns, episodes = [], 0
    while True:
        ret, done = 0.0, False
        while not done:
            _, r, term, trunc, info = env.step(int(rng.choice([FIRE, 2, 3])))
            ret += r
            done = term or trunc
        episode_returns.append(ret)
        episodes += 1
        if info["game_over"]:
            break
        env.reset()
    assert episodes == 5  # Breakout: 5 lives, one training episode each
    assert info["game_score"] == sum(episode_returns)
    _, info = env.reset()
    assert info["lives"] == 5 and info["game_score"] == 0 and info["noops"] >= 1


def test_truncation_at_max_episode_frames():
    cfg = dataclasses.replace(CFG, max_episode_frames=200)
    env = make_env("Breakout", 0, True, cfg)  # without FIRE the ball never launches: no life is lost
    _, info = env.reset()
    noops = info["noops"]
    for t in range(1, 100):
        _, _, term, trunc, info = env.step(0)
        if term or trunc:
            break
    assert trunc and not term
    assert info["episode_frame_number"] == 200
    assert t == -(-(200 - noops) // cfg.frame_skip)  # the step during which frame 200 is reached
    _, info = env.reset()
    assert info["episode_frame_number"] == info["noops"]  # a real reset follows truncation


def _play(env, actions: list[int]) -> list:
    """Step through `actions`, resetting at each episode end; every output, frames included."""
    out = []
    for a in actions:
        obs, reward, terminated, truncated, info = env.step(a)
        out.append((obs.tobytes(), reward, terminated, truncated, info))
        if terminated or truncated:
            obs, info = env.reset()
            out.append((obs.tobytes(), info))
    return out


def test_state_snapshot_continues_the_game_exactly():
    """get_state/set_state (the agent's resume) continue the same game on another env: the same
    frames, rewards, life losses, no-op resets and episode frame counts as the original."""
    cfg = dataclasses.replace(CFG, obs_size=32)
    rng = np.random.default_rng(0)
    env = make_env("Breakout", 0, train=True, config=cfg)
    env.reset()
    while env.get_state()["game_score"] == 0:  # snapshot mid-game, with points scored
        _play(env, [int(rng.integers(0, 4))])
    snapshot = env.get_state()
    actions = [int(a) for a in rng.integers(0, 4, 400)]
    expected = _play(env, actions)
    assert sum(1 for row in expected if len(row) == 2) >= 2  # the tail crosses episode ends
    other = make_env("Breakout", 123, train=True, config=cfg)
    other.reset()
    other.set_state(snapshot)
    assert _play(other, actions) == expected


def test_bad_config_and_action_rejected():
    with pytest.raises(ConfigError, match="env.frame_skip: 0"):
        make_env("Breakout", 0, True, dataclasses.replace(CFG, frame_skip=0))
    env = make_env("Breakout", 0, True, CFG)
    env.reset()
    with pytest.raises(ValueError, match=r"action 4 is not in 0..3"):
        env.step(4)
    with pytest.raises(ConfigError, match=r"seed: -1 must be a non-negative integer"):
        make_env("Breakout", -1, True, CFG)
    env.close()
    env.close()  # idempotent


def test_benchmark_prints_both_pipelines_and_the_ratio(monkeypatch, capsys):
    import sys

    from benchmarks import bench_env

    monkeypatch.setattr(sys, "argv", ["bench_env", "--game", "Pong", "--steps", "50", "--rounds", "1"])
    bench_env.main()
    out = capsys.readouterr().out
    assert "diamond Collector" in out and "gymnasium AtariPreprocessing" in out
    wall, cpu = [float(x.split("x ")[0]) for x in out.split("ratio (ours / gymnasium)")[1].split(", ")]
    assert wall > 0 and cpu > 0


OFFICIAL_EXTRA_LIFE = Path(__file__).parent / "fixtures" / "official" / "p8_extra_life.json"


def play_extra_life_fixture(life_counter: str) -> tuple[dict, list[dict]]:
    """Replay the official P8 fixture's game with our env: the same seed and actions, and an extra
    life written into the lives RAM byte before the same steps; a training episode that ends on a
    life loss continues the game at the next reset, as official DoneOnLifeLoss leaves it going."""
    fx = json.loads(OFFICIAL_EXTRA_LIFE.read_text())
    cfg = dataclasses.replace(CFG, frame_skip=fx["frame_skip"], max_noops=fx["max_noops"], life_counter=life_counter)
    env = make_env(fx["game"], fx["seed"], train=True, config=cfg)
    env.reset()
    rows, ram_index = [], fx["lives_ram_index"]
    for t, action in enumerate(fx["actions"]):
        if t in fx["bonus_before_steps"]:
            env.unwrapped.ale.setRAM(ram_index, int(env.unwrapped.ale.getRAM()[ram_index]) + 1)
        _, reward, terminated, truncated, info = env.step(action)
        rows.append({"ale_lives": env.unwrapped.ale.lives(), "counter": info["lives"], "life_loss": info["life_loss"],
                     "end": terminated, "game_over": info["game_over"], "reward": reward})
        if info["game_over"] or truncated:
            break
        if terminated:
            env.reset()
    return fx, rows


def test_life_counter_decreases_only_matches_the_official_wrapper_after_an_extra_life():
    # Official src/envs/atari_preprocessing.py:76-78 (row P8): after an extra life (5 -> 6) the
    # next loss (6 -> 5) is not a life loss, so the training episode goes on.
    fx, rows = play_extra_life_fixture("decreases_only")
    official = fx["steps"]
    assert [r["ale_lives"] for r in rows] == [r["ale_lives"] for r in official]  # the same game
    assert rows == official
    hidden = [t for t, r in enumerate(official) if t and r["ale_lives"] < official[t - 1]["ale_lives"] and not r["end"]]
    assert len(hidden) == 2  # one unseen loss after each extra life


def test_life_counter_every_step_sees_every_loss_after_an_extra_life():
    fx, rows = play_extra_life_fixture("every_step")
    official = fx["steps"]
    assert [r["ale_lives"] for r in rows] == [r["ale_lives"] for r in official]
    losses = [t for t, r in enumerate(rows) if t and r["ale_lives"] < rows[t - 1]["ale_lives"]]
    assert [t for t, r in enumerate(rows) if r["end"]] == losses
    assert sum(r["end"] for r in rows) == sum(r["end"] for r in official) + 2


def test_life_counter_bad_value_is_one_line():
    with pytest.raises(ConfigError, match=r"env.life_counter: 'sometimes' is not one of 'every_step', 'decreases_only'"):
        make_env("Breakout", 0, True, dataclasses.replace(CFG, life_counter="sometimes"))
