"""The on-disk episode store: round trip, reproducible bytes, integrity checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from diamond.data import Episode, EpisodeStore
from diamond.io import ArtifactError


def make_episode(rng: np.random.Generator, steps: int, size: int = 8) -> Episode:
    terminated = np.zeros(steps, dtype=bool)
    terminated[-1] = True
    return Episode(
        obs=rng.integers(0, 256, (steps + 1, 3, size, size), dtype=np.uint8),
        act=rng.integers(0, 4, steps).astype(np.int64),
        rew=rng.choice([0.0, 1.0, -1.0, 7.0], steps).astype(np.float32),
        terminated=terminated,
        truncated=np.zeros(steps, dtype=bool),
    )


def fill(root: Path, seed: int = 0, lengths=(5, 1, 12)) -> tuple[EpisodeStore, list[Episode]]:
    rng = np.random.default_rng(seed)
    store = EpisodeStore(root, game="Breakout", num_actions=4)
    episodes = [make_episode(rng, n) for n in lengths]
    for i, ep in enumerate(episodes):
        assert store.append(ep) == i
    return store, episodes


def assert_same(a: Episode, b: Episode) -> None:
    for name in Episode.FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        np.testing.assert_array_equal(x, y, err_msg=name)


def test_round_trip_and_manifest(tmp_path):
    store, episodes = fill(tmp_path / "ds")
    assert len(store) == 3 and store.num_steps == 18
    reopened = EpisodeStore(tmp_path / "ds")
    assert (reopened.game, reopened.num_actions, len(reopened), reopened.num_steps) == ("Breakout", 4, 3, 18)
    for i, ep in enumerate(episodes):
        assert_same(reopened[i], ep)
    assert_same(reopened[-1], episodes[-1])
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert manifest["game"] == "Breakout" and manifest["num_actions"] == 4
    assert [e["num_steps"] for e in manifest["episodes"]] == [5, 1, 12]
    # The episode files are plain npz archives.
    with np.load(tmp_path / "ds" / "episode_000002.npz") as z:
        np.testing.assert_array_equal(z["obs"], episodes[2].obs)
    assert not [p for p in (tmp_path / "ds").iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(IndexError):
        reopened[3]


def test_same_data_gives_byte_identical_files(tmp_path):
    fill(tmp_path / "a", seed=1)
    fill(tmp_path / "b", seed=1)
    files_a = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files_a == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in files_a:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    fill(tmp_path / "c", seed=2)
    assert (tmp_path / "a" / "episode_000000.npz").read_bytes() != (tmp_path / "c" / "episode_000000.npz").read_bytes()


def test_truncated_file_rejected_naming_it(tmp_path):
    fill(tmp_path / "ds")
    path = tmp_path / "ds" / "episode_000001.npz"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ArtifactError, match=r"episode_000001\.npz: truncated"):
        EpisodeStore(tmp_path / "ds")


def test_flipped_byte_rejected_naming_it(tmp_path):
    fill(tmp_path / "ds")
    path = tmp_path / "ds" / "episode_000002.npz"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"episode_000002\.npz: corrupt episode file"):
        EpisodeStore(tmp_path / "ds")


def test_missing_file_and_bad_manifest_rejected(tmp_path):
    fill(tmp_path / "ds")
    (tmp_path / "ds" / "episode_000000.npz").unlink()
    with pytest.raises(ArtifactError, match=r"episode_000000\.npz: episode file listed in the manifest is missing"):
        EpisodeStore(tmp_path / "ds")
    fill(tmp_path / "ds2")
    (tmp_path / "ds2" / "manifest.json").write_text('{"format": 1, "game": "Breakout"')
    with pytest.raises(ArtifactError, match=r"manifest\.json: not valid JSON"):
        EpisodeStore(tmp_path / "ds2")


def test_open_checks_game_and_actions(tmp_path):
    fill(tmp_path / "ds")
    with pytest.raises(ArtifactError, match="holds game 'Breakout', not 'Pong'"):
        EpisodeStore(tmp_path / "ds", game="Pong")
    with pytest.raises(ArtifactError, match="has 4 actions, not 6"):
        EpisodeStore(tmp_path / "ds", num_actions=6)
    with pytest.raises(ArtifactError, match="give game and num_actions"):
        EpisodeStore(tmp_path / "new")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("x")
    with pytest.raises(ArtifactError, match="not an episode store"):
        EpisodeStore(tmp_path / "junk", game="Breakout", num_actions=4)


def test_append_rejects_malformed_episodes(tmp_path):
    store = EpisodeStore(tmp_path / "ds", game="Breakout", num_actions=4)
    ep = make_episode(np.random.default_rng(0), 3)
    with pytest.raises(ValueError, match=r"Episode.obs: expected a numpy array of uint8, got float32"):
        store.append(Episode(ep.obs.astype(np.float32), ep.act, ep.rew, ep.terminated, ep.truncated))
    with pytest.raises(ValueError, match=r"Episode.obs: expected shape \(4, 3, H, W\)"):
        store.append(Episode(ep.obs[:3], ep.act, ep.rew, ep.terminated, ep.truncated))
    with pytest.raises(ValueError, match=r"actions must be in 0..3"):
        store.append(Episode(ep.obs, ep.act + 4, ep.rew, ep.terminated, ep.truncated))
    assert len(store) == 0 and len(EpisodeStore(tmp_path / "ds")) == 0


def test_copy_to(tmp_path):
    store, episodes = fill(tmp_path / "ds")
    copy = store.copy_to(tmp_path / "out" / "copy")
    assert len(copy) == 3
    assert_same(copy[2], episodes[2])
    copy.append(episodes[0])
    assert len(EpisodeStore(tmp_path / "ds")) == 3  # the source is untouched
    with pytest.raises(ArtifactError, match="destination exists and is not empty"):
        store.copy_to(tmp_path / "out" / "copy")
    assert len(store.copy_to(tmp_path / "out" / "copy", overwrite=True)) == 3


def test_replace_the_episode_in_progress(tmp_path):
    """The episode in progress is stored under a name with its step count and replaced as it grows
    (official src/coroutines/collector.py); it takes its plain name once it ends."""
    store, episodes = fill(tmp_path / "ds")
    rng = np.random.default_rng(1)
    grown = make_episode(rng, 9)
    grown.terminated[:] = False
    part = Episode(obs=grown.obs[:5].copy(), act=grown.act[:4].copy(), rew=grown.rew[:4].copy(),
                   terminated=grown.terminated[:4].copy(), truncated=grown.truncated[:4].copy())
    index = store.append(part, in_progress=True)
    assert store.in_progress(index) and not store.in_progress(0)
    assert list(store.lengths) == [5, 1, 12, 4] and store.num_steps == 22
    assert (tmp_path / "ds" / "episode_000003.partial_000004.npz").exists()
    store.replace(index, grown, in_progress=True)
    assert list(store.lengths) == [5, 1, 12, 9]  # the lengths the sampler reads follow the replacement
    names = sorted(p.name for p in (tmp_path / "ds").iterdir())
    assert names == ["episode_000000.npz", "episode_000001.npz", "episode_000002.npz",
                     "episode_000003.partial_000009.npz", "manifest.json"]
    assert_same(EpisodeStore(tmp_path / "ds")[3], grown)
    grown.truncated[-1] = True
    store.replace(index, grown)
    assert not store.in_progress(index)
    assert sorted(p.name for p in (tmp_path / "ds").iterdir())[3] == "episode_000003.npz"
    assert_same(EpisodeStore(tmp_path / "ds")[3], grown)
    with pytest.raises(IndexError):
        store.replace(4, grown)


def test_replace_killed_before_the_manifest_leaves_the_previous_store(tmp_path, monkeypatch):
    store, episodes = fill(tmp_path / "ds")
    ep = make_episode(np.random.default_rng(2), 3)
    ep.terminated[:] = False
    store.append(ep, in_progress=True)
    longer = make_episode(np.random.default_rng(3), 6)
    longer.terminated[:] = False

    def killed(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(EpisodeStore, "_write_manifest", killed)
    with pytest.raises(KeyboardInterrupt):
        store.replace(3, longer, in_progress=True)
    monkeypatch.undo()
    reopened = EpisodeStore(tmp_path / "ds")  # verified: sizes and hashes match the manifest
    assert list(reopened.lengths) == [5, 1, 12, 3]
    assert_same(reopened[3], ep)
