"""Convolutional building blocks shared by the prior, the glimpse encoders and the decoders.

Each stack is built from a *plan*: a list of `LayerSpec`s that also carries the official
module name of every layer, so that the checkpoint converter and the model agree by
construction. The plans reproduce one quirk of the official code on purpose: its keypoint CNN
registers layers by name, and a repeated channel width re-uses a name, which replaces the
earlier layer in place and drops the later one. Published checkpoints (shapes, obj3d128_img,
traffic_img background encoders) have that shorter layer sequence, so we build it too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .norm import GroupNorm


def group_norm(channels: int) -> nn.GroupNorm:
    return GroupNorm(4 if channels % 4 == 0 else 5, channels, eps=1e-4)


@dataclass(frozen=True)
class LayerSpec:
    name: str            # official module name (for the converter)
    c_in: int
    c_out: int
    kernel: int = 3
    stride: int = 1
    norm: bool = True
    act: bool = True
    upsample: bool = False
    bias: bool = False


class _ReplicatePad(torch.autograd.Function):
    """Replicate padding of a [N, C, H, W] activation, optionally after a ReLU.

    Autocast would run `F.pad(mode="replicate")` in float32 (it is on the CPU's float32 list):
    two full-tensor casts per layer and a float32 copy kept for backward. Here the padding keeps
    its input's dtype, saves nothing (its gradient needs only the input's shape) and, with
    `relu`, keeps only the padded output for the ReLU's gradient: the conv that follows keeps
    that tensor anyway. Forward values and gradients are those of ReLU + nn.ReplicationPad2d
    (the same aten kernels).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, pad: int, relu: bool) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            y = F.pad(x, (pad,) * 4, mode="replicate")
        if relu:        # in place on the padded copy: the ReLU commutes with replicating borders
            y.relu_()
        ctx.pad, ctx.relu, ctx.shape = pad, relu, x.shape
        channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        ctx.format = torch.channels_last if channels_last else torch.contiguous_format
        if relu:
            ctx.save_for_backward(y)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        p = ctx.pad
        shape_only = torch.empty(ctx.shape, dtype=grad.dtype, device=grad.device, memory_format=ctx.format)
        grad_in = torch.ops.aten.replication_pad2d_backward(grad, shape_only, [p] * 4)
        if ctx.relu:
            (y,) = ctx.saved_tensors
            # into grad_in itself: one activation-sized buffer less per layer
            torch.ops.aten.threshold_backward.grad_input(grad_in, y[..., p:-p, p:-p], 0, grad_input=grad_in)
        return grad_in, None, None


def _bilinear_taps() -> torch.Tensor:
    """[2, 3, 3]: for output phase a of a x2 bilinear upsample (align_corners=False), the weights
    that tap d of a 3x3 kernel centred on upsampled pixel 2i + a gives to input pixels i-1, i, i+1.
    Upsampled pixel 2m is 0.75 x[m] + 0.25 x[m-1] and 2m + 1 is 0.75 x[m] + 0.25 x[m+1]; with the
    input replicate-padded by one this holds at the borders too, and tap -1 / 2n of the upsampled
    image is then its replicate padding."""
    taps = torch.zeros(2, 3, 3)
    for a in range(2):
        for d in range(3):
            m, odd = divmod(a - 1 + d, 2)
            taps[a, d, 1 + m] += 0.75
            taps[a, d, 1 + m + (1 if odd else -1)] += 0.25
    return taps


_TAPS = _bilinear_taps()


def fold_upsample(weight: torch.Tensor) -> torch.Tensor:
    """A 3x3 conv weight [C_out, C_in, 3, 3] applied to a x2 bilinear upsample -> the weight
    [4 C_out, C_in, 3, 3] of the same map on the input itself: output channel
    (2 row phase + column phase) C_out + channel, the order `interleave_phases` reads."""
    taps = _TAPS.to(weight.device, weight.dtype)
    folded = torch.einsum("adi,bej,ocde->abocij", taps, taps, weight)
    return folded.reshape(-1, *weight.shape[1:]).contiguous(memory_format=torch.channels_last)


