"""CLEVRER: the original MP4 videos, or frames written by the official preprocessing.

Videos (`video_<id>.mp4`, anywhere under the root, e.g. `video_train/video_00000-01000/`): frames
18..117 of each video (the paper's trimming, which starts where all the initial objects are in
view), resized to 128 x 128 with area averaging (aspect ratio not kept), as the official
preprocessing does. Splits by video id, as in the paper: train = training videos 0-4999,
val = validation videos 10000-10999, test = validation videos 11000-11999.

Frames: `<root>/{train,valid,test}/<int>/<t>.png` (see trees.ClevrerFrames).
"""
from __future__ import annotations

import re
from pathlib import Path

from ..config import Config
from .clipset import ClipDataset, standard_items
from ..config import DataOptions
from .sources import SPLITS, VideoFiles, canonical_split, with_cache
from .trees import ClevrerFrames

START_FRAME = 18
EPISODE_LEN = 100
SIZE = 128
VIDEO_IDS = {"train": range(0, 5000), "val": range(10000, 11000), "test": range(11000, 12000)}
_NAME = re.compile(r"video_(\d+)\.(mp4|webm|mkv|avi|mov)$", re.IGNORECASE)


def find_videos(root: Path) -> dict[int, Path]:
    """video id -> file, for every `video_<id>.<ext>` below root."""
    found = {}
    for p in root.rglob("video_*"):
        m = _NAME.match(p.name)
        if m and p.is_file():
            found[int(m.group(1))] = p
    return found


def has_frame_tree(root: Path) -> bool:
    return any((root / name).is_dir() for names in SPLITS.values() for name in names)


class Clevrer:
    title = "CLEVRER"

    @classmethod
    def build(cls, config: Config, root: Path, split: str) -> ClipDataset:
        split = canonical_split(split)
        if not root.exists():
            raise FileNotFoundError(f"CLEVRER folder not found: {root} (pass --data.root DIR)")
        if root.is_dir() and has_frame_tree(root):
            return ClevrerFrames.build(config, root, split)
        opts = config.data
        videos = find_videos(root) if root.is_dir() else {}
        if not videos:
            raise FileNotFoundError(
                f"{root}: neither CLEVRER videos (video_<id>.mp4 below it) nor preprocessed frames "
                "(<root>/{train,valid,test}/<episode>/<t>.png)")
        ids = [i for i in sorted(videos) if i in VIDEO_IDS[split]]
        if not ids:
            r = VIDEO_IDS[split]
            raise ValueError(f"{root}: the {split} split would be empty: no video_<id>.mp4 with id in "
                             f"{r.start}-{r.stop - 1} among {len(videos)} videos")
        start = START_FRAME if opts.start_frame is None else opts.start_frame
        source = VideoFiles([videos[i] for i in ids], size=opts.frame_size or SIZE, resample="box",
                            start_frame=start, length=opts.episode_len or EPISODE_LEN)
        source = with_cache(source, opts.cache)
        return ClipDataset(source, standard_items(source, config, split), image=not config.is_video,
                           split=split, description=f"CLEVRER videos {split} ({root})")
