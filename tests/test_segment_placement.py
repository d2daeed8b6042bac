"""The official segment placements (docs/official-parity.md C3, C7, C8, D3, R7) against the
official sampler's exact distribution.

tests/fixtures/official/segment_placement.json holds, for five episodes of known lengths and ends
(a 2-step one that terminated, a truncated one, two terminated ones, one still running), every
(episode, start, stop) the official BatchSampler + Dataset can give (src/data/batch_sampler.py,
src/data/utils.py make_segment), its exact probability, which frame, action, end flag and mask
fill each position, and for R the inputs and loss mask official src/models/rew_end_model.py:57-69
builds (the folder's README). An official episode of T steps stores frames 0..T-1; ours also
stores frame T, the official `final_observation` of an episode that ended.
"""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

from diamond.data import OURS, Episode, EpisodeStore, Placement, SegmentSampler, episode_weights
from diamond.models.reward_end import RewardEndModel

FIXTURE = json.loads((Path(__file__).parent / "fixtures/official/segment_placement.json").read_text())
CONSUMERS = ("denoiser", "imagination_starts", "reward_end")
OFFICIAL = {"denoiser": Placement(end="clipped", frames="without_final"),
            "imagination_starts": Placement(end="clipped", frames="without_final"),
            "reward_end": Placement(both_sides=True)}
Outcome = tuple[int, int]  # (episode, first frame of the segment = official SegmentId.start)
FRAMES_PER_EPISODE = 20  # pixel value 20k + j + 1 is frame j of episode k; 0 is padding


def fixture_episode(k: int, length: int, ends: str) -> Episode:
    j = np.arange(length + 1)
    value = (FRAMES_PER_EPISODE * k + j + 1).astype(np.uint8)
    obs = np.broadcast_to(value[:, None, None, None], (length + 1, 3, 2, 2)).copy()
    flags = {name: np.zeros(length, dtype=bool) for name in ("terminated", "truncated")}
    if ends != "running":
        flags[ends][-1] = True
    return Episode(obs=obs, act=j[:-1] + 1, rew=np.zeros(length, dtype=np.float32), **flags)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> EpisodeStore:
    s = EpisodeStore(tmp_path_factory.mktemp("placement") / "ds", game="Breakout", num_actions=20)
    for k, e in enumerate(FIXTURE["episodes"]):
        s.append(fixture_episode(k, e["length"], e["ends"]))
    return s


def official(consumer: str) -> dict[Outcome, dict]:
    return {(o["episode"], o["start"]): o for o in FIXTURE["consumers"][consumer]["outcomes"]}


def num_steps(consumer: str) -> int:
    """Our steps per segment: the official window of seq_length frames holds seq_length - 1 steps."""
    return FIXTURE["consumers"][consumer]["seq_length"] - 1


def exact_distribution(placement: Placement, lengths: np.ndarray, steps: int) -> dict[Outcome, float]:
    """Our exact probabilities: every step t (and offset u, where drawn) through
    `Placement.first_frames`, weighted as SegmentSampler draws them."""
    dist: dict[Outcome, float] = defaultdict(float)
    offsets = np.arange(steps + 1) if placement.draws_offset else np.zeros(1, dtype=np.int64)
    for ep, p in enumerate(episode_weights(lengths)):
        T = int(lengths[ep])
        t, u = (a.ravel() for a in np.meshgrid(np.arange(T), offsets))
        for f in placement.first_frames(np.full(len(t), T), t, u if placement.draws_offset else None, steps):
            dist[(ep, int(f))] += p / len(t)
    return dict(dist)


def total_variation(p: dict[Outcome, float], q: dict[Outcome, float]) -> float:
    return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in set(p) | set(q))


@pytest.mark.parametrize("consumer", CONSUMERS)
def test_official_placement_has_the_official_exact_distribution(store, consumer):
    np.testing.assert_allclose(episode_weights(store.lengths), FIXTURE["episode_probs"], rtol=0, atol=1e-15)
    ours = exact_distribution(OFFICIAL[consumer], store.lengths, num_steps(consumer))
    theirs = {k: o["prob"] for k, o in official(consumer).items()}
    assert set(ours) == set(theirs)
    for k, p in theirs.items():
        assert ours[k] == pytest.approx(p, rel=0, abs=1e-14), k


@pytest.mark.parametrize("consumer", CONSUMERS)
@pytest.mark.parametrize("placement", [OURS, Placement(end="clipped"), Placement(frames="without_final")])
def test_other_placements_are_far_from_the_official_one(store, consumer, placement):
    """The comparison above can fail: no switch, or either one alone, is measurably not official."""
    ours = exact_distribution(placement, store.lengths, num_steps(consumer))
    theirs = {k: o["prob"] for k, o in official(consumer).items()}
    assert total_variation(ours, theirs) > 0.1


def decode(values: torch.Tensor | np.ndarray) -> list[tuple[int, int] | None]:
    """(episode, frame) at each position of one row of uint8 pixel values; None for zeros."""
    return [None if v == 0 else divmod(int(v) - 1, FRAMES_PER_EPISODE) for v in np.asarray(values)[:, 0, 0, 0]]


