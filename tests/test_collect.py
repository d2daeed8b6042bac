"""Collector, test episodes, and the collect stage (docs/architecture.md §3.5) on real ROMs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest

from conftest import tiny_params_dict, write_params
from diamond.config import EnvConfig
from diamond.data import EpisodeStore
from diamond.env.atari import make_env, num_actions
from diamond.env.collector import Collector, UniformPolicy, run_episodes
from diamond.io import read_json

CFG = EnvConfig(frame_skip=4, max_noops=30, max_episode_frames=108_000, obs_size=64, life_counter="every_step")


def breakout_collector(root: Path, seed: int = 0) -> Collector:
    store = EpisodeStore(root, game="Breakout", num_actions=4)
    return Collector(make_env("Breakout", seed, True, CFG), UniformPolicy(4, np.random.default_rng(seed)), store)


def test_uniform_policy_is_seeded_and_covers_actions():
    a = UniformPolicy(9, np.random.default_rng(5))
    b = UniformPolicy(9, np.random.default_rng(5))
    acts = [a.act(np.zeros((3, 64, 64), np.uint8)) for _ in range(500)]
    assert acts == [b.act(np.zeros((3, 64, 64), np.uint8)) for _ in range(500)]
    assert set(acts) == set(range(9))


def test_collector_keeps_the_unfinished_episode_across_calls(tmp_path):
    collector = breakout_collector(tmp_path / "ds")
    stats = []
    for _ in range(6):
        stats += collector.collect(50)
    store = collector.store
    assert collector.total_steps == 300
    assert len(store) == len(stats) >= 3
    assert [s.num_steps for s in stats] == list(store.lengths)
    unfinished = 300 - store.num_steps
    assert unfinished > 0  # an episode is in progress, not stored yet
    last = collector.flush()
    assert last is not None and last.num_steps == unfinished and last.truncated and not last.terminated
    assert store.num_steps == 300 and collector.flush() is None
    assert sum(collector.reward_counts.values()) == 300
    for i, s in enumerate(stats):
        ep = store[i]
        assert ep.obs.shape == (s.num_steps + 1, 3, 64, 64)
        assert ep.ret == s.ret and ep.terminated[-1] and not ep.terminated[:-1].any() and not ep.truncated.any()
        # Training episodes end on a life loss and the next one picks the game up from that frame.
        if not s.game_over:
            np.testing.assert_array_equal(store[i + 1].obs[0], ep.obs[-1])
    assert store[len(stats)].truncated[-1]


def test_collection_is_deterministic(tmp_path):
    for name in ("a", "b"):
        collector = breakout_collector(tmp_path / name, seed=4)
        collector.collect(120)
        collector.flush()
    for p in sorted((tmp_path / "a").iterdir()):
        assert p.read_bytes() == (tmp_path / "b" / p.name).read_bytes(), p.name


def _store_files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


def test_episode_in_progress_is_in_the_store_after_every_call(tmp_path):
    """Official src/coroutines/collector.py: while training collects, the current episode is in the
    dataset after every collection call (not ended: neither terminated nor truncated), replaced as
    it grows; the finished dataset is the same, file for file, as when only ended episodes are stored."""
    store = EpisodeStore(tmp_path / "live", game="Breakout", num_actions=4)
    collector = Collector(make_env("Breakout", 4, True, CFG), UniformPolicy(4, np.random.default_rng(4)), store,
                          store_in_progress=True)
    saw_in_progress = saw_grown = False
    previous: tuple[int, int] | None = None
    for _ in range(20):
        collector.collect(15)
        assert store.num_steps == collector.total_steps  # every collected step can be sampled now
        assert len(_store_files(store.root)) == len(store) + 1  # the manifest; no stale versions left
        reopened = EpisodeStore(store.root)  # what is on disk is a complete, verified store
        assert reopened.num_steps == collector.total_steps
        last = len(store) - 1
        if store.in_progress(last):
            saw_in_progress = True
            ep = reopened[last]
            assert not ep.terminated.any() and not ep.truncated.any()
            assert ".partial_" in reopened._entries[last]["file"]
            if previous is not None and previous[0] == last:
                saw_grown = True
                assert ep.num_steps > previous[1]
            previous = (last, ep.num_steps)
        for i in range(last):
            assert not store.in_progress(i) and store[i].terminated[-1]
    assert saw_in_progress and saw_grown
    collector.flush()
    assert not any(store.in_progress(i) for i in range(len(store))) and store[len(store) - 1].truncated[-1]

    plain = breakout_collector(tmp_path / "plain", seed=4)
    for _ in range(20):
        plain.collect(15)
    plain.flush()
    assert _store_files(tmp_path / "live") == _store_files(tmp_path / "plain")


def test_resume_puts_the_episode_in_progress_back_as_saved(tmp_path):
    """A killed run may grow (or end) the stored episode in progress after its checkpoint: resuming
    from the checkpoint rewrites it as saved, and the run goes on as if never interrupted."""
    from diamond.agent.loop import truncate_store

    def collector(root: Path) -> Collector:
        store = EpisodeStore(root, game="Breakout", num_actions=4) if not root.exists() else EpisodeStore(root)
        return Collector(make_env("Breakout", 5, True, CFG), UniformPolicy(4, np.random.default_rng(5)), store,
                         store_in_progress=True)

    first = collector(tmp_path / "run")
    first.collect(70)
    assert first.store.in_progress(len(first.store) - 1)
    checkpoint = {"env": first.env.unwrapped.get_state(), "episode": first.get_state(),
                  "rng": first.policy.rng.bit_generator.state, "num_episodes": len(first.store)}
    at_checkpoint = _store_files(tmp_path / "run")
    first.collect(100)  # after the checkpoint: the episode in progress grows or ends, others may follow
    assert _store_files(tmp_path / "run") != at_checkpoint

    store = truncate_store(EpisodeStore(tmp_path / "run"), checkpoint["num_episodes"])
    resumed = Collector(make_env("Breakout", 5, True, CFG), UniformPolicy(4, np.random.default_rng(0)), store,
                        store_in_progress=True)
    resumed.env.unwrapped.set_state(checkpoint["env"])
    resumed.policy.rng.bit_generator.state = checkpoint["rng"]
    resumed.set_state(checkpoint["episode"])
    assert _store_files(tmp_path / "run") == at_checkpoint

    uninterrupted = collector(tmp_path / "alone")
    uninterrupted.collect(70)
    for c in (resumed, uninterrupted):
        c.collect(130)
        c.flush()
    assert _store_files(tmp_path / "run") == _store_files(tmp_path / "alone")


def test_run_episodes_returns_whole_game_scores():
    class FireThenRandom:
        """Presses FIRE at the start so that Breakout's ball is launched after every life."""

        def __init__(self) -> None:
            self.rng = np.random.default_rng(0)

        def reset(self) -> None:
            self.resets = getattr(self, "resets", 0) + 1

        def act(self, obs: np.ndarray) -> int:
            assert obs.shape == (3, 64, 64) and obs.dtype == np.uint8
            return int(self.rng.choice([1, 2, 3]))

    policy = FireThenRandom()
    scores = run_episodes(make_env("Breakout", 11, False, CFG), policy, 2)
    assert len(scores) == 2 and policy.resets == 2
    again = run_episodes(make_env("Breakout", 11, False, CFG), FireThenRandom(), 2)
    assert scores == again
    # The test score is the whole game's: here it agrees with the sum of the training episodes'
    # returns when the same game is played with life-loss termination.
    env = make_env("Breakout", 11, True, CFG)
    policy2, total = FireThenRandom(), 0.0
    while True:
        env.reset()
        while True:
            _, r, term, trunc, info = env.step(policy2.act(np.zeros((3, 64, 64), np.uint8)))
            total += r
            if term or trunc:
                break
        if info["game_over"]:
            break
    assert scores[0] == total


