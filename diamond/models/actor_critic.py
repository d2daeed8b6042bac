"""Actor-critic network (paper section 3; official src/models/actor_critic.py).

Encoder: an input conv, then per level a small residual block (GroupNorm, SiLU, conv3x3, plus a
skip) and a 2x2 max-pool; then an LSTMCell with the official initialisation and zero-initialised
policy and value heads (so the untrained policy is uniform and its value 0).
"""

from __future__ import annotations

import torch
from torch import nn

from diamond.config import ActorCriticConfig, ConfigError
from diamond.models.blocks import SmallResBlock, init_lstm

HiddenState = tuple[torch.Tensor, torch.Tensor]


class ActorCritic(nn.Module):
    """One frame in, action logits and a value out; the LSTM carries the past."""

    def __init__(self, cfg: ActorCriticConfig, num_actions: int, obs_size: int) -> None:
        super().__init__()
        if num_actions < 2:
            raise ConfigError(f"actor-critic: num_actions={num_actions}; a game has at least 2 actions")
        if not cfg.channels or obs_size % (2 ** len(cfg.channels)) != 0:
            raise ConfigError(
                f"actor_critic.channels: {len(cfg.channels)} max-pool levels do not divide obs_size={obs_size}"
            )
        self.num_actions = num_actions
        self.lstm_dim = cfg.lstm_dim
        layers: list[nn.Module] = [nn.Conv2d(3, cfg.channels[0], 3, padding=1)]
        for i, ch in enumerate(cfg.channels):
            # Each level halves the resolution: 64 -> 4 after the paper's 4 levels.
            layers += [SmallResBlock(cfg.channels[max(0, i - 1)], ch, cfg.num_groups_channels), nn.MaxPool2d(2)]
        self.encoder = nn.Sequential(*layers)
        side = obs_size // (2 ** len(cfg.channels))
        self.lstm = nn.LSTMCell(cfg.channels[-1] * side * side, cfg.lstm_dim)
        init_lstm(self.lstm)
        self.actor = nn.Linear(cfg.lstm_dim, num_actions)
        self.critic = nn.Linear(cfg.lstm_dim, 1)
        for head in (self.actor, self.critic):
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def initial_state(self, batch_size: int, device: torch.device | str) -> HiddenState:
        zeros = torch.zeros(batch_size, self.lstm_dim, device=device)
        return zeros, zeros.clone()

    def forward(self, obs: torch.Tensor, hx_cx: HiddenState) -> tuple[torch.Tensor, torch.Tensor, HiddenState]:
        """obs float (B, 3, H, W) in [-1, 1] -> logits (B, A), value (B,), new (hx, cx)."""
        hx, cx = self.lstm(self.encoder(obs).flatten(1), hx_cx)
        return self.actor(hx), self.critic(hx).squeeze(-1), (hx, cx)

    def burn_in(self, obs: torch.Tensor, mask: torch.Tensor | None = None) -> HiddenState:
        """Warm the LSTM on context frames obs (B, T, 3, H, W); returns the state after them.

        `mask` (B, T) is False on frames padded before an episode start: the state is reset to
        zero after them, so padding never leaks into the memory.
        """
        state = self.initial_state(obs.shape[0], obs.device)
        for t in range(obs.shape[1]):
            _, _, state = self(obs[:, t], state)
            if mask is not None:
                keep = mask[:, t].float().unsqueeze(-1)
                state = (state[0] * keep, state[1] * keep)
        return state

    def restart_rows(
        self, state: HiddenState, rows: torch.Tensor, context_obs: torch.Tensor, context_mask: torch.Tensor | None,
        with_gradient: bool = False,
    ) -> HiddenState:
        """The state with the rows where `rows` (B,) is True replaced by a burn-in on their context.

        `context_obs` (B, T, 3, H, W) and `context_mask` (B, T) are aligned with the batch (rows that
        go on may hold anything); with 0 rows, no row restarts (diamond.agent.imagination.Restart). Static
        shapes, no host sync: the burn-in runs on all B rows and torch.where keeps the rows that go
        on, with their gradient path. `with_gradient`: the burn-in is part of the graph, as in the
        official env loop (src/coroutines/env_loop.py:53-56; params actor_critic.burn_in).
        """
        if context_obs.shape[0] == 0:
            return state
        with torch.set_grad_enabled(with_gradient and torch.is_grad_enabled()):
            warmed = self.burn_in(context_obs, context_mask)
        # Under autocast the burn-in's state may come out in another dtype than the running state: cast it.
        keep = rows[:, None]
        h, c = (torch.where(keep, w.to(s.dtype), s) for w, s in zip(warmed, state))
        return h, c
