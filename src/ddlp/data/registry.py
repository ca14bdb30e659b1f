"""Datasets by name: a new dataset is one builder function plus one `register` line."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from torch.utils.data import Dataset

from ..config import Config

# builder(config, root, split) -> Dataset of dict(frames=[T, 3, H, W] or [3, H, W], ...)
Builder = Callable[[Config, Path, str], Dataset]
_REGISTRY: dict[str, Builder] = {}


def register(name: str):
    def wrap(fn: Builder) -> Builder:
        _REGISTRY[name] = fn
        return fn
    return wrap


def available() -> list[str]:
    return sorted(_REGISTRY)


def build_dataset(config: Config, split: str, root: Optional[str | Path] = None,
                  name: Optional[str] = None) -> Dataset:
    """The `split` ('train', 'val', 'test') of dataset `name` (default: config.ds) under `root`
    (default: config.root). For DDLP the training split yields clips of timestep_horizon + 1
    frames and evaluation splits whole episodes; for DLP every split yields single frames."""
    name = name or config.ds
    if name not in _REGISTRY:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(available())}")
    root = root or config.root
    if root is None:
        raise ValueError(f"dataset {name!r} needs a data folder: pass --data.root DIR")
    return _REGISTRY[name](config, Path(root).expanduser(), split)


@register("balls")
def _balls(config: Config, root: Path, split: str) -> Dataset:
    from .balls import BallsDataset
    if not config.is_video:
        return BallsDataset(root, split, image=True)
    if split == "train":
        return BallsDataset(root, split, clip_len=config.timestep_horizon + 1)
    return BallsDataset(root, split)
