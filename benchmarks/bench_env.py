"""Benchmark: collector steps per second against gymnasium's AtariPreprocessing pipeline.

Both sides play the same game with uniformly random actions under the same protocol (raw ALE
frames, no sticky actions, up to 30 no-ops, action repeat 4 with max-pooling, 64x64 RGB,
life-loss termination). Ours is the full `Collector` (environment, CHW frames, episode
buffers); the reference is a bare loop over `AtariPreprocessing`, which does less work per
step. The two alternate within one run, round by round, and the ratio is the median over rounds
of the paired ratios, by wall clock and by process CPU time (steadier on a shared machine).

    python -m benchmarks.bench_env --game Breakout --steps 2000 --rounds 3
"""

from __future__ import annotations

import argparse
import time

import gymnasium as gym
import numpy as np
from gymnasium.wrappers import AtariPreprocessing

from diamond.config import EnvConfig
from diamond.env.atari import make_env, num_actions
from diamond.env.collector import Collector, UniformPolicy

PROTOCOL = EnvConfig(frame_skip=4, max_noops=30, max_episode_frames=108_000, obs_size=64, life_counter="every_step")


class Timer:
    """Steps per second by wall clock and by this process's CPU time."""

    def __enter__(self) -> Timer:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu

    def rates(self, steps: int) -> tuple[float, float]:
        return steps / self.wall, steps / max(self.cpu, 1e-9)


def ours_steps_per_second(game: str, steps: int, seed: int) -> tuple[float, float]:
    env = make_env(game, seed, train=True, config=PROTOCOL)
    collector = Collector(env, UniformPolicy(num_actions(game), np.random.default_rng(seed)), store=None)
    with Timer() as timer:
        collector.collect(steps)
    return timer.rates(steps)


def gymnasium_steps_per_second(game: str, steps: int, seed: int) -> tuple[float, float]:
    raw = gym.make(f"ALE/{game}-v5", frameskip=1, repeat_action_probability=0.0, full_action_space=False,
                   max_num_frames_per_episode=PROTOCOL.max_episode_frames)
    env = AtariPreprocessing(raw, noop_max=PROTOCOL.max_noops, frame_skip=PROTOCOL.frame_skip,
                             screen_size=PROTOCOL.obs_size, terminal_on_life_loss=True, grayscale_obs=False)
    rng = np.random.default_rng(seed)
    n = env.action_space.n
    with Timer() as timer:
        env.reset(seed=seed)
        for _ in range(steps):
            _, _, terminated, truncated, _ = env.step(int(rng.integers(n)))
            if terminated or truncated:
                env.reset()
    return timer.rates(steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--game", default="Breakout")
    parser.add_argument("--steps", type=int, default=2000, help="agent steps per round and side")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    ours, ref = [], []
    for r in range(args.rounds):
        ours.append(ours_steps_per_second(args.game, args.steps, seed=r))
        ref.append(gymnasium_steps_per_second(args.game, args.steps, seed=r))
    ours_a, ref_a = np.array(ours), np.array(ref)  # (rounds, [wall, cpu])
    ratio = np.median(ours_a / ref_a, axis=0)
    print(f"game {args.game}, {args.steps} agent steps x {args.rounds} rounds; steps/s by wall clock per round")
    print(f"diamond Collector (make_env)            {np.round(ours_a[:, 0]).astype(int).tolist()}")
    print(f"gymnasium AtariPreprocessing loop       {np.round(ref_a[:, 0]).astype(int).tolist()}")
    print(f"ratio (ours / gymnasium)                {ratio[0]:.2f}x wall clock, {ratio[1]:.2f}x CPU time (median of rounds)")


if __name__ == "__main__":
    main()
