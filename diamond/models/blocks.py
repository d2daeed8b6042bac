"""Building blocks of the denoiser's U-Net, the reward/termination model and the actor-critic.

The module tree mirrors the official DIAMOND code (`src/models/blocks.py` of
github.com/eloialonso/diamond) block for block, so that an official state dict maps onto ours by
renaming keys alone (`diamond/official/keymap.py`); the initialisations are the official ones:
zero-initialised second conv in every residual block and attention output, orthogonal
downsampling convs. `docs/official-parity.md` lists every remaining difference.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diamond.config import ConfigError

# Attention heads have this many channels each, and GroupNorm uses this epsilon: architecture
# constants of the official code, not tuned hyperparameters.
ATTENTION_HEAD_CHANNELS = 8
GROUP_NORM_EPS = 1e-5


def num_groups(channels: int, group_channels: int) -> int:
    """GroupNorm groups of about `group_channels` channels: max(1, channels // group_channels), as
    the official code counts them (a 48-channel layer with 32-channel groups has 1 group)."""
    groups = max(1, channels // group_channels)
    if channels % groups != 0:
        raise ConfigError(
            f"num_groups_channels: {group_channels} splits a layer of {channels} channels into {groups} "
            "unequal groups; use channel counts that the group count divides"
        )
    return groups


def group_norm(channels: int, group_channels: int) -> nn.GroupNorm:
    """A plain (affine, unconditioned) GroupNorm."""
    return nn.GroupNorm(num_groups(channels, group_channels), channels, eps=GROUP_NORM_EPS)


def init_lstm(lstm: nn.LSTM | nn.LSTMCell) -> None:
    """The official LSTM initialisation (`init_lstm`, official src/utils.py): Xavier-uniform input
    weights, orthogonal recurrent weights, zero biases except a forget-gate bias of 1."""
    for name, p in lstm.named_parameters():
        if name.startswith("weight_ih"):
            nn.init.xavier_uniform_(p.data)
        elif name.startswith("weight_hh"):
            nn.init.orthogonal_(p.data)
        elif name.startswith("bias_ih"):
            p.data.zero_()
            gates = p.shape[0] // 4  # PyTorch's gate order: input, forget, cell, output
            p.data[gates : 2 * gates] = 1.0
        elif name.startswith("bias_hh"):
            p.data.zero_()


class FourierFeatures(nn.Module):
    """Random Fourier features of a scalar (the noise level c_noise): [cos(2 pi f x), sin(2 pi f x)]."""

    def __init__(self, out_channels: int) -> None:
        super().__init__()
        if out_channels % 2 != 0:
            raise ConfigError(f"cond_channels: {out_channels} must be even (cos and sin halves)")
        # A buffer, not a parameter: the frequencies are fixed at init and saved with the model.
        self.register_buffer("freqs", torch.randn(1, out_channels // 2))

    def forward(self, x: Tensor) -> Tensor:
        angles = 2 * math.pi * x[:, None].float() * self.freqs
        return torch.cat([angles.cos(), angles.sin()], dim=1)


class AdaGroupNorm(nn.Module):
    """GroupNorm without affine weights; scale and shift come from the conditioning vector."""

    def __init__(self, channels: int, cond_channels: int, group_channels: int) -> None:
        super().__init__()
        self.num_groups = num_groups(channels, group_channels)
        self.to_scale_shift = nn.Linear(cond_channels, 2 * channels)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        x = F.group_norm(x, self.num_groups, eps=GROUP_NORM_EPS)
        scale, shift = self.to_scale_shift(cond)[:, :, None, None].chunk(2, dim=1)
        return x * (1 + scale) + shift


class SelfAttention2d(nn.Module):
    """Multi-head self-attention over the pixels of a feature map.

    As in the official code: a plain affine GroupNorm (not conditioned), and the attention
    output is added to the *normalised* input (the official block reassigns x to its norm
    before the residual). The output projection starts at zero, so the block starts as the norm.
    """

    def __init__(self, channels: int, group_channels: int) -> None:
        super().__init__()
        self.num_heads = max(1, channels // ATTENTION_HEAD_CHANNELS)
        self.norm = group_norm(channels, group_channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        x = self.norm(x)
        qkv = self.qkv(x).reshape(b, 3, self.num_heads, c // self.num_heads, h * w)
        q, k, v = (t.transpose(-1, -2) for t in qkv.unbind(1))  # (b, heads, hw, head_channels)
        y = F.scaled_dot_product_attention(q, k, v)
        y = y.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.out(y)


class ResBlock(nn.Module):
    """Pre-norm residual block: (AdaGN, SiLU, conv3x3) twice, plus a 1x1 skip when widths differ,
    then optional self-attention. The second conv's weight starts at zero (official init), so
    every block starts as its skip path."""

    def __init__(
        self, in_channels: int, out_channels: int, cond_channels: int, group_channels: int, attention: bool
    ) -> None:
        super().__init__()
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        self.norm1 = AdaGroupNorm(in_channels, cond_channels, group_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = AdaGroupNorm(out_channels, cond_channels, group_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        self.attention = SelfAttention2d(out_channels, group_channels) if attention else None

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x, cond)))
        h = self.conv2(F.silu(self.norm2(h, cond)))
        x = self.skip(x) + h
        if self.attention is not None:
            x = self.attention(x)
        return x


class ResBlocks(nn.Module):
    """A sequence of residual blocks with per-block widths. Returns the last and every output."""

    def __init__(
        self,
        in_channels: list[int],
        out_channels: list[int],
        cond_channels: int,
        group_channels: int,
        attention: bool,
    ) -> None:
        super().__init__()
        if len(in_channels) != len(out_channels):
            raise ValueError(f"ResBlocks: {len(in_channels)} input widths for {len(out_channels)} blocks")
        self.blocks = nn.ModuleList(
            ResBlock(i, o, cond_channels, group_channels, attention) for i, o in zip(in_channels, out_channels)
        )

    def forward(self, x: Tensor, cond: Tensor, skips: list[Tensor] | None = None) -> tuple[Tensor, list[Tensor]]:
        outputs = []
        for i, block in enumerate(self.blocks):
            if skips is not None:
                # Decoder: each block also reads one encoder activation.
                x = torch.cat([x, skips[i]], dim=1)
            x = block(x, cond)
            outputs.append(x)
        return x, outputs


class Downsample(nn.Module):
    """Stride-2 3x3 convolution, orthogonally initialised (official init)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        nn.init.orthogonal_(self.conv.weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling followed by a 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class SmallResBlock(nn.Module):
    """The actor-critic's unconditioned residual block: GroupNorm, SiLU, conv3x3, plus the input
    (through a 1x1 projection when the width changes)."""

    def __init__(self, in_channels: int, out_channels: int, group_channels: int) -> None:
        super().__init__()
        self.norm = group_norm(in_channels, group_channels)
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.skip(x) + self.conv(F.silu(self.norm(x)))