def run_stage(params: Path, out: Path, mlflow_db: Path, game: str = "Breakout") -> subprocess.CompletedProcess:
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{mlflow_db}")
    cmd = [sys.executable, "-m", "stages.collect", "--params", str(params), "--game", game, "--seed", "3",
           "--out-dataset", str(out / "dataset_initial"), "--out-stats", str(out / "collect.json")]
    return subprocess.run(cmd, cwd=mlflow_db.parent, env=env, capture_output=True, text=True, timeout=300)


def test_collect_stage_is_reproducible_and_tracked(tmp_path):
    params = write_params(tmp_path / "params.yaml", tiny_params_dict())
    db = tmp_path / "mlflow.db"
    for name in ("a", "b"):
        proc = run_stage(params, tmp_path / name, db)
        assert proc.returncode == 0, proc.stderr
    files = sorted(p.name for p in (tmp_path / "a" / "dataset_initial").iterdir())
    assert "manifest.json" in files and len(files) > 2
    for name in files:
        a = (tmp_path / "a" / "dataset_initial" / name).read_bytes()
        assert a == (tmp_path / "b" / "dataset_initial" / name).read_bytes(), name
    assert (tmp_path / "a" / "collect.json").read_bytes() == (tmp_path / "b" / "collect.json").read_bytes()

    stats = read_json(tmp_path / "a" / "collect.json")
    store = EpisodeStore(tmp_path / "a" / "dataset_initial")
    c = tiny_params_dict()["collect"]
    assert store.game == "Breakout" and store.num_actions == num_actions("Breakout")
    assert c["min_steps"] <= stats["steps"] == store.num_steps <= c["max_steps"]
    assert stats["steps"] % c["chunk_steps"] == 0
    assert stats["episodes"] == len(store) == len(stats["returns"])
    counts = stats["reward_counts"]
    assert sum(counts.values()) == stats["steps"]
    assert stats["minority_rewards"] == stats["steps"] - max(counts.values())
    if stats["stopped"] == "min_steps_and_minority_rewards":
        assert stats["minority_rewards"] >= c["min_minority_rewards"]
    assert sum(stats["returns"]) == sum(store[i].ret for i in range(len(store)))
    assert not [p for p in tmp_path.joinpath("a").iterdir() if p.name.endswith(".tmp")]

    mlflow.set_tracking_uri(f"sqlite:///{db}")
    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.stage = 'collect'", output_format="list")
    assert len(runs) == 2
    run = runs[0]
    assert run.data.tags["game"] == "Breakout" and run.data.tags["seed"] == "3"
    assert run.data.metrics["steps"] == stats["steps"] and run.data.metrics["minority_rewards"] == stats["minority_rewards"]
    assert run.data.params["collect.min_steps"] == str(c["min_steps"])
    assert run.data.params["env.frame_skip"] == "4"


