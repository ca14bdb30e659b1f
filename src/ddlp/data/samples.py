"""Small datasets in each published on-disk format, filled with moving discs.

For tests, benchmarks and trying a command before downloading gigabytes. Every writer returns the
uint8 frames [T, H, W, 3] it wrote (as RGB, before any format quirk), split by split, so readers
can be checked against them.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

Episodes = dict[str, list[np.ndarray]]


def episode(frames: int, size: int, seed: int, ramp: bool = False, background: int = 0) -> np.ndarray:
    """uint8 [frames, size, size, 3]: three discs bouncing around. `ramp` brightens the background
    with time (frame t has grey level 8 + 6t, mod 200) so that the order survives lossy codecs."""
    from .synthetic import moving_discs
    x = moving_discs(frames=frames, size=size, n_discs=3, speed=max(1.0, size / 32), seed=seed)[0]
    a = (x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    bg = (a.max(-1, keepdims=True) == 0)
    if ramp:
        level = ((8 + 6 * np.arange(frames)) % 200).astype(np.uint8)[:, None, None, None]
        a = np.where(bg, level, a)
    elif background:
        a = np.where(bg, np.uint8(background), a)
    return a


def _save_png(path: Path, frame: np.ndarray, mode: str = "RGB", swap_rb: bool = False) -> None:
    img = Image.fromarray(np.ascontiguousarray(frame[..., ::-1]) if swap_rb else frame)
    if mode == "RGBA":
        img = img.convert("RGBA")
    img.save(path)


def write_frame_tree(root: str | os.PathLike, episodes: dict[str, int], frames: int, size: int,
                     name: str = "{k}.png", first: int = 0, episode_name: str = "{e}", mode: str = "RGB",
                     seed: int = 0, background: int = 0, swap_rb: bool = False) -> Episodes:
    """`root/<split>/<episode>/<frame>` PNG trees (the layout of OBJ3D, CLEVRER frames and PHYRE)."""
    out: Episodes = {}
    for s, (split, n) in enumerate(episodes.items()):
        out[split] = []
        for e in range(n):
            clip = episode(frames, size, seed=seed + 1000 * s + e, background=background)
            folder = Path(root) / split / episode_name.format(e=e)
            folder.mkdir(parents=True, exist_ok=True)
            for k, frame in enumerate(clip):
                _save_png(folder / name.format(k=k + first), frame, mode, swap_rb)
            out[split].append(clip)
    return out


def write_obj3d(root: str | os.PathLike, episodes: Optional[dict[str, int]] = None, frames: int = 100,
                size: int = 128) -> Episodes:
    """OBJ3D: `root/{train,val,test}/<int>/test_<k>.png`, k from 1, RGBA."""
    return write_frame_tree(root, episodes or {"train": 3, "val": 1, "test": 1}, frames, size,
                            name="test_{k}.png", first=1, mode="RGBA")


def write_clevrer_frames(root: str | os.PathLike, episodes: Optional[dict[str, int]] = None,
                         frames: int = 100, size: int = 128) -> Episodes:
    """CLEVRER after the official preprocessing: `root/{train,valid,test}/<int>/<t>.png`."""
    return write_frame_tree(root, episodes or {"train": 3, "valid": 1, "test": 1}, frames, size)


def write_video(path: Path, frames: np.ndarray, fps: int = 25) -> None:
    import imageio.v3 as iio
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".gif":
        iio.imwrite(path, frames, duration=1000 / fps, loop=0)
    else:
        iio.imwrite(path, frames, fps=fps, plugin="FFMPEG", macro_block_size=1)


def write_clevrer_videos(root: str | os.PathLike, ids: Optional[dict[str, list[int]]] = None,
                         frames: int = 128, size: tuple[int, int] = (480, 320)) -> Episodes:
    """CLEVRER as downloaded: `video_train/video_00000-01000/video_00000.mp4`,
    `video_validation/video_10000-11000/video_10000.mp4`... (size is width, height)."""
    ids = ids or {"train": [0, 1, 2], "val": [10000], "test": [11000]}
    out: Episodes = {}
    w, h = size
    for split, numbers in ids.items():
        out[split] = []
        for i in numbers:
            square = episode(frames, 128, seed=i, ramp=True)       # drawn small, then stretched (cheap)
            clip = np.stack([np.asarray(Image.fromarray(f).resize((w, h), Image.BILINEAR)) for f in square])
            top = "video_train" if i < 10000 else "video_validation"
            block = f"video_{i // 1000 * 1000:05d}-{i // 1000 * 1000 + 1000:05d}"
            write_video(Path(root) / top / block / f"video_{i:05d}.mp4", clip)
            out[split].append(clip)
    return out


def write_phyre(root: str | os.PathLike, episodes: Optional[dict[str, int]] = None, frames: int = 130,
                size: int = 128) -> Episodes:
    """PHYRE as published: `root/{train,valid,test}/<00000>/<00000>.png`, white background, red and
    blue swapped in the files. Returns the RGB frames before the swap."""
    return write_frame_tree(root, episodes or {"train": 2, "valid": 1, "test": 1}, frames, size,
                            name="{k:05d}.png", episode_name="{e:05d}", background=255, swap_rb=True)


def write_traffic(path: str | os.PathLike, frames: int = 500, size: int = 128, cars: int = 8,
                  seed: int = 0) -> np.ndarray:
    """Traffic: one .npy of every frame of a fixed-camera video, uint8 [N, size, size, 3]: cars
    (coloured boxes) driving along lanes of a grey road."""
    rng = np.random.default_rng(seed)
    h, w = max(2, size // 12), max(3, size // 7)
    rows = rng.integers(0, size - h, cars)
    x0, speed = rng.uniform(0, size, cars), rng.uniform(0.5, 2.0, cars) * size / 64
    colours = rng.integers(60, 256, (cars, 3)).astype(np.uint8)
    data = np.full((frames, size, size, 3), 90, np.uint8)
    for t in range(frames):
        for k in range(cars):
            x = int(x0[k] + speed[k] * t) % (size + w) - w          # enter on the left, leave on the right
            data[t, rows[k]:rows[k] + h, max(0, x):max(0, x + w)] = colours[k]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, data)
    return data
