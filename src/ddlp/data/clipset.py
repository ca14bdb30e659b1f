"""One Dataset class for every on-disk format: a source of episodes plus a table of items.

An item is (episode, first frame, frames). The sampling rules of the paper are functions that
build that table: sliding training windows, whole evaluation episodes, single frames for image
models. Reading past an episode's end repeats its last frame (PHYRE's padding).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from ..config import Config
from .clips import ClipError
from .sources import EpisodeSource

Items = np.ndarray                              # int64 [N, 3]: episode, first frame, frames


def _table(rows: list[tuple[int, int, int]]) -> Items:
    return np.asarray(rows, dtype=np.int64).reshape(-1, 3)


def _check_lengths(source: EpisodeSource, need: int, why: str) -> None:
    for e, n in enumerate(source.lengths):
        if n < need:
            raise ClipError(f"{source.name(e)}: {n} frames, fewer than the {need} needed for {why}")


def sliding_windows(source: EpisodeSource, clip_len: int, why: str = "a training clip") -> Items:
    """Every window of `clip_len` consecutive frames (stride 1) of every episode, in order."""
    _check_lengths(source, clip_len, why)
    return _table([(e, s, clip_len) for e, n in enumerate(source.lengths) for s in range(n - clip_len + 1)])


def whole_episodes(source: EpisodeSource, length: Optional[int] = None, min_len: int = 1) -> Items:
    """One item per episode: its first `length` frames (default: the shortest episode's length,
    so that a batch of episodes stacks)."""
    if len(source) == 0:
        return _table([])
    length = length or min(source.lengths)
    _check_lengths(source, max(length, min_len), "an evaluation episode")
    return _table([(e, 0, length) for e in range(len(source))])


def every_frame(source: EpisodeSource) -> Items:
    return _table([(e, t, 1) for e, n in enumerate(source.lengths) for t in range(n)])


def standard_items(source: EpisodeSource, config: Config, split: str, eval_len: Optional[int] = None) -> Items:
    """The official rule: DDLP trains on windows of timestep_horizon + 1 frames and evaluates on
    whole episodes; DLP sees single frames in every split."""
    if not config.is_video:
        return every_frame(source)
    clip = config.timestep_horizon + 1
    if split == "train":
        return sliding_windows(source, clip)
    return whole_episodes(source, eval_len, min_len=clip)


class ClipDataset(Dataset):
    """Items are dicts: `frames` float32 [L, 3, S, S] in [0, 1] ([3, S, S] when `image`), and
    `window` int64 [2] = (episode, first frame) for inspection and tests."""

    def __init__(self, source: EpisodeSource, items: Items, image: bool = False, invert: bool = False,
                 split: str = "", description: str = ""):
        self.source, self.items, self.image, self.invert = source, np.asarray(items, np.int64), image, invert
        self.split, self.description = split, description
        if image and len(self.items) and (self.items[:, 2] != 1).any():
            raise ValueError("image datasets yield single frames")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        e, start, n = (int(v) for v in self.items[index])
        stop = min(start + n, self.source.lengths[e])
        raw = self.source.read(e, start, stop)
        if len(raw) < n:                                        # past the end: repeat the last frame
            raw = np.concatenate([raw, np.repeat(raw[-1:], n - len(raw), axis=0)])
        x = self._tensor(raw)
        return {"frames": x[0] if self.image else x, "window": torch.tensor([e, start])}

    def _tensor(self, raw: np.ndarray) -> torch.Tensor:
        raw = np.ascontiguousarray(raw)
        if not raw.flags.writeable:                             # a memory map: torch wants its own copy
            raw = raw.copy()
        x = torch.from_numpy(raw).permute(0, 3, 1, 2).float().div_(255)
        return 1.0 - x if self.invert else x

    def episode(self, e: int) -> torch.Tensor:
        """All frames of episode e, float [T, 3, S, S] (inverted like the items)."""
        return self._tensor(self.source.read(e, 0, self.source.lengths[e]))

    def __repr__(self) -> str:
        shape = "frame" if self.image else f"clip of {int(self.items[0, 2]) if len(self.items) else 0} frames"
        return (f"{type(self).__name__}({self.description or self.split}: {len(self)} items ({shape} each) "
                f"from {len(self.source)} episodes)")

