"""Segments of consecutive steps for training, with recency weights (official src/data/batch_sampler.py).

As the official code does: episodes are split into 4 chronological groups (by
episode index) of n//4 episodes each, the remainder n%4 going to the last (newest) group; the
groups are drawn with weights 0.1, 0.1, 0.1, 0.7, so recent data (from the current policy)
dominates; within a group every episode is equally likely, whatever its length, and then a step
uniformly within the episode (so steps of short episodes are drawn more often). Until the store
holds 4 episodes every step is equally likely. A segment of L steps ends at the chosen step e and
covers steps e-L+1..e and frames e-L+1..e+1; positions before the episode start are zero-padded
and masked, so the last step and its next frame are always real.

`Placement` selects the official placements instead (docs/official-parity.md C3, C7, C8), each
mapped onto our episodes of T+1 frames without changing them: the end clipped to the episode's
last step (`batch_sampler.py:56,64-68`), segments ending on the T frames an official episode
stores (`src/coroutines/collector.py:73-74`), and R's window padded on both sides
(`batch_sampler.py:59-61`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from diamond.config import SEGMENT_ENDS, SEGMENT_FRAMES, DenoiserConfig, RewardEndConfig
from diamond.data.episode import Episode
from diamond.data.frames import to_float
from diamond.data.store import EpisodeStore

RECENCY_WEIGHTS = (0.1, 0.1, 0.1, 0.7)


@dataclass(frozen=True)
class Placement:
    """Where a segment of S steps (S+1 frames) falls in an episode of T steps (T+1 frames).

    A step t is drawn uniformly in [0, T) and, for end "clipped" or both_sides, an offset u
    uniformly in {0..S} (the official draws, `batch_sampler.py:56,60,66`, S+1 = its seq_length).
    - end "uniform": the segment's last frame is frame t+1 (ours).
      end "clipped": its last frame is frame min(T-1, t+u)+1, so the last step ends a segment
      (S+2)/2 times as often as an interior one (official, C7).
    - frames "with_final": as above, last frames range over 1..T (ours). "without_final": one
      frame earlier, over 0..T-1, the frames an official episode stores (C8); frame 0 can end a
      segment whose context is all padding.
    - both_sides: R's official window (C3, R7), which overrides `end` and `frames`: the first frame
      is t-u, so t sits at a uniform position; frames past T-1 are padding (mask False), as for an
      official episode, which stores no final frame. Their pixels are still filled where stored
      (frame T), for R's terminal next frame (`RewardEndModel.loss_terms`).
    """

    end: str = "uniform"
    frames: str = "with_final"
    both_sides: bool = False

    def __post_init__(self) -> None:
        if self.end not in SEGMENT_ENDS:
            raise ValueError(f"segment end {self.end!r}: allowed {', '.join(SEGMENT_ENDS)}")
        if self.frames not in SEGMENT_FRAMES:
            raise ValueError(f"segment frames {self.frames!r}: allowed {', '.join(SEGMENT_FRAMES)}")

    @property
    def draws_offset(self) -> bool:
        return self.both_sides or self.end == "clipped"

    def first_frames(
        self, lengths: np.ndarray, steps: np.ndarray, offsets: np.ndarray | None, num_steps: int
    ) -> np.ndarray:
        """Index of each segment's first frame (negative: padding before the episode start), from
        the episodes' lengths T, the drawn steps t and, where `draws_offset`, the offsets u."""
        if self.both_sides:
            assert offsets is not None
            return steps - offsets
        last = steps if self.end == "uniform" else np.minimum(lengths - 1, steps + offsets)
        return last + (1 if self.frames == "with_final" else 0) - num_steps

    @property
    def last_real_frame_offset(self) -> int:
        """Frames up to T + this offset are real (mask True): the final frame T is padding in R's
        official window, as in an official episode."""
        return -1 if self.both_sides else 0


OURS = Placement()


def denoiser_placement(c: DenoiserConfig) -> Placement:
    """D's training segments and the imagination starts (world_model.denoiser.segment_end,
    segment_frames)."""
    return Placement(end=c.segment_end, frames=c.segment_frames)


def reward_end_placement(c: RewardEndConfig) -> tuple[Placement, int]:
    """R's placement and steps per segment: the official window holds segment_length frames
    (src/trainer.py:161-162, seq_length), so segment_length - 1 transitions; ours
    segment_length transitions."""
    if c.segment_window == "both_sides":
        return Placement(both_sides=True), c.segment_length - 1
    return OURS, c.segment_length


