"""PSNR and SSIM with the conventions of piqa 1.3.x, the library behind the paper's numbers.

Both take a batch of images [N, C, H, W] with values in [0, value_range] and return one value per
image ([N], piqa's `reduction='none'`):

* PSNR: ``10 log10(L^2 / (MSE + 1e-8))``, MSE over all C*H*W elements, so identical images give
  exactly 80 dB rather than infinity.
* SSIM: 11-tap Gaussian window (sigma 1.5) applied separably and per channel (not on grey),
  *without padding* (a 64 px image gives a 54 px map), C1 = (0.01 L)^2, C2 = (0.03 L)^2,
  averaged over channels and map positions.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

PSNR_EPS = 1e-8
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5


def _check_pair(x: Tensor, y: Tensor) -> None:
    if x.shape != y.shape:
        raise ValueError(f"images to compare must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.ndim < 2:
        raise ValueError(f"expected a batch of images [N, ...], got shape {tuple(x.shape)}")


def psnr(x: Tensor, y: Tensor, value_range: float = 1.0, eps: float = PSNR_EPS) -> Tensor:
    """Peak signal-to-noise ratio in dB per image of x, y [N, ...]: returns [N]."""
    _check_pair(x, y)
    mse = (x - y).square().reshape(x.shape[0], -1).mean(-1)
    return 10 * torch.log10(value_range ** 2 / (mse + eps))


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA, dtype=torch.float32,
                    device=None) -> Tensor:
    """Normalised 1-D Gaussian [size] centred on the middle tap."""
    i = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-i.square() / (2 * sigma ** 2))
    return g / g.sum()


def _blur(x: Tensor, g: Tensor) -> Tensor:
    """Valid (unpadded) separable depthwise filtering of [N, C, H, W]: rows first, then columns."""
    C, k = x.shape[1], g.numel()
    x = F.conv2d(x, g.view(1, 1, k, 1).expand(C, 1, k, 1), groups=C)
    return F.conv2d(x, g.view(1, 1, 1, k).expand(C, 1, 1, k), groups=C)


def ssim_map(x: Tensor, y: Tensor, value_range: float = 1.0, window: int = SSIM_WINDOW,
             sigma: float = SSIM_SIGMA, k1: float = 0.01, k2: float = 0.03) -> Tensor:
    """Per-channel SSIM map [N, C, H - window + 1, W - window + 1] of images x, y [N, C, H, W]."""
    _check_pair(x, y)
    if x.ndim != 4 or min(x.shape[-2:]) < window:
        raise ValueError(f"SSIM needs images [N, C, H, W] of at least {window}x{window} pixels, "
                         f"got shape {tuple(x.shape)}")
    g = gaussian_window(window, sigma, x.dtype, x.device)
    c1, c2 = (k1 * value_range) ** 2, (k2 * value_range) ** 2
    mu_x, mu_y = _blur(x, g), _blur(y, g)
    mu_xx, mu_yy, mu_xy = mu_x.square(), mu_y.square(), mu_x * mu_y
    var_x = _blur(x.square(), g) - mu_xx
    var_y = _blur(y.square(), g) - mu_yy
    cov = _blur(x * y, g) - mu_xy
    contrast_structure = (2 * cov + c2) / (var_x + var_y + c2)
    return (2 * mu_xy + c1) / (mu_xx + mu_yy + c1) * contrast_structure


def ssim(x: Tensor, y: Tensor, value_range: float = 1.0) -> Tensor:
    """Structural similarity per image of x, y [N, C, H, W] (mean over channels and positions): [N]."""
    return ssim_map(x, y, value_range).flatten(1).mean(-1)
