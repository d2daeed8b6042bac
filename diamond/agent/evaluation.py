"""Final scoring of an agent: test episodes in the real game, the score record, GIFs.

Test episodes do not end on life loss (train=False) and the policy keeps sampling its actions
(epsilon adds uniform exploration on top; the score uses epsilon 0), as the official test
collector does (src/trainer.py, `collection.test`: epsilon 0, 100 final episodes).

`agent_test_returns` plays many test episodes at once: one emulator per slot, one batched
actor-critic step for all of them, under `torch.inference_mode`. Episode i has its own
environment seed and its own action stream (derived from the evaluation seed and i), so its
return does not depend on how many episodes run beside it.
"""

from __future__ import annotations


import numpy as np
import torch

from diamond.agent.imagination import ImaginationEnv
from diamond.agent.policy import sample_action
from diamond.config import EnvConfig
from diamond.data.frames import to_float, to_uint8
from diamond.env.atari import make_env
from diamond.env.collector import Policy, chw, run_episodes
from diamond.models.actor_critic import ActorCritic
from diamond.seeds import episode_seeds


def test_episode_returns(game: str, seed: int, env_cfg: EnvConfig, policy: Policy, episodes: int) -> list[float]:
    """Raw game scores of `episodes` test episodes in a test environment seeded with `seed`."""
    env = make_env(game, seed, train=False, config=env_cfg)
    try:
        return [float(r) for r in run_episodes(env, policy, episodes)]
    finally:
        env.close()


@torch.inference_mode()
def agent_test_returns(
    game: str, seed: int, env_cfg: EnvConfig, ac: ActorCritic, epsilon: float, episodes: int, num_envs: int,
    device: torch.device, film_frames: int = 0,
) -> tuple[list[float], list[np.ndarray]]:
    """Raw game scores of `episodes` test episodes of the actor-critic, `num_envs` at a time, and
    the first `film_frames` frames of episode 0 (CHW uint8) for a GIF."""
    if episodes < 1 or num_envs < 1:
        raise ValueError(f"episodes ({episodes}) and num_envs ({num_envs}) must be >= 1")
    slots = min(num_envs, episodes)
    envs = [make_env(game, episode_seeds(seed, j)[0], train=False, config=env_cfg) for j in range(slots)]
    size = env_cfg.obs_size
    obs = np.zeros((slots, 3, size, size), dtype=np.uint8)
    episode_of = [-1] * slots  # the episode a slot plays; -1 once no episode is left for it
    rngs: list[np.random.Generator | None] = [None] * slots
    returns: list[float] = [0.0] * episodes
    film: list[np.ndarray] = []
    hx, cx = ac.initial_state(slots, device)
    started = 0

    def start(j: int) -> None:
        nonlocal started
        episode_of[j], started = (started, started + 1) if started < episodes else (-1, started)
        if episode_of[j] >= 0:
            env_seed, policy_seed = episode_seeds(seed, episode_of[j])
            obs[j] = chw(envs[j].reset(seed=env_seed)[0])
            rngs[j] = np.random.default_rng(policy_seed)
            hx[j], cx[j] = 0.0, 0.0

    try:
        for j in range(slots):
            start(j)
        while active := [j for j, e in enumerate(episode_of) if e >= 0]:
            if episode_of[0] == 0 and len(film) < film_frames:
                film.append(obs[0].copy())
            # Only the slots still playing go through the network: no work on finished ones.
            rows = None if len(active) == slots else torch.tensor(active, device=device)
            x = to_float(obs if rows is None else obs[active], device)
            state = (hx, cx) if rows is None else (hx[rows], cx[rows])
            logits, _, (h, c) = ac(x, state)
            if rows is None:
                hx, cx = h, c
            else:
                hx[rows], cx[rows] = h, c
            logits = logits.double().cpu()
            for k, j in enumerate(active):
                frame, _, terminated, truncated, info = envs[j].step(sample_action(logits[k], epsilon, rngs[j]))
                obs[j] = chw(frame)
                if terminated or truncated:
                    returns[episode_of[j]] = float(info["game_score"])
                    start(j)
    finally:
        for env in envs:
            env.close()
    return returns, film


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
    frames = [to_uint8(obs[0])]
    while len(frames) < num_frames:
        logits, _, state = ac(obs, state)
        step = env.step(torch.distributions.Categorical(logits=logits).sample())
        state = ac.restart_rows(state, step.restart.rows, step.restart.context_obs, step.restart.context_mask)
        obs = step.obs
        frames.append(to_uint8(obs[0]))
    return frames
