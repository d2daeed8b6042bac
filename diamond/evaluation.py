"""Final scoring of an agent (DESIGN 2): test episodes in the real game, the score record, GIFs.

Test episodes do not end on life loss (train=False) and the policy keeps sampling its actions
(epsilon adds uniform exploration on top; the score uses epsilon 0).
"""

from __future__ import annotations

import io
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import torch

from diamond.collector import Policy, run_episodes
from diamond.config import EnvConfig
from diamond.env import make_env
from diamond.imagination import ImaginationEnv
from diamond.io import atomic_write_bytes
from diamond.models.actor_critic import ActorCritic
from diamond.scores import human_normalized


def test_episode_returns(game: str, seed: int, env_cfg: EnvConfig, policy: Policy, episodes: int) -> list[float]:
    """Raw game scores of `episodes` test episodes in a test environment seeded with `seed`."""
    env = make_env(game, seed, train=False, config=env_cfg)
    try:
        return [float(r) for r in run_episodes(env, policy, episodes)]
    finally:
        env.close()


def score_record(game: str, seed: int, returns: list[float], method: str) -> dict:
    """The score.json contract read by `aggregate`."""
    mean = float(np.mean(returns))
    return {
        "game": game,
        "seed": seed,
        "episode_returns": [float(r) for r in returns],
        "mean_return": mean,
        "human_normalized_score": float(human_normalized(game, mean)),
        "num_episodes": len(returns),
        "method": method,
    }


class RecordingPolicy:
    """Wraps a policy and keeps the first `max_frames` frames it is shown (for a GIF)."""

    def __init__(self, policy: Policy, max_frames: int) -> None:
        self.policy, self.max_frames = policy, max_frames
        self.frames: list[np.ndarray] = []

    def reset(self) -> None:
        self.policy.reset()

    def act(self, obs: np.ndarray) -> int:
        if len(self.frames) < self.max_frames:
            self.frames.append(np.array(obs, copy=True))
        return self.policy.act(obs)


@torch.no_grad()
def imagined_frames(ac: ActorCritic, env: ImaginationEnv, num_frames: int) -> list[np.ndarray]:
    """The agent playing inside the world model (batch row 0), as uint8 CHW frames."""
    obs, start = env.reset()
    state = ac.burn_in(start.context_obs, start.context_mask)
    frames = [_to_uint8(obs[0])]
    while len(frames) < num_frames:
        logits, _, state = ac(obs, state)
        step = env.step(torch.distributions.Categorical(logits=logits).sample())
        state = ac.restart_rows(state, step.restart.rows, step.restart.context_obs, step.restart.context_mask)
        obs = step.obs
        frames.append(_to_uint8(obs[0]))
    return frames


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()


def write_gif(path: str | Path, frames: list[np.ndarray], scale: int = 2, fps: int = 15) -> None:
    """CHW uint8 frames -> an animated GIF, enlarged `scale` times (nearest neighbour), atomically."""
    if not frames:
        raise ValueError(f"{path}: no frames to write")
    images = [np.repeat(np.repeat(f.transpose(1, 2, 0), scale, 0), scale, 1) for f in frames]
    buf = io.BytesIO()
    imageio.mimsave(buf, images, format="GIF", duration=1000 / fps, loop=0)
    atomic_write_bytes(path, buf.getvalue())
