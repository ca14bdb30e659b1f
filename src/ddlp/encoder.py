"""Posterior encoders: the attribute encoder (anchor refinement, offset, scale, depth,
transparency; tracking-aware through the correlation channel), the appearance encoder, and the
per-frame encoding procedure that combines them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from .nn.blocks import ConvEncoder, mlp
from .nn.glimpse import correlation_maps, crop
from .nn.precision import full_precision
from .particles import Particles


def reparameterize(mu: Tensor, logvar: Tensor, deterministic: bool) -> Tensor:
    """A sample of N(mu, e^logvar), or mu. In float32 whatever the autocast dtype: a bf16 position
    would be quantised to ~1/128 of the image half-side."""
    mu, logvar = full_precision(mu), full_precision(logvar)
    if deterministic:
        return mu
    return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)


class GlimpseEncoder(nn.Module):
    """Glimpse CNN -> 32 maps -> Linear(fc_in, 256) -> two ReLU layers of 256."""

    def __init__(self, c_in: int, channels: list[int], glimpse: int, hidden: int = 256):
        super().__init__()
        self.cnn = ConvEncoder(c_in, channels, glimpse, n_out=32)
        self.projection = nn.Linear(32 * self.cnn.out_side ** 2, hidden)
        self.backbone = mlp(hidden, hidden, hidden, final_act=True)

    def embed(self, glimpses: Tensor) -> Tensor:
        """[N, C, g, g] -> [N, hidden]"""
        return self.backbone(self.projection(self.cnn(glimpses).flatten(1)))


@dataclass
class Attributes:
    offset_mu: Tensor        # [B, K, 2], tanh-bounded
    offset_logvar: Tensor    # [B, K, 2]
    scale_mu: Tensor         # [B, K, 2] pre-sigmoid
    scale_logvar: Tensor
    log_a: Tensor            # [B, K]
    log_b: Tensor
    depth_mu: Tensor         # [B, K, 1]
    depth_logvar: Tensor


class AttributeEncoder(GlimpseEncoder):
    """Reads a glimpse around each anchor and predicts the particle's attributes. With
    `correlation` the glimpse gets a 4th channel: the correlation map of the previous frame's
    glimpse over this one (all zeros when there is no previous frame)."""

    def __init__(self, channels: list[int], glimpse: int, image_size: int, correlation: bool,
                 activation: str = "tanh", max_offset: float = 1.0, hidden: int = 256):
        super().__init__(4 if correlation else 3, channels, glimpse, hidden)
        self.glimpse, self.image_size, self.correlation = glimpse, image_size, correlation
        self.activation, self.max_offset = activation, max_offset
        self.offset_y_head = nn.Linear(hidden, 2)   # (mu, logvar) of the row offset
        self.offset_x_head = nn.Linear(hidden, 2)   # (mu, logvar) of the column offset
        self.scale_head = nn.Linear(hidden, 4)      # mu (y, x), logvar (y, x)
        self.transparency_head = nn.Linear(hidden, 2)  # log a, log b
        self.depth_head = nn.Linear(hidden, 2)      # mu, logvar

    def glimpses(self, x: Tensor, anchors: Tensor, scale: Optional[Tensor],
                 prev_glimpses: Optional[Tensor]) -> Tensor:
        """CNN input [B*K, C, g, g]."""
        B, K, _ = anchors.shape
        s = torch.full_like(anchors, self.glimpse / self.image_size) if scale is None else torch.sigmoid(scale)
        if not self.correlation:
            return crop(x, anchors, s, self.glimpse).flatten(0, 1)
        with torch.no_grad():
            search = crop(x.clamp(0, 1), anchors, s, self.glimpse).flatten(0, 1)
            if prev_glimpses is None:
                heat = torch.zeros_like(search[:, :1])
            else:
                heat = correlation_maps(search, prev_glimpses.flatten(0, 1))
            return torch.cat([search, heat], 1)

    def forward(self, x: Tensor, anchors: Tensor, scale: Optional[Tensor] = None,
                prev_glimpses: Optional[Tensor] = None) -> Attributes:
        B, K, _ = anchors.shape
        h = self.embed(self.glimpses(x, anchors, scale, prev_glimpses)).view(B, K, -1)
        oy, ox = self.offset_y_head(h), self.offset_x_head(h)
        offset = torch.stack([oy[..., 0], ox[..., 0]], -1)
        squash = torch.tanh if self.activation == "tanh" else torch.sigmoid
        sc, on, dp = self.scale_head(h), self.transparency_head(h), self.depth_head(h)
        return Attributes(
            offset_mu=self.max_offset * squash(offset),
            offset_logvar=torch.stack([oy[..., 1], ox[..., 1]], -1),
            scale_mu=sc[..., :2], scale_logvar=sc[..., 2:],
            log_a=on[..., 0], log_b=on[..., 1],
            depth_mu=dp[..., :1], depth_logvar=dp[..., 1:])


class AppearanceEncoder(GlimpseEncoder):
    """Visual features of each particle from a glimpse at its (sampled) position and scale."""

    def __init__(self, channels: list[int], glimpse: int, features_dim: int, hidden: int = 256):
        super().__init__(3, channels, glimpse, hidden)
        self.glimpse = glimpse
        self.features_head = nn.Linear(hidden, 2 * features_dim)

    def crop(self, x: Tensor, position: Tensor, scale: Tensor) -> Tensor:
        """Glimpses [B, K, 3, g, g] at the particles (scale pre-sigmoid)."""
        return crop(x, position, torch.sigmoid(scale), self.glimpse)

    def forward(self, glimpses: Tensor) -> tuple[Tensor, Tensor]:
        """Glimpses [..., K, 3, g, g] -> features mu, logvar [..., K, F]."""
        out = self.features_head(self.embed(glimpses.flatten(0, -4)))
        mu, logvar = out.view(*glimpses.shape[:-3], -1).chunk(2, -1)
        return mu, logvar


@dataclass
class FrameEncoding:
    particles: Particles     # per-frame posterior [B, K, ...] (no background; no features if not described)
    glimpses: Tensor         # appearance glimpses [B, K, 3, g, g]: tracking template, warm-up target


def encode_frame(attr_enc: AttributeEncoder, app_enc: AppearanceEncoder, x: Tensor,
                 anchors_init: Tensor, n_particles: int, anchor_s: float, *,
                 deterministic: bool, warmup: bool, noisy: bool,
                 prev_glimpses: Optional[Tensor] = None, prev_scale: Optional[Tensor] = None,
                 refine: bool = True, describe: bool = True) -> FrameEncoding:
    """Posterior particles of one frame.

    refine=True (single images, first video frame): a first attribute pass moves the proposals to
    refined anchors z_a, and a second pass at z_a (with the first pass's scale) gives the
    attributes. refine=False (tracking, t > 0): the anchors are the previous positions and the
    previous glimpses/scale condition a single pass. In warm-up/noisy epochs the tracking inputs
    are dropped. describe=False stops after cropping the appearance glimpses: the caller runs the
    appearance CNN later (`add_features`), e.g. once for all frames of a clip.
    """
    anchor = anchors_init[:, :n_particles]
    if warmup or noisy:
        prev_glimpses, prev_scale = None, None
    attrs = attr_enc(x, anchor.detach(), prev_scale, prev_glimpses)
    if refine:
        anchor = anchor + attrs.offset_mu
        if prev_scale is None and not (warmup or noisy):
            prev_scale = attrs.scale_mu.detach()
        attrs = attr_enc(x, anchor.detach(), prev_scale, prev_glimpses)

    position_mu = anchor + attrs.offset_mu
    a = torch.exp(full_precision(attrs.log_a)).clamp_min(1e-5)    # float32: the Beta sampler has no bf16 kernel
    b = torch.exp(full_precision(attrs.log_b)).clamp_min(1e-5)
    position = reparameterize(position_mu, attrs.offset_logvar, deterministic)
    if not deterministic:   # the official code draws an unused offset sample here (RNG order)
        reparameterize(attrs.offset_mu, attrs.offset_logvar, deterministic)
    scale = reparameterize(attrs.scale_mu, attrs.scale_logvar, deterministic)
    depth = reparameterize(attrs.depth_mu, attrs.depth_logvar, deterministic)
    transparency = a / (a + b) if deterministic else torch.distributions.Beta(a, b, validate_args=False).rsample()
    if noisy:   # random glimpse size; `0 *` keeps the graph without a gradient
        logit = math.log(anchor_s / (1 - anchor_s + 1e-5))
        scale = 0 * scale + logit + 0.1 * torch.randn_like(scale)
    if warmup:   # the anchor keeps its graph: the Chamfer-KL still trains the prior in warm-up
        position, scale = position.detach(), scale.detach()

    glimpses = app_enc.crop(x, position, scale.detach())
    particles = Particles(
        position=position, scale=scale, depth=depth, transparency=transparency, features=None,
        position_mu=position_mu, position_logvar=attrs.offset_logvar, anchor=anchor,
        offset_mu=attrs.offset_mu, scale_mu=attrs.scale_mu, scale_logvar=attrs.scale_logvar,
        depth_mu=attrs.depth_mu, depth_logvar=attrs.depth_logvar, transparency_a=a,
        transparency_b=b)
    if describe:
        particles = add_features(app_enc, particles, glimpses, deterministic)
    return FrameEncoding(particles, glimpses)


def add_features(app_enc: AppearanceEncoder, particles: Particles, glimpses: Tensor,
                 deterministic: bool) -> Particles:
    """Particles with their appearance features, from their glimpses (any leading dims)."""
    mu, logvar = app_enc(glimpses)
    return particles.replace(features=reparameterize(mu, logvar, deterministic),
                             features_mu=mu, features_logvar=logvar)
