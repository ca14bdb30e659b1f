"""Data options that are not model hyper-parameters: read from `config.extra`, set with `--set KEY=VALUE`.

    data_format      custom data: auto | frames | videos | npy | hdf5            (default auto)
    data_frame_size  side of the square frames the loader produces             (default: the dataset's own)
    data_episode_len frames per episode: cuts a single long sequence into episodes, caps longer
                     ones, and is the assumed length of videos (CLEVRER: 100, PHYRE: 100, Traffic
                     evaluation episodes: 50)
    data_split       custom data without train/val/test folders: fractions of episodes, in
                     order, for train, val and test                            (default [0.8, 0.1, 0.1])
    data_cache       a folder for decoded, resized episodes (uint8 .npy, memory-mapped on reuse)
    data_key         the HDF5 dataset / .npz array holding the frames           (default: guessed)
    data_start_frame frames skipped at the start of every episode              (CLEVRER videos: 18)
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Optional

FORMATS = ("auto", "frames", "videos", "npy", "hdf5")


@dataclass(frozen=True)
class DataOptions:
    format: str = "auto"
    frame_size: Optional[int] = None
    episode_len: Optional[int] = None
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    cache: Optional[str] = None
    key: Optional[str] = None
    start_frame: Optional[int] = None

    @classmethod
    def from_extra(cls, extra: dict[str, Any]) -> "DataOptions":
        """Options from a config's `extra` dict (keys `data_<field>`), checked with clear messages."""
        values = {f.name: extra[f"data_{f.name}"] for f in fields(cls) if extra.get(f"data_{f.name}") is not None}
        for name in ("frame_size", "episode_len"):
            v = values.get(name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"data_{name} must be a positive integer, got {v!r}")
        start = values.get("start_frame")
        if start is not None and (isinstance(start, bool) or not isinstance(start, int) or start < 0):
            raise ValueError(f"data_start_frame must be an integer >= 0, got {start!r}")
        if values.get("format", "auto") not in FORMATS:
            raise ValueError(f"data_format must be one of {', '.join(FORMATS)}, got {values['format']!r}")
        if "split" in values:
            values["split"] = _fractions(values["split"])
        for name in ("cache", "key"):
            if name in values:
                values[name] = str(values[name])
        return cls(**values)


def _fractions(value: Any) -> tuple[float, float, float]:
    ok = isinstance(value, (list, tuple)) and len(value) == 3 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in value)
    if not ok or not 0 < sum(value) <= 1 + 1e-9:
        raise ValueError(f"data_split must be three fractions >= 0 for train, val and test with a sum in "
                         f"(0, 1], e.g. [0.8, 0.1, 0.1]; got {value!r}")
    return tuple(float(v) for v in value)
