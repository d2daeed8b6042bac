"""Segment sampling: contents, padding and mask, recency weights, tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diamond.data import Episode, EpisodeStore, Segment, SegmentSampler, episode_weights


def numbered_episode(episode_id: int, steps: int) -> Episode:
    """Frame t of episode k has every pixel = 10k + t + 1 (never 0, the padding value)."""
    t = np.arange(steps + 1)
    obs = np.broadcast_to((10 * episode_id + t + 1).astype(np.uint8)[:, None, None, None], (steps + 1, 3, 4, 4))
    terminated = np.zeros(steps, dtype=bool)
    terminated[-1] = True
    return Episode(obs=obs.copy(), act=(t[:-1] % 3 + 1).astype(np.int64), rew=(t[:-1] + 1).astype(np.float32),
                   terminated=terminated, truncated=np.zeros(steps, dtype=bool))


def numbered_store(root, lengths) -> EpisodeStore:
    store = EpisodeStore(root, game="Breakout", num_actions=4)
    for k, n in enumerate(lengths):
        store.append(numbered_episode(k, n))
    return store


def test_segments_are_consecutive_steps_padded_before_the_start(tmp_path):
    store = numbered_store(tmp_path / "ds", [3, 9, 6, 2, 5])
    L = 4
    seg = SegmentSampler(store, np.random.default_rng(0)).sample(batch_size=300, num_steps=L)
    assert seg.obs.shape == (300, L + 1, 3, 4, 4) and seg.obs.dtype == np.uint8
    assert seg.act.shape == seg.rew.shape == seg.terminated.shape == seg.truncated.shape == (300, L)
    assert (seg.act.dtype, seg.rew.dtype, seg.terminated.dtype, seg.mask.dtype) == (np.int64, np.float32, bool, bool)
    assert seg.mask.shape == (300, L + 1)
    saw_padding = False
    for b in range(300):
        pad = int((~seg.mask[b]).sum())
        assert seg.mask[b, pad:].all() and seg.mask[b, -1] and seg.mask[b, -2]  # padding only at the front
        saw_padding |= pad > 0
        frames = seg.obs[b, :, 0, 0, 0].astype(int)
        assert (seg.obs[b, :pad] == 0).all() and (seg.act[b, :pad] == 0).all() and (seg.rew[b, :pad] == 0).all()
        k, first = divmod(int(frames[pad]) - 1, 10)  # episode and step of the first real frame
        assert first == 0 or pad == 0  # padding only where the episode starts inside the segment
        np.testing.assert_array_equal(frames[pad:], 10 * k + first + 1 + np.arange(L + 1 - pad))
        steps = first + np.arange(L - pad)
        np.testing.assert_array_equal(seg.rew[b, pad:], steps + 1)
        np.testing.assert_array_equal(seg.act[b, pad:], steps % 3 + 1)
        ep_len = store.lengths[k]
        np.testing.assert_array_equal(seg.terminated[b, pad:], steps == ep_len - 1)
    assert saw_padding


def test_recency_weights_by_quarter():
    lengths = np.full(8, 10)
    p = episode_weights(lengths)
    np.testing.assert_allclose(p, [0.05, 0.05, 0.05, 0.05, 0.05, 0.05, 0.35, 0.35])
    # Fewer than 4 episodes: uniform over steps.
    np.testing.assert_allclose(episode_weights(np.array([10, 30])), [0.25, 0.75])
    np.testing.assert_allclose(episode_weights(np.array([10, 30, 60])), [0.1, 0.3, 0.6])


def test_recency_weights_are_per_episode_within_a_group():
    """Official src/data/batch_sampler.py: a group's weight is split equally among its episodes,
    whatever their lengths (steps of short episodes are drawn more often)."""
    p = episode_weights(np.array([1, 100, 10, 10, 3, 7, 500, 2]))
    np.testing.assert_allclose(p, [0.05, 0.05, 0.05, 0.05, 0.05, 0.05, 0.35, 0.35])


@pytest.mark.parametrize("n, sizes", [(4, [1, 1, 1, 1]), (5, [1, 1, 1, 2]), (6, [1, 1, 1, 3]), (7, [1, 1, 1, 4]),
                                      (9, [2, 2, 2, 3]), (11, [2, 2, 2, 5])])
def test_recency_groups_put_the_remainder_in_the_newest_group(n, sizes):
    """Official src/data/batch_sampler.py: n//4 episodes per group, the n%4 newest ones added to the last."""
    expected = np.concatenate([np.full(s, w / s) for w, s in zip([0.1, 0.1, 0.1, 0.7], sizes)])
    np.testing.assert_allclose(episode_weights(np.arange(1, n + 1)), expected)


