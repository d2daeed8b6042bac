"""Real-environment interaction: collecting episodes into a store, and test episodes.

A policy sees one uint8 frame (3, H, W) at a time, as stored; a recurrent policy keeps its own
state and clears it in `reset()` at each episode start.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import gymnasium
import numpy as np

from diamond.data.episode import Episode
from diamond.data.store import EpisodeStore


class Policy(Protocol):
    def reset(self) -> None: ...

    def act(self, obs: np.ndarray) -> int: ...


class UniformPolicy:
    """Uniformly random actions: the untrained policy of the initial collection."""

    def __init__(self, num_actions: int, rng: np.random.Generator) -> None:
        self.num_actions, self.rng = num_actions, rng

    def reset(self) -> None:
        pass

    def act(self, obs: np.ndarray) -> int:
        return int(self.rng.integers(self.num_actions))


@dataclass
class EpisodeStats:
    """Statistics of one finished (or flushed) episode."""

    num_steps: int
    ret: float  # sum of raw rewards of this episode
    game_score: float  # raw score of the whole game so far (all lives), from the environment
    terminated: bool
    truncated: bool
    game_over: bool  # the game itself ended (not just a life), or was cut by the frame limit


def chw(obs: np.ndarray) -> np.ndarray:
    """HWC frame from the environment -> contiguous CHW, the layout of the store and the models."""
    return np.ascontiguousarray(obs.transpose(2, 0, 1))


class Collector:
    """Steps `env` with `policy`, keeping an unfinished episode across `collect` calls.

    With `store_in_progress`, the unfinished episode is also in the store after every `collect`
    call (neither terminated nor truncated), replaced there as it grows and when it ends, as
    official src/coroutines/collector.py does while training collects: the newest steps are
    sampled by training at once instead of only once their episode ends.

    With `record_writes`, each stored episode lists the step counts at which it was written
    (`EpisodeStore.write_history`): one write per `collect` call that leaves it running, one when
    it ends, as official src/coroutines/collector.py:70-77 saves it (for
    `world_model.training_frames: resaved_per_write`, diamond/data/resave.py).
    """

    def __init__(self, env: gymnasium.Env, policy: Policy, store: EpisodeStore | None,
                 store_in_progress: bool = False, record_writes: bool = False) -> None:
        self.env, self.policy, self.store = env, policy, store
        self.store_in_progress = store_in_progress and store is not None
        self.record_writes = record_writes
        self._writes: list[int] = []  # step counts of the unfinished episode's writes so far
        self.total_steps = 0
        self.reward_counts = {-1: 0, 0: 0, 1: 0}  # over every step collected, by sign of reward
        self._obs: list[np.ndarray] | None = None  # frames of the unfinished episode
        self._act: list[int] = []
        self._rew: list[float] = []
        self._info: dict = {}
        self._stored_index: int | None = None  # where the store holds the unfinished episode

    def collect(self, num_steps: int) -> list[EpisodeStats]:
        """Take `num_steps` steps; store and return the stats of the episodes that finished."""
        finished = self._collect(num_steps)
        if self.store_in_progress and self._act:
            self._store_in_progress()
        return finished

    def _collect(self, num_steps: int) -> list[EpisodeStats]:
        finished: list[EpisodeStats] = []
        for _ in range(num_steps):
            if self._obs is None:
                obs, self._info = self.env.reset()
                self.policy.reset()
                self._obs, self._act, self._rew = [chw(obs)], [], []
            action = self.policy.act(self._obs[-1])
            obs, reward, terminated, truncated, self._info = self.env.step(action)
            self._obs.append(chw(obs))
            self._act.append(action)
            self._rew.append(float(reward))
            self.total_steps += 1
            self.reward_counts[int(np.sign(reward))] += 1
            if terminated or truncated:
                finished.append(self._finish(bool(terminated), bool(truncated)))
        return finished

    def get_state(self) -> dict:
        """The unfinished episode and the counters, for an exact resume (with the env's and the
        policy's own states, which the caller saves)."""
        return {
            "obs": None if self._obs is None else np.stack(self._obs),
            "act": list(self._act),
            "rew": list(self._rew),
            "info": dict(self._info),
            "total_steps": self.total_steps,
            "reward_counts": dict(self.reward_counts),
            "stored_index": self._stored_index,
            # only with record_writes, so that a run without it saves the same state as before
            **({"writes": list(self._writes)} if self.record_writes else {}),
        }

    def set_state(self, state: dict) -> None:
        """Restore `get_state`; the store's copy of the unfinished episode is rewritten to match
        it (a killed run may have grown or ended it after the state was saved)."""
        self._obs = None if state["obs"] is None else list(state["obs"])
        self._act, self._rew = list(state["act"]), list(state["rew"])
        self._info = dict(state["info"])
        self.total_steps = int(state["total_steps"])
        self.reward_counts = {int(k): int(v) for k, v in state["reward_counts"].items()}
        self._stored_index = state.get("stored_index")
        self._writes = [int(w) for w in state.get("writes", [])]
        if self._stored_index is not None and self._act:
            self._store_in_progress()

    def _episode(self, terminated: bool, truncated: bool) -> Episode:
        t = len(self._act)
        term = np.zeros(t, dtype=bool)
        trunc = np.zeros(t, dtype=bool)
        term[-1], trunc[-1] = terminated, truncated
        return Episode(obs=np.stack(self._obs), act=np.array(self._act, dtype=np.int64),
                       rew=np.array(self._rew, dtype=np.float32), terminated=term, truncated=trunc)

    def _store_in_progress(self) -> None:
        """Put the unfinished episode (not terminated, not truncated) in the store."""
        ep = self._episode(terminated=False, truncated=False)
        writes = self._written()
        if self._stored_index is None:
            self._stored_index = self.store.append(ep, in_progress=True, writes=writes)
        else:
            self.store.replace(self._stored_index, ep, in_progress=True, writes=writes)

    def _written(self) -> list[int] | None:
        """The write history including the write about to happen (None unless `record_writes`).

        A write at the same step count as the last one stores nothing new (the rewrite when a
        run resumes, or the cut of an episode just stored in progress), so it is not another
        official write.
        """
        if not self.record_writes:
            return None
        t = len(self._act)
        if not self._writes or self._writes[-1] < t:
            self._writes.append(t)
        return list(self._writes)

    def flush(self) -> EpisodeStats | None:
        """Store the unfinished episode, cut here (truncated), so no collected step is lost.

        The next `collect` starts a new episode with `env.reset()` (a real reset, since the
        cut episode had not ended).
        """
        if not self._act:
            self._obs, self._stored_index, self._writes = None, None, []
            return None
        return self._finish(terminated=False, truncated=True)

    def _finish(self, terminated: bool, truncated: bool) -> EpisodeStats:
        t = len(self._act)
        ep = self._episode(terminated, truncated)
        if self.store is not None:
            writes = self._written()
            if self._stored_index is None:
                self.store.append(ep, writes=writes)
            else:
                self.store.replace(self._stored_index, ep, writes=writes)
        self._obs, self._act, self._rew, self._stored_index, self._writes = None, [], [], None, []
        return EpisodeStats(num_steps=t, ret=ep.ret, game_score=float(self._info.get("game_score", ep.ret)),
                            terminated=terminated, truncated=truncated,
                            game_over=bool(self._info.get("game_over", terminated or truncated)))


def run_episodes(env: gymnasium.Env, policy: Policy, n: int) -> list[float]:
    """Play `n` whole test episodes; their raw game scores (use a test env: train=False)."""
    scores = []
    for _ in range(n):
        obs, info = env.reset()
        policy.reset()
        total = 0.0
        while True:
            obs, reward, terminated, truncated, info = env.step(policy.act(chw(obs)))
            total += float(reward)
            if terminated or truncated:
                break
        scores.append(float(info.get("game_score", total)))
    return scores
