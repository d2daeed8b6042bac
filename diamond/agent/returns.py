"""Lambda-returns over a fixed window of (imagined or real) steps (docs/architecture.md §3.4).

Step t of the window is the transition s_t --a_t--> s_{t+1} with reward r_t. Its flags say how
the trajectory continues after it:
  * terminated[t]: the episode really ended; nothing is bootstrapped after r_t.
  * truncated[t]: the trajectory was cut (horizon reached); the value of the true next state
    s_{t+1} is bootstrapped, but step t+1 of the window (if any) belongs to a new trajectory,
    so its return must not flow back into step t.
The last step of the window is treated like a truncation: it bootstraps from the value of its
true next state.

    G_t = r_t + gamma * (1 - terminated_t) * ((1 - lambda) * V(s_{t+1}) + lambda * N_t)
    N_t = V(s_{t+1})    if truncated_t or t is the last step of the window
        = G_{t+1}       otherwise
"""

from __future__ import annotations

import torch


def lambda_returns(
    rewards: torch.Tensor,
    next_values: torch.Tensor,
    terminated: torch.Tensor,
    truncated: torch.Tensor,
    gamma: float,
    lambda_: float,
) -> torch.Tensor:
    """All inputs are (B, H); `next_values[:, t]` is V(s_{t+1}) of the true next state of step t.

    Returns the (B, H) lambda-returns, computed backwards in time. Callers detach the inputs:
    the returns are regression targets, never differentiated.
    """
    shapes = {rewards.shape, next_values.shape, terminated.shape, truncated.shape}
    if len(shapes) != 1 or rewards.dim() != 2:
        raise ValueError(
            f"lambda_returns: rewards, next_values, terminated, truncated must share one (B, H) shape; got "
            f"{tuple(rewards.shape)}, {tuple(next_values.shape)}, {tuple(terminated.shape)}, {tuple(truncated.shape)}"
        )
    if not (0.0 <= gamma <= 1.0 and 0.0 <= lambda_ <= 1.0):
        raise ValueError(f"lambda_returns: gamma={gamma} and lambda={lambda_} must lie in [0, 1]")
    continues = 1.0 - terminated.float()
    cut = truncated.float()
    horizon = rewards.shape[1]
    returns = torch.empty_like(rewards, dtype=next_values.dtype)
    following = next_values[:, -1]  # N_{H-1}: the last step bootstraps
    for t in reversed(range(horizon)):
        if t < horizon - 1:
            following = cut[:, t] * next_values[:, t] + (1.0 - cut[:, t]) * returns[:, t + 1]
        mixed = (1.0 - lambda_) * next_values[:, t] + lambda_ * following
        returns[:, t] = rewards[:, t] + gamma * continues[:, t] * mixed
    return returns
