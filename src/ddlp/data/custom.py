"""Your own data, no code: `--dataset custom --data.root PATH`.

PATH may be
  * a folder of episode folders of frames (png/jpg/bmp/webp, natural order: 2.png before 10.png),
  * a folder of video files (mp4/gif/webm/avi/mov/mkv), one episode each,
  * a folder of .npy/.npz files, one episode [T, H, W, C] each,
  * a folder of frames (one long sequence),
  * one .npy/.npz array: [N, T, H, W, C] episodes or [T, H, W, C] one long sequence,
  * one HDF5 file (a dataset [N, T, H, W, C] or [T, H, W, C]; key `imgs`, `frames`, `video`... or
    `data_key`), or a video file (one long sequence),
  * a folder with `train`, `val` (or `valid`) and `test` entries, each one of the above
    (e.g. G-SWM's train/val/test.hdf5 or OBJ3D-style trees): then they are the splits.
Otherwise episodes are split in order by `data_split` fractions (default 80/10/10 %, every split
with a positive fraction gets at least one episode). A single long sequence is cut into episodes
of `data_episode_len` frames (default 100); with `data_episode_len` set, longer episodes are cut
too. Frames may be uint8 or float in [0, 1] / [0, 255], RGB, grey or RGBA, channel-last or -first,
and are resized to `data_frame_size` (default: the config's image_size).
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..config import Config
from .clips import ARRAY_SUFFIXES, IMAGE_SUFFIXES, ClipError
from .clipset import ClipDataset, standard_items
from ..config import DataOptions
from .sources import (
    SPLITS,
    ArrayFrames,
    EpisodeSource,
    FrameFolders,
    MultiSource,
    SpanSource,
    VideoFiles,
    canonical_split,
    is_video,
    list_frames,
    natural_key,
    with_cache,
)

HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")
DEFAULT_EPISODE_LEN = 100                         # for a single long sequence
FRAME_KEYS = ("imgs", "frames", "images", "video", "videos", "observations", "obs", "data", "x")


# ---------------------------------------------------------------------------------- arrays
def _open_npy(path: Path, key: Optional[str]) -> Any:
    try:
        if path.suffix.lower() == ".npy":
            return np.load(path, mmap_mode="r")
        with np.load(path) as z:
            keys = list(z.keys())
            if not keys:
                raise ClipError(f"{path}: empty .npz")
            name = key or next((k for k in FRAME_KEYS if k in keys), keys[0])
            if name not in keys:
                raise ClipError(f"{path}: no array {name!r} (has {', '.join(keys)})")
            return z[name]
    except ClipError:
        raise
    except Exception as e:
        raise ClipError(f"{path}: cannot load array ({type(e).__name__}: {e})") from e


def _h5_key(f: Any, path: Path, key: Optional[str]) -> str:
    import h5py
    arrays: dict[str, Any] = {}

    def collect(name: str, obj: Any) -> None:                 # returning a value would stop the walk
        if isinstance(obj, h5py.Dataset):
            arrays[name] = obj
    f.visititems(collect)
    if key:
        if key not in arrays:
            raise ClipError(f"{path}: no dataset {key!r} (has {', '.join(sorted(arrays)) or 'none'})")
        return key
    for name in FRAME_KEYS:
        if name in arrays:
            return name
    frames = [n for n, d in arrays.items() if d.ndim in (4, 5)]
    if len(frames) != 1:
        raise ClipError(f"{path}: cannot tell which dataset holds the frames ({', '.join(sorted(arrays)) or 'none'}); "
                        "set data_key")
    return frames[0]


def _open_h5(path: Path, key: Optional[str]) -> Any:
    import h5py
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ClipError(f"{path}: not a readable HDF5 file ({e})") from e
    return f[_h5_key(f, path, key)]


def array_source(path: Path, opts: DataOptions, size: Optional[int]) -> ArrayFrames:
    """[N, T, H, W, C] -> N episodes; [T, H, W, C] (or [T, H, W]) -> one sequence."""
    opener = functools.partial(_open_h5 if path.suffix.lower() in HDF5_SUFFIXES else _open_npy, path, opts.key)
    shape = tuple(opener().shape)
    if len(shape) == 5:
        spans = [(i, 0, shape[1]) for i in range(shape[0])]
    elif len(shape) in (3, 4):
        spans = [(None, 0, shape[0])]
    else:
        raise ClipError(f"{path}: expected frames [N, T, H, W, C] or [T, H, W, C], got shape {shape}")
    if not shape[0] or not spans[0][2]:
        raise ClipError(f"{path}: holds no frames (shape {shape})")
    return ArrayFrames(opener, path, spans, size=size, resample="bicubic")


# ---------------------------------------------------------------------------------- discovery
def _visible(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if not p.name.startswith(".")), key=lambda p: natural_key(p.name))


def _frames_of(folder: Path) -> list[Path]:
    files = list_frames(folder)
    if not files:
        raise ClipError(f"{folder}: empty episode folder (no {', '.join(IMAGE_SUFFIXES)} files)")
    return files


def open_collection(path: Path, opts: DataOptions, size: Optional[int]) -> tuple[EpisodeSource, bool, str]:
    """Everything at `path` as episodes: (source, is_one_long_sequence, description)."""
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    fmt = opts.format
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in ARRAY_SUFFIXES + HDF5_SUFFIXES and fmt in ("auto", "npy", "hdf5"):
            src = array_source(path, opts, size)
            return src, src.spans[0][0] is None, f"array {path.name}"
        if is_video(path) and fmt in ("auto", "videos"):
            return VideoFiles([path], size, "bicubic"), True, f"video {path.name}"
        raise ClipError(f"{path}: not a dataset file; use a folder, a video, .npy/.npz or .h5/.hdf5")
    entries = _visible(path)
    if not entries:
        raise ClipError(f"{path}: empty folder")
    dirs = [p for p in entries if p.is_dir()]
    files = [p for p in entries if p.is_file()]
    videos = [p for p in files if is_video(p)]
    arrays = [p for p in files if p.suffix.lower() in ARRAY_SUFFIXES + HDF5_SUFFIXES]
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    if dirs and not videos and fmt in ("auto", "videos") and not any(list_frames(d) for d in dirs):
        videos = sorted((p for p in path.rglob("*") if is_video(p) and p.is_file()),
                        key=lambda p: natural_key(str(p.relative_to(path))))     # nested folders of videos
        if videos:
            src = VideoFiles(videos, size, "bicubic", length=opts.episode_len, progress=True)
            return src, False, f"{len(videos)} video files in sub-folders"
    if dirs and fmt in ("auto", "frames"):
        return FrameFolders([_frames_of(d) for d in dirs], size, "bicubic"), False, \
            f"{len(dirs)} episode folders of frames"
    if videos and fmt in ("auto", "videos"):
        src = VideoFiles(videos, size, "bicubic", length=opts.episode_len, progress=True)
        return src, False, f"{len(videos)} video files"
    if arrays and fmt in ("auto", "npy", "hdf5"):
        parts = [array_source(p, opts, size) for p in arrays]
        return MultiSource(parts), False, f"{len(arrays)} array files"
    if images and fmt in ("auto", "frames"):
        return FrameFolders([images], size, "bicubic", names=[str(path)]), True, f"one sequence of {len(images)} frames"
    want = "" if fmt == "auto" else f" of data_format {fmt!r}"
    raise ClipError(f"{path}: no episodes{want} found (expected episode folders of frames, video files, "
                    ".npy/.npz/.hdf5 arrays or image files)")


def cut_episodes(source: EpisodeSource, single: bool, episode_len: Optional[int]) -> EpisodeSource:
    """Cut episodes into pieces of `episode_len` frames (rest dropped; shorter episodes kept)."""
    length = episode_len or (DEFAULT_EPISODE_LEN if single else None)
    if length is None:
        return source
    spans = []
    for e, n in enumerate(source.lengths):
        spans += [(e, s, length) for s in range(0, n - length + 1, length)] if n >= length else [(e, 0, n)]
    return SpanSource(source, spans)


def split_entries(root: Path) -> Optional[dict[str, Path]]:
    """train/val/test entries of a folder (folders, or files train.hdf5, train.npy...), if it has a train one."""
    if not root.is_dir():
        return None
    found: dict[str, Path] = {}
    for split, names in SPLITS.items():
        for name in names:
            candidates = [root / name] + [root / f"{name}{s}" for s in ARRAY_SUFFIXES + HDF5_SUFFIXES]
            hit = next((c for c in candidates if c.exists()), None)
            if hit is not None:
                found[split] = hit
                break
    return found if "train" in found else None


def split_counts(n: int, fractions: tuple[float, float, float]) -> tuple[int, int, int]:
    """Episodes per split, in order; a positive fraction gets at least one episode."""
    def take(f: float) -> int:
        return max(1, round(f * n)) if f > 0 else 0
    n_val, n_test = take(fractions[1]), take(fractions[2])
    rest = n - n_val - n_test
    n_train = rest if abs(sum(fractions) - 1) < 1e-6 else min(rest, take(fractions[0]))
    return n_train, n_val, n_test


def custom_source(root: Path, split: str, opts: DataOptions, size: Optional[int]) -> tuple[EpisodeSource, str]:
    """The episodes of one split and a description of what was found."""
    split = canonical_split(split)
    entries = split_entries(root)
    if entries is not None:
        if split not in entries:
            raise FileNotFoundError(f"{root}: has a train entry but no {' or '.join(SPLITS[split])} "
                                    f"folder or file for the {split} split")
        source, single, what = open_collection(entries[split], opts, size)
        return cut_episodes(source, single, opts.episode_len), f"{what} in {entries[split]}"
    source, single, what = open_collection(root, opts, size)
    source = cut_episodes(source, single, opts.episode_len)
    counts = split_counts(len(source), opts.split)
    k = ("train", "val", "test").index(split)
    if counts[k] <= 0 or min(c for c, f in zip(counts, opts.split) if f > 0) <= 0:
        raise ValueError(f"{root}: the {split} split would be empty: {len(source)} episodes ({what}) with "
                         f"data_split {list(opts.split)} give train/val/test = {'/'.join(map(str, counts))}; "
                         "add episodes, set data_episode_len to cut them shorter, or change data_split")
    first = sum(counts[:k])
    subset = SpanSource(source, [(e, 0, source.lengths[e]) for e in range(first, first + counts[k])])
    return subset, f"{what}, episodes {first}-{first + counts[k] - 1} of {len(source)}"


class Custom:
    title = "custom"

    @classmethod
    def build(cls, config: Config, root: Path, split: str) -> ClipDataset:
        split = canonical_split(split)
        opts = config.data
        source, what = custom_source(root, split, opts, opts.frame_size or config.image_size)
        source = with_cache(source, opts.cache)
        return ClipDataset(source, standard_items(source, config, split), image=not config.is_video,
                           split=split, description=f"custom {split}: {what}")
