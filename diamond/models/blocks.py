"""Building blocks shared by the denoiser's U-Net and the reward/termination model (DESIGN 3.2, 3.3).

Both networks are stacks of residual blocks whose GroupNorm scale and shift are predicted from a
conditioning vector (noise level and actions for the denoiser, the action for the reward model).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diamond.config import ConfigError

# Attention heads of the middle block have this many channels each (an architecture constant of
# the paper's U-Net, not a tuned hyperparameter).
ATTENTION_HEAD_CHANNELS = 8


def num_groups(channels: int, group_channels: int) -> int:
    """GroupNorm groups of `group_channels` channels each (one group if the layer is narrower)."""
    if channels % group_channels != 0 and channels > group_channels:
        raise ConfigError(
            f"num_groups_channels: {group_channels} does not divide a layer of {channels} channels; "
            "use a divisor of every channel count"
        )
    return max(1, channels // group_channels)


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
        x = F.group_norm(x, self.num_groups)
        scale, shift = self.to_scale_shift(cond)[:, :, None, None].chunk(2, dim=1)
        return x * (1 + scale) + shift


class SelfAttention2d(nn.Module):
    """Multi-head self-attention over the pixels of a feature map (used in the U-Net's middle block)."""

    def __init__(self, channels: int, cond_channels: int, group_channels: int) -> None:
        super().__init__()
        self.num_heads = max(1, channels // ATTENTION_HEAD_CHANNELS)
        self.norm = AdaGroupNorm(channels, cond_channels, group_channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)
        # Zero init: the block starts as the identity, like the residual blocks' skip path.
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x, cond)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w)
        q, k, v = (t.transpose(-1, -2) for t in qkv.unbind(1))  # (b, heads, hw, head_channels)
        y = F.scaled_dot_product_attention(q, k, v)
        y = y.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.out(y)


class ResBlock(nn.Module):
    """Pre-norm residual block: (AdaGN, SiLU, conv3x3) twice, plus a 1x1 skip when widths differ."""

    def __init__(
        self, in_channels: int, out_channels: int, cond_channels: int, group_channels: int, attention: bool
    ) -> None:
        super().__init__()
        self.norm1 = AdaGroupNorm(in_channels, cond_channels, group_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = AdaGroupNorm(out_channels, cond_channels, group_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        self.attention = SelfAttention2d(out_channels, cond_channels, group_channels) if attention else None

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x, cond)))
        h = self.conv2(F.silu(self.norm2(h, cond)))
        x = self.skip(x) + h
        if self.attention is not None:
            x = self.attention(x, cond)
        return x


class ResBlocks(nn.Module):
    """A sequence of residual blocks; the first changes the width. Returns every block's output."""

    def __init__(
        self,
        in_channels: list[int],
        out_channels: int,
        cond_channels: int,
        group_channels: int,
        attention: bool,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            ResBlock(c, out_channels, cond_channels, group_channels, attention) for c in in_channels
        )

    def forward(self, x: Tensor, cond: Tensor, skips: list[Tensor] | None = None) -> tuple[Tensor, list[Tensor]]:
        outputs = []
        for block in self.blocks:
            if skips is not None:
                # Decoder: each block also reads the matching encoder activation.
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, cond)
            outputs.append(x)
        return x, outputs


class Downsample(nn.Module):
    """Stride-2 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling followed by a 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
