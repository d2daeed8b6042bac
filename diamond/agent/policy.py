"""Actor-critic losses (docs/architecture.md §3.4) and the agent as a collector policy.

`imagination_loss` is the method: REINFORCE with a value baseline on lambda-returns of
trajectories imagined by the world model, plus a value MSE and an entropy bonus.
`real_data_loss` is the paper's model-free ablation: the same loss on real segments of the
dataset, the behaviour's actions standing in for the policy's (so its policy gradient is
off-policy; the data is mostly from the current policy, recency-weighted).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.distributions import Categorical

from diamond.agent.imagination import Carry, ImaginationEnv, Restart, categorical
from diamond.agent.returns import lambda_returns
from diamond.config import ActorCriticConfig, ConfigError
from diamond.data import SegmentSampler
from diamond.data.frames import to_float
from diamond.models.actor_critic import ActorCritic, HiddenState
from diamond.training import read_metrics


def _combine(
    cfg: ActorCriticConfig,
    log_probs: torch.Tensor,
    entropies: torch.Tensor,
    values: torch.Tensor,
    returns: torch.Tensor,
    valid: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The three loss terms, averaged over the valid (B, H) steps, and the metrics as 0-d
    tensors (`read_metrics` turns them into floats with one host sync)."""
    weight = valid.float()
    count = weight.sum().clamp(min=1.0)
    advantage = (returns - values).detach()
    policy_loss = -(log_probs * advantage * weight).sum() / count
    value_loss = (((values - returns) ** 2) * weight).sum() / count
    entropy = (entropies * weight).sum() / count
    loss = policy_loss + cfg.value_loss_weight * value_loss - cfg.entropy_weight * entropy
    metrics = {
        "loss_actor": policy_loss.detach(),
        "loss_value": value_loss.detach(),
        "entropy": entropy.detach(),
        "value_mean": ((values * weight).sum() / count).detach(),
        "lambda_return_mean": ((returns * weight).sum() / count).detach(),
    }
    return loss, metrics


@dataclass
class ImaginedWindow:
    """One update's window of imagined steps, each (B, H): what the loss is computed from."""

    log_probs: torch.Tensor  # log pi(a_t | s_t), with gradient
    entropies: torch.Tensor  # entropy of pi(. | s_t), with gradient
    values: torch.Tensor  # V(s_t), with gradient
    next_values: torch.Tensor  # V of the true next state (no gradient): the bootstrap targets
    rewards: torch.Tensor  # sign(reward) in {-1, 0, 1}
    terminated: torch.Tensor  # bool
    truncated: torch.Tensor  # bool

    def lambda_returns(self, cfg: ActorCriticConfig) -> torch.Tensor:
        return lambda_returns(self.rewards, self.next_values, self.terminated, self.truncated, cfg.gamma, cfg.lambda_)