@dataclass
class Segment:
    """A batch of segments: numpy arrays, or tensors after `to_torch`."""

    obs: np.ndarray | torch.Tensor  # uint8 (B, L+1, 3, H, W); float in [-1, 1] after to_torch
    act: np.ndarray | torch.Tensor  # int64 (B, L)
    rew: np.ndarray | torch.Tensor  # float32 (B, L), raw reward
    terminated: np.ndarray | torch.Tensor  # bool (B, L)
    truncated: np.ndarray | torch.Tensor  # bool (B, L)
    # bool (B, L+1), False on padding: before the episode start (and past frame T-1 in R's official window)
    mask: np.ndarray | torch.Tensor

    def to_torch(self, device: torch.device | str = "cpu") -> Segment:
        """The same batch as tensors on `device`, frames as floats in [-1, 1]."""
        out = {f.name: torch.from_numpy(getattr(self, f.name)).to(device) for f in fields(self)}
        out["obs"] = to_float(out["obs"])
        return Segment(**out)


def episode_weights(lengths: np.ndarray, weights: tuple[float, ...] | None = RECENCY_WEIGHTS) -> np.ndarray:
    """Probability of drawing each episode (official src/data/batch_sampler.py).

    With k = len(weights) and n >= k episodes: k chronological groups of n//k episodes, the last
    also taking the n%k remaining (newest) ones; group g has weight weights[g], split equally
    among its episodes. With fewer than k episodes, or no weights (the official static-dataset
    mode, `static_dataset.ignore_sample_weights`): proportional to episode length (every step
    equally likely).
    """
    n, k = len(lengths), len(weights or ())
    if weights is None or n < k:
        lengths = lengths.astype(np.float64)
        return lengths / lengths.sum()
    sizes = [n // k] * (k - 1) + [n // k + n % k]
    p = np.concatenate([np.full(size, w / size) for w, size in zip(weights, sizes)])
    return p / p.sum()


class SegmentSampler:
    """Draws batches of fixed-length segments from a (possibly growing) episode store."""

    def __init__(self, store: EpisodeStore, rng: np.random.Generator,
                 weights: tuple[float, ...] | None = RECENCY_WEIGHTS, placement: Placement = OURS) -> None:
        self.store, self.rng, self.weights, self.placement = store, rng, weights, placement

    def sample(self, batch_size: int, num_steps: int) -> Segment:
        if len(self.store) == 0:
            raise ValueError(f"{self.store.root}: cannot sample segments from an empty episode store")
        if batch_size < 1 or num_steps < 1:
            raise ValueError(f"batch_size ({batch_size}) and num_steps ({num_steps}) must be >= 1")
        lengths = self.store.lengths
        episodes = self.rng.choice(len(lengths), size=batch_size, p=episode_weights(lengths, self.weights))
        steps = (self.rng.random(batch_size) * lengths[episodes]).astype(np.int64)
        L = num_steps
        # Drawn only where the placement needs them, so that OURS draws exactly what it always did.
        offsets = self.rng.integers(0, L + 1, size=batch_size) if self.placement.draws_offset else None
        firsts = self.placement.first_frames(lengths[episodes], steps, offsets, L)
        first = self.store[int(episodes[0])]
        _, c, h, w = first.obs.shape
        seg = Segment(
            obs=np.zeros((batch_size, L + 1, c, h, w), dtype=np.uint8),
            act=np.zeros((batch_size, L), dtype=np.int64),
            rew=np.zeros((batch_size, L), dtype=np.float32),
            terminated=np.zeros((batch_size, L), dtype=bool),
            truncated=np.zeros((batch_size, L), dtype=bool),
            mask=np.zeros((batch_size, L + 1), dtype=bool),
        )
        for b, (i, f) in enumerate(zip(episodes, firsts)):
            self._fill(seg, b, self.store[int(i)], int(f), L)
        return seg

    def _fill(self, seg: Segment, b: int, ep: Episode, first: int, L: int) -> None:
        """Row b of `seg`: frames first..first+L and steps first..first+L-1 of `ep`, zero-padded
        outside the episode; mask True on frames 0..T (0..T-1 in R's official window)."""
        T = ep.num_steps
        pad = max(0, -first)
        s = first + pad
        stop = min(first + L, T)  # the last frame copied (frame T is stored); steps end before it
        seg.obs[b, pad:pad + stop - s + 1] = ep.obs[s:stop + 1]
        n = stop - s  # real steps
        seg.act[b, pad:pad + n] = ep.act[s:s + n]
        seg.rew[b, pad:pad + n] = ep.rew[s:s + n]
        seg.terminated[b, pad:pad + n] = ep.terminated[s:s + n]
        seg.truncated[b, pad:pad + n] = ep.truncated[s:s + n]
        last_real = min(first + L, T + self.placement.last_real_frame_offset)
        seg.mask[b, pad:pad + last_real - s + 1] = True
