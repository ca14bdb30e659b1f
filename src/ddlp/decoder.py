"""Decoders: glimpse decoder (features -> RGBA glimpse), depth/transparency stitching of the
pasted glimpses, and the background particle (masked encoder and decoder)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .nn.blocks import (ConvBlock, ConvEncoder, ConvStack, background_decoder_plan, glimpse_decoder_plan, mlp,
                        run_blocks, upsampling_plan)
from .nn.glimpse import paste, square_masks


class GlimpseDecoder(nn.Module):
    """features [N, F] -> RGBA glimpse [N, 4, g, g] (channel 0 is alpha), all in [0, 1]."""

    def __init__(self, features_dim: int, glimpse: int):
        super().__init__()
        self.fc = mlp(features_dim, 256, 256, 32 * 8 * 8, final_act=True)
        self.plan = glimpse_decoder_plan(glimpse)
        self.cnn = ConvStack(*[ConvBlock(s) for s in self.plan])

    def forward(self, features: Tensor) -> Tensor:
        return torch.sigmoid(self.cnn(self.fc(features).view(-1, 32, 8, 8)))


@dataclass
class Foreground:
    image: Tensor          # [B, 3, H, W] stitched particles
    bg_mask: Tensor        # [B, 1, H, W] = 1 - sum_k alpha_masks
    alpha_masks: Tensor    # [B, K, 1, H, W] effective per-particle alpha on the canvas
    glimpses: Tensor       # [B, K, 4, g, g] decoded RGBA glimpses before placement


def stitch(decoded: Tensor, position: Tensor, scale: Tensor, depth: Tensor, transparency: Tensor,
           image_size: int, noisy: bool = False) -> Foreground:
    """Paste RGBA glimpses and blend them by transparency and depth (smaller depth in front).

    decoded [B, K, 4, g, g]; position / scale (pre-sigmoid) [B, K, 2]; depth [B, K, 1];
    transparency [B, K].

    With gradients and canvases of RECOMPUTE_STITCH_BYTES or more it runs as a checkpoint:
    backward recomputes the pasting and blending from these small inputs (the noisy alpha with
    the same random draws) instead of keeping their float32 canvases, [B, K, 4, H, W] twice and
    five [B, K, 1, H, W] beside the sampling grid. A bf16 Balls step (8 x 11 frames) then keeps
    489 MB instead of 607, for 2 % of its time; the quickstart's small batches (one canvas:
    5.5 MB) would pay the 2 % and gain no memory that matters.
    """
    args = (decoded, position, scale, depth, transparency, image_size, noisy)
    canvas_bytes = 4 * decoded.shape[0] * decoded.shape[1] * 4 * image_size ** 2
    if torch.is_grad_enabled() and canvas_bytes >= RECOMPUTE_STITCH_BYTES:
        return checkpoint(_stitch, *args, use_reentrant=False)
    return _stitch(*args)


RECOMPUTE_STITCH_BYTES = 16 * 2 ** 20      # one float32 [B, K, 4, H, W] canvas


def _stitch(decoded: Tensor, position: Tensor, scale: Tensor, depth: Tensor, transparency: Tensor,
            image_size: int, noisy: bool) -> Foreground:
    rgba = paste(decoded, position, torch.sigmoid(scale), image_size)
    if rgba.dtype != torch.bfloat16:
        # float32 rounding can leave [0, 1] by an ulp. In bf16 the glimpses are in [0, 1] and
        # each axis's two rounded weights sum to at most 1 + 2^-9; bf16 rounds a product below
        # 1 + 2^-8 to at most 1, so the clamp, a fifth of the stitch's time with its backward,
        # would change nothing (tests/test_blocks.py checks the bound)
        rgba = rgba.clamp(0, 1)
    alpha, rgb = rgba[:, :, :1], rgba[:, :, 1:]
    if noisy:
        alpha = (alpha + 0.1 * torch.randn_like(alpha)).clamp(0, 1)
    # under bf16 autocast the pasted canvases are bf16 (nn.glimpse.paste): the per-particle
    # factors follow them, so that the canvases' arithmetic stays bf16 instead of promoting
    alpha = transparency[..., None, None, None].to(alpha.dtype) * alpha
    weight = alpha * torch.sigmoid(-depth[..., None, None]).to(alpha.dtype)
    weight = weight / (weight.sum(1, keepdim=True) + 1e-5)
    alpha_masks = weight * alpha
    fg = (alpha_masks * rgb).sum(1)
    return Foreground(fg, 1 - alpha_masks.sum(1), alpha_masks, decoded)


def alpha_centres(decoded: Tensor, scale: Tensor) -> Tensor:
    """Where each decoded object sits in its glimpse: the centroid of the glimpse's alpha relative
    to the glimpse centre, in image coordinates. decoded [N, K, 4, g, g] (alpha first), scale
    (pre-sigmoid) [N, K, 2] -> [N, K, 2] (row, col), the same units as positions.

    Glimpse pixel i sits at u_i = linspace(-1, 1, g)[i], i.e. at position + sigmoid(scale) * u_i
    in the image (nn.glimpse.crop), so the offset is sigmoid(scale) times the centroid of u."""
    alpha = decoded[:, :, 0].float()
    u = torch.linspace(-1, 1, alpha.shape[-1], device=alpha.device)
    mass = alpha.sum((-2, -1)).clamp_min(1e-6)
    centroid = torch.stack([alpha.sum(-1) @ u, alpha.sum(-2) @ u], -1) / mass[..., None]
    return torch.sigmoid(scale.float()) * centroid


class Background(nn.Module):
    """The background particle: features encoded from the image with the particles masked out,
    decoded to a full image. Its position is fixed at the centre."""

    def __init__(self, image_size: int, channels: list[int], features_dim: int,
                 glimpse: int, replicate_pad: bool = True):
        super().__init__()
        self.image_size, self.glimpse = image_size, glimpse
        self.cnn = ConvEncoder(3, channels, image_size, n_out=32, first_kernel=7,
                               replicate_pad=replicate_pad)
        f = self.cnn.out_side
        self.encoder_mlp = mlp(32 * f * f, 256, 256, 2 * features_dim)
        self.decoder_mlp = mlp(features_dim, 256, 256, 32 * 8 * 8, final_act=True)
        n_up = max(f.bit_length() - 1 - 3, 0)   # 8x8 -> f x f
        self.upsample = ConvStack(*[ConvBlock(s, replicate_pad) for s in upsampling_plan(n_up)])
        self.plan = background_decoder_plan(channels)
        self.decoder_cnn = ConvStack(*[ConvBlock(s, replicate_pad) for s in self.plan])

    def encoder_mask(self, position: Tensor, transparency: Tensor) -> Tensor:
        """1 where no (visible) particle square covers the pixel: [B, 1, H, W]."""
        masks = square_masks(position.detach(), self.image_size, self.glimpse)
        masks = masks.clamp(0, 1) * transparency.detach()[..., None, None, None]
        return 1 - masks.sum(1).clamp(0, 1)

    def encode(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        out = self.encoder_mlp(self.cnn(x * mask).flatten(1))
        mu, logvar = out.chunk(2, -1)
        return mu, logvar

    def decode(self, features: Tensor) -> Tensor:
        # one sequence, so that the last upsample folds into the decoder's first conv
        h = run_blocks([*self.upsample, *self.decoder_cnn], self.decoder_mlp(features).view(-1, 32, 8, 8))
        return torch.sigmoid(h)

