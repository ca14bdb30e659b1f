"""Traffic: one NumPy file of every frame of a fixed-camera video, uint8 [N, 128, 128, 3], RGB.

Splits are contiguous blocks of frames: the first int(0.8 N) train, the next int(0.1 N) val, the
rest test. Training windows start at every train frame and are moved back to end at the last
frame near the end (so the last few repeat); they cross the 50-frame "episode" boundaries, as
upstream. Evaluation items are the floor(n / 50) consecutive 50-frame episodes of the block.
Image models see every frame of the block. The file is memory-mapped once per process.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from ..config import Config
from .clips import ClipError
from .clipset import ClipDataset, Items, _table
from ..config import DataOptions
from .sources import ArrayFrames, canonical_split

FILE_NAME = "img128np.npy"
EVAL_EPISODE_LEN = 50


def find_array(root: Path) -> Path:
    """The .npy file itself, or the one inside a folder (img128np.npy preferred)."""
    if root.is_file():
        if root.suffix.lower() != ".npy":
            raise ValueError(f"{root}: Traffic data are one .npy file of frames [N, H, W, 3]")
        return root
    if not root.exists():
        raise FileNotFoundError(f"Traffic data not found: {root} (pass --data.root FILE.npy or its folder)")
    if (root / FILE_NAME).is_file():
        return root / FILE_NAME
    found = sorted(root.glob("*.npy"))
    if len(found) != 1:
        raise FileNotFoundError(f"{root}: expected {FILE_NAME} or exactly one .npy file, found "
                                f"{len(found)}" + (f" ({', '.join(p.name for p in found)})" if found else ""))
    return found[0]


def open_frames(path: Path) -> np.ndarray:
    try:
        arr = np.load(path, mmap_mode="r")
    except Exception as e:
        raise ClipError(f"{path}: cannot load array ({type(e).__name__}: {e})") from e
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3, 4):
        raise ClipError(f"{path}: expected frames [N, H, W, 3], got an array of shape {arr.shape}")
    return arr


def split_block(n: int, split: str) -> tuple[int, int]:
    """(first frame, frames) of a split: 80 / 10 / 10 % by frame index, as upstream."""
    train, val = int(0.8 * n), int(0.1 * n)
    return {"train": (0, train), "val": (train, val), "test": (train + val, n - train - val)}[split]


def traffic_items(n: int, config: Config, split: str, eval_len: int) -> Items:
    if not config.is_video:
        return _table([(0, i, 1) for i in range(n)])
    clip = config.timestep_horizon + 1
    if split == "train":
        if clip > n:
            raise ValueError(f"Traffic: {n} training frames, fewer than a clip of {clip}")
        return _table([(0, min(i, n - clip), clip) for i in range(n)])
    if eval_len < clip:
        raise ValueError(f"Traffic: evaluation episodes of {eval_len} frames are shorter than "
                         f"timestep_horizon + 1 = {clip}")
    return _table([(0, min(eval_len * e, n - eval_len), eval_len) for e in range(n // eval_len)])


class Traffic:
    title = "Traffic"

    @classmethod
    def build(cls, config: Config, root: Path, split: str) -> ClipDataset:
        split = canonical_split(split)
        opts = config.data
        path = find_array(root)
        total = len(open_frames(path))
        first, count = split_block(total, split)
        eval_len = opts.episode_len or EVAL_EPISODE_LEN
        items = traffic_items(count, config, split, eval_len)
        if len(items) == 0:
            raise ValueError(f"{path}: the {split} split would be empty ({count} of {total} frames; "
                             f"evaluation episodes have {eval_len})")
        source = ArrayFrames(functools.partial(open_frames, path), path, [(None, first, count)],
                             size=opts.frame_size or config.image_size, resample="bilinear", label=f" [{split}]")
        return ClipDataset(source, items, image=not config.is_video, split=split,
                           description=f"Traffic {split} ({path})")
