"""The denoiser's network F: input conv, conditional U-Net, output conv (paper section 3 and
Appendix C; official src/models/diffusion/inner_model.py and src/models/blocks.py `UNet`).

Level i first downsamples (stride-2 conv; none at level 0), then runs its residual blocks. The
decoder mirrors it: each decoder level reads the encoder level's activations in reverse order
(its block outputs, then the map it started from) one per block, so it holds one block more than
the encoder level, and its last block returns to the width of the level above. A middle block of
two residual blocks with self-attention sits at the bottom. The module tree is the official one,
so official weights load by renaming keys (`diamond/official/keymap.py`).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from diamond.config import ConfigError
from diamond.models.blocks import Downsample, ResBlocks, Upsample, group_norm


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

        down_blocks, up_blocks = [], []
        for i, (c, d, attn) in enumerate(zip(channels, depths, attention)):
            above = channels[max(0, i - 1)]
            down_blocks.append(ResBlocks([above] + [c] * (d - 1), [c] * d, cond_channels, group_channels, attn))
            up_blocks.append(ResBlocks([2 * c] * d + [above + c], [c] * d + [above], cond_channels, group_channels, attn))
        self.down_blocks = nn.ModuleList(down_blocks)
        self.up_blocks = nn.ModuleList(reversed(up_blocks))  # deepest level first
        self.middle = ResBlocks([channels[-1]] * 2, [channels[-1]] * 2, cond_channels, group_channels, attention=True)
        # Identity at the top level keeps the official module indices (and so its state-dict keys).
        self.downsamples = nn.ModuleList([nn.Identity()] + [Downsample(c) for c in channels[:-1]])
        self.upsamples = nn.ModuleList([nn.Identity()] + [Upsample(c) for c in reversed(channels[:-1])])

        self.norm_out = group_norm(channels[0], group_channels)
        self.conv_out = nn.Conv2d(channels[0], out_channels, 3, padding=1)
        # Zero weight (the bias keeps PyTorch's init, as in the official code): F starts near 0,
        # so D starts near c_skip * x, the EDM prior.
        nn.init.zeros_(self.conv_out.weight)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        size = x.shape[-1]
        if size % (2 ** (self.num_levels - 1)) != 0:
            raise ConfigError(f"obs_size {size} is not divisible by 2^(levels-1) = {2 ** (self.num_levels - 1)}")
        x = self.conv_in(x)
        encoder_maps: list[list[Tensor]] = []
        for blocks, down in zip(self.down_blocks, self.downsamples):
            x_down = down(x)
            x, outs = blocks(x_down, cond)
            encoder_maps.append([x_down, *outs])
        x, _ = self.middle(x, cond)
        for blocks, up, skips in zip(self.up_blocks, self.upsamples, reversed(encoder_maps)):
            x, _ = blocks(up(x), cond, skips[::-1])
        return self.conv_out(F.silu(self.norm_out(x)))
