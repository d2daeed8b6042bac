"""Segments of consecutive steps for training, with recency weights (official src/data/batch_sampler.py).

As the official code does: episodes are split into 4 chronological groups (by
episode index) of n//4 episodes each, the remainder n%4 going to the last (newest) group; the
groups are drawn with weights 0.1, 0.1, 0.1, 0.7, so recent data (from the current policy)
dominates; within a group every episode is equally likely, whatever its length, and then a step
uniformly within the episode (so steps of short episodes are drawn more often). Until the store
holds 4 episodes every step is equally likely. A segment of L steps ends at the chosen step e and
covers steps e-L+1..e and frames e-L+1..e+1; positions before the episode start are zero-padded
and masked, so the last step and its next frame are always real.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from diamond.data.store import EpisodeStore
from diamond.frames import to_float

RECENCY_WEIGHTS = (0.1, 0.1, 0.1, 0.7)


@dataclass
class Segment:
    """A batch of segments: numpy arrays, or tensors after `to_torch`."""

    obs: np.ndarray | torch.Tensor  # uint8 (B, L+1, 3, H, W); float in [-1, 1] after to_torch
    act: np.ndarray | torch.Tensor  # int64 (B, L)
    rew: np.ndarray | torch.Tensor  # float32 (B, L), raw reward
    terminated: np.ndarray | torch.Tensor  # bool (B, L)
    truncated: np.ndarray | torch.Tensor  # bool (B, L)
    mask: np.ndarray | torch.Tensor  # bool (B, L+1), False on padding before the episode start

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
                 weights: tuple[float, ...] | None = RECENCY_WEIGHTS) -> None:
        self.store, self.rng, self.weights = store, rng, weights

    def sample(self, batch_size: int, num_steps: int) -> Segment:
        if len(self.store) == 0:
            raise ValueError(f"{self.store.root}: cannot sample segments from an empty episode store")
        if batch_size < 1 or num_steps < 1:
            raise ValueError(f"batch_size ({batch_size}) and num_steps ({num_steps}) must be >= 1")
        lengths = self.store.lengths
        episodes = self.rng.choice(len(lengths), size=batch_size, p=episode_weights(lengths, self.weights))
        ends = (self.rng.random(batch_size) * lengths[episodes]).astype(np.int64)
        first = self.store[int(episodes[0])]
        _, c, h, w = first.obs.shape
        L = num_steps
        seg = Segment(
            obs=np.zeros((batch_size, L + 1, c, h, w), dtype=np.uint8),
            act=np.zeros((batch_size, L), dtype=np.int64),
            rew=np.zeros((batch_size, L), dtype=np.float32),
            terminated=np.zeros((batch_size, L), dtype=bool),
            truncated=np.zeros((batch_size, L), dtype=bool),
            mask=np.zeros((batch_size, L + 1), dtype=bool),
        )
        for b, (i, e) in enumerate(zip(episodes, ends)):
            ep = self.store[int(i)]
            start = int(e) - L + 1  # first step of the segment; negative means padding
            pad = max(0, -start)
            s = start + pad
            seg.obs[b, pad:] = ep.obs[s:e + 2]
            seg.act[b, pad:] = ep.act[s:e + 1]
            seg.rew[b, pad:] = ep.rew[s:e + 1]
            seg.terminated[b, pad:] = ep.terminated[s:e + 1]
            seg.truncated[b, pad:] = ep.truncated[s:e + 1]
            seg.mask[b, pad:] = True
        return seg
