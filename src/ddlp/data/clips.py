"""Read one clip from disk, whatever it is stored as: a video file, a folder of frames or an array.

Every reader returns float frames [T, 3, H, W] in [0, 1]; `size` resizes (bilinear, antialiased)
to a square of that many pixels.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

VIDEO_SUFFIXES = (".mp4", ".gif", ".webm", ".avi", ".mov", ".mkv")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
ARRAY_SUFFIXES = (".npy", ".npz")


class ClipError(ValueError):
    """A clip that cannot be read; the message names the file."""

    def __str__(self) -> str:
        # A DataLoader worker re-raises it with the worker's whole traceback as the message; the
        # user needs only the last line (ours), without the class-name prefix.
        msg = super().__str__()
        if "Original Traceback" in msg:
            last = [line for line in msg.strip().splitlines() if line.strip()][-1]
            msg = last.split("ClipError: ", 1)[-1]
        return msg


def _to_tensor(frames: np.ndarray, source: Path) -> Tensor:
    """uint8/float [T, H, W, C] or [T, C, H, W] -> float [T, 3, H, W] in [0, 1]."""
    a = np.asarray(frames)
    if a.ndim == 3:                                   # grey frames
        a = a[..., None]
    if a.ndim != 4:
        raise ClipError(f"{source}: expected frames [T, H, W, C], got an array of shape {a.shape}")
    if a.shape[-1] not in (1, 3, 4) and a.shape[1] in (1, 3, 4):
        a = a.transpose(0, 2, 3, 1)                   # channels first -> last
    if a.shape[-1] not in (1, 3, 4):
        raise ClipError(f"{source}: cannot tell the channel axis of an array of shape {a.shape}")
    a = a[..., :3] if a.shape[-1] >= 3 else np.repeat(a, 3, axis=-1)
    x = torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2)
    if x.dtype == torch.uint8:
        return x.float() / 255
    x = x.float()
    if x.numel() and (x.min() < 0 or x.max() > 1):
        if x.min() >= 0 and x.max() <= 255:
            return x / 255
        raise ClipError(f"{source}: float frames must lie in [0, 1] or [0, 255], "
                        f"got [{x.min():.3g}, {x.max():.3g}]")
    return x


def resize(frames: Tensor, size: Optional[int]) -> Tensor:
    if size is None or frames.shape[-2:] == (size, size):
        return frames
    return F.interpolate(frames, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=True).clamp(0, 1)


def read_video(path: str | os.PathLike) -> np.ndarray:
    """All frames of a video file as uint8 [T, H, W, 3] (imageio; ffmpeg from imageio-ffmpeg)."""
    import imageio.v3 as iio
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such video: {path}")
    try:
        frames = iio.imread(path, index=None) if path.suffix.lower() == ".gif" else \
            np.stack(list(iio.imiter(path, plugin="FFMPEG")))
    except Exception as e:  # decoders raise many types; all mean "this file is unusable"
        first = (str(e).strip().splitlines() or [""])[0]
        raise ClipError(f"{path}: cannot decode video ({type(e).__name__}: {first})") from e
    if frames.ndim == 3:
        frames = frames[None]
    if len(frames) == 0:
        raise ClipError(f"{path}: video has no frames")
    return frames


def frame_files(folder: Path) -> list[Path]:
    """Image files of a folder in natural order (2.png before 10.png)."""
    import re
    files = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
    key = lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]  # noqa: E731
    return sorted(files, key=key)


def read_frame_folder(folder: str | os.PathLike) -> np.ndarray:
    from PIL import Image
    folder = Path(folder)
    files = frame_files(folder)
    if not files:
        raise ClipError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    frames = []
    for f in files:
        try:
            with Image.open(f) as im:
                frames.append(np.asarray(im.convert("RGB")))
        except Exception as e:
            raise ClipError(f"{f}: cannot read image ({type(e).__name__}: {e})") from e
        if frames[-1].shape != frames[0].shape:
            raise ClipError(f"{f}: frame of size {frames[-1].shape[:2]} in a folder of "
                            f"{frames[0].shape[:2]} frames")
    return np.stack(frames)


def read_array(path: Path) -> np.ndarray:
    try:
        data = np.load(path)
    except Exception as e:
        raise ClipError(f"{path}: cannot load array ({type(e).__name__}: {e})") from e
    if isinstance(data, np.lib.npyio.NpzFile):
        keys = list(data.keys())
        if not keys:
            raise ClipError(f"{path}: empty .npz")
        data = data["frames"] if "frames" in keys else data[keys[0]]
    if data.ndim == 5:                                # [N, T, ...]: the first episode
        data = data[0]
    return data


def read_clip(path: str | os.PathLike, size: Optional[int] = None) -> Tensor:
    """Frames [T, 3, H, W] in [0, 1] from a video file, a folder of frames or an .npy/.npz array."""
    path = Path(path).expanduser()
    if path.is_dir():
        raw = read_frame_folder(path)
    elif not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    elif path.suffix.lower() in VIDEO_SUFFIXES:
        raw = read_video(path)
    elif path.suffix.lower() in ARRAY_SUFFIXES:
        raw = read_array(path)
    elif path.suffix.lower() in IMAGE_SUFFIXES:
        raw = read_frame_folder(path.parent)[[frame_files(path.parent).index(path)]]
    else:
        raise ClipError(f"{path}: unknown clip format {path.suffix!r}; use a video "
                        f"({', '.join(VIDEO_SUFFIXES)}), a folder of frames or {', '.join(ARRAY_SUFFIXES)}")
    return resize(_to_tensor(raw, path), size)