def test_sampling_frequencies_follow_the_weights(tmp_path):
    store = numbered_store(tmp_path / "ds", [5] * 8)
    seg = SegmentSampler(store, np.random.default_rng(1)).sample(batch_size=4000, num_steps=1)
    episode = (seg.obs[:, -1, 0, 0, 0].astype(int) - 1) // 10
    last_quarter = np.mean(episode >= 6)
    assert abs(last_quarter - 0.7) < 0.03


def test_sampling_draws_short_and_long_episodes_of_a_group_equally(tmp_path):
    """Episodes 0 (1 step) and 1 (9 steps) share the first group: each is drawn 5% of the time
    (per-step weighting would draw episode 0 only 1% of the time)."""
    store = numbered_store(tmp_path / "ds", [1, 9, 5, 5, 5, 5, 5, 5])
    seg = SegmentSampler(store, np.random.default_rng(4)).sample(batch_size=8000, num_steps=1)
    episode = (seg.obs[:, -1, 0, 0, 0].astype(int) - 1) // 10
    assert abs(np.mean(episode == 0) - 0.05) < 0.01
    assert abs(np.mean(episode == 1) - 0.05) < 0.01


def test_sampler_sees_a_growing_store_and_is_seeded(tmp_path):
    store = numbered_store(tmp_path / "ds", [4])
    sampler = SegmentSampler(store, np.random.default_rng(2))
    assert (sampler.sample(20, 2).obs[:, -1, 0, 0, 0] <= 5).all()
    store.append(numbered_episode(1, 4))
    assert (sampler.sample(200, 2).obs[:, -1, 0, 0, 0] > 10).any()
    a = SegmentSampler(store, np.random.default_rng(3)).sample(16, 3)
    b = SegmentSampler(store, np.random.default_rng(3)).sample(16, 3)
    np.testing.assert_array_equal(a.obs, b.obs)
    np.testing.assert_array_equal(a.mask, b.mask)


def test_to_torch(tmp_path):
    store = EpisodeStore(tmp_path / "ds", game="Breakout", num_actions=4)
    ep = numbered_episode(0, 3)
    ep.obs[0], ep.obs[1] = 0, 255
    store.append(ep)
    seg = SegmentSampler(store, np.random.default_rng(0)).sample(8, 3)
    t = seg.to_torch("cpu")
    assert isinstance(t, Segment)
    assert t.obs.dtype == torch.float32 and t.act.dtype == torch.int64 and t.mask.dtype == torch.bool
    assert t.obs.shape == (8, 4, 3, 4, 4)
    assert t.obs.min() >= -1 and t.obs.max() <= 1
    np.testing.assert_allclose(t.obs.numpy(), seg.obs.astype(np.float32) / 127.5 - 1, atol=1e-6)
    assert t.obs.max() == 1.0 and t.obs.min() == -1.0
    np.testing.assert_array_equal(t.rew.numpy(), seg.rew)


def test_empty_store_and_bad_sizes(tmp_path):
    store = EpisodeStore(tmp_path / "ds", game="Breakout", num_actions=4)
    with pytest.raises(ValueError, match="empty episode store"):
        SegmentSampler(store, np.random.default_rng(0)).sample(2, 2)
    store.append(numbered_episode(0, 2))
    with pytest.raises(ValueError, match=r"batch_size \(0\)"):
        SegmentSampler(store, np.random.default_rng(0)).sample(0, 2)


def test_no_weights_make_every_step_equally_likely():
    """The official static-dataset mode (ignore_sample_weights): episodes drawn by length."""
    lengths = np.array([10, 30, 60, 100])
    np.testing.assert_allclose(episode_weights(lengths, None), lengths / lengths.sum())
    assert not np.allclose(episode_weights(lengths), lengths / lengths.sum())
