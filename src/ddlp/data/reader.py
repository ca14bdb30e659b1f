"""One clip from anything the dataset loaders read: the reader behind `predict`, `what-if` and
`studio`.

    video file (.mp4, .gif, ...)         its frames
    one image file                       that image, as a one-frame clip
    folder of frames                     its frames, in natural order
    .npy / .npz / .h5 / .hdf5 array      episode `episode` of [N, T, H, W, C], or the [T, H, W, C] clip
    dataset folder                       episode `episode` of split `split` when it has train/val/test
                                         entries (our Balls data, G-SWM's, OBJ3D-style trees), else of
                                         its episodes (episode folders, videos or arrays)

Everything but single videos and images goes through the sources that `--dataset custom` uses, so a
path that trains also predicts.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from .clips import IMAGE_SUFFIXES, ClipError, resize
from .custom import open_collection, split_entries
from ..config import DataOptions
from .sources import canonical_split, decode_video, is_video, read_image


def read_clip(path: str | os.PathLike, size: Optional[int] = None, *, episode: Optional[int] = None,
              split: str = "test", key: Optional[str] = None) -> Tensor:
    """Frames [T, 3, H, W] in [0, 1] of one clip at `path`, resized to size x size if given.

    `episode` picks one episode where `path` holds several (default 0); `split` the split of a
    dataset folder with train/val/test entries; `key` the HDF5 dataset or .npz array holding the
    frames (default: guessed, as for `data_key`)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    if episode is not None and episode < 0:
        raise ValueError(f"the episode index must be >= 0, got {episode}")
    if path.is_file() and (path.suffix.lower() in IMAGE_SUFFIXES or is_video(path)):
        if episode:
            raise ClipError(f"{path}: holds one clip, so there is no episode {episode}")
        raw = read_image(path, None, "bicubic")[None] if path.suffix.lower() in IMAGE_SUFFIXES \
            else decode_video(path)
        if not len(raw):
            raise ClipError(f"{path}: video has no frames")
    else:
        raw = _read_episode(path, episode or 0, split, key)
    x = torch.from_numpy(np.require(raw, requirements=["C", "W"])).permute(0, 3, 1, 2).float() / 255
    return resize(x, size)


def _read_episode(path: Path, episode: int, split: str, key: Optional[str]) -> np.ndarray:
    """uint8 frames [T, H, W, 3] of one episode of an array file or a folder."""
    entries = split_entries(path)
    where = path
    if entries is not None:
        split = canonical_split(split)
        if split not in entries:
            raise ClipError(f"{path}: no {split} split (it has {', '.join(sorted(entries))})")
        where = entries[split]
    source, _, what = open_collection(where, DataOptions(key=key), None)
    n = len(source)
    if episode >= n:
        raise ClipError(f"{where}: there is no episode {episode} ({what}: {n} episode{'s' * (n != 1)}, "
                        f"numbered 0-{n - 1})")
    return source.read(episode, 0, source.lengths[episode])
