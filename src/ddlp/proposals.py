"""The keypoint proposer (DLP's patch-wise "prior"): one soft-argmax proposal per image patch, then filtering.

The proposals serve twice: the first K (after filtering) initialise the posterior anchors, and
all L kept proposals are the (detached) targets of the Chamfer-KL.

With `spacing` (ours, off in the official configs) the kept proposals are reordered so that the
first K are at least `spacing` apart where the kept set allows it: several proposals on one
object no longer crowd out another object, which then has no particle for the whole clip.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .nn.blocks import ConvEncoder
from .nn.glimpse import crop, spatial_softmax

HEURISTICS = ("variance", "distance", "random", "none")


class KeypointProposer(nn.Module):
    def __init__(self, image_size: int, patch_size: int, channels: list[int], n_keep: int,
                 heuristic: str = "variance", replicate_pad: bool = True, n_anchors: int = 0,
                 spacing: float = 0.0):
        super().__init__()
        if heuristic not in HEURISTICS:
            raise ValueError(f"filtering_heuristic must be one of {HEURISTICS}, got {heuristic!r}")
        self.image_size, self.patch_size, self.heuristic = image_size, patch_size, heuristic
        self.grid = image_size // patch_size
        self.n_patches = self.grid ** 2
        self.n_keep = self.n_patches if heuristic == "none" else min(n_keep, self.n_patches)
        self.cnn = ConvEncoder(3, channels, patch_size, n_out=1, replicate_pad=replicate_pad)
        self.n_anchors, self.spacing = n_anchors, spacing

    def patch_origins(self, ref: Tensor) -> Tensor:
        """Top-left pixel (row, col) of every patch, raster order: [Q, 2]."""
        idx = torch.arange(self.grid, device=ref.device, dtype=ref.dtype) * self.patch_size
        return torch.stack(torch.meshgrid(idx, idx, indexing="ij"), -1).reshape(-1, 2)

    def to_global(self, local: Tensor) -> Tensor:
        """Patch-local [-1, 1] coordinates [B, Q, 2] -> image coordinates."""
        S, H = self.patch_size, self.image_size
        return (((local + 1) / 2) * (S - 1) + self.patch_origins(local)) / (H - 1) * 2 - 1

    def proposals(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """All patch proposals (global (y, x)) [B, Q, 2] and their local (var_y, var_x, cov)."""
        B, C, H, W = x.shape
        G, S = self.grid, self.patch_size
        patches = x.view(B, C, G, S, G, S).permute(0, 2, 4, 1, 3, 5).reshape(B * G * G, C, S, S)
        heat = self.cnn(patches)                                   # [B*Q, 1, h, w]
        mean, var = spatial_softmax(heat[:, 0])
        return self.to_global(mean.view(B, G * G, 2)), var.view(B, G * G, 3)

    def forward(self, x: Tensor, heuristic: str | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Returns the kept proposals [B, L, 2] (graph kept), plus all proposals and variances."""
        kp, var = self.proposals(x)
        heuristic = heuristic or self.heuristic
        if heuristic == "none":
            return kp, kp, var
        if heuristic == "variance":
            idx = torch.topk(var.sum(-1), self.n_keep, dim=1, largest=False).indices
        elif heuristic == "distance":
            centres = self.to_global(torch.zeros_like(kp))
            idx = torch.topk((kp - centres).pow(2).sum(-1), self.n_keep, dim=1).indices
        else:  # random: one permutation shared by the batch
            perm = torch.randperm(self.n_patches, device=x.device)[: self.n_keep]
            idx = perm.expand(kp.shape[0], -1)
        kept = torch.gather(kp, 1, idx[..., None].expand(-1, -1, 2))
        if self.spacing > 0 and heuristic != "random":
            kept = spread_first(kept, self.n_anchors, self.spacing)
        return kept, kp, var


def spread_first(kp: Tensor, k: int, spacing: float) -> Tensor:
    """Reorder proposals [B, L, 2]: greedily, in their order, take up to k that are at least
    `spacing` from every one taken before; the taken ones come first, the others keep their
    order behind them. A permutation, so the set (the Chamfer-KL's target) is unchanged."""
    B, L, _ = kp.shape
    close = torch.cdist(kp.detach(), kp.detach()) < spacing            # [B, L, L]
    taken = torch.zeros(B, L, dtype=torch.bool, device=kp.device)
    for i in range(L):
        free = ~(close[:, i] & taken).any(-1)
        taken[:, i] = free & (taken.sum(-1) < k)
    rank = torch.arange(L, device=kp.device) + L * (~taken).long()    # taken first, stable
    order = rank.argsort(-1)
    return torch.gather(kp, 1, order[..., None].expand(-1, -1, 2))


class _Residual(nn.Module):
    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.norm, self.fn = nn.LayerNorm(dim), fn

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fn(self.norm(x))


class ParticleMixer(nn.Module):
    """Maps all Q patch proposals to K anchors (used with filtering 'none'): an MLP-mixer over
    glimpse features and positions predicts, per anchor, softmax weights over the proposals."""

    def __init__(self, n_proposals: int, n_particles: int, image_size: int, glimpse: int,
                 channels: list[int], width: int = 64):
        super().__init__()
        self.image_size, self.glimpse = image_size, glimpse
        self.cnn = ConvEncoder(3, channels, glimpse, n_out=32)
        self.glimpse_projection = nn.Linear(32 * self.cnn.out_side ** 2, width)
        self.position_projection = nn.Linear(2, width)
        d = 2 * width
        self.token_mixing = _Residual(d, nn.Sequential(
            nn.Conv1d(n_proposals, d, 1), nn.ReLU(), nn.Conv1d(d, n_proposals, 1)))
        self.channel_mixing = _Residual(d, nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d)))
        self.norm = nn.LayerNorm(d)
        self.to_weights = nn.Linear(d, n_particles)

    def forward(self, x: Tensor, kp: Tensor) -> Tensor:
        B, Q, _ = kp.shape
        s = self.glimpse / self.image_size
        scale = torch.full_like(kp, s)
        glimpses = crop(x, kp.detach(), scale, self.glimpse)          # [B, Q, 3, g, g]
        feats = self.cnn(glimpses.flatten(0, 1)).reshape(B, Q, -1)
        h = torch.cat([self.glimpse_projection(feats), self.position_projection(kp.detach())], -1)
        h = self.channel_mixing(self.token_mixing(h))
        weights = F.softmax(self.to_weights(self.norm(h)), dim=1)     # [B, Q, K], over proposals
        return weights.transpose(1, 2) @ kp                           # [B, K, 2]
