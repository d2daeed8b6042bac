"""Reward/termination model R (DESIGN 3.3).

A conv encoder of the pair (frame t, frame t+1), built of the same conditional residual blocks as
the U-Net but conditioned on the action a_t, then an LSTM over time and two heads: the sign of the
reward ({-1, 0, +1} as classes {0, 1, 2}) and termination ({no, yes}). Cross-entropy losses,
masked on padding before the episode start.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diamond.config import ConfigError, RewardEndConfig
from diamond.models.blocks import Downsample, ResBlocks, num_groups
from diamond.models.denoiser import SegmentLike

NUM_REWARD_CLASSES = 3
NUM_END_CLASSES = 2


def reward_classes(rew: Tensor) -> Tensor:
    """sign(reward) in {-1, 0, 1} -> class index {0, 1, 2}."""
    return (torch.sign(rew) + 1).long()


def class_counts(rew: np.ndarray, terminated: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Transitions per reward class (sign -1, 0, +1) and per termination class (no, yes)."""
    reward = np.bincount((np.sign(rew) + 1).astype(np.int64), minlength=NUM_REWARD_CLASSES)
    end = np.bincount(terminated.astype(np.int64), minlength=NUM_END_CLASSES)
    return reward, end


def log_priors(counts: np.ndarray) -> Tensor:
    """Log class frequencies, add-one smoothed so that an unseen class gets a finite bias."""
    smoothed = np.asarray(counts, dtype=np.float64) + 1.0
    return torch.from_numpy(np.log(smoothed / smoothed.sum())).float()


class RewardEndModel(nn.Module):
    def __init__(self, cfg: RewardEndConfig, num_actions: int, obs_size: int) -> None:
        super().__init__()
        if not cfg.channels or len(cfg.channels) != len(cfg.depths) or min(cfg.depths) < 1:
            raise ConfigError(
                f"reward_end: channels {cfg.channels} and depths {cfg.depths} must be non-empty, "
                "of the same length, with depths >= 1"
            )
        downsampling = 2 ** (len(cfg.channels) - 1)
        if obs_size % downsampling != 0:
            raise ConfigError(
                f"reward_end.channels: {len(cfg.channels)} levels halve the frame {len(cfg.channels) - 1} times, "
                f"which does not divide obs_size={obs_size}"
            )
        self.cfg = cfg
        self.num_actions = num_actions
        self.act_emb = nn.Embedding(num_actions, cfg.cond_channels)
        self.conv_in = nn.Conv2d(6, cfg.channels[0], 3, padding=1)
        self.levels = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        width = cfg.channels[0]
        for i, (c, d) in enumerate(zip(cfg.channels, cfg.depths)):
            self.levels.append(ResBlocks([width] + [c] * (d - 1), c, cfg.cond_channels, cfg.num_groups_channels, False))
            width = c
            if i < len(cfg.channels) - 1:
                self.downsamples.append(Downsample(c))
        self.norm_out = nn.GroupNorm(num_groups(width, cfg.num_groups_channels), width)
        # The LSTM reads the encoder's own output map (8x8 for the paper's 4 levels on 64x64), as
        # the official code does. Resizing a smaller map up to 8x8 (tried: 4x4 at 32x32 frames)
        # only repeats features, and delayed R's first reward predictions on Assault from ~2,000
        # to ~4,000 steps (same data, init and batches).
        out_side = obs_size // downsampling
        self.lstm = nn.LSTM(width * out_side**2, cfg.lstm_dim, batch_first=True)
        self.head_rew = self._head(cfg.lstm_dim, NUM_REWARD_CLASSES)
        self.head_end = self._head(cfg.lstm_dim, NUM_END_CLASSES)

    @staticmethod
    def _head(dim: int, classes: int) -> nn.Sequential:
        return nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, classes))

    @torch.no_grad()
    def init_heads_to_priors(self, reward_counts: np.ndarray, end_counts: np.ndarray) -> None:
        """Output biases of both heads := log class frequencies, so that R starts at the prior
        instead of first fitting it (WorldModelConfig.reward_end_prior_init)."""
        for head, counts in ((self.head_rew, reward_counts), (self.head_end, end_counts)):
            bias = head[-1].bias
            if len(counts) != bias.numel():
                raise ValueError(f"init_heads_to_priors: {len(counts)} class counts for a head of {bias.numel()} classes")
            bias.copy_(log_priors(counts).to(bias.device))

    def encode(self, obs: Tensor, act: Tensor, next_obs: Tensor) -> Tensor:
        """(B, T, 3, H, W) x2 and (B, T) -> (B, T, features)."""
        b, t = act.shape
        x = torch.cat([obs, next_obs], dim=2).flatten(0, 1)
        cond = self.act_emb(act.flatten())
        x = self.conv_in(x)
        for i, blocks in enumerate(self.levels):
            x, _ = blocks(x, cond)
            if i < len(self.downsamples):
                x = self.downsamples[i](x)
        x = F.silu(self.norm_out(x))
        return x.reshape(b, t, -1)

    def forward(
        self,
        obs: Tensor,
        act: Tensor,
        next_obs: Tensor,
        hx_cx: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
        """-> (reward logits (B, T, 3), termination logits (B, T, 2), LSTM state)."""
        features = self.encode(obs, act, next_obs)
        h, hx_cx = self.lstm(features, hx_cx)
        return self.head_rew(h), self.head_end(h), hx_cx

    def compute_loss(self, seg: SegmentLike) -> tuple[Tensor, dict[str, float]]:
        """Cross-entropy on sign(reward) and termination for every real step of the segment."""
        mask = seg.mask[:, :-1] & seg.mask[:, 1:]
        frame_mask = seg.mask[:, :, None, None, None]
        obs = seg.obs * frame_mask  # padding before the episode start becomes zeros
        logits_rew, logits_end, _ = self(obs[:, :-1], seg.act, obs[:, 1:])
        target_rew = reward_classes(seg.rew)
        target_end = seg.terminated.long()
        weight = mask.float().flatten()
        denom = weight.sum().clamp(min=1)
        loss_rew = (F.cross_entropy(logits_rew.flatten(0, 1).float(), target_rew.flatten(), reduction="none") * weight).sum() / denom
        loss_end = (F.cross_entropy(logits_end.flatten(0, 1).float(), target_end.flatten(), reduction="none") * weight).sum() / denom
        loss = loss_rew + loss_end
        with torch.no_grad():
            m = mask.flatten()
            acc_rew = (logits_rew.argmax(-1).flatten()[m] == target_rew.flatten()[m]).float().mean()
            acc_end = (logits_end.argmax(-1).flatten()[m] == target_end.flatten()[m]).float().mean()
        metrics = {
            "loss": loss.item(),
            "loss_rew": loss_rew.item(),
            "loss_end": loss_end.item(),
            "acc_rew": acc_rew.item(),
            "acc_end": acc_end.item(),
        }
        return loss, metrics
