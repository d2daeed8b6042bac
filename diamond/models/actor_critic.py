"""Actor-critic network (DESIGN 3.4): conv encoder, LSTMCell, zero-initialised policy and value heads."""

from __future__ import annotations

import torch
from torch import nn

from diamond.config import ActorCriticConfig, ConfigError

HiddenState = tuple[torch.Tensor, torch.Tensor]


class ActorCritic(nn.Module):
    """One frame in, action logits and a value out; the LSTM carries the past."""

    def __init__(self, cfg: ActorCriticConfig, num_actions: int, obs_size: int) -> None:
        super().__init__()
        if num_actions < 2:
            raise ConfigError(f"actor-critic: num_actions={num_actions}; a game has at least 2 actions")
        if obs_size % (2 ** len(cfg.channels)) != 0:
            raise ConfigError(
                f"actor_critic.channels: {len(cfg.channels)} max-pool levels do not divide obs_size={obs_size}"
            )
        self.num_actions = num_actions
        self.lstm_dim = cfg.lstm_dim
        layers: list[nn.Module] = []
        in_ch = 3
        for ch in cfg.channels:
            # Each level halves the resolution: 64 -> 4 after the paper's 4 levels.
            layers += [nn.Conv2d(in_ch, ch, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2)]
            in_ch = ch
        self.encoder = nn.Sequential(*layers, nn.Flatten())
        side = obs_size // (2 ** len(cfg.channels))
        self.lstm = nn.LSTMCell(in_ch * side * side, cfg.lstm_dim)
        self.actor = nn.Linear(cfg.lstm_dim, num_actions)
        self.critic = nn.Linear(cfg.lstm_dim, 1)
        # Zero heads: the untrained policy is uniform and the untrained value is 0.
        for head in (self.actor, self.critic):
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def initial_state(self, batch_size: int, device: torch.device | str) -> HiddenState:
        zeros = torch.zeros(batch_size, self.lstm_dim, device=device)
        return zeros, zeros.clone()

    def forward(self, obs: torch.Tensor, hx_cx: HiddenState) -> tuple[torch.Tensor, torch.Tensor, HiddenState]:
        """obs float (B, 3, H, W) in [-1, 1] -> logits (B, A), value (B,), new (hx, cx)."""
        hx, cx = self.lstm(self.encoder(obs), hx_cx)
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
        self, state: HiddenState, rows: torch.Tensor, context_obs: torch.Tensor, context_mask: torch.Tensor
    ) -> HiddenState:
        """The state with the rows where `rows` (B,) is True replaced by a burn-in on their new context."""
        if not bool(rows.any()):
            return state
        with torch.no_grad():
            warmed = self.burn_in(context_obs, context_mask)
        index = rows.nonzero().squeeze(-1)
        # index_copy keeps the gradient path of the rows that continue.
        return state[0].index_copy(0, index, warmed[0]), state[1].index_copy(0, index, warmed[1])