def row_outcome(seg, b: int) -> tuple[Outcome, dict]:
    """Row b of a uint8 segment as the official fixture describes one: its (episode, start) and its
    frame per position (-1 where masked), mask, actions and end flags."""
    mask = [bool(m) for m in seg.mask[b]]
    frames = decode(seg.obs[b])
    pos = mask.index(True)  # every placement keeps at least one real frame
    ep, f = frames[pos]
    return (ep, f - pos), {
        "obs_index": [fr[1] if m else -1 for fr, m in zip(frames, mask)],
        "mask": mask,
        "act_index": [int(a) - 1 for a in seg.act[b]],
        "end": [int(x) for x in seg.terminated[b]],
        "trunc": [int(x) for x in seg.truncated[b]],
    }


@pytest.mark.parametrize("consumer", CONSUMERS)
def test_sampled_segments_match_the_official_distribution_and_contents(store, consumer):
    """SegmentSampler.sample itself, 20,000 segments: their empirical distribution is within total
    variation 0.05 of the official one (sampling noise alone gives about 0.01-0.03 for these 35 to
    125 outcomes; the switches off are > 0.1 away, test above), and each segment's frames, mask,
    actions and end flags are the official segment's, position by position."""
    n, L = 20_000, num_steps(consumer)
    seg = SegmentSampler(store, np.random.default_rng(0), placement=OFFICIAL[consumer]).sample(n, L)
    reference = official(consumer)
    counts: dict[Outcome, int] = defaultdict(int)
    for b in range(n):
        key, row = row_outcome(seg, b)
        o = reference[key]
        assert row["mask"] == o["mask"] and row["obs_index"] == o["obs_index"], (key, row)
        # The official segment has one more action and flag (its last frame's), unused by D and R.
        assert (row["act_index"], row["end"], row["trunc"]) == (o["act_index"][:L], o["end"][:L], o["trunc"][:L]), key
        # Padding: zeros before the start; past the end, zeros except frame T (R's terminal next frame).
        T = FIXTURE["episodes"][key[0]]["length"]
        for fr, m in zip(decode(seg.obs[b]), row["mask"]):
            assert m or fr is None or fr == (key[0], T)
        counts[key] += 1
    empirical = {k: c / n for k, c in counts.items()}
    assert total_variation(empirical, {k: o["prob"] for k, o in reference.items()}) < 0.05


def test_reward_end_sees_the_official_inputs_and_loss_mask(store, tiny_params):
    """R's loss with segment_window both_sides reads, for every official outcome, the frames, next
    frames (the final frame after a termination, grey padding after the last step of a truncated or
    running episode) and loss mask of official src/models/rew_end_model.py:57-69."""
    cfg = dataclasses.replace(tiny_params.world_model.reward_end, segment_window="both_sides")
    model = RewardEndModel(cfg, 20, 2)
    seen: dict[str, torch.Tensor] = {}
    model.register_forward_pre_hook(lambda m, args: seen.update(obs=args[0], next_obs=args[2]))
    L = num_steps("reward_end")
    seg = SegmentSampler(store, np.random.default_rng(1), placement=OFFICIAL["reward_end"]).sample(4000, L)
    mask = model.loss_terms(seg.to_torch())[5]
    reference, checked = official("reward_end"), set()
    for b in range(len(seg.act)):
        key, _ = row_outcome(seg, b)
        o = reference[key]
        assert [bool(m) for m in mask[b]] == o["rew_end_loss_mask"]
        for name in ("obs", "next_obs"):
            # float frames in [-1, 1]; exact zeros are grey padding
            values = ((seen[name][b] + 1) * 127.5).round().to(torch.uint8) * (seen[name][b] != 0)
            assert [-1 if f is None else f[1] for f in decode(values)] == o[f"rew_end_{name}_index"], (key, name)
        checked.add(key)
    assert len(checked) > 0.9 * len(reference)  # nearly every official outcome was seen


@pytest.mark.parametrize("section, key, value", [
    ("denoiser", "segment_end", "random"),
    ("denoiser", "segment_frames", "all"),
    ("denoiser", "padded_target_feedback", "masked"),
    ("reward_end", "segment_window", "left"),
])
def test_bad_placement_keys_are_one_line_errors(section, key, value):
    from conftest import tiny_params_dict

    from diamond.config import ConfigError, params_from_dict

    d = tiny_params_dict()
    d["world_model"][section][key] = value
    with pytest.raises(ConfigError, match=rf"^world_model\.{section}\.{key}: '{value}' is not one of '"):
        params_from_dict(d)
    with pytest.raises(ValueError, match="segment end 'random': allowed uniform, clipped"):
        Placement(end="random")


@pytest.mark.parametrize("length", [1, 2, 7, 100])
def test_how_often_a_segment_has_a_padded_first_target(length):
    """The share of D's 6-frame training segments (L = 4, one autoregressive step) from an episode
    of T steps whose first target, frame 4, is padding (docs/official-parity.md D2): exact, over
    every equally likely (t, u) draw. Under the official placement (C7, C8) only t = 0, u = 0 ends a
    segment at obs[0]: 1/(6T), or every segment when T = 1; with `segment_end: uniform` and
    `without_final`, 1/T; ours (`with_final`) never."""
    steps, L = 5, 4
    t = np.repeat(np.arange(length), steps + 1)
    u = np.tile(np.arange(steps + 1), length)

    def share(p: Placement) -> float:
        return float(np.mean(p.first_frames(np.full(t.shape, length), t, u, steps) + L < 0))

    assert share(Placement(end="clipped", frames="without_final")) == (1.0 if length == 1 else 1 / (6 * length))
    assert share(Placement(end="uniform", frames="without_final")) == 1 / length
    assert share(OURS) == share(Placement(end="clipped")) == 0.0
