"""Latent statistics of a frozen DDLP and the per-feature normalisation of diffusion tokens.

Statistics pool every (clip, frame, particle) foreground vector of the training latents
(per-feature mean, unbiased std, min, max over the F_fg = 6 + m slots) and, separately, the
background feature vectors. The background's centre slots and the padding are never normalised.

    minmax: z' = 2 (z - min) / (max - min + eps) - 1      (about [-1, 1]; the official default)
    std:    z' = (z - mean) / (std + eps)

Sampling clips predicted clean tokens to the range the training data occupy: [-1, 1] for minmax
(as upstream), and the standardised data range for std (upstream clips std latents to [-1, 1],
i.e. at one standard deviation, which truncates them).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

from ..storage import atomic_write
from .tokens import TokenLayout, to_tokens

EPS = 1e-5
NORM_MODES = ("minmax", "std")
STATS_FORMAT = "ddlp-latent-stats/1"
STATS_FILE = "latent_stats.safetensors"


def fingerprint(model: nn.Module) -> str:
    """A short hash of a model's weights: ties statistics and diffusion models to one DDLP."""
    h = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        v = value.detach().cpu().contiguous()
        h.update(f"{name}:{v.dtype}:{tuple(v.shape)};".encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()[:16]


@dataclass
class LatentStats:
    fg_mean: Tensor     # [6 + m]
    fg_std: Tensor
    fg_min: Tensor
    fg_max: Tensor
    bg_mean: Tensor     # [m_bg]
    bg_std: Tensor
    bg_min: Tensor
    bg_max: Tensor
    fingerprint: Optional[str] = None   # of the DDLP that produced the latents
    clips: int = 0
    frames: int = 0

    TENSORS = ("fg_mean", "fg_std", "fg_min", "fg_max", "bg_mean", "bg_std", "bg_min", "bg_max")

    @classmethod
    def from_tokens(cls, tokens: Tensor, layout: TokenLayout, fingerprint: Optional[str] = None) -> "LatentStats":
        """Statistics of raw tokens [M, T, K + 1, F]."""
        if tokens.ndim != 4 or tokens.shape[-2:] != (layout.n_tokens, layout.token_dim):
            raise ValueError(f"expected tokens [M, T, {layout.n_tokens}, {layout.token_dim}], "
                             f"got {tuple(tokens.shape)}")
        fg = tokens[:, :, :-1, :layout.fg_dim].reshape(-1, layout.fg_dim).double()
        bg = tokens[:, :, -1, 2:layout.bg_dim].reshape(-1, layout.bg_features_dim).double()
        if fg.shape[0] < 2 or bg.shape[0] < 2:
            raise ValueError("latent statistics need at least two frames of latents")
        f = lambda t: t.float()  # noqa: E731
        return cls(f(fg.mean(0)), f(fg.std(0)), f(fg.min(0).values), f(fg.max(0).values),
                   f(bg.mean(0)), f(bg.std(0)), f(bg.min(0).values), f(bg.max(0).values),
                   fingerprint, tokens.shape[0], tokens.shape[1])

    def layout_dims(self) -> tuple[int, int]:
        return self.fg_mean.numel(), self.bg_mean.numel()

    def check(self, layout: TokenLayout, fingerprint: Optional[str], source: str = "the statistics") -> None:
        """Raise ValueError when these statistics were computed for another DDLP."""
        if self.layout_dims() != (layout.fg_dim, layout.bg_features_dim):
            raise ValueError(f"{source} describe particles with {self.fg_mean.numel() - 6} features and "
                             f"{self.bg_mean.numel()} background features, but the DDLP has "
                             f"{layout.features_dim} and {layout.bg_features_dim}: they were computed for a "
                             "different model; recompute them with `ddlp diffuse stats`")
        if self.fingerprint and fingerprint and self.fingerprint != fingerprint:
            raise ValueError(f"{source} were computed for a different DDLP (weights fingerprint "
                             f"{self.fingerprint}, this DDLP has {fingerprint}); recompute them with "
                             "`ddlp diffuse stats`")

    # ------------------------------------------------------------------ files
    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file
        path = Path(path)
        tensors = {k: getattr(self, k).detach().float().contiguous().cpu() for k in self.TENSORS}
        meta = {"format": STATS_FORMAT, "fingerprint": self.fingerprint or "",
                "clips": str(self.clips), "frames": str(self.frames)}
        atomic_write(path, lambda p: save_file(tensors, p, metadata=meta))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "LatentStats":
        """Our statistics file, or an official `latent_stats.pth`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"latent statistics not found: {path}")
        if path.suffix in (".pth", ".pt"):
            return cls.from_official(path)
        from safetensors import safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # noqa: BLE001 - any unreadable file is reported the same way
            raise ValueError(f"{path} is not a latent statistics file: {e}") from None
        missing = [k for k in cls.TENSORS if k not in tensors]
        if meta.get("format") != STATS_FORMAT or missing:
            raise ValueError(f"{path} is not a latent statistics file (missing: {', '.join(missing) or 'format tag'})")
        return cls(**{k: tensors[k] for k in cls.TENSORS}, fingerprint=meta.get("fingerprint") or None,
                   clips=int(meta.get("clips", 0)), frames=int(meta.get("frames", 0)))

    @classmethod
    def from_official(cls, path: str | Path) -> "LatentStats":
        """The official ParticleNormalization state (`latent_stats.pth`)."""
        names = {"fg_mean": "mu", "fg_std": "std", "fg_min": "min_val", "fg_max": "max_val",
                 "bg_mean": "mu_bg", "bg_std": "std_bg", "bg_min": "min_val_bg", "bg_max": "max_val_bg"}
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{path} is not a readable latent_stats.pth: {e}") from None
        missing = [v for v in names.values() if not (isinstance(sd, dict) and v in sd)]
        if missing:
            raise ValueError(f"{path} is not an official latent_stats.pth (missing {', '.join(missing)})")
        return cls(**{k: sd[v].float() for k, v in names.items()})


class LatentNormalizer(nn.Module):
    """Normalises tokens [..., K + 1, F] with stored statistics (persistent buffers, so they
    travel inside the diffusion model's weights)."""

    def __init__(self, layout: TokenLayout, mode: str = "minmax"):
        super().__init__()
        if mode not in NORM_MODES:
            raise ValueError(f"unknown particle normalisation {mode!r}; choose from {', '.join(NORM_MODES)}")
        self.layout, self.mode = layout, mode
        for name in LatentStats.TENSORS:
            n = layout.fg_dim if name.startswith("fg") else layout.bg_features_dim
            init = torch.ones(n) if name.endswith(("std", "max")) else -torch.ones(n) if name.endswith("min") \
                else torch.zeros(n)
            self.register_buffer(name, init)

    @torch.no_grad()
    def set_stats(self, stats: LatentStats) -> None:
        stats.check(self.layout, None)
        for name in LatentStats.TENSORS:
            getattr(self, name).copy_(getattr(stats, name).to(getattr(self, name).device))

    def stats(self) -> LatentStats:
        return LatentStats(**{k: getattr(self, k).clone() for k in LatentStats.TENSORS})

    def _affine(self) -> tuple[Tensor, Tensor]:
        """Token-shaped (scale, shift) with z' = z * scale + shift; identity on unnormalised slots."""
        L = self.layout
        scale = torch.ones(L.n_tokens, L.token_dim, device=self.fg_mean.device)
        shift = torch.zeros_like(scale)
        for rows, cols, prefix in ((slice(0, -1), slice(0, L.fg_dim), "fg"), (-1, slice(2, L.bg_dim), "bg")):
            mean, std, lo, hi = (getattr(self, f"{prefix}_{s}") for s in ("mean", "std", "min", "max"))
            if self.mode == "minmax":
                a = 2 / (hi - lo + EPS)
                scale[rows, cols], shift[rows, cols] = a, -lo * a - 1
            else:
                a = 1 / (std + EPS)
                scale[rows, cols], shift[rows, cols] = a, -mean * a
        return scale, shift

    def normalize(self, tokens: Tensor) -> Tensor:
        scale, shift = self._affine()
        return tokens * scale + shift

    def unnormalize(self, tokens: Tensor) -> Tensor:
        L = self.layout
        spread = torch.ones(L.n_tokens, L.token_dim, device=self.fg_mean.device)
        offset = torch.zeros_like(spread)
        for rows, cols, prefix in ((slice(0, -1), slice(0, L.fg_dim), "fg"), (-1, slice(2, L.bg_dim), "bg")):
            mean, std, lo, hi = (getattr(self, f"{prefix}_{s}") for s in ("mean", "std", "min", "max"))
            if self.mode == "minmax":       # z = (z' + 1) / 2 * (max - min + eps) + min
                s = (hi - lo + EPS) / 2
                spread[rows, cols], offset[rows, cols] = s, lo + s
            else:                           # z = z' * (std + eps) + mean
                spread[rows, cols], offset[rows, cols] = std + EPS, mean
        return tokens * spread + offset

    def clip_bounds(self) -> tuple[Tensor, Tensor]:
        """Token-shaped (low, high) for clipping predicted clean tokens during sampling."""
        L = self.layout
        lo = -torch.ones(L.n_tokens, L.token_dim, device=self.fg_mean.device)
        hi = torch.ones_like(lo)
        if self.mode == "std":
            scale, shift = self._affine()
            for rows, cols, prefix in ((slice(0, -1), slice(0, L.fg_dim), "fg"), (-1, slice(2, L.bg_dim), "bg")):
                a, b = scale[rows, cols], shift[rows, cols]
                lo[rows, cols] = getattr(self, f"{prefix}_min") * a + b
                hi[rows, cols] = getattr(self, f"{prefix}_max") * a + b
        return lo, hi

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


# ---------------------------------------------------------------------------- latents of a dataset
def clip_indices(dataset, clips: str = "first", max_clips: Optional[int] = None) -> list[int]:
    """Which dataset items to encode. 'first': the clips that start an episode, as the official
    code does for Balls/OBJ3D/CLEVRER/PHYRE (its 100-frame training windows are whole episodes);
    'all': every training window (official for Traffic). Episode starts are read from the
    dataset's item table (`items`: episode, first frame, frames) or its windows per episode
    (`windows`); a dataset with neither has every item used."""
    if clips not in ("first", "all"):
        raise ValueError(f"clips must be 'first' or 'all', got {clips!r}")
    n = len(dataset)
    idx = list(range(n))
    items = getattr(dataset, "items", None)
    windows = getattr(dataset, "windows", None)
    if clips == "first" and items is not None and getattr(items, "ndim", 0) == 2 and len(items) == n:
        idx = [i for i in idx if int(items[i][1]) == 0]
    elif clips == "first" and isinstance(windows, int) and windows > 0:
        idx = idx[::windows]
    if max_clips is not None:
        if max_clips < 1:
            raise ValueError(f"max_clips must be >= 1, got {max_clips}")
        idx = idx[:max_clips]
    if not idx:
        raise ValueError("the training set is empty: no clips to encode")
    return idx


def default_clips(ds: Optional[str]) -> str:
    """Official choice per dataset: Traffic uses every window, the others episode starts."""
    return "all" if ds == "traffic" else "first"


@torch.inference_mode()
def encode_dataset(ddlp, dataset, frames: int, clips: str = "first", max_clips: Optional[int] = None,
                   batch_size: int = 32, progress: bool = True) -> Tensor:
    """Raw tokens [M, frames, K + 1, F] of the first `frames` frames of the selected clips,
    encoded deterministically (posterior means, Beta means) by the frozen DDLP."""
    from torch.utils.data import DataLoader, Subset
    layout = TokenLayout.from_ddlp(ddlp.config)
    idx = clip_indices(dataset, clips, max_clips)
    loader = DataLoader(Subset(dataset, idx), batch_size=batch_size, shuffle=False, num_workers=0)
    device = next(ddlp.parameters()).device
    was_training = ddlp.training
    ddlp.eval()
    out = []
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(idx), desc="encode latents", unit="clip", dynamic_ncols=True)
    try:
        for batch in loader:
            x = batch["frames"] if isinstance(batch, dict) else batch
            if x.ndim != 5 or x.shape[1] < frames:
                raise ValueError(f"the training set yields items of shape {tuple(x.shape[1:])}; DiffuseDDLP "
                                 f"needs clips of at least {frames} frames")
            p = ddlp.encode(x[:, :frames].to(device), deterministic=True)
            out.append(to_tokens(p, layout).float().cpu())
            if bar is not None:
                bar.update(x.shape[0])
    finally:
        if bar is not None:
            bar.close()
        ddlp.train(was_training)
    return torch.cat(out)


def save_tokens(tokens: Tensor, path: str | Path, fingerprint: str) -> Path:
    from safetensors.torch import save_file
    path = Path(path)
    atomic_write(path, lambda p: save_file({"tokens": tokens.contiguous()}, p,
                                           metadata={"fingerprint": fingerprint}))
    return path


def load_tokens(path: str | Path, fingerprint: Optional[str] = None) -> Optional[Tensor]:
    """Cached training latents, or None when absent or made by another DDLP."""
    from safetensors import safe_open
    path = Path(path)
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        if fingerprint and (f.metadata() or {}).get("fingerprint") != fingerprint:
            return None
        return f.get_tensor("tokens")


def describe(stats: LatentStats, layout: TokenLayout) -> str:
    """A readable table of the foreground statistics."""
    names = ["pos_y", "pos_x", "scale_y", "scale_x", "depth", "transp"] + [
        f"feat{i}" for i in range(layout.features_dim)]
    rows = [f"{'':8s} {'mean':>9s} {'std':>9s} {'min':>9s} {'max':>9s}"]
    for i, n in enumerate(names):
        rows.append(f"{n:8s} {stats.fg_mean[i]:9.4f} {stats.fg_std[i]:9.4f} {stats.fg_min[i]:9.4f} "
                    f"{stats.fg_max[i]:9.4f}")
    return "\n".join(rows)

