"""Speed of the evaluate stage's test episodes at the paper's size (the released agents' cost).

Plays test episodes of one game with the paper-size actor-critic (configs/paper.yaml, 64x64
frames) through `diamond.agent.evaluation.agent_test_returns`, once per `--num-envs` value, and once
with the one-at-a-time loop the stage used before (`AgentPolicy` + `test_episode_returns`), all
in one run so that the ratios hold on a shared machine. Prints steps/s, the share of time in the
emulator, and the projected time of 100 episodes at a given episode length.

The weights are the official initialisation (zero policy head: a uniform policy), so episodes are
as long as a random agent's; a released agent's are longer, which is why the projection is per
step. The work per step does not depend on the weights.

    python benchmarks/evaluate_speed.py --game Breakout --episodes 20 --num-envs 1 8 --json out.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from diamond.agent.evaluation import agent_test_returns, test_episode_returns
from diamond.agent.policy import AgentPolicy
from diamond.config import load_params
from diamond.env.atari import AtariEnv, num_actions
from diamond.models.actor_critic import ActorCritic
from diamond.training import set_memory_format


class EmulatorClock:
    """Accumulates the time spent in AtariEnv.step (wrapping the class method for this process)."""

    def __init__(self) -> None:
        self.seconds, self.steps = 0.0, 0
        self._step = AtariEnv.step
        clock = self

        def timed(env, action):
            t = time.perf_counter()
            out = clock._step(env, action)
            clock.seconds += time.perf_counter() - t
            clock.steps += 1
            return out

        AtariEnv.step = timed

    def reset(self) -> None:
        self.seconds, self.steps = 0.0, 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="configs/paper.yaml")
    ap.add_argument("--game", default="Breakout")
    ap.add_argument("--episodes", type=int, default=20)
    ap.add_argument("--num-envs", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--episode-steps", type=int, default=2000, help="episode length for the 100-episode projection")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    p = load_params(args.params)
    torch.manual_seed(0)
    ac = ActorCritic(p.actor_critic, num_actions(args.game), p.env.obs_size).eval()
    set_memory_format(p.channels_last, ac)  # as the evaluate stage does
    clock = EmulatorClock()
    rows = []

    def record(name: str, seconds: float) -> None:
        sps = clock.steps / seconds
        rows.append({"loop": name, "steps": clock.steps, "seconds": seconds, "steps_per_s": sps,
                     "emulator_share": clock.seconds / seconds,
                     "projected_100_episodes_min": 100 * args.episode_steps / sps / 60})
        print(f"{name:>24}: {clock.steps} steps in {seconds:.1f} s, {sps:.0f} steps/s, emulator "
              f"{clock.seconds / seconds:.0%}; 100 episodes of {args.episode_steps} steps: {rows[-1]['projected_100_episodes_min']:.1f} min")

    clock.reset()
    t = time.perf_counter()
    policy = AgentPolicy(ac, 0.0, np.random.default_rng(0), torch.device("cpu"))
    test_episode_returns(args.game, 0, p.env, policy, args.episodes)
    record("one at a time (before)", time.perf_counter() - t)
    for n in args.num_envs:
        clock.reset()
        t = time.perf_counter()
        agent_test_returns(args.game, 0, p.env, ac, 0.0, args.episodes, n, torch.device("cpu"))
        record(f"batched, num_envs={n}", time.perf_counter() - t)
    base = rows[0]["steps_per_s"]
    for r in rows:
        r["speedup_vs_before"] = r["steps_per_s"] / base
    print("speedup vs one at a time: " + ", ".join(f"{r['loop']} {r['speedup_vs_before']:.2f}x" for r in rows[1:]))
    if args.json:
        args.json.write_text(json.dumps({"game": args.game, "episodes": args.episodes, "threads": torch.get_num_threads(),
                                         "params": args.params, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
