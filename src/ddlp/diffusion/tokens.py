"""Particles <-> the fixed-size tokens a DDPM diffuses.

One frame is K + 1 tokens of F numbers: foreground particle k is
[position (y, x), scale (2), depth, transparency, features (m)] and the background token (last)
is [0, 0, background features (m_bg), zero padding]: the two zeros are the background's fixed
centre. A padding mask marks the slots that carry data (1) and the padding (0).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..particles import Particles

FIXED = 6   # position 2 + scale 2 + depth 1 + transparency 1


@dataclass(frozen=True)
class TokenLayout:
    n_particles: int        # K foreground particles
    features_dim: int       # m
    bg_features_dim: int    # m_bg

    @property
    def fg_dim(self) -> int:
        return FIXED + self.features_dim

    @property
    def bg_dim(self) -> int:
        return 2 + self.bg_features_dim

    @property
    def token_dim(self) -> int:
        """F: every published config has m_bg = m, so F = 6 + m and only the background pads."""
        return max(self.fg_dim, self.bg_dim)

    @property
    def n_tokens(self) -> int:
        return self.n_particles + 1

    def padding_mask(self, device=None, dtype=torch.float32) -> Tensor:
        """[K + 1, F]: 1 on data slots, 0 on padding."""
        mask = torch.zeros(self.n_tokens, self.token_dim, device=device, dtype=dtype)
        mask[:-1, :self.fg_dim] = 1
        mask[-1, :self.bg_dim] = 1
        return mask

    @classmethod
    def from_ddlp(cls, config) -> "TokenLayout":
        return cls(config.n_kp_enc, config.learned_feature_dim, config.bg_features_dim)


def to_tokens(p: Particles, layout: TokenLayout) -> Tensor:
    """Particles [B, T, K, ...] (background features required) -> tokens [B, T, K + 1, F]."""
    if p.bg_features is None:
        raise ValueError("particles without background features cannot be turned into tokens")
    if p.num_particles != layout.n_particles or p.features.shape[-1] != layout.features_dim:
        raise ValueError(f"particles with K={p.num_particles}, m={p.features.shape[-1]} do not fit the "
                         f"token layout K={layout.n_particles}, m={layout.features_dim}")
    fg = torch.cat([p.position, p.scale, p.depth, p.transparency[..., None], p.features], -1)
    bg = torch.cat([p.bg_features.new_zeros(*p.bg_features.shape[:-1], 2), p.bg_features], -1)
    F = layout.token_dim
    fg = torch.nn.functional.pad(fg, (0, F - fg.shape[-1]))
    bg = torch.nn.functional.pad(bg, (0, F - bg.shape[-1]))
    return torch.cat([fg, bg[..., None, :]], -2)


def from_tokens(x: Tensor, layout: TokenLayout) -> Particles:
    """Tokens [..., K + 1, F] -> particles (values only); padding and the background's centre
    slots are dropped."""
    K, m = layout.n_particles, layout.features_dim
    if x.shape[-2:] != (layout.n_tokens, layout.token_dim):
        raise ValueError(f"expected tokens [..., {layout.n_tokens}, {layout.token_dim}], got {tuple(x.shape)}")
    fg, bg = x[..., :K, :], x[..., K, :]
    p = Particles(position=fg[..., 0:2], scale=fg[..., 2:4], depth=fg[..., 4:5],
                  transparency=fg[..., 5], features=fg[..., FIXED:FIXED + m],
                  bg_features=bg[..., 2:2 + layout.bg_features_dim])
    return p.map(Tensor.contiguous)
