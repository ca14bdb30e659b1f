"""GroupNorm with a bf16 channels-last path for the CPU.

torch's CPU kernels for a bf16 channels-last GroupNorm are slow when a group holds few channels:
on a [88, 32, 64, 64] activation with 4 groups the backward takes 10x as long as on the same
tensor channels-first, and on the glimpse decoder's [528, 16, 16, 16] the forward does too
(docs/performance.md). Converting layouts around the norm costs more than it saves. `GroupNorm`
computes those cases from per-channel sums instead: a few full-tensor passes of plain bf16
arithmetic, which torch vectorises over the contiguous channels, and the rest on [N, C] in float32.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


class GroupNorm(nn.GroupNorm):
    """`nn.GroupNorm` (same parameters, same state dict) that takes `_ChannelsLastGroupNorm` for
    bf16 channels-last CPU inputs of at least `SMALL` elements whose groups hold at most
    `FEW_CHANNELS` channels, except for an inference forward on maps of `LARGE_MAP` pixels or
    more, where torch's kernel is fast."""

    FEW_CHANNELS = 8        # measured: from 16 channels per group on, torch's kernels are as fast
    LARGE_MAP = 1024        # torch's channels-last forward switches to a fast loop from 1024 pixels
    SMALL = 1 << 17         # elements below which torch's kernels win: ours costs ~0.2 ms in small ops

    def forward(self, x: Tensor) -> Tensor:
        if (x.device.type == "cpu" and x.dtype == torch.bfloat16 and x.ndim == 4 and self.affine
                and self.num_channels // self.num_groups <= self.FEW_CHANNELS and x.numel() >= self.SMALL
                and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()):
            training = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
            if training or x.shape[2] * x.shape[3] < self.LARGE_MAP:
                return _ChannelsLastGroupNorm.apply(x, self.weight, self.bias, self.num_groups, self.eps)
        return super().forward(x)


def _rows(t: Tensor, pack: int) -> Tensor:
    """A channels-last [N, C, H, W] as the view [N, H*W / pack, pack * C]: `pack` neighbouring
    pixels per row, so that rows are at least 32 wide (torch's bf16 loops over 16 are 4x slower)."""
    N, C, H, W = t.shape
    return t.permute(0, 2, 3, 1).reshape(N, H * W // pack, pack * C)


def _pixels_per_row(C: int, pixels: int) -> int:
    """The `pack` of `_rows`: the fewest pixels (a power of 2 dividing `pixels`) for 32 channels."""
    pack = 1
    while pack * C < 32 and pixels % (2 * pack) == 0:
        pack *= 2
    return pack


def _channel_sums(rows: Tensor, C: int, dtype: torch.dtype) -> Tensor:
    """Per-channel sums [N, C] of rows [N, R, pack * C] (torch sums bf16 in float32)."""
    return rows.sum(1).to(dtype).view(rows.shape[0], -1, C).sum(1)


def _per_channel(t: Tensor, pack: int, like: Tensor) -> Tensor:
    """[N, C] coefficients -> [N, 1, pack * C] in `like`'s dtype, to broadcast over rows."""
    return t.repeat(1, pack)[:, None].to(like.dtype)


class _ChannelsLastGroupNorm(torch.autograd.Function):
    """GroupNorm of x [N, C, H, W] (bf16, channels-last) with affine weight and bias [C].

    Each channel is first centred on its own bf16-rounded mean `shift` (d = x - shift), so the
    variance comes from sums of d and d^2, without the cancellation of E[x^2] - E[x]^2. The
    statistics combine per-channel sums in float32; the full-tensor passes round to bf16 as
    autocast's layers do. Backward keeps d (as torch keeps x) and uses
    dx = rstd * (w dy - mean_g(w dy) - xhat * mean_g(w dy xhat)), one affine map of dy and d per
    channel.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float) -> Tensor:
        N, C, H, W = x.shape
        pixels, per_group = H * W, C // groups
        pack = _pixels_per_row(C, pixels)
        stat = torch.promote_types(x.dtype, torch.float32)       # statistics: float32 for bf16 input
        rows = _rows(x, pack)
        shift = _channel_sums(rows, C, stat) / pixels            # [N, C]
        d = rows - _per_channel(shift, pack, x)
        shift = shift.to(x.dtype).to(stat)                       # the bf16-rounded shift d was taken from
        out = torch.mul(d, d)                                    # d^2, then the output: one buffer
        s1, s2 = _channel_sums(d, C, stat), _channel_sums(out, C, stat)
        mean = (shift + s1 / pixels).view(N, groups, per_group).mean(-1)                    # [N, G]
        offset = shift.view(N, groups, per_group) - mean[..., None]                         # shift - group mean
        # sum over the group of (x - mean)^2, from d = x - shift: sum d^2 + 2 offset sum d + pixels offset^2
        squares = s2.view(N, groups, per_group) + offset * (2 * s1.view(N, groups, per_group) + pixels * offset)
        rstd = torch.rsqrt(squares.sum(-1) / (pixels * per_group) + eps)
        offset = offset.reshape(N, C)
        scale = rstd.repeat_interleave(per_group, 1) * weight                               # [N, C]
        y = torch.addcmul(_per_channel(bias + offset * scale, pack, x), d, _per_channel(scale, pack, x), out=out)
        ctx.save_for_backward(d, offset, rstd, weight)
        ctx.shape, ctx.groups, ctx.pack = x.shape, groups, pack
        return y.view(N, H, W, C).permute(0, 3, 1, 2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        d, offset, rstd, weight = ctx.saved_tensors
        (N, C, H, W), groups, pack = ctx.shape, ctx.groups, ctx.pack
        per_group = C // groups
        g = _rows(grad.contiguous(memory_format=torch.channels_last), pack)
        sum_g = _channel_sums(g, C, rstd.dtype)                                  # [N, C]
        rstd_c = rstd.repeat_interleave(per_group, 1)
        dx = torch.mul(g, d)                    # g d, then the input's gradient: one buffer
        sum_g_xhat = rstd_c * (_channel_sums(dx, C, rstd.dtype) + offset * sum_g)   # x - mean = d + offset
        group_mean = lambda t: (weight * t).view(N, groups, per_group).sum(-1) / (H * W * per_group)  # noqa: E731
        m1, m2 = group_mean(sum_g), group_mean(sum_g_xhat)                       # [N, G]
        on_d = -(rstd * rstd * m2).repeat_interleave(per_group, 1)               # coefficient of d
        const = -(rstd * m1).repeat_interleave(per_group, 1) + on_d * offset
        torch.addcmul(_per_channel(const, pack, d), d, _per_channel(on_d, pack, d), out=dx)
        dx.addcmul_(g, _per_channel(rstd_c * weight, pack, d))
        return dx.view(N, H, W, C).permute(0, 3, 1, 2), sum_g_xhat.sum(0), sum_g.sum(0), None, None
