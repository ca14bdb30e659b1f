"""LPIPS (VGG variant) as piqa 1.3.x computes it, on our own VGG-16 (no torchvision needed).

    x in [0, 1] -> ImageNet normalisation -> VGG-16 features after relu1_2, relu2_2, relu3_3,
    relu4_3, relu5_3 -> each spatial feature vector divided by (its L2 norm + 1e-10) ->
    squared difference averaged over positions, one value per channel -> dot product with the
    LPIPS v0.1 linear weights of that layer -> sum over the five layers.

Two weight files are needed, neither shipped: the torchvision ImageNet VGG-16 checkpoint (found by
`ddlp.nn.vgg.find_vgg16_weights`) and the LPIPS v0.1 `vgg.pth` linear weights (the file piqa and
the `lpips` package use), looked up here in that order: an explicit path, $DDLP_LPIPS_WEIGHTS,
the torch hub cache (where piqa downloads it), an installed `lpips` package, and a torch hub
download when a network is available.
"""
from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..nn.vgg import IMAGENET_MEAN, IMAGENET_STD, VGG16Features, WeightsNotFound

LPIPS_TAPS = (3, 8, 15, 22, 29)               # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
LPIPS_CHANNELS = (64, 128, 256, 512, 512)
LPIPS_URL = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth"
LPIPS_FILE = "vgg.pth"
LPIPS_ENV = "DDLP_LPIPS_WEIGHTS"
NORM_EPS = 1e-10


def _lpips_package_file() -> Optional[Path]:
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "weights" / "v0.1" / LPIPS_FILE


def find_lpips_weights(path: Optional[str | os.PathLike] = None, download: bool = True) -> Path:
    """Path of the LPIPS v0.1 VGG linear weights; raises WeightsNotFound saying where to put them."""
    for candidate in (path, os.environ.get(LPIPS_ENV)):
        if candidate:
            if not Path(candidate).is_file():
                raise WeightsNotFound(f"LPIPS linear weights not found at {candidate}")
            return Path(candidate)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_FILE
    package = _lpips_package_file()
    for candidate in (cached, package):
        if candidate is not None and candidate.is_file():
            return candidate
    reason = "download disabled"
    if download:
        try:
            torch.hub.load_state_dict_from_url(LPIPS_URL, map_location="cpu", progress=False)
            return cached
        except Exception as e:  # noqa: BLE001 - every failure means "not available offline"
            reason = f"download failed: {type(e).__name__}"
    raise WeightsNotFound(
        f"the LPIPS v0.1 VGG linear weights are not available ({reason}). Download {LPIPS_URL} "
        f"and put it at {cached}, or pass its path (--lpips-weights / {LPIPS_ENV}=/path/to/{LPIPS_FILE})")


def load_lpips_weights(path: str | os.PathLike) -> list[Tensor]:
    """The five linear weight vectors [64], [128], [256], [512], [512] of an LPIPS `vgg.pth`
    (keys `lin{l}.model.1.weight`, shapes [1, C, 1, 1]), in layer order."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{path}: cannot read LPIPS weights ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected an LPIPS state dict, got {type(state).__name__}")
    layer = lambda k: int(m.group(1)) if (m := re.match(r"lin(\d+)\.", k)) else -1  # noqa: E731
    keys = sorted(state, key=layer) if all(layer(k) >= 0 for k in state) else list(state)
    weights = [state[k].detach().float().flatten() for k in keys]
    sizes = tuple(w.numel() for w in weights)
    if sizes != LPIPS_CHANNELS:
        raise ValueError(f"{path} is not an LPIPS VGG weight file: layer sizes {sizes}, "
                         f"expected {LPIPS_CHANNELS} (AlexNet/SqueezeNet files do not fit)")
    return weights


class LPIPS(nn.Module):
    """Learned perceptual distance between images x, y [N, 3, H, W] in [0, 1]: returns [N]."""

    def __init__(self, features: VGG16Features, weights: Sequence[Tensor], eps: float = NORM_EPS):
        super().__init__()
        if len(weights) != len(LPIPS_TAPS):
            raise ValueError(f"LPIPS needs {len(LPIPS_TAPS)} weight vectors, got {len(weights)}")
        self.net = features.eval().requires_grad_(False)
        for i, w in enumerate(weights):
            self.register_buffer(f"w{i}", torch.as_tensor(w, dtype=torch.float32).flatten())
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.eps = eps

    @classmethod
    def pretrained(cls, vgg_path: Optional[str | os.PathLike] = None,
                   lpips_path: Optional[str | os.PathLike] = None, download: bool = True) -> "LPIPS":
        """The metric with the ImageNet VGG-16 and the LPIPS v0.1 weights (WeightsNotFound when
        either is missing). The small linear file is looked up first, so a missing one fails fast."""
        weights = load_lpips_weights(find_lpips_weights(lpips_path, download))
        return cls(VGG16Features.pretrained(vgg_path), weights)

    @property
    def weights(self) -> list[Tensor]:
        return [getattr(self, f"w{i}") for i in range(len(LPIPS_TAPS))]

    @torch.no_grad()
    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"LPIPS compares RGB images [N, 3, H, W] of one shape, got "
                             f"{tuple(x.shape)} and {tuple(y.shape)}")
        n = x.shape[0]
        both = (torch.cat([x, y]) - self.mean) / self.std          # one pass through VGG for x and y
        total = x.new_zeros(n)
        for w, f in zip(self.weights, self.net(both, taps=LPIPS_TAPS)):
            f = f / (f.square().sum(1, keepdim=True).sqrt() + self.eps)
            per_channel = (f[:n] - f[n:]).square().mean((-2, -1))   # [N, C]
            total = total + per_channel @ w
        return total
