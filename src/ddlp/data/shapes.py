"""Shapes: random coloured shapes on a cyan background, drawn on the fly (image models only).

Follows the official recipe (scikit-image `random_shapes`: 2-5 non-overlapping rectangles,
circles, triangles and ellipses of 11-13 px, each channel uniform in 0..200, white background
whose red channel is then zeroed -> cyan) with our own numpy drawing, so scikit-image is not
needed and shapes differ in detail. Unlike upstream, image i of a split is a pure function of
(split seed, i): the validation set is the same on every call.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from ..config import Config
from .sources import canonical_split

SPLIT_SIZES = {"train": 40_000, "val": 2_000, "test": 2_000}
SPLIT_SEEDS = {"train": 1000, "val": 1001, "test": 1002}
KINDS = ("rectangle", "circle", "triangle", "ellipse")


def _shape_mask(kind: str, size: int, rng: np.random.Generator, canvas: int) -> np.ndarray:
    """A filled shape fitting a `size` box at a random place: bool [canvas, canvas]."""
    top, left = rng.integers(0, canvas - size + 1, size=2)
    yy, xx = np.mgrid[0:canvas, 0:canvas].astype(np.float32)
    y, x = yy - top, xx - left                                  # box coordinates
    inside = (y >= 0) & (y < size) & (x >= 0) & (x < size)
    c = (size - 1) / 2
    if kind == "rectangle":
        h, w = rng.integers(max(2, size // 2), size + 1, size=2)
        return inside & (y < h) & (x < w)
    if kind == "circle":
        return inside & ((y - c) ** 2 + (x - c) ** 2 <= (size / 2) ** 2)
    if kind == "triangle":                                      # apex up, base on the bottom row
        half = (y + 1) / size * size / 2
        return inside & (np.abs(x - c) <= half)
    a, b = rng.uniform(size / 4, size / 2, size=2)              # ellipse semi-axes
    return inside & (((y - c) / a) ** 2 + ((x - c) / b) ** 2 <= 1)


def random_shapes(rng: np.random.Generator, canvas: int = 64, min_shapes: int = 2, max_shapes: int = 5,
                  min_size: int = 11, max_size: int = 13, trials: int = 100) -> np.ndarray:
    """One image, uint8 [canvas, canvas, 3]; a shape that finds no free place in `trials` is skipped."""
    img = np.full((canvas, canvas, 3), 255, np.uint8)
    taken = np.zeros((canvas, canvas), bool)
    for _ in range(int(rng.integers(min_shapes, max_shapes + 1))):
        kind = KINDS[int(rng.integers(len(KINDS)))]
        size = int(rng.integers(min_size, max_size + 1))
        for _ in range(trials):
            mask = _shape_mask(kind, size, rng, canvas)
            if not (mask & taken).any():
                img[mask] = rng.integers(0, 201, size=3)
                taken |= mask
                break
    img[..., 0][img[..., 0] == 255] = 0                        # white -> cyan; shapes are <= 200
    return img


class ShapesDataset(Dataset):
    """Items: dict(frames float32 [3, S, S] in [0, 1], index)."""

    def __init__(self, split: str, size: int = 64, n: int | None = None, seed: int | None = None):
        self.split = canonical_split(split)
        self.size, self.n = size, SPLIT_SIZES[self.split] if n is None else n
        self.seed = SPLIT_SEEDS[self.split] if seed is None else seed
        if size < 16:
            raise ValueError(f"Shapes: image_size {size} is too small for 11-13 px shapes")

    def __len__(self) -> int:
        return self.n

    def image(self, index: int) -> np.ndarray:
        return random_shapes(np.random.default_rng([self.seed, index]), canvas=self.size)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not -self.n <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} images")
        x = torch.from_numpy(self.image(index % self.n)).permute(2, 0, 1).float().div_(255)
        return {"frames": x, "index": torch.tensor(index % self.n)}


def build_shapes(config: Config, split: str) -> ShapesDataset:
    if config.is_video:
        raise ValueError("Shapes is an image dataset (no video variant): use it with an image preset "
                         "such as --preset shapes")
    n = config.extra.get("data_num_images")
    return ShapesDataset(split, config.image_size, n=int(n) if n is not None and split == "train" else None)
