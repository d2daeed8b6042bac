"""Reward/termination model R (paper section 3; official src/models/rew_end_model.py).

A conv encoder of the pair (frame t, frame t+1), built of the same conditional residual blocks as
the U-Net but conditioned on the action a_t, then an LSTM over time and one head whose outputs
are the sign of the reward ({-1, 0, +1} as classes {0, 1, 2}) and termination ({no, yes}).
Cross-entropy losses, masked on padding before the episode start.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diamond.config import ConfigError, RewardEndConfig
from diamond.models.blocks import Downsample, ResBlocks, init_lstm
from diamond.training import read_metrics
from diamond.world_model.denoiser import SegmentLike

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


class RewardEndEncoder(nn.Module):
    """Conv encoder of (frame t, frame t+1) conditioned on a_t: input conv, levels of conditional
    residual blocks (stride-2 downsampling before every level but the first), then a middle
    block of two residual blocks with self-attention (official src/models/rew_end_model.py)."""

    def __init__(self, cfg: RewardEndConfig) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(6, cfg.channels[0], 3, padding=1)
        g = cfg.num_groups_channels
        blocks = []
        for i, (c, d) in enumerate(zip(cfg.channels, cfg.depths)):
            above = cfg.channels[max(0, i - 1)]
            blocks.append(ResBlocks([above] + [c] * (d - 1), [c] * d, cfg.cond_channels, g, attention=False))
        width = cfg.channels[-1]
        blocks.append(ResBlocks([width] * 2, [width] * 2, cfg.cond_channels, g, attention=True))
        self.blocks = nn.ModuleList(blocks)
        # Identities keep the official module indices (and so its state-dict keys).
        self.downsamples = nn.ModuleList([nn.Identity()] + [Downsample(c) for c in cfg.channels[:-1]] + [nn.Identity()])

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        x = self.conv_in(x)
        for blocks, down in zip(self.blocks, self.downsamples):
            x, _ = blocks(down(x), cond)
        return x


class RewardEndModel(nn.Module):
    """R: encoder, LSTM over time, one shared head whose 5 outputs are the 3 reward-sign logits
    and the 2 termination logits (official layout: Linear-SiLU-Linear, the last without bias).

    `output_bias` adds a bias to the last layer: only for `reward_end_prior_init` (not in the
    official code), which starts those biases at the dataset's log class frequencies.
    """

    def __init__(self, cfg: RewardEndConfig, num_actions: int, obs_size: int, output_bias: bool = False) -> None:
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
        self.encoder = RewardEndEncoder(cfg)
        self.act_emb = nn.Embedding(num_actions, cfg.cond_channels)
        # The LSTM reads the encoder's own output map (8x8 for the paper's 4 levels on 64x64).
        out_side = obs_size // downsampling
        self.lstm = nn.LSTM(cfg.channels[-1] * out_side**2, cfg.lstm_dim, batch_first=True)
        init_lstm(self.lstm)
        self.head = nn.Sequential(
            nn.Linear(cfg.lstm_dim, cfg.lstm_dim),
            nn.SiLU(),
            nn.Linear(cfg.lstm_dim, NUM_REWARD_CLASSES + NUM_END_CLASSES, bias=output_bias),
        )

    @torch.no_grad()
    def init_heads_to_priors(self, reward_counts: np.ndarray, end_counts: np.ndarray) -> None:
        """Output biases := log class frequencies, so that R starts at the prior instead of first
        fitting it (WorldModelConfig.reward_end_prior_init)."""
        bias = self.head[-1].bias
        if bias is None:
            raise ValueError("init_heads_to_priors: R was built without output biases (output_bias=False)")
        if len(reward_counts) != NUM_REWARD_CLASSES or len(end_counts) != NUM_END_CLASSES:
            raise ValueError(
                f"init_heads_to_priors: {len(reward_counts)} reward and {len(end_counts)} termination class counts, "
                f"need {NUM_REWARD_CLASSES} and {NUM_END_CLASSES}"
            )
        bias.copy_(torch.cat([log_priors(reward_counts), log_priors(end_counts)]).to(bias.device))

    def encode(self, obs: Tensor, act: Tensor, next_obs: Tensor) -> Tensor:
        """(B, T, 3, H, W) x2 and (B, T) -> (B, T, features)."""
        b, t = act.shape
        x = torch.cat([obs, next_obs], dim=2).flatten(0, 1)
        x = self.encoder(x, self.act_emb(act.flatten()))
        return x.reshape(b, t, -1)

    def forward(
        self,
        obs: Tensor,
        act: Tensor,
        next_obs: Tensor,
        hx_cx: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
        """-> (reward logits (B, T, 3), termination logits (B, T, 2), LSTM state)."""
        h, hx_cx = self.lstm(self.encode(obs, act, next_obs), hx_cx)
        logits = self.head(h)
        return logits[..., :NUM_REWARD_CLASSES], logits[..., NUM_REWARD_CLASSES:], hx_cx

    def loss_terms(self, seg: SegmentLike) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(loss, reward loss, termination loss, reward logits, termination logits, mask of real
        steps (B, T)): cross-entropy on sign(reward) and termination for every real step.

        Tensors in, tensors out, nothing read on the host: torch.compile(fullgraph=True) captures
        it whole once dynamo's `allow_rnn` lets it trace the LSTM (tests/test_compiled_step.py).

        With `segment_window` "both_sides" (R's official window, diamond/data/sampler.py
        Placement), as official src/models/rew_end_model.py:57-69: a step is learnt where its frame
        is real; past the last real frame the frames are grey padding, except the final frame after
        a termination (official `final_observation`, written into the segment's frames, so also the
        input of the next, masked, step)."""
        if self.cfg.segment_window == "both_sides":
            after_end = F.pad(seg.terminated, (1, 0))  # (B, L+1): the frame right after a termination
            obs = seg.obs * (seg.mask | after_end)[:, :, None, None, None]
            logits_rew, logits_end, _ = self(obs[:, :-1], seg.act, obs[:, 1:])
            return self._loss(seg, seg.mask[:, :-1], logits_rew, logits_end)
        mask = seg.mask[:, :-1] & seg.mask[:, 1:]
        frame_mask = seg.mask[:, :, None, None, None]
        obs = seg.obs * frame_mask  # padding before the episode start becomes zeros
        logits_rew, logits_end, _ = self(obs[:, :-1], seg.act, obs[:, 1:])
        return self._loss(seg, mask, logits_rew, logits_end)

    @staticmethod
    def _loss(seg: SegmentLike, mask: Tensor, logits_rew: Tensor, logits_end: Tensor
              ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Cross-entropies on sign(reward) and termination, averaged over the steps of `mask`."""
        weight = mask.float().flatten()
        denom = weight.sum().clamp(min=1)
        target_rew, target_end = reward_classes(seg.rew).flatten(), seg.terminated.long().flatten()
        loss_rew = (F.cross_entropy(logits_rew.flatten(0, 1).float(), target_rew, reduction="none") * weight).sum() / denom
        loss_end = (F.cross_entropy(logits_end.flatten(0, 1).float(), target_end, reduction="none") * weight).sum() / denom
        return loss_rew + loss_end, loss_rew, loss_end, logits_rew, logits_end, mask

    def compute_loss(self, seg: SegmentLike) -> tuple[Tensor, dict[str, float]]:
        """`loss_terms`' loss, with the losses and accuracies on real steps as floats."""
        loss, loss_rew, loss_end, logits_rew, logits_end, mask = self.loss_terms(seg)
        with torch.no_grad():
            m = mask.flatten()
            acc_rew = (logits_rew.argmax(-1).flatten()[m] == reward_classes(seg.rew).flatten()[m]).float().mean()
            acc_end = (logits_end.argmax(-1).flatten()[m] == seg.terminated.long().flatten()[m]).float().mean()
        metrics = {"loss": loss, "loss_rew": loss_rew, "loss_end": loss_end, "acc_rew": acc_rew, "acc_end": acc_end}
        return loss, read_metrics(metrics)
