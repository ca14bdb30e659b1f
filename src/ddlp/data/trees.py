"""Datasets stored as `<root>/<split>/<episode>/<frame files>` (OBJ3D, preprocessed CLEVRER, PHYRE).

A new dataset in this layout is a subclass that sets a few class attributes, plus one
`register(name, Class)` line in registry.py.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..config import Config
from .clips import ClipError
from .clipset import ClipDataset, Items, standard_items
from ..config import DataOptions
from .sources import SPLITS, EpisodeSource, FrameFolders, canonical_split, list_frames, with_cache


def split_folder(root: Path, split: str, what: str = "dataset") -> Path:
    """`root/<split>`, accepting the aliases val/valid; clear errors for a missing root or split."""
    if not root.exists():
        raise FileNotFoundError(f"{what} folder not found: {root} (pass --data.root DIR)")
    if not root.is_dir():
        raise ValueError(f"{root} is a file; the {what} is a folder with train/val/test sub-folders")
    names = SPLITS[canonical_split(split)]
    for name in names:
        if (root / name).is_dir():
            return root / name
    raise FileNotFoundError(f"{root}: no {' or '.join(repr(n) for n in names)} folder for the {split!r} split")


def integer_folders(folder: Path) -> list[Path]:
    """Sub-folders named by integers, in numeric order (other entries are ignored, as upstream)."""
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()]
    if not found:
        raise ClipError(f"{folder}: no episode folders (integer-named sub-folders of frames)")
    return sorted(found, key=lambda p: int(p.name))


class FrameTree:
    """`<root>/<split>/<int>/<frames>`: frames matching `frame_glob` in natural order, resized to
    `size` (None: the config's image_size) with `resample`; `invert` maps x to 1 - x."""
    frame_glob = "*.png"
    size: Optional[int] = None
    resample = "bicubic"
    invert = False
    title = "dataset"

    @classmethod
    def episode_files(cls, folder: Path, opts: DataOptions) -> list[Path]:
        files = list_frames(folder, cls.frame_glob)
        if not files:
            raise ClipError(f"{folder}: no frames matching {cls.frame_glob!r}")
        files = files[opts.start_frame or 0:]
        return files[:opts.episode_len] if opts.episode_len else files

    @classmethod
    def source(cls, config: Config, root: Path, split: str, opts: DataOptions) -> EpisodeSource:
        folders = integer_folders(split_folder(root, split, cls.title))
        size = opts.frame_size or cls.size or config.image_size
        src = FrameFolders([cls.episode_files(f, opts) for f in folders], size, cls.resample,
                           names=[str(f) for f in folders])
        return with_cache(src, opts.cache)

    @classmethod
    def items(cls, source: EpisodeSource, config: Config, split: str, opts: DataOptions) -> Items:
        return standard_items(source, config, split)

    @classmethod
    def build(cls, config: Config, root: Path, split: str) -> ClipDataset:
        split = canonical_split(split)
        opts = config.data
        source = cls.source(config, root, split, opts)
        return ClipDataset(source, cls.items(source, config, split, opts), image=not config.is_video,
                           invert=cls.invert, split=split, description=f"{cls.title} {split} ({root})")


class Obj3D(FrameTree):
    """OBJ3D (G-SWM): `<root>/{train,val,test}/<int>/test_<k>.png`, 128 px RGBA, resized to 64."""
    frame_glob, size, title = "test_*.png", 64, "OBJ3D"


class Obj3D128(Obj3D):
    size = 128


class ClevrerFrames(FrameTree):
    """CLEVRER after the official preprocessing: `<root>/{train,valid,test}/<int>/<t>.png`, 128 px."""
    size, title = 128, "CLEVRER"