def interleave_phases(y: torch.Tensor) -> torch.Tensor:
    """[N, 4 C, H, W] with channels in `fold_upsample`'s phase-major order -> [N, C, 2H, 2W],
    channels-last. `F.pixel_shuffle` wants the phases innermost (channel-major), and on a
    channels-last tensor its copy then moves one element at a time: phase-major, the copy below
    moves runs of C contiguous channels (4x faster in bf16 on [88, 128, 32, 32], forward and
    backward, and faster in float32 too)."""
    N, C4, H, W = y.shape
    C = C4 // 4
    pixels = y.permute(0, 2, 3, 1).reshape(N, H, W, 2, 2, C).permute(0, 1, 3, 2, 4, 5)
    return pixels.reshape(N, 2 * H, 2 * W, C).permute(0, 3, 1, 2)


class ConvBlock(nn.Module):
    """[replicate pad] -> conv -> [GroupNorm] -> [ReLU] -> [bilinear x2 upsample].

    `forward(x, relu_first=True)` applies the previous block's ReLU before the padding, and
    `defer_relu=True` leaves this block's ReLU to the next block (see run_blocks).
    `upsampled=True` takes x at half the block's resolution for its x2 bilinear upsample, which is
    never built: the upsample is folded into the conv (`fold_upsample`, then `interleave_phases`),
    the same map with the same FLOPs, without the two largest activations (the upsample and its
    padding) of a decoder. `skip_upsample=True` leaves this block's upsample to the next block."""

    def __init__(self, spec: LayerSpec, replicate_pad: bool = True):
        super().__init__()
        pad = spec.kernel // 2
        self.pad = pad if replicate_pad else 0
        self.conv = nn.Conv2d(spec.c_in, spec.c_out, spec.kernel, spec.stride,
                              padding=0 if replicate_pad else pad, bias=spec.bias)
        self.norm = group_norm(spec.c_out) if spec.norm else None
        self.act, self.upsample = spec.act, spec.upsample
        # only the replicate-padded 3x3 stride-1 conv has the folded form above
        self.folds_upsample = self.pad == 1 and spec.kernel == 3 and spec.stride == 1

    def forward(self, x: torch.Tensor, relu_first: bool = False, defer_relu: bool = False,
                upsampled: bool = False, skip_upsample: bool = False) -> torch.Tensor:
        if self.pad:
            x = _ReplicatePad.apply(x, self.pad, relu_first)
        elif relu_first:
            x = torch.relu(x)
        if upsampled:
            bias = None if self.conv.bias is None else self.conv.bias.repeat(4)
            x = interleave_phases(F.conv2d(x, fold_upsample(self.conv.weight), bias))
        else:
            x = self.conv(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.act and not defer_relu:
            x = torch.relu(x)
        if self.upsample and not skip_upsample:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        return x


def run_blocks(blocks: list[ConvBlock], x: torch.Tensor) -> torch.Tensor:
    """ConvBlocks in sequence. Where a block's ReLU feeds the next block's padding directly, the
    two run as one op that keeps a single activation for backward instead of two; where its
    upsample feeds a block that can fold it, that block does (ConvBlock)."""
    pending = folded = False
    for block, nxt in zip(blocks, blocks[1:] + [None]):
        fold = block.upsample and nxt is not None and nxt.folds_upsample
        defer = block.act and nxt is not None and nxt.pad > 0 and (fold or not block.upsample)
        x = block(x, relu_first=pending, defer_relu=defer, upsampled=folded, skip_upsample=fold)
        pending, folded = defer, fold
    return x


class ConvStack(nn.Sequential):
    """ConvBlocks in sequence (`run_blocks`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_blocks(list(self), x)


def encoder_plan(c_in: int, channels: list[int], side: int, first_kernel: int = 3) -> list[LayerSpec]:
    """Layer plan of the keypoint CNN: two stride-1 convs, then per extra width a stride-2 and a
    stride-1 conv, with the official name-collision behaviour (see module docstring)."""
    plan: dict[str, LayerSpec] = {}
    plan["in_block_1"] = LayerSpec("in_block_1", c_in, channels[0], kernel=first_kernel)
    plan["in_block_2"] = LayerSpec("in_block_2", channels[0], channels[0])
    prev, size = channels[0], side
    for c in channels[1:]:
        down, same = f"conv_in_{size}_0", f"conv_in_{c}_1"
        plan[down] = LayerSpec(down, prev, c, stride=2)
        plan[same] = LayerSpec(same, c, c)    # a repeated name keeps its first position
        prev, size = c, size // 2
    return list(plan.values())


class ConvEncoder(nn.Module):
    """The official 'keypoint CNN': conv stack then a 1x1 conv to `n_out` maps.

    Only the 1x1 output is used by the model. Output side = side / 2^(len(channels) - 1).
    """

    def __init__(self, c_in: int, channels: list[int], side: int, n_out: int,
                 first_kernel: int = 3, replicate_pad: bool = True):
        super().__init__()
        self.plan = encoder_plan(c_in, channels, side, first_kernel)
        self.layers = ConvStack(*[ConvBlock(s, replicate_pad) for s in self.plan])
        self.keymap = nn.Conv2d(channels[-1], n_out, 1)
        self.out_side = side // 2 ** (len(channels) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.keymap(self.layers(x))


def glimpse_decoder_plan(glimpse: int, c_out: int = 4) -> list[LayerSpec]:
    """Object decoder: 8x8x32 map -> glimpse x glimpse x 4 (alpha, r, g, b)."""
    n_up = int(math.log2(glimpse)) - 3
    if 8 * 2 ** n_up != glimpse or n_up < 1:
        raise ValueError(f"glimpse side must be 8 * 2^n with n >= 1, got {glimpse}")
    plan = [LayerSpec("depth_up", 32, 64, upsample=True)]
    size = 8
    for _ in range(n_up - 1):
        plan.append(LayerSpec(f"conv_to_{2 * size}", 64, 64, upsample=True))
        size *= 2
    plan.append(LayerSpec(f"conv_to_{2 * size}", 64, 32))
    plan.append(LayerSpec("final_conv", 32, c_out, kernel=1, norm=False, act=False, bias=True))
    return plan


def background_decoder_plan(channels: list[int], c_out: int = 3) -> list[LayerSpec]:
    """Background decoder: f x f x 32 map -> image (mirror of the encoder widths)."""
    plan = [LayerSpec("depth_up", 32, channels[-1], norm=False, upsample=True)]
    prev, size = channels[-1], 4
    for c in reversed(channels[1:-1]):
        plan.append(LayerSpec(f"conv_to_{2 * size}", prev, c, upsample=True))
        prev, size = c, size * 2
    plan.append(LayerSpec(f"conv_to_{2 * size}", prev, channels[0]))
    plan.append(LayerSpec("final_conv", channels[0], c_out, kernel=1, norm=False, act=False, bias=True))
    return plan


def upsampling_plan(n: int, channels: int = 32) -> list[LayerSpec]:
    """n conv + x2 upsample blocks (background feature map from 8x8 to 8*2^n)."""
    return [LayerSpec(f"depth_up_{i}", channels, channels, upsample=True) for i in range(n)]


def mlp(*widths: int, final_act: bool = False) -> nn.Sequential:
    """Linear layers with ReLU between them (and after the last one if `final_act`)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if final_act or i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def init_normal(modules, std: float, layers: tuple[type, ...], norms: tuple[type, ...] = (),
                tables: tuple[type, ...] = ()) -> None:
    """The official initialisations, in module order (so the random draws come in the same order):
    weights of `layers` from N(0, std^2) with zero biases, `norms` at unit scale and zero shift,
    every own parameter of `tables` from N(0, std^2)."""
    for m in modules:
        if isinstance(m, layers):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, norms):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, tables):
            for t in m.parameters(recurse=False):
                nn.init.normal_(t, std=std)


def init_conv_weights(module: nn.Module) -> None:
    """Official initialisation of every 2-D conv of the particle model: N(0, 0.01^2), bias 0."""
    init_normal(module.modules(), 0.01, (nn.Conv2d,), (nn.GroupNorm,))
