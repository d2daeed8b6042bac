"""The denoiser's network F: a conditional U-Net (DESIGN 3.2).

Levels of residual blocks at decreasing resolution (stride-2 conv down, nearest-neighbour up),
a middle block of two residual blocks with self-attention, and skip connections from every
encoder activation (the input conv's output, each block's output, each downsampled map) to
the decoder, whose levels therefore hold one block more than the encoder's.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from diamond.config import ConfigError
from diamond.models.blocks import Downsample, ResBlocks, Upsample, num_groups


class UNet(nn.Module):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        cond_channels: int,
        channels: list[int],
        depths: list[int],
        attention: list[bool],
        group_channels: int,
    ) -> None:
        super().__init__()
        if not (len(channels) == len(depths) == len(attention)) or not channels:
            raise ConfigError(
                f"denoiser: channels {channels}, depths {depths} and attention {attention} "
                "must be non-empty lists of the same length (one entry per U-Net level)"
            )
        if min(depths) < 1:
            raise ConfigError(f"denoiser.depths: {depths} must all be >= 1")
        self.num_levels = len(channels)
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)

        skip_channels = [channels[0]]  # widths of the activations the decoder will read, in order
        self.down_blocks = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        width = channels[0]
        for i, (c, d, attn) in enumerate(zip(channels, depths, attention)):
            self.down_blocks.append(ResBlocks([width] + [c] * (d - 1), c, cond_channels, group_channels, attn))
            width = c
            skip_channels += [c] * d
            if i < self.num_levels - 1:
                self.downsamples.append(Downsample(c))
                skip_channels.append(c)

        self.middle = ResBlocks([width, width], width, cond_channels, group_channels, attention=True)

        self.up_blocks = nn.ModuleList()
        self.upsamples = nn.ModuleList()
        for i in reversed(range(self.num_levels)):
            c, d, attn = channels[i], depths[i], attention[i]
            ins = []
            for _ in range(d + 1):
                ins.append(width + skip_channels.pop())
                width = c
            self.up_blocks.append(ResBlocks(ins, c, cond_channels, group_channels, attn))
            if i > 0:
                self.upsamples.append(Upsample(c))

        self.norm_out = nn.GroupNorm(num_groups(width, group_channels), width)
        self.conv_out = nn.Conv2d(width, out_channels, 3, padding=1)
        # Zero-initialised output: F starts at 0, so D starts as c_skip * x (the EDM prior).
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        size = x.shape[-1]
        if size % (2 ** (self.num_levels - 1)) != 0:
            raise ConfigError(f"obs_size {size} is not divisible by 2^(levels-1) = {2 ** (self.num_levels - 1)}")
        x = self.conv_in(x)
        skips = [x]
        for i, blocks in enumerate(self.down_blocks):
            x, outs = blocks(x, cond)
            skips += outs
            if i < self.num_levels - 1:
                x = self.downsamples[i](x)
                skips.append(x)
        x, _ = self.middle(x, cond)
        for i, blocks in enumerate(self.up_blocks):
            x, _ = blocks(x, cond, skips)
            if i < self.num_levels - 1:
                x = self.upsamples[i](x)
        return self.conv_out(torch.nn.functional.silu(self.norm_out(x)))
