"""One episode of real interaction (docs/architecture.md §3.1)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Episode:
    """T steps of one episode.

    obs[t] is the frame seen before act[t]; obs[T] is the frame after the last step, so there are
    T + 1 frames. rew is the raw game reward (the models take its sign). An episode that ended on
    a life loss in training has terminated[-1] True; one cut by the frame limit, or cut where
    collection stopped, has truncated[-1] True. The episode still in progress while training
    collects (official src/coroutines/collector.py stores it at every collection call) has
    neither: it has not ended, and nothing may learn an end there.
    """

    obs: np.ndarray  # uint8 (T+1, 3, H, W)
    act: np.ndarray  # int64 (T,)
    rew: np.ndarray  # float32 (T,)
    terminated: np.ndarray  # bool (T,)
    truncated: np.ndarray  # bool (T,)

    FIELDS = ("obs", "act", "rew", "terminated", "truncated")

    def __len__(self) -> int:
        return len(self.act)

    @property
    def num_steps(self) -> int:
        return len(self.act)

    @property
    def ret(self) -> float:
        """Sum of raw rewards."""
        return float(self.rew.sum(dtype=np.float64))

    def check(self) -> None:
        """Raise ValueError naming the first field whose dtype or shape breaks the contract."""
        expected = {"obs": np.uint8, "act": np.int64, "rew": np.float32, "terminated": np.bool_, "truncated": np.bool_}
        for name, dtype in expected.items():
            value = getattr(self, name)
            if not isinstance(value, np.ndarray) or value.dtype != dtype:
                got = value.dtype if isinstance(value, np.ndarray) else type(value).__name__
                raise ValueError(f"Episode.{name}: expected a numpy array of {np.dtype(dtype)}, got {got}")
        t = len(self.act)
        if t < 1:
            raise ValueError("Episode: needs at least one step")
        if self.obs.ndim != 4 or self.obs.shape[0] != t + 1 or self.obs.shape[1] != 3:
            raise ValueError(f"Episode.obs: expected shape ({t + 1}, 3, H, W) for {t} steps, got {self.obs.shape}")
        for name in ("act", "rew", "terminated", "truncated"):
            if getattr(self, name).shape != (t,):
                raise ValueError(f"Episode.{name}: expected shape ({t},), got {getattr(self, name).shape}")

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in self.FIELDS}
