"""`ddlp data inspect`: what a path holds (episodes, frames, sizes, value range) and a contact sheet.

Two views: the raw files, found the way `--dataset custom` finds them (native frame size); or,
with a dataset name, the items a registered loader yields (after its resizing, inversion and
sampling rules), i.e. what the model will see.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from .custom import cut_episodes, open_collection, split_counts, split_entries
from ..config import DataOptions
from .sources import EpisodeSource


@dataclass
class Summary:
    """What one split (or the whole collection) holds."""
    name: str
    what: str
    episodes: int
    lengths: tuple[int, int, int]                     # min, max, total frames
    sizes: set = field(default_factory=set)           # (H, W) of the sampled frames
    value_range: tuple[float, float, float] = (0.0, 0.0, 0.0)   # min, max, mean in [0, 1]
    notes: list[str] = field(default_factory=list)
    items: bool = False                               # loader view: episodes/lengths describe items

    def lines(self) -> list[str]:
        vmin, vmax, mean = self.value_range
        if self.items:
            return [f"{self.name}: {self.what}", f"  values [{vmin:.3f}, {vmax:.3f}] (mean {mean:.3f})"]
        lo, hi, total = self.lengths
        frames = f"{lo}" if lo == hi else f"{lo}-{hi}"
        size = ", ".join(f"{w}x{h}" for h, w in sorted(self.sizes)) or "?"
        out = [f"{self.name}: {self.what}",
               f"  {self.episodes} episodes, {frames} frames each ({total} frames), frames {size} px, "
               f"values [{vmin:.3f}, {vmax:.3f}] (mean {mean:.3f})"]
        return out + [f"  {n}" for n in self.notes]


def _pick(n: int, k: int) -> list[int]:
    """k indices spread evenly over range(n)."""
    return sorted({int(round(i)) for i in np.linspace(0, n - 1, min(n, k))}) if n else []


def summarize_source(name: str, what: str, source: EpisodeSource, n_episodes: int, n_frames: int
                     ) -> tuple[Summary, list[list[np.ndarray]], list[str]]:
    """Statistics over a sample of episodes, and their frames for the contact sheet."""
    lengths = source.lengths
    s = Summary(name, what, len(source), (min(lengths), max(lengths), sum(lengths)) if lengths else (0, 0, 0))
    rows, labels, lo, hi, means = [], [], 1.0, 0.0, []
    for e in _pick(len(source), n_episodes):
        frames = [source.read(e, t, t + 1)[0] for t in _pick(lengths[e], n_frames)]
        for f in frames:
            s.sizes.add(f.shape[:2])
            lo, hi = min(lo, f.min() / 255), max(hi, f.max() / 255)
            means.append(f.mean() / 255)
        rows.append(frames)
        labels.append(Path(source.name(e)).name or source.name(e))
    s.value_range = (float(lo), float(hi), float(np.mean(means))) if means else (0.0, 0.0, 0.0)
    if len(s.sizes) > 1:
        s.notes.append("frame sizes differ between episodes; loaders resize every frame to the model's image_size")
    if s.sizes and any(h != w for h, w in s.sizes):
        s.notes.append("frames are not square; loaders resize them to squares (aspect ratio not kept)")
    return s, rows, labels


def inspect_files(path: Path, opts: DataOptions, n_episodes: int = 6, n_frames: int = 8
                  ) -> tuple[list[Summary], list[list[np.ndarray]], list[str]]:
    """Raw view: splits if the path has train/val/test entries, else the whole collection."""
    entries = split_entries(path)
    summaries, sheet_rows, sheet_labels = [], [], []
    targets = list(entries.items()) if entries else [("all", path)]
    for split, where in targets:
        source, single, what = open_collection(where, opts, None)
        source = cut_episodes(source, single, opts.episode_len)
        s, rows, labels = summarize_source(split, what, source, n_episodes if not sheet_rows else 2, n_frames)
        if not entries:
            counts = split_counts(len(source), opts.split)
            s.notes.append(f"split by data_split {list(opts.split)}: train/val/test = "
                           f"{'/'.join(map(str, counts))} episodes")
            if min(c for c, f in zip(counts, opts.split) if f > 0) <= 0:
                s.notes.append("a split would be empty: add episodes or change data_split / data_episode_len")
        summaries.append(s)
        sheet_rows += rows
        sheet_labels += [f"{split} {lb}" for lb in labels]
    return summaries, sheet_rows, sheet_labels


def inspect_dataset(dataset_name: str, path: Path, config, n_items: int = 4, n_frames: int = 8
                    ) -> tuple[list[Summary], list[list[np.ndarray]], list[str]]:
    """Loader view: the items of each split of a registered dataset."""
    from .registry import build_dataset
    summaries, sheet_rows, sheet_labels = [], [], []
    for split in ("train", "val", "test"):
        ds = build_dataset(config, split, root=path, name=dataset_name)
        picks = _pick(len(ds), n_items)
        xs = [ds[i]["frames"] for i in picks]
        xs = [x[None] if x.ndim == 3 else x for x in xs]
        shapes = {tuple(x.shape) for x in xs}
        s = Summary(split, f"{len(ds)} items of {', '.join('x'.join(map(str, sh)) for sh in shapes)} "
                    f"({type(ds).__name__})", len(ds), (min(len(x) for x in xs), max(len(x) for x in xs),
                                                         sum(len(x) for x in xs)) if xs else (0, 0, 0))
        s.sizes = {tuple(x.shape[-2:]) for x in xs}
        if xs:
            flat = torch.cat([x.flatten() for x in xs])
            s.value_range = (float(flat.min()), float(flat.max()), float(flat.mean()))
        s.items = True
        summaries.append(s)
        for i, x in zip(picks, xs):
            frames = x[_pick(len(x), n_frames)]
            sheet_rows.append([(f.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for f in frames])
            sheet_labels.append(f"{split} #{i}")
    return summaries, sheet_rows, sheet_labels


def contact_sheet(rows: list[list[np.ndarray]], labels: list[str], tile: int = 96) -> Image.Image:
    """Rows of frames (uint8 [H, W, 3]) as one picture, each tile `tile` px high."""
    from ..viz import grid
    pil_rows = []
    for row in rows:
        tiles = []
        for f in row:
            img = Image.fromarray(np.ascontiguousarray(f))
            w = max(1, round(img.width * tile / img.height))
            tiles.append(img.resize((w, tile), Image.NEAREST if img.height < tile else Image.BILINEAR))
        pil_rows.append(tiles)
    width = max(t.width for r in pil_rows for t in r)   # grid() wants equal tiles: pad narrow ones
    pil_rows = [[_pad(t, width, tile) for t in r] for r in pil_rows]
    return grid(pil_rows, labels=labels)


def _pad(img: Image.Image, width: int, height: int) -> Image.Image:
    if img.size == (width, height):
        return img
    out = Image.new("RGB", (width, height))
    out.paste(img, ((width - img.width) // 2, (height - img.height) // 2))
    return out


def save_sheet(img: Image.Image, out: Path) -> Path:
    from ..storage import atomic_write
    atomic_write(out, lambda p: img.save(p, format="PNG"))
    return out


def default_sheet_path(path: Path, out: Optional[str]) -> Path:
    return Path(out) if out else Path(f"inspect-{path.stem or 'data'}.png")
