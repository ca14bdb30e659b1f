"""Episode sources: where the frames of each episode live and how to read a range of them.

A source knows `lengths[e]` (frames of episode e) and `read(e, start, stop)`, which returns uint8
frames [stop - start, S, S, 3] (RGB, channel-last) already resized to the source's `size` (None:
native size). Files are opened where they are read, so decoding runs in DataLoader workers;
array files (HDF5, .npy) are opened once per process and kept open.
"""
from __future__ import annotations

import hashlib
import os
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
from PIL import Image

from .clips import IMAGE_SUFFIXES, VIDEO_SUFFIXES, ClipError

RESAMPLE = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
            "box": Image.BOX, "area": Image.BOX, "lanczos": Image.LANCZOS}
SPLITS = {"train": ("train",), "val": ("val", "valid"), "test": ("test",)}


def canonical_split(split: str) -> str:
    """'train', 'val' (alias 'valid', 'validation') or 'test'."""
    s = {"valid": "val", "validation": "val"}.get(split, split)
    if s not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use train, val (or valid) or test")
    return s


def natural_key(name: str) -> list:
    """Sort key that orders embedded numbers by value: frame_2 before frame_10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def to_uint8_rgb(a: Any, source: object, unit_floats: Optional[bool] = None) -> np.ndarray:
    """Frames [T, H, W, C] / [T, C, H, W] / [T, H, W] (uint8, or float in [0, 1] or [0, 255])
    -> uint8 [T, H, W, 3]; grey is repeated, alpha dropped. `unit_floats` says whether float
    frames are in [0, 1] (None: guess from these frames)."""
    a = np.asarray(a)
    if a.ndim == 3:
        a = a[..., None]
    if a.ndim != 4:
        raise ClipError(f"{source}: expected frames [T, H, W, C], got an array of shape {a.shape}")
    if a.shape[-1] not in (1, 3, 4) and a.shape[1] in (1, 3, 4):
        a = a.transpose(0, 2, 3, 1)
    if a.shape[-1] not in (1, 3, 4):
        raise ClipError(f"{source}: cannot tell the channel axis of frames of shape {a.shape}")
    a = a[..., :3] if a.shape[-1] >= 3 else np.repeat(a, 3, axis=-1)
    if a.dtype == np.uint8:
        return np.ascontiguousarray(a)
    if a.dtype == bool or not np.issubdtype(a.dtype, np.number):
        raise ClipError(f"{source}: frames of dtype {a.dtype} are not images")
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if lo < 0 or hi > 255:
        raise ClipError(f"{source}: frame values must lie in [0, 1] or [0, 255], got [{lo:.3g}, {hi:.3g}]")
    unit = hi <= 1 if unit_floats is None else unit_floats
    scale = 255.0 if np.issubdtype(a.dtype, np.floating) and unit else 1.0
    return np.clip(np.rint(a.astype(np.float32) * scale), 0, 255).astype(np.uint8)


def resize_frames(frames: np.ndarray, size: Optional[int], resample: str) -> np.ndarray:
    """uint8 [T, H, W, 3] -> [T, size, size, 3] with a PIL filter (antialiased when shrinking)."""
    if size is None or frames.shape[1:3] == (size, size):
        return frames
    f = RESAMPLE[resample]
    return np.stack([np.asarray(Image.fromarray(x).resize((size, size), f)) for x in frames])


class EpisodeSource:
    """Base class: `lengths`, `read`, `name` (for messages) and `identity` (for the cache)."""
    lengths: list[int]
    size: Optional[int] = None
    resample: str = "bicubic"

    def __len__(self) -> int:
        return len(self.lengths)

    def name(self, e: int) -> str:
        raise NotImplementedError

    def read(self, e: int, start: int, stop: int) -> np.ndarray:
        raise NotImplementedError

    def identity(self, e: int) -> str:
        return f"{self.name(e)}|{self.size}|{self.resample}"

    def __getstate__(self) -> dict:
        # open handles stay in the process that opened them; workers reopen lazily
        return {k: (None if k.startswith("_h") else v) for k, v in self.__dict__.items()}


# ---------------------------------------------------------------------------------- image files
def read_image(path: Path, size: Optional[int], resample: str, expect: Optional[tuple[int, int]] = None,
               ) -> np.ndarray:
    """One frame as uint8 [S, S, 3]. RGB(A) images are resized in their own mode and then lose
    alpha (what torchvision's ToTensor()[:3] after a PIL resize gives); other modes become RGB."""
    try:
        with Image.open(path) as im:
            if expect is not None and im.size != expect:
                raise ClipError(f"{path}: frame of {im.size[0]}x{im.size[1]} px in an episode of "
                                f"{expect[0]}x{expect[1]} px frames")
            im.load()
            if im.mode not in ("RGB", "RGBA"):
                im = im.convert("RGB")
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), RESAMPLE[resample])
            return np.asarray(im)[..., :3]
    except ClipError:
        raise
    except FileNotFoundError:
        raise FileNotFoundError(f"frame file disappeared: {path}") from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for broken files
        raise ClipError(f"{path}: cannot read image ({type(e).__name__}: {e})") from e


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header."""
    try:
        with Image.open(path) as im:
            return im.size
    except Exception as e:
        raise ClipError(f"{path}: cannot read image ({type(e).__name__}: {e})") from e


def list_frames(folder: Path, pattern: str = "*") -> list[Path]:
    """Image files of a folder matching `pattern`, in natural order."""
    files = [p for p in folder.glob(pattern) if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    return sorted(files, key=lambda p: natural_key(p.name))


class FrameFolders(EpisodeSource):
    """Episodes given as lists of image files (one folder of frames per episode)."""

    def __init__(self, episodes: Sequence[Sequence[Path]], size: Optional[int] = None,
                 resample: str = "bicubic", names: Optional[Sequence[str]] = None):
        self.episodes = [list(map(Path, files)) for files in episodes]
        self.lengths = [len(files) for files in self.episodes]
        self.size, self.resample = size, resample
        self.names = list(names) if names is not None else [
            str(files[0].parent) if files else "?" for files in self.episodes]
        self._first: dict[int, tuple[int, int]] = {}

    def name(self, e: int) -> str:
        return self.names[e]

    def read(self, e: int, start: int, stop: int) -> np.ndarray:
        files = self.episodes[e]
        if e not in self._first:                      # every frame must match the episode's first one
            self._first[e] = image_size(files[0])
        frames = [read_image(f, self.size, self.resample, self._first[e]) for f in files[start:stop]]
        return np.stack(frames)

    def identity(self, e: int) -> str:
        files = self.episodes[e]
        stamp = [(str(f), f.stat().st_mtime_ns) for f in (files[0], files[-1])] if files else []
        return f"frames|{stamp}|{len(files)}|{self.size}|{self.resample}"


# ---------------------------------------------------------------------------------- videos
def _video_plugin() -> str:
    try:
        import av  # noqa: F401
        return "pyav"
    except ImportError:
        return "FFMPEG"


def decode_video(path: Path, start: int = 0, stop: Optional[int] = None) -> np.ndarray:
    """Frames [start, stop) of a video file as uint8 [n, H, W, 3]; decoding stops at `stop`."""
    import imageio.v3 as iio
    if not path.is_file():
        raise FileNotFoundError(f"no such video: {path}")
    try:
        if path.suffix.lower() == ".gif":
            frames = iio.imread(path, index=None)
            frames = (frames[None] if frames.ndim == 3 else frames)[start:stop]
        else:
            out = []
            for i, frame in enumerate(iio.imiter(path, plugin=_video_plugin())):
                if stop is not None and i >= stop:
                    break
                if i >= start:
                    out.append(frame)
            frames = np.stack(out) if out else np.zeros((0, 1, 1, 3), np.uint8)
    except Exception as e:  # decoders raise many types; all mean "this file is unusable"
        first = (str(e).strip().splitlines() or [""])[0]
        raise ClipError(f"{path}: cannot decode video ({type(e).__name__}: {first})") from e
    return to_uint8_rgb(frames, path) if len(frames) else frames


def count_video_frames(path: Path) -> int:
    """Number of frames (decodes the file; corrupt files raise ClipError naming them)."""
    if path.suffix.lower() != ".gif" and _video_plugin() == "FFMPEG":
        try:
            import imageio_ffmpeg
            return int(imageio_ffmpeg.count_frames_and_secs(str(path))[0])
        except ImportError:
            pass
        except Exception as e:
            first = (str(e).strip().splitlines() or [""])[0]
            raise ClipError(f"{path}: cannot decode video ({type(e).__name__}: {first})") from e
    return len(decode_video(path))


class VideoFiles(EpisodeSource):
    """One video file per episode. `start_frame` frames are skipped; with `length` every video is
    assumed to hold start_frame + length frames (checked when read) instead of being counted."""

    def __init__(self, paths: Sequence[Path], size: Optional[int] = None, resample: str = "box",
                 start_frame: int = 0, length: Optional[int] = None, progress: bool = False):
        self.paths = [Path(p) for p in paths]
        self.size, self.resample, self.start_frame = size, resample, start_frame
        if length is not None:
            self.lengths = [length] * len(self.paths)
        else:
            from tqdm.auto import tqdm
            counted = [count_video_frames(p) for p in tqdm(self.paths, desc="counting video frames",
                                                           disable=not progress or len(self.paths) < 20)]
            self.lengths = [max(0, n - start_frame) for n in counted]

    def name(self, e: int) -> str:
        return str(self.paths[e])

    def read(self, e: int, start: int, stop: int) -> np.ndarray:
        first = self.start_frame + start
        frames = decode_video(self.paths[e], first, self.start_frame + stop)
        if len(frames) < stop - start:
            has = f"has {first + len(frames)} frames" if len(frames) else f"has at most {first} frames"
            raise ClipError(f"{self.paths[e]}: {has}; needs at least {self.start_frame + stop} "
                            f"(start_frame {self.start_frame} + {stop} frames); "
                            "set data_episode_len to the frames per video")
        return resize_frames(frames, self.size, self.resample)

    def identity(self, e: int) -> str:
        p = self.paths[e]
        return f"video|{p}|{p.stat().st_mtime_ns}|{self.start_frame}|{self.lengths[e]}|{self.size}|{self.resample}"


# ---------------------------------------------------------------------------------- arrays
Span = tuple[Optional[int], int, int]        # (index on the episode axis or None, first frame, frames)


class ArrayFrames(EpisodeSource):
    """Episodes as spans of an array: [N, T, ...] (one episode per row) or [F, ...] (spans of one
    long sequence). `opener()` returns the array (a memory map or an HDF5 dataset) and is called
    once per process."""

    def __init__(self, opener: Callable[[], Any], path: Path, spans: Sequence[Span], size: Optional[int] = None,
                 resample: str = "bicubic", label: str = ""):
        self.opener, self.path, self.spans = opener, Path(path), list(spans)
        self.lengths = [n for _, _, n in self.spans]
        self.size, self.resample, self.label = size, resample, label
        self._handle: Any = None
        self._handle_pid = -1
        # Whether float frames are in [0, 1] is decided once, from the first episode, so that a
        # dark clip of a [0, 255] array is not mistaken for a [0, 1] one.
        self.unit_floats: Optional[bool] = None
        if self.spans and np.issubdtype(np.dtype(self._array().dtype), np.floating):
            self.unit_floats = float(np.max(self._raw(0, 0, min(self.lengths[0], 50)))) <= 1

    def _array(self) -> Any:
        if self._handle is None or self._handle_pid != os.getpid():
            self._handle, self._handle_pid = self.opener(), os.getpid()
        return self._handle

    def name(self, e: int) -> str:
        idx, first, n = self.spans[e]
        where = f"episode {idx}" if idx is not None else f"frames {first}-{first + n - 1}"
        return f"{self.path}{self.label} ({where})"

    def _raw(self, e: int, start: int, stop: int) -> np.ndarray:
        idx, first, _ = self.spans[e]
        a = self._array()
        return a[idx, first + start:first + stop] if idx is not None else a[first + start:first + stop]

    def read(self, e: int, start: int, stop: int) -> np.ndarray:
        raw = to_uint8_rgb(self._raw(e, start, stop), self.path, self.unit_floats)
        return resize_frames(raw, self.size, self.resample)

    def identity(self, e: int) -> str:
        stamp = self.path.stat().st_mtime_ns
        return f"array|{self.path}|{stamp}|{self.label}|{self.spans[e]}|{self.size}|{self.resample}"


# ---------------------------------------------------------------------------------- composition
class SpanSource(EpisodeSource):
    """Episodes that are spans (inner episode, first frame, frames) of another source: cutting a
    long sequence into episodes, or taking a subset of episodes for a split."""

    def __init__(self, inner: EpisodeSource, spans: Sequence[tuple[int, int, int]]):
        self.inner, self.spans = inner, [tuple(int(v) for v in s) for s in spans]
        self.lengths = [n for _, _, n in self.spans]
        self.size, self.resample = inner.size, inner.resample

    def name(self, e: int) -> str:
        ie, first, n = self.spans[e]
        whole = first == 0 and n == self.inner.lengths[ie]
        return self.inner.name(ie) + ("" if whole else f" [frames {first}-{first + n - 1}]")

    def read(self, e: int, start: int, stop: int) -> np.ndarray:
        ie, first, _ = self.spans[e]
        return self.inner.read(ie, first + start, first + stop)

    def identity(self, e: int) -> str:
        return f"{self.inner.identity(self.spans[e][0])}|{self.spans[e]}"


class MultiSource(EpisodeSource):
    """The episodes of several sources, one after the other."""

    def __init__(self, parts: Sequence[EpisodeSource]):
        self.parts = list(parts)
        self.index = [(k, e) for k, p in enumerate(self.parts) for e in range(len(p))]
        self.lengths = [p.lengths[e] for k, p in enumerate(self.parts) for e in range(len(p))]
        self.size = self.parts[0].size if self.parts else None
        self.resample = self.parts[0].resample if self.parts else "bicubic"

    def name(self, e: int) -> str:
        k, i = self.index[e]
        return self.parts[k].name(i)

    def read(self, e: int, start: int, stop: int) -> np.ndarray:
        k, i = self.index[e]
        return self.parts[k].read(i, start, stop)

    def identity(self, e: int) -> str:
        k, i = self.index[e]
        return self.parts[k].identity(i)


# ---------------------------------------------------------------------------------- cache
class CachedSource(EpisodeSource):
    """Decode each episode once (whole, resized) into `folder/<hash>.npy`; later reads memory-map it.

    Writes are atomic (temp file + rename), so several DataLoader workers may fill the cache at once."""

    def __init__(self, inner: EpisodeSource, folder: str | os.PathLike, keep_open: int = 64):
        self.inner, self.folder, self.keep_open = inner, Path(folder).expanduser(), keep_open
        self.lengths, self.size, self.resample = inner.lengths, inner.size, inner.resample
        self._hmaps: OrderedDict[int, np.ndarray] = OrderedDict()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"data_cache: cannot create the cache folder {self.folder}: {e.strerror}") from None

    def name(self, e: int) -> str:
        return self.inner.name(e)

    def identity(self, e: int) -> str:
        return self.inner.identity(e)

    def cache_file(self, e: int) -> Path:
        return self.folder / (hashlib.sha1(self.identity(e).encode()).hexdigest()[:20] + ".npy")

    def _episode(self, e: int) -> np.ndarray:
        if e in self._hmaps:
            self._hmaps.move_to_end(e)
            return self._hmaps[e]
        path = self.cache_file(e)
        if not path.is_file():
            frames = self.inner.read(e, 0, self.lengths[e])
            tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npy")
            np.save(tmp, frames)
            os.replace(tmp, path)
        arr = np.load(path, mmap_mode="r")
        self._hmaps[e] = arr
        if len(self._hmaps) > self.keep_open:
            self._hmaps.popitem(last=False)
        return arr

    def read(self, e: int, start: int, stop: int) -> np.ndarray:
        return np.array(self._episode(e)[start:stop])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_hmaps": OrderedDict()}


def with_cache(source: EpisodeSource, folder: Optional[str]) -> EpisodeSource:
    return CachedSource(source, folder) if folder else source


def is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_SUFFIXES
