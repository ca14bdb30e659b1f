"""Frechet Video Distance (optional): I3D features of real and predicted clips, then the Frechet
distance between the two Gaussian fits, as in LPWM's `eval_fvd.py` (StyleGAN-V variant).

The I3D network is not shipped: pass the TorchScript file `i3d_torchscript.pt` from StyleGAN-V. It
is called with rescale=False, resize=False, return_features=True and gives a 400-d vector per
clip; clips are resized (bilinear) so that the shorter side is 224, centre-cropped to 224 x 224 and
mapped to [-1, 1].
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

I3D_FILE = "i3d_torchscript.pt"
I3D_SIDE = 224
MIN_FRAMES = 10


def frechet_distance_from_stats(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(cov1 + cov2 - 2 (cov1 cov2)^(1/2)).

    Tr((cov1 cov2)^(1/2)) is the sum of square roots of the eigenvalues of the symmetric matrix
    cov1^(1/2) cov2 cov1^(1/2), which shares them with cov1 cov2 and avoids a general sqrtm."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.atleast_2d(np.asarray(cov1, np.float64)), np.atleast_2d(np.asarray(cov2, np.float64))
    w, v = np.linalg.eigh((cov1 + cov1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = root1 @ cov2 @ root1
    cross = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    return float(np.square(mu1 - mu2).sum() + np.trace(cov1) + np.trace(cov2) - 2 * cross)


def frechet_distance(real: np.ndarray | Tensor, fake: np.ndarray | Tensor) -> float:
    """Frechet distance between feature sets [N, D] and [M, D] (covariance divisor N - 1). With a
    single sample in either set only the mean term is defined, and only it is returned."""
    a = np.asarray(real.detach().cpu() if torch.is_tensor(real) else real, np.float64)
    b = np.asarray(fake.detach().cpu() if torch.is_tensor(fake) else fake, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be [N, D] with the same D, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        return float(np.square(a.mean(0) - b.mean(0)).sum())
    return frechet_distance_from_stats(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def load_i3d(path: str | os.PathLike, device: str | torch.device = "cpu") -> torch.jit.ScriptModule:
    """The StyleGAN-V TorchScript I3D detector."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"I3D weights not found at {path} (FVD needs StyleGAN-V's {I3D_FILE})")
    try:
        with warnings.catch_warnings():         # TorchScript is deprecated, but it is the format the file is in
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(str(path), map_location=device).eval()
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{path} is not a TorchScript I3D model ({type(e).__name__}: {e})") from None


def i3d_preprocess(videos: Tensor) -> Tensor:
    """Clips [N, T, 3, H, W] in [0, 1] -> I3D input [N, 3, T, 224, 224] in [-1, 1]."""
    if videos.ndim != 5 or videos.shape[1] < MIN_FRAMES:
        raise ValueError(f"FVD needs clips [N, T >= {MIN_FRAMES}, 3, H, W], got {tuple(videos.shape)}")
    N, T, C, H, W = videos.shape
    scale = I3D_SIDE / min(H, W)
    h, w = max(I3D_SIDE, round(H * scale)), max(I3D_SIDE, round(W * scale))
    x = F.interpolate(videos.reshape(N * T, C, H, W).float(), size=(h, w), mode="bilinear", align_corners=False)
    top, left = (h - I3D_SIDE) // 2, (w - I3D_SIDE) // 2
    x = x[..., top:top + I3D_SIDE, left:left + I3D_SIDE]
    return (2 * x - 1).reshape(N, T, C, I3D_SIDE, I3D_SIDE).transpose(1, 2)


@torch.no_grad()
def i3d_features(detector, videos: Tensor, batch_size: int = 10) -> Tensor:
    """I3D features [N, D] of clips [N, T, 3, H, W] in [0, 1], `batch_size` clips at a time."""
    device = next(iter(detector.parameters()), torch.empty(0)).device
    out = [detector(i3d_preprocess(videos[i:i + batch_size]).to(device), rescale=False, resize=False,
                    return_features=True).float().cpu()
           for i in range(0, len(videos), batch_size)]
    return torch.cat(out)
