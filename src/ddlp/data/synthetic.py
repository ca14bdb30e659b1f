"""Tiny procedural clips of coloured discs moving and bouncing off the walls.

Used by the demo and the tests; no files, no randomness beyond the given seed.
"""
from __future__ import annotations

import torch

PALETTE = torch.tensor([[0.1, 0.3, 1.0], [1.0, 0.15, 0.1], [1.0, 0.9, 0.1],
                        [1.0, 0.2, 0.9], [0.1, 1.0, 0.95], [0.3, 1.0, 0.3]])


def moving_discs(frames: int = 8, size: int = 64, n_discs: int = 3, radius: float | None = None,
                 speed: float = 2.0, seed: int = 0, batch: int = 1) -> torch.Tensor:
    """Clips [batch, frames, 3, size, size] in [0, 1] on a black background."""
    g = torch.Generator().manual_seed(seed)
    r = radius or size / 8
    pos = r + torch.rand(batch, n_discs, 2, generator=g) * (size - 2 * r)
    angle = torch.rand(batch, n_discs, generator=g) * 2 * torch.pi
    vel = speed * torch.stack([angle.sin(), angle.cos()], -1)
    colours = PALETTE[torch.randint(len(PALETTE), (batch, n_discs), generator=g)]
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32),
                            torch.arange(size, dtype=torch.float32), indexing="ij")
    out = torch.zeros(batch, frames, 3, size, size)
    for t in range(frames):
        d = ((yy - pos[..., 0, None, None]) ** 2 + (xx - pos[..., 1, None, None]) ** 2).sqrt()
        alpha = (r + 0.5 - d).clamp(0, 1)                                # [B, n, H, W], soft edge
        img = torch.zeros(batch, 3, size, size)
        for k in range(n_discs):                                         # later discs occlude earlier ones
            a = alpha[:, k, None]
            img = (1 - a) * img + a * colours[:, k, :, None, None]
        out[:, t] = img
        pos = pos + vel
        low, high = pos < r, pos > size - 1 - r
        vel = torch.where(low | high, -vel, vel)
        pos = torch.where(low, 2 * r - pos, torch.where(high, 2 * (size - 1 - r) - pos, pos))
    return out
