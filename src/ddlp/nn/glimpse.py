"""Spatial operations on particles: glimpse crop / paste, square masks, spatial soft-argmax and
the tracking correlation maps.

Coordinates are (y, x) in [-1, 1] with the align_corners=True convention (-1 and +1 are the
centres of the first and last pixel). Crops and pastes build one sampling grid per particle and
sample the *shared* image once (the K glimpses of an image are laid side by side in the grid),
so no per-particle copy of the image is made.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _axis(n: int, ref: Tensor) -> Tensor:
    return torch.linspace(-1.0, 1.0, n, device=ref.device, dtype=ref.dtype)


def crop(images: Tensor, position: Tensor, scale: Tensor, size: int) -> Tensor:
    """Glimpses of side `size` covering [position - scale, position + scale] per axis.

    images [B, C, H, W], position / scale [B, K, 2] -> [B, K, C, size, size]
    """
    B, K = position.shape[:2]
    C = images.shape[1]
    u = _axis(size, position)
    gy = scale[..., 0, None] * u + position[..., 0, None]           # [B, K, size] rows
    gx = scale[..., 1, None] * u + position[..., 1, None]           # [B, K, size] cols
    grid = torch.stack(torch.broadcast_tensors(gx[:, :, None, :], gy[:, :, :, None]), dim=-1)
    out = F.grid_sample(images, grid.reshape(B, K * size, size, 2), mode="bilinear",
                        padding_mode="zeros", align_corners=True)      # [B, C, K*size, size]
    return out.view(B, C, K, size, size).transpose(1, 2)


def paste(glimpses: Tensor, position: Tensor, scale: Tensor, canvas: int) -> Tensor:
    """Inverse of `crop`: place each glimpse on an empty canvas (zero outside its window).

    glimpses [B, K, C, g, g], position / scale [B, K, 2] -> [B, K, C, canvas, canvas]

    The map is grid_sample's (bilinear, zero padding, align_corners=True) on the grid that scales
    and shifts the canvas into glimpse coordinates. That grid is separable, rows from y and
    columns from x, so the sampling is two matrix products, rows_y @ glimpse @ rows_x^T, with
    each axis's bilinear taps as a [canvas, g] matrix: the same values up to float rounding,
    gradients included, and under bf16 autocast the products run in bf16, several times faster
    than grid_sample, which autocast keeps in float32 (docs/performance.md).
    """
    rows = _bilinear_taps(position[..., 0], scale[..., 0], canvas, glimpses.shape[-1])
    cols = _bilinear_taps(position[..., 1], scale[..., 1], canvas, glimpses.shape[-1])
    return rows[:, :, None] @ glimpses @ cols[:, :, None].transpose(-1, -2)


def _bilinear_taps(position: Tensor, scale: Tensor, canvas: int, g: int) -> Tensor:
    """Bilinear weights [B, K, canvas, g] of the g glimpse pixels at each canvas pixel along one
    axis, for positions / scales [B, K]: max(0, 1 - |i - q|), where i is the canvas pixel's
    coordinate in glimpse pixels (grid_sample's unnormalised index) and q the glimpse pixel;
    pixels beyond the glimpse get no tap, as grid_sample's zero padding."""
    denom = scale + 1e-9
    coord = (1.0 / denom)[..., None] * _axis(canvas, position) - (position / denom)[..., None]
    index = (coord + 1) / 2 * (g - 1)
    return torch.relu(1 - (index[..., None] - torch.arange(g, device=index.device, dtype=index.dtype)).abs())


def square_masks(position: Tensor, image_size: int, side: int) -> Tensor:
    """Binary squares of `side` pixels around each position, nearest-neighbour placed.

    Equivalent to sampling a centred block of ones with a translation grid and mode='nearest'
    (the official construction), computed per axis: [B, K, 2] -> [B, K, 1, H, H].
    """
    pad = (image_size - side) // 2
    span = side + 2 * pad - 1                               # last index of the padded block
    u = _axis(image_size, position)

    def inside(coord: Tensor) -> Tensor:                    # [B, K] -> [B, K, H]
        src = torch.round(((u - coord[..., None]) + 1) / 2 * span)
        return (src >= pad) & (src < pad + side)

    rows, cols = inside(position[..., 0]), inside(position[..., 1])
    return (rows[..., :, None] & cols[..., None, :]).unsqueeze(2).to(position.dtype)


def spatial_softmax(logits: Tensor) -> tuple[Tensor, Tensor]:
    """Soft-argmax with variance of heat maps [N, h, w].

    Returns the mean (y, x) [N, 2] and (var_y, var_x, cov) [N, 3]; variances are clamped at 1e-6.
    """
    N, h, w = logits.shape
    prob = logits.reshape(N, h * w).softmax(-1).view(N, h, w)
    ys, xs = _axis(h, logits), _axis(w, logits)
    py, px = prob.sum(2), prob.sum(1)                        # marginals [N, h], [N, w]
    mu_y, mu_x = (py * ys).sum(1), (px * xs).sum(1)
    var_y = ((py * ys ** 2).sum(1) - mu_y ** 2).clamp_min(1e-6)
    var_x = ((px * xs ** 2).sum(1) - mu_x ** 2).clamp_min(1e-6)
    cov = (prob * ys[:, None] * xs[None, :]).sum((1, 2)) - mu_y * mu_x
    return torch.stack([mu_y, mu_x], -1), torch.stack([var_y, var_x, cov], -1)


@torch.no_grad()
def correlation_maps(search: Tensor, template: Tensor) -> Tensor:
    """Normalised cross-correlation of each particle's previous glimpse (template) over its
    current glimpse (search window), both [N, 3, P, P] -> [N, 1, P, P] in [0, 1], in float32
    (or float64) whatever the autocast.

    Entry (dy + P/2 - 1, dx + P/2 - 1) scores a displacement (dy, dx) of the object. As in the
    official code the normaliser uses the energy of *all* templates together, and each map is
    min-max scaled.

    The official code runs a grouped conv with each template as its own filter; oneDNN is slow
    at that (5-7 ms for 48 particles of 16 pixels), and in bf16 the min-max scaling magnifies
    its rounding to errors of 0.1. Here each template row i is matched against every row of the
    window at once, as one matrix product over (channel, column), and the P row terms of a
    displacement dy, those with window row dy + i, are summed through a strided view; the
    energies are box sums, one axis at a time. 1.0 ms, float32 under autocast too, and closer to
    float64 than the float32 conv (6e-6 against 4e-5 on random glimpses; the min-max scaling
    magnifies the products' rounding).
    """
    N, C, P, _ = search.shape
    with torch.autocast(search.device.type, enabled=False):
        dtype = torch.promote_types(search.dtype, torch.float32)       # bf16 -> float32
        search, template = search.to(dtype), template.to(dtype).clamp(0, 1)
        # Only displacements within half a glimpse are kept, so only the 2P-1 rows/cols of the
        # replicate-padded window they read are needed.
        lo, R = P // 2 + 1, 2 * P - 1
        window = F.pad(search, (P, P, P, P), mode="replicate")[..., lo:lo + R, lo:lo + R]
        shifted = window.unfold(3, P, 1).permute(0, 1, 4, 2, 3).reshape(N, C * P, R * P)   # [(c, j), (r, dx)]
        rows = template.permute(0, 2, 1, 3).reshape(N, P, C * P)                           # [i, (c, j)]
        terms = torch.bmm(rows, shifted).view(N, P, R, P)                                   # [n, i, r, dx]
        n, i, r, dx = terms.stride()
        corr = terms.as_strided((N, P, P, P), (n, i + r, r, dx)).sum(1)                     # r = dy + i
        squares = window.pow(2).sum(1)                                                      # [N, R, R]
        energy = F.avg_pool2d(F.avg_pool2d(squares, (1, P), stride=1), (P, 1), stride=1) * (P * P)   # box sums, separably
        corr = corr / (torch.sqrt(template.pow(2).sum() * energy + 1e-10) + 1e-5)
        flat = corr.reshape(N, P * P)
        low, high = flat.min(1, keepdim=True)[0], flat.max(1, keepdim=True)[0]
        return ((flat - low) / (high - low + 1e-5)).view(N, 1, P, P)
