"""Frames: the one conversion between stored uint8 pixels and the networks' [-1, 1] floats, and
the one GIF writer.

Stored frames are uint8 CHW (diamond/data/episode.py); the networks see x = u / 127.5 - 1, as the
official code does (src/data/... `obs.float().div(255).mul(2).sub(1)`, the same map).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from diamond.io import atomic_write_bytes

GIF_SCALE = 2  # nearest-neighbour upscaling of the small frames
GIF_FRAME_MS = 1000 / 15  # 15 frames per second


def to_float(frames: np.ndarray | Tensor, device: torch.device | str | None = None) -> Tensor:
    """uint8 frames -> float32 in [-1, 1] (on `device` when given)."""
    x = torch.from_numpy(frames) if isinstance(frames, np.ndarray) else frames
    if device is not None:
        x = x.to(device)
    return x.float().div_(127.5).sub_(1.0)  # .float() of uint8 is a fresh tensor: in place is safe


def to_uint8(x: Tensor) -> np.ndarray:
    """[-1, 1] floats -> uint8 numpy frames (clamped, rounded to the nearest level)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()


def gif_bytes(frames: np.ndarray | list[np.ndarray], scale: int = GIF_SCALE, frame_ms: float = GIF_FRAME_MS) -> bytes:
    """CHW uint8 frames -> an animated GIF (looping), enlarged `scale` times (nearest neighbour)."""
    import imageio.v3 as iio

    if len(frames) == 0:
        raise ValueError("no frames to write")
    images = np.stack(list(frames)).transpose(0, 2, 3, 1).repeat(scale, axis=1).repeat(scale, axis=2)
    return iio.imwrite("<bytes>", images, extension=".gif", duration=frame_ms, loop=0)


def write_gif(path: str | Path, frames: np.ndarray | list[np.ndarray], scale: int = GIF_SCALE,
              frame_ms: float = GIF_FRAME_MS) -> None:
    """`gif_bytes` written atomically to `path`."""
    if len(frames) == 0:
        raise ValueError(f"{path}: no frames to write")
    atomic_write_bytes(path, gif_bytes(frames, scale, frame_ms))
