"""VGG-16 features and the perceptual reconstruction loss (no torchvision needed).

The layer indices match torchvision's `vgg16().features`, so its ImageNet checkpoint
(`vgg16-397923af.pth`, IMAGENET1K_V1) loads directly. Weights are looked up, in order, at an
explicit path, at $DDLP_VGG16_WEIGHTS, in the torch hub cache, and finally downloaded by torch
hub when a network is available.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
VGG16_FILE = "vgg16-397923af.pth"
_LAYOUT = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Outputs kept by the perceptual loss: relu1_2, relu2_2, relu3_2, relu4_3, pool5. (The official
# loss asks for conv outputs 2/7/12/21, but torchvision's in-place ReLUs overwrite them with the
# activations, so these are the features it really compares.)
PERCEPTUAL_TAPS = (3, 8, 13, 22, 30)


class WeightsNotFound(FileNotFoundError):
    pass


class VGG16Features(nn.Module):
    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for v in _LAYOUT:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c_in, v, 3, padding=1), nn.ReLU()]
                c_in = v
        self.features = nn.Sequential(*layers)

    def forward(self, x: Tensor, taps: Sequence[int] = PERCEPTUAL_TAPS) -> list[Tensor]:
        out = []
        for i, layer in enumerate(self.features[: max(taps) + 1]):
            x = layer(x)
            if i in taps:
                out.append(x)
        return out

    @classmethod
    def pretrained(cls, path: Optional[str | os.PathLike] = None) -> "VGG16Features":
        net = cls()
        state = torch.load(find_vgg16_weights(path), map_location="cpu", weights_only=True)
        net.load_state_dict({k: v for k, v in state.items() if k.startswith("features.")})
        return net.eval().requires_grad_(False)


def find_vgg16_weights(path: Optional[str | os.PathLike] = None) -> Path:
    """Path of the ImageNet VGG-16 checkpoint, downloading it through torch hub if needed."""
    for candidate in (path, os.environ.get("DDLP_VGG16_WEIGHTS")):
        if candidate:
            if not Path(candidate).is_file():
                raise WeightsNotFound(f"VGG-16 weights not found at {candidate}")
            return Path(candidate)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE
    if cached.is_file():
        return cached
    try:
        torch.hub.load_state_dict_from_url(VGG16_URL, map_location="cpu", progress=True)
    except Exception as e:  # noqa: BLE001 - any download failure means the same to the user
        raise WeightsNotFound(
            f"VGG-16 ImageNet weights are needed (perceptual loss / LPIPS) but are not available "
            f"offline and could not be downloaded ({type(e).__name__}). Download {VGG16_URL} on a "
            f"machine with internet and either put it at {cached}, or point to it with "
            f"DDLP_VGG16_WEIGHTS=/path/to/{VGG16_FILE}."
        ) from None
    return cached


class VGGPerceptualLoss(nn.Module):
    """Per-image pixel SSE + coeff * sum of squared differences of VGG-16 features computed on
    ImageNet-normalised inputs. Inputs [N, 3, H, W] in [0, 1]; output [N]."""

    def __init__(self, features: VGG16Features, coeff: float = 0.12151):
        super().__init__()
        self.net, self.coeff = features.eval().requires_grad_(False), coeff
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def pretrained(cls, path: Optional[str | os.PathLike] = None) -> "VGGPerceptualLoss":
        return cls(VGG16Features.pretrained(path))

    def forward(self, rec: Tensor, target: Tensor) -> Tensor:
        if rec.shape[1] == 1:
            rec, target = rec.expand(-1, 3, -1, -1), target.expand(-1, 3, -1, -1)
        loss = (target - rec).pow(2).sum((1, 2, 3))
        mean, std = self.mean.to(rec), self.std.to(rec)
        f_t = self.net((target - mean) / std)
        f_r = self.net((rec - mean) / std)
        for a, b in zip(f_t, f_r):
            loss = loss + self.coeff * (a - b).pow(2).sum((1, 2, 3))
        return loss