def imagination_loss(
    ac: ActorCritic, env: ImaginationEnv, cfg: ActorCriticConfig, forward: Callable[..., Any] | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """Imagine `cfg.horizon` steps (`imagine_window`) and return the actor-critic loss."""
    window = imagine_window(ac, env, cfg, forward)
    values = window.values
    valid = torch.ones_like(values, dtype=torch.bool)
    loss, metrics = _combine(cfg, window.log_probs, window.entropies, values, window.lambda_returns(cfg), valid)
    metrics["imagined_reward_mean"] = window.rewards.mean()
    metrics["imagined_termination_rate"] = window.terminated.float().mean()
    return loss, read_metrics(metrics)


def imagine_window(
    ac: ActorCritic, env: ImaginationEnv, cfg: ActorCriticConfig, forward: Callable[..., Any] | None = None
) -> ImaginedWindow:
    """Imagine `cfg.horizon` steps with the actor-critic acting, from fresh real starts or (params
    actor_critic.continue_rows_across_updates) from where the last window left its rows.

    `forward` is the actor-critic's forward at each imagined step (default `ac` itself; the
    loop passes a compiled one under params compile_imagination); burn-ins stay eager."""
    forward = ac if forward is None else forward
    obs, state = _window_start(ac, env, cfg)
    log_probs, entropies, values, next_values = [], [], [], []
    rewards, terminated, truncated = [], [], []
    for _ in range(cfg.horizon):
        logits, value, state = forward(obs, state)
        dist = categorical(logits)
        action = env.draws.sample(logits, "action")
        step = env.step(action)
        log_probs.append(dist.log_prob(action))
        entropies.append(dist.entropy())
        values.append(value)
        rewards.append(step.reward)
        terminated.append(step.terminated)
        truncated.append(step.truncated)
        with torch.no_grad():
            # V of the true next frame; on rows that continue it is recomputed with gradient
            # at the next step, here only as a target.
            _, next_value, _ = forward(step.final_obs, state)
            next_values.append(next_value)
        state = _restart_rows(ac, cfg, state, step.restart)
        obs = step.obs
    if cfg.continue_rows_across_updates:
        env.carry = Carry(obs, state[0].detach(), state[1].detach())
    stack = lambda xs: torch.stack(xs, dim=1)  # noqa: E731
    return ImaginedWindow(stack(log_probs), stack(entropies), stack(values), stack(next_values),
                          stack(rewards), stack(terminated), stack(truncated))


def _window_start(ac: ActorCritic, env: ImaginationEnv, cfg: ActorCriticConfig) -> tuple[torch.Tensor, HiddenState]:
    """The observation and LSTM state an update's window starts from.

    Rows going on across updates (A8 of docs/official-parity.md): the last window's carry; the
    run's first window starts the rows from a zero LSTM state, with no burn-in, as the official
    env loop does (src/coroutines/env_loop.py:18-22). Otherwise every row restarts here, burnt in."""
    if cfg.continue_rows_across_updates and env.carry is not None:
        return env.carry.obs, (env.carry.hx, env.carry.cx)
    obs, start = env.reset()
    if cfg.continue_rows_across_updates:
        return obs, ac.initial_state(obs.shape[0], obs.device)
    if cfg.burn_in == "with_gradient_unmasked":
        return obs, ac.burn_in(start.context_obs)
    with torch.no_grad():
        return obs, ac.burn_in(start.context_obs, start.context_mask)


def _restart_rows(ac: ActorCritic, cfg: ActorCriticConfig, state: HiddenState, restart: Restart) -> HiddenState:
    """`ActorCritic.restart_rows` as params actor_critic.burn_in says (row A9 of docs/official-parity.md)."""
    if cfg.burn_in == "with_gradient_unmasked":
        return ac.restart_rows(state, restart.rows, restart.context_obs, None, with_gradient=True)
    return ac.restart_rows(state, restart.rows, restart.context_obs, restart.context_mask)


def compiled_forward(ac: ActorCritic) -> Callable[..., Any]:
    """The actor-critic's forward under torch.compile without CUDA graphs (params
    compile_imagination), for `imagination_loss`'s `forward`: inductor's fused kernels only.

    Not mode="reduce-overhead": a CUDA-graphed forward that needs gradients leaves its backward
    pending through the whole unroll, and then CUDA graph trees fall back to their slow path for
    every graph of the process, the imagined step's too (measured on an H200: 1.02x; the warning
    "Unable to hit fast path of CUDAGraphs because of pending, uninvoked backwards";
    docs/results.md, "GPU measurement"). The official code graphs only the world model's step.
    fullgraph: a graph break is an error, not a silent split (tests/test_compiled_step.py)."""
    return torch.compile(ac, fullgraph=True)


def real_data_loss(
    ac: ActorCritic, segments: SegmentSampler, cfg: ActorCriticConfig, context: int, device: torch.device
) -> tuple[torch.Tensor, dict[str, float]]:
    """The model-free ablation: the same loss on real segments (burn-in on `context - 1` frames)."""
    seg = segments.sample(cfg.batch_size, context - 1 + cfg.horizon).to_torch(device)
    burn = context - 1
    with torch.no_grad():
        state = ac.burn_in(seg.obs[:, :burn], seg.mask[:, :burn])
    log_probs, entropies, values = [], [], []
    for t in range(burn, burn + cfg.horizon):
        logits, value, state = ac(seg.obs[:, t], state)
        # Padded frames (before an episode start) leave no trace in the memory.
        keep = seg.mask[:, t].float().unsqueeze(-1)
        state = (state[0] * keep, state[1] * keep)
        dist = Categorical(logits=logits)
        log_probs.append(dist.log_prob(seg.act[:, t]))
        entropies.append(dist.entropy())
        values.append(value)
    values_t = torch.stack(values, dim=1)
    with torch.no_grad():
        _, last_value, _ = ac(seg.obs[:, burn + cfg.horizon], state)
    next_values = torch.cat([values_t[:, 1:].detach(), last_value[:, None]], dim=1)
    window = slice(burn, burn + cfg.horizon)
    returns = lambda_returns(
        seg.rew[:, window].sign(), next_values, seg.terminated[:, window], seg.truncated[:, window], cfg.gamma, cfg.lambda_
    )
    loss, metrics = _combine(cfg, torch.stack(log_probs, 1), torch.stack(entropies, 1), values_t, returns, seg.mask[:, window])
    return loss, read_metrics(metrics)


class AgentPolicy:
    """The actor-critic as a collector `Policy`: samples its action, uniform with probability epsilon.

    `temperature` divides the logits before sampling (IRIS src/agent.py `act`); below 1 the policy
    commits to its preferred action (agent.collect_temperature: IRIS's trick for Freeway).
    """

    def __init__(self, ac: ActorCritic, epsilon: float, rng: np.random.Generator, device: torch.device,
                 temperature: float = 1.0) -> None:
        if not 0.0 <= epsilon <= 1.0:
            raise ConfigError(f"epsilon: {epsilon} is not a probability in [0, 1]")
        if not temperature > 0:
            raise ConfigError(f"temperature: {temperature} must be > 0")
        self.ac = ac
        self.epsilon = epsilon
        self.temperature = temperature
        self.rng = rng
        self.device = device
        self.state: tuple[torch.Tensor, torch.Tensor] | None = None

    def reset(self) -> None:
        self.state = None

    @torch.no_grad()
    def act(self, obs: np.ndarray) -> int:
        x = to_float(np.ascontiguousarray(obs), self.device)[None]
        if self.state is None:
            self.state = self.ac.initial_state(1, self.device)
        logits, _, self.state = self.ac(x, self.state)
        return sample_action(logits[0].double().cpu() / self.temperature, self.epsilon, self.rng)


def sample_action(logits: torch.Tensor, epsilon: float, rng: np.random.Generator) -> int:
    """One action from float64 CPU `logits` (A,): uniform with probability epsilon, else from the softmax.

    Both random numbers are drawn every step, so the random stream does not depend on the branch taken."""
    explore, u = rng.random(2)
    if explore < epsilon:
        return int(rng.integers(logits.shape[0]))
    cdf = torch.softmax(logits, dim=-1).cumsum(0).numpy()
    return int(min(np.searchsorted(cdf, u * cdf[-1], side="right"), logits.shape[0] - 1))
