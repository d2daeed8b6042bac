"""Freeway: rewards reached by train-agent's collection with and without agent.collect_temperature.

IRIS's trick for Freeway (IRIS paper, Appendix H; the DIAMOND authors' answer in
eloialonso/diamond issue #34): the collecting policy samples its actions at temperature 0.01
instead of 1. A uniform random walk (the initial collection's policy) hardly moves the chicken
and scores 0; a policy that commits to the action it slightly prefers crosses the road when that
action is UP. This plays the real game through train-agent's own collector (diamond.agent.loop) with
actor-critics of the params' architecture, for each actor once at the params' Freeway temperature
and once at 1, and prints the rewards and the actions taken:

  - `--agent PATH` (repeatable): the actor-critic of a train-agent checkpoint;
  - `--random-actors N`: N untrained actor-critics whose actor head has PyTorch's default
    initialisation, as IRIS's untrained actor has (DIAMOND's head starts at zero, which samples
    uniformly at any temperature, so the trick acts only once training has moved it).

    .venv/bin/python scripts/freeway_collect_temperature.py --params params.yaml --steps 2000 --random-actors 8
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

import numpy as np
import torch

from diamond.agent.loop import AgentRun, _new_collector
from diamond.config import load_params
from diamond.data import EpisodeStore
from diamond.env.atari import make_env, num_actions
from diamond.env.collector import Collector, UniformPolicy
from diamond.io import load_torch
from diamond.models.actor_critic import ActorCritic
from diamond.seeds import AGENT_POLICY, stream_rng

GAME = "Freeway"


def collect(p, ac: ActorCritic, temperatures: dict[str, float], steps: int, seed: int, root: Path) -> tuple[int, np.ndarray]:
    """Rewards (> 0) and action counts of `steps` steps of train-agent's collector."""
    params = dataclasses.replace(p, agent=dataclasses.replace(p.agent, collect_temperature=temperatures))
    run = AgentRun(params=params, game=GAME, seed=seed, device=torch.device("cpu"),
                   store=EpisodeStore(root, GAME, num_actions(GAME)), world_model=None, actor_critic=ac,
                   actor_critic_trainer=None, segment_rng=np.random.default_rng(seed),
                   policy_rng=stream_rng(seed, AGENT_POLICY), initial_env_steps=0, env_steps=0)
    collector = _new_collector(run)
    collector.collect(steps)
    collector.flush()
    acts = np.concatenate([run.store[i].act for i in range(len(run.store))])
    return collector.reward_counts[1], np.bincount(acts, minlength=num_actions(GAME))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0, help="environment and policy seed")
    parser.add_argument("--agent", type=Path, action="append", default=[], help="train-agent checkpoint (agent.pt)")
    parser.add_argument("--random-actors", type=int, default=0)
    args = parser.parse_args()
    p = load_params(args.params)
    on = p.agent.collect_temperature_of(GAME)
    n = num_actions(GAME)
    actors: list[tuple[str, ActorCritic]] = []
    for path in args.agent:
        ac = ActorCritic(p.actor_critic, n, p.env.obs_size)
        ac.load_state_dict(load_torch(path)["actor_critic"])
        actors.append((str(path), ac))
    for k in range(args.random_actors):
        torch.manual_seed(k)
        ac = ActorCritic(p.actor_critic, n, p.env.obs_size)
        ac.actor.reset_parameters()  # PyTorch's default Linear init, as IRIS's untrained actor
        actors.append((f"untrained actor, default-init head, torch seed {k}", ac))
    print(f"{GAME}, {args.steps} steps each, seed {args.seed}, params {args.params} "
          f"(collect_temperature for {GAME}: {on}); actions NOOP/UP/DOWN")
    with tempfile.TemporaryDirectory() as tmp:
        store = EpisodeStore(Path(tmp) / "uniform", GAME, n)
        uniform = Collector(make_env(GAME, args.seed, True, p.env), UniformPolicy(n, np.random.default_rng(args.seed)), store)
        uniform.collect(args.steps)
        print(f"  uniform policy (the initial collection's): {uniform.reward_counts[1]} rewards")
        totals = {on: 0, 1.0: 0}
        for name, ac in actors:
            ac.eval()
            row = []
            for t in (on, 1.0):
                temps = {GAME: t} if t != 1.0 else {}
                rewards, acts = collect(p, ac, temps, args.steps, args.seed, Path(tmp) / f"{len(row)}-{id(ac)}")
                totals[t] += rewards
                row.append(f"T={t:g}: {rewards:3d} rewards, actions {acts.tolist()}")
            print(f"  {name}\n      " + "\n      ".join(row))
        print(f"  total rewards: T={on:g}: {totals[on]}, T=1: {totals[1.0]}")


if __name__ == "__main__":
    main()
