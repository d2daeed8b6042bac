"""The agent as a collector policy: epsilon-greedy collection in a real game, reproducibility, resets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from diamond.agent.policy import AgentPolicy
from diamond.config import ConfigError, Params
from diamond.data import EpisodeStore
from diamond.env.atari import make_env, num_actions
from diamond.env.collector import Collector
from diamond.models.actor_critic import ActorCritic

GAME = "Breakout"  # 4 actions


def _biased_actor(params: Params, favourite: int) -> ActorCritic:
    """An actor that (all but) always picks `favourite`, so exploration is what shows in the data."""
    ac = ActorCritic(params.actor_critic, num_actions(GAME), params.env.obs_size)
    with torch.no_grad():
        ac.actor.bias[favourite] = 50.0
    return ac


def _collect(params: Params, policy: AgentPolicy, root: Path, steps: int) -> EpisodeStore:
    store = EpisodeStore(root, GAME, num_actions(GAME))
    collector = Collector(make_env(GAME, 0, train=True, config=params.env), policy, store)
    collector.collect(steps)
    collector.flush()
    return store


def _actions(store: EpisodeStore) -> np.ndarray:
    return np.concatenate([store[i].act for i in range(len(store))])


def test_epsilon_greedy_collection_explores_at_rate_epsilon(tiny_params: Params, tmp_path: Path) -> None:
    n, eps = 400, 0.3
    policy = AgentPolicy(_biased_actor(tiny_params, favourite=2), eps, np.random.default_rng(0), torch.device("cpu"))
    acts = _actions(_collect(tiny_params, policy, tmp_path / "eps", n))
    assert len(acts) == n
    # Off-favourite actions come only from exploration: eps * 3/4 of the steps (0.225, sd ~0.02).
    off = float(np.mean(acts != 2))
    assert 0.15 < off < 0.30
    assert set(np.unique(acts[acts != 2])) == {0, 1, 3}


def test_epsilon_zero_follows_the_policy(tiny_params: Params, tmp_path: Path) -> None:
    policy = AgentPolicy(_biased_actor(tiny_params, favourite=1), 0.0, np.random.default_rng(0), torch.device("cpu"))
    assert (_actions(_collect(tiny_params, policy, tmp_path / "greedy", 100)) == 1).all()


def test_same_seed_same_actions_and_reset_clears_memory(tiny_params: Params) -> None:
    torch.manual_seed(0)
    ac = ActorCritic(tiny_params.actor_critic, num_actions(GAME), tiny_params.env.obs_size)
    with torch.no_grad():  # non-zero heads so the memory matters to the action distribution
        ac.actor.weight.normal_(0, 1.0)
    frames = np.random.default_rng(1).integers(0, 256, size=(20, 3, tiny_params.env.obs_size, tiny_params.env.obs_size), dtype=np.uint8)

    def play(seed: int) -> list[int]:
        policy = AgentPolicy(ac, 0.1, np.random.default_rng(seed), torch.device("cpu"))
        policy.reset()
        return [policy.act(f) for f in frames]

    assert play(3) == play(3)
    assert play(3) != play(4)
    policy = AgentPolicy(ac, 0.0, np.random.default_rng(0), torch.device("cpu"))
    policy.act(frames[0])
    assert policy.state is not None
    policy.reset()
    assert policy.state is None


def test_bad_epsilon_is_a_clear_error(tiny_params: Params) -> None:
    ac = ActorCritic(tiny_params.actor_critic, num_actions(GAME), tiny_params.env.obs_size)
    with pytest.raises(ConfigError, match="epsilon: 1.5"):
        AgentPolicy(ac, 1.5, np.random.default_rng(0), torch.device("cpu"))


def test_temperature_divides_the_logits_and_leaves_a_uniform_actor_uniform(tiny_params: Params) -> None:
    frames = np.random.default_rng(1).integers(0, 256, size=(200, 3, tiny_params.env.obs_size, tiny_params.env.obs_size), dtype=np.uint8)

    def play(ac: ActorCritic, temperature: float) -> np.ndarray:
        policy = AgentPolicy(ac, 0.0, np.random.default_rng(7), torch.device("cpu"), temperature=temperature)
        return np.array([policy.act(f) for f in frames])

    # The untrained actor (zero head, logits 0) is uniform at any temperature, draw for draw.
    fresh = ActorCritic(tiny_params.actor_critic, num_actions(GAME), tiny_params.env.obs_size)
    np.testing.assert_array_equal(play(fresh, 1.0), play(fresh, 0.01))
    # A slight preference (logit +0.1: p = 0.27 at temperature 1) is all but certain at 0.01.
    leaning = ActorCritic(tiny_params.actor_critic, num_actions(GAME), tiny_params.env.obs_size)
    with torch.no_grad():
        leaning.actor.bias[3] = 0.1
    assert np.mean(play(leaning, 1.0) == 3) < 0.4
    assert np.mean(play(leaning, 0.01) == 3) > 0.99
    with pytest.raises(ConfigError, match="temperature: 0"):
        AgentPolicy(fresh, 0.0, np.random.default_rng(0), torch.device("cpu"), temperature=0)


@pytest.mark.parametrize("setting, expect_rewards", [({"Freeway": 0.01}, True), ({}, False), ({"Pong": 0.01}, False)])
def test_freeway_collect_temperature_reaches_rewards(tmp_path: Path, setting: dict, expect_rewards: bool) -> None:
    """IRIS's Freeway trick (agent.collect_temperature), on the real game through train-agent's
    collector: an actor leaning slightly to UP (logit +0.05) samples nearly uniformly at
    temperature 1, a random walk that does not cross the road in 600 steps; at Freeway's
    temperature 0.01 it keeps going UP and scores."""
    from conftest import tiny_params_dict
    from diamond.config import params_from_dict
    from diamond.agent.loop import AgentRun, _new_collector

    d = tiny_params_dict()
    d["games"], d["agent"]["collect_temperature"] = ["Freeway"], setting
    p = params_from_dict(d)
    ac = ActorCritic(p.actor_critic, num_actions("Freeway"), p.env.obs_size)
    with torch.no_grad():
        ac.actor.bias[1] = 0.05  # Freeway's actions: NOOP, UP, DOWN
    run = AgentRun(params=p, game="Freeway", seed=0, device=torch.device("cpu"),
                   store=EpisodeStore(tmp_path / "ds", "Freeway", 3), world_model=None, actor_critic=ac,
                   actor_critic_trainer=None, segment_rng=np.random.default_rng(0),
                   policy_rng=np.random.default_rng(0), initial_env_steps=0, env_steps=0)
    collector = _new_collector(run)
    assert collector.policy.temperature == (0.01 if "Freeway" in setting else 1.0)
    collector.collect(600)
    rewards = collector.reward_counts[1]
    assert (rewards >= 2) if expect_rewards else (rewards == 0), rewards
