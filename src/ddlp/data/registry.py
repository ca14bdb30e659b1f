"""Datasets by name: a new dataset is one small class (or builder function) plus one `register` line.

    register("mine", MyTree)            # a class with build(config, root, split), e.g. a trees.FrameTree
    @register("other")                  # or a function (config, root, split) -> Dataset
    def _other(config, root, split): ...

Every builder gets the split ('train', 'val'/'valid', 'test') and the data root: `--data.root`
when given, else the config's `root` (presets use `data/<ds>`). DDLP (video) configs get clips of
timestep_horizon + 1 frames for training and whole episodes for evaluation; DLP (image) configs
get single frames [3, H, W] in every split. Options that are not model hyper-parameters
(`data_episode_len`, `data_split`, `data_cache`, ...) are read as `config.data` (config.DataOptions).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

from torch.utils.data import Dataset

from ..config import Config

# builder(config, root, split) -> Dataset of dict(frames=[T, 3, H, W] or [3, H, W], ...)
Builder = Callable[[Config, Path, str], Dataset]
_REGISTRY: dict[str, Builder] = {}
NEEDS_NO_ROOT = {"shapes"}                       # generated on the fly


def register(name: str, target: Any = None):
    """Register a builder function or a class with a `build(config, root, split)` classmethod.
    Usable as `register(name, Class)` or as a decorator `@register(name)`."""
    def add(obj: Any) -> Any:
        _REGISTRY[name] = obj.build if isinstance(obj, type) else obj
        return obj
    return add(target) if target is not None else add


def available() -> list[str]:
    return sorted(_REGISTRY)


def resolve_root(config: Config, name: str, root: Optional[str | Path] = None) -> Path:
    """The data root: the explicit one, else the config's (presets: data/<ds>)."""
    root = root or config.root
    if root is None:
        if name in NEEDS_NO_ROOT:
            return Path(".")
        raise ValueError(f"dataset {name!r} needs a data folder: pass --data.root DIR")
    return Path(root).expanduser()


def build_dataset(config: Config, split: str, root: Optional[str | Path] = None,
                  name: Optional[str] = None) -> Dataset:
    """The `split` ('train', 'val', 'test') of dataset `name` (default: config.ds) under `root`
    (default: config.root). For DDLP the training split yields clips of timestep_horizon + 1
    frames and evaluation splits whole episodes; for DLP every split yields single frames."""
    name = name or config.ds
    if name not in _REGISTRY:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(available())}")
    return _REGISTRY[name](config, resolve_root(config, name, root), split)


@register("balls")
def _balls(config: Config, root: Path, split: str) -> Dataset:
    from .balls import BallsDataset
    if not config.is_video:
        return BallsDataset(root, split, image=True)
    if split == "train":
        return BallsDataset(root, split, clip_len=config.timestep_horizon + 1)
    return BallsDataset(root, split)


@register("shapes")
def _shapes(config: Config, root: Path, split: str) -> Dataset:
    from .shapes import build_shapes
    return build_shapes(config, split)


def _lazy(module: str, cls: str) -> Builder:
    """Import the loader module only when its dataset is built (keeps `import ddlp` light)."""
    def build(config: Config, root: Path, split: str) -> Dataset:
        import importlib
        return getattr(importlib.import_module(f"{__package__}.{module}"), cls).build(config, root, split)
    return build


register("obj3d", _lazy("trees", "Obj3D"))
register("obj3d128", _lazy("trees", "Obj3D128"))
register("clevrer", _lazy("clevrer", "Clevrer"))
register("phyre", _lazy("phyre", "Phyre"))
register("traffic", _lazy("traffic", "Traffic"))
register("custom", _lazy("custom", "Custom"))