def test_collect_stage_stops_at_max_steps(tmp_path, monkeypatch):
    from stages import collect

    d = tiny_params_dict()
    # A threshold that 150 random Breakout steps cannot reach: collection stops at max_steps.
    d["collect"].update(min_steps=100, max_steps=150, chunk_steps=100, min_minority_rewards=1000)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root is ./mlruns
    monkeypatch.setattr(sys, "argv", [
        "collect", "--params", str(write_params(tmp_path / "p.yaml", d)), "--game", "Breakout", "--seed", "0",
        "--out-dataset", str(tmp_path / "run" / "ds"), "--out-stats", str(tmp_path / "run" / "collect.json"),
    ])
    collect.main()
    stats = read_json(tmp_path / "run" / "collect.json")
    assert stats["steps"] == 150 and stats["stopped"] == "max_steps"  # chunks of 100 then 50


def run_stage_in_process(monkeypatch, argv: list[str]) -> None:
    from stages import collect
    from stages.common import run_main

    monkeypatch.setattr(sys, "argv", ["collect", *argv])
    with pytest.raises(SystemExit) as exit_info:
        run_main(collect.main)
    assert exit_info.value.code == 2


def test_collect_stage_bad_input_is_one_line(tmp_path, tiny_params_file, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    outs = ["--out-dataset", str(tmp_path / "run" / "ds"), "--out-stats", str(tmp_path / "run" / "collect.json")]
    run_stage_in_process(monkeypatch, ["--params", str(tiny_params_file), "--game", "Pacman", "--seed", "0", *outs])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown game 'Pacman'" in err and "Breakout" in err
    d = tiny_params_dict()
    d["collect"]["chunk_steps"] = 0
    params = write_params(tmp_path / "p.yaml", d)
    run_stage_in_process(monkeypatch, ["--params", str(params), "--game", "Breakout", "--seed", "0", *outs])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "collect.chunk_steps: 0 must be >= 1" in err
    assert not (tmp_path / "run").exists()
