"""Frames as the official code's models read them after repeated episode writes (row C9,
docs/official-parity.md; `world_model.training_frames: resaved_per_write`).

The official `Episode.save` stores `x.add(1).div(2).mul(255).byte()` of x = u/255*2-1
(src/data/episode.py:48, src/envs/env.py:89), and `Episode.load` reads it back the same way
(episode.py:40). In float32 the truncation lowers levels 1..63 by one. The trainer clears the
dataset's RAM cache after every collection (src/trainer.py:219-220, 237-238;
src/data/dataset.py:130-132), so D, R and the imagination starts read the disk copy, and the
collector re-reads and re-saves the episode in progress at every collection call
(src/coroutines/collector.py:74-77): a frame written w times is read as the w-fold re-save of the
real frame. The initial collection's own calls do not compound (no clear between them); here its
episodes are stored once, when they end (stages/collect.py), which gives the same counts.

The store keeps the exact frames and, per episode, the step counts at which the episode was
written (`EpisodeStore.write_history`). A write of T steps stores obs[0..T-1]: obs[T], the frame
after the last step, is the next official buffer's first frame, or the `final_observation` of an
ended episode, which is kept exact. So frame j has been written once per write of more than j
steps. `ResavedEpisodes` serves the re-saved frames from that, without copying the store.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np
import torch

from diamond.data.episode import Episode
from diamond.data.store import EpisodeStore


@functools.lru_cache(maxsize=1)
def resave_table() -> np.ndarray:
    """uint8 (W + 1, 256): row w is each level after w official save/load round trips, computed
    with the official float32 operations; W is where the round trip reaches its fixed point."""
    rows = [torch.arange(256, dtype=torch.uint8)]
    while True:
        x = rows[-1].div(255).mul(2).sub(1)  # Episode.load (episode.py:40), as src/envs/env.py:89
        rows.append(x.add(1).div(2).mul(255).byte())  # Episode.save (episode.py:48)
        if torch.equal(rows[-1], rows[-2]):
            return torch.stack(rows[:-1]).numpy()


def write_counts(history: list[int], num_frames: int) -> np.ndarray:
    """How many of the writes (step counts `history`, increasing) stored each of the frames
    0..num_frames-1: frame j is in every write of more than j steps."""
    h = np.asarray(history, dtype=np.int64)
    return len(h) - np.searchsorted(h, np.arange(num_frames), side="right")


class ResavedFrames:
    """An episode's frames (T+1, 3, H, W), each read through its write count; indexed like the
    numpy array (the first index picks frames), re-saved only where read."""

    def __init__(self, obs: np.ndarray, counts: np.ndarray) -> None:
        table = resave_table()
        self._obs, self._counts, self._table = obs, np.minimum(counts, len(table) - 1), table
        self.shape, self.dtype, self.ndim = obs.shape, obs.dtype, obs.ndim

    def __len__(self) -> int:
        return len(self._obs)

    def __getitem__(self, key: Any) -> np.ndarray:
        frames = self._obs[key]
        counts = self._counts[key[0] if isinstance(key, tuple) else key]
        counts = np.reshape(counts, np.shape(counts) + (1,) * (frames.ndim - np.ndim(counts)))
        return self._table[counts, frames]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        frames = self[:]
        return frames if dtype is None else frames.astype(dtype)


class ResavedEpisodes:
    """Read view of an `EpisodeStore` whose episodes hold `ResavedFrames`: what the official
    models would read. Everything else (lengths, root, ...) is the store's own."""

    def __init__(self, store: EpisodeStore) -> None:
        self.store = store

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, index: int) -> Episode:
        ep = self.store[index]
        history = self.store.write_history(index) or [ep.num_steps]
        return dataclasses.replace(ep, obs=ResavedFrames(ep.obs, write_counts(history, len(ep.obs))))

    def __getattr__(self, name: str) -> Any:
        # The samplers read more of the store than frames (lengths, root, in_progress, ...):
        # those are the store's, unchanged.
        return getattr(self.store, name)


def training_episodes(store: EpisodeStore, training_frames: str) -> EpisodeStore | ResavedEpisodes:
    """The episodes D, R and the actor-critic's starts are trained on (`world_model.training_frames`)."""
    if training_frames == "exact":
        return store
    if training_frames == "resaved_per_write":
        return ResavedEpisodes(store)
    raise ValueError(f"training_frames: {training_frames!r} is not 'exact' or 'resaved_per_write'")
