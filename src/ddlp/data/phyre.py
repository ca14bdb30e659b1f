"""PHYRE: the published frame folders, and a generator for new ones (needs the optional `phyre` package).

Stored data (`<root>/{train,valid,test}/<episode>/<k>.png`, 128 px) keep two quirks of the
official writer that the published models were trained with: red and blue are swapped (an RGB
image written by a BGR writer) and the 256 -> 128 resize is bilinear. The loader does not undo
the swap; it inverts the frames (x -> 1 - x, white background -> black), as the official loader.

Loader rules (official `PhyreDataset`): the last 30 frames of an episode are idle and dropped;
the rest is cut to 100 frames, and shorter episodes are padded to 100 by repeating their last
frame. Training windows of L frames start at 0..100-L; a window that would run past the real
length is moved back to end there (or starts at 0, with padding, when L exceeds the length).
Evaluation items are the padded 100-frame episodes; image models see every window of one frame.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import ModuleType
from typing import Optional

import numpy as np
from PIL import Image

from ..config import Config
from .clips import ClipError
from .clipset import Items, _table
from ..config import DataOptions
from .sources import EpisodeSource, list_frames
from .trees import FrameTree

IDLE_FRAMES = 30
EPISODE_LEN = 100
# PHYRE's colour table (phyre.vis), indexed by the simulator's observation codes 0..7.
COLOURS = np.array([[255, 255, 255], [0xF3, 0x4F, 0x46], [0x6B, 0xCE, 0xBB], [0x18, 0x77, 0xF2],
                    [0x4B, 0x4A, 0xA4], [0xB9, 0xCA, 0xD2], [0, 0, 0], [0xFC, 0xDF, 0xE3]], dtype=np.uint8)
EXCLUDED_TEMPLATES = (12, 13, 16, 20, 21)


class PhyreMissing(ValueError):
    """The optional `phyre` package is not installed."""


class Phyre(FrameTree):
    title, invert = "PHYRE", True

    @classmethod
    def episode_files(cls, folder: Path, opts: DataOptions) -> list[Path]:
        files = list_frames(folder, "*.png")
        start = opts.start_frame or 0
        kept = files[start:len(files) - IDLE_FRAMES]
        if not kept:
            raise ClipError(f"{folder}: {len(files)} frames; a PHYRE episode loses its last {IDLE_FRAMES} "
                            f"(idle) frames, so it needs at least {start + IDLE_FRAMES + 1}")
        return kept[:opts.episode_len or EPISODE_LEN]

    @classmethod
    def items(cls, source: EpisodeSource, config: Config, split: str, opts: DataOptions) -> Items:
        ep_len = opts.episode_len or EPISODE_LEN
        if config.is_video and split != "train":
            return _table([(e, 0, ep_len) for e in range(len(source))])
        clip = config.timestep_horizon + 1 if config.is_video else 1
        if clip > ep_len:
            raise ValueError(f"PHYRE: training clips of {clip} frames are longer than the {ep_len}-frame episodes")
        rows = []
        for e, real in enumerate(source.lengths):
            for start in range(ep_len - clip + 1):
                if start + clip > real:
                    start = 0 if clip > real else real - clip
                rows.append((e, start, clip))
        return _table(rows)


# ---------------------------------------------------------------------------------- generation
def observation_to_stored(obs: np.ndarray, size: int = 128) -> np.ndarray:
    """A simulator observation (int codes [H, W], y up) -> the uint8 [size, size, 3] array the
    official writer stores: colour table, flipped upright, bilinear resize (an exact 2x2 mean for
    256 -> 128, rounded half up), red and blue swapped."""
    rgb = COLOURS[np.asarray(obs, dtype=np.int64)][::-1]
    h, w = rgb.shape[:2]
    if (h, w) == (2 * size, 2 * size):
        blocks = rgb.reshape(size, 2, size, 2, 3).astype(np.uint16).sum(axis=(1, 3))
        rgb = ((blocks + 2) // 4).astype(np.uint8)
    elif (h, w) != (size, size):
        rgb = np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).resize((size, size), Image.BILINEAR))
    return np.ascontiguousarray(rgb[..., ::-1])


def import_phyre() -> ModuleType:
    try:
        import phyre
    except ImportError:
        raise PhyreMissing(
            "generating PHYRE data needs the optional 'phyre' package, which is not installed: "
            "`pip install phyre` (wheels exist for Python 3.6-3.9 on Linux/macOS; use a separate "
            "environment). Alternatively download the published frames and pass --data.root") from None
    return phyre


def _write_episode(folder: Path, images: np.ndarray, size: int) -> int:
    """All frames of one rollout as <k:05d>.png; the folder appears complete or not at all."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for k, obs in enumerate(images):
        Image.fromarray(observation_to_stored(obs, size)).save(tmp / f"{k:05d}.png")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return len(images)


def generate_phyre(out: str | os.PathLike, train_per_task: int = 2, eval_per_task: int = 1, fold: int = 0,
                   setup: str = "ball_within_template", stride: int = 7, max_tries: int = 510, size: int = 128,
                   seed: Optional[int] = None, progress: bool = True, phyre: Optional[ModuleType] = None
                   ) -> dict[str, int]:
    """Roll out solving actions (from PHYRE's 100k action cache) for the tasks of one fold and
    write `<out>/{train,valid,test}/<episode:05d>/<k:05d>.png`. Templates 12, 13, 16, 20 and 21
    are left out, as in the paper. Returns episodes written per split."""
    from tqdm.auto import tqdm
    phyre = phyre or import_phyre()
    out = Path(out)
    rng = np.random.default_rng(seed)
    folds = dict(zip(("train", "valid", "test"), phyre.get_fold(setup, fold)))
    cache = phyre.get_default_100k_cache("ball")
    counts: dict[str, int] = {}
    for split, task_ids in folds.items():
        tasks = [t for t in task_ids if int(str(t).split(":")[0]) not in EXCLUDED_TEMPLATES]
        per_task = train_per_task if split == "train" else eval_per_task
        sim = phyre.initialize_simulator(tasks, "ball")
        index, episode = [], 0
        for i, task in enumerate(tqdm(tasks, desc=f"PHYRE {split}", disable=not progress)):
            solving = np.asarray(cache.action_array)[np.asarray(cache.load_simulation_states(task)) == 1]
            written = tries = 0
            while written < per_task and tries < max_tries:
                tries += 1
                action = solving[rng.integers(len(solving))] if len(solving) else rng.random(3)
                res = sim.simulate_action(i, action, need_images=True, stride=stride)
                if res.status.is_solved() and not res.status.is_invalid():
                    n = _write_episode(out / split / f"{episode:05d}", np.asarray(res.images), size)
                    index.append({"episode": episode, "task": str(task), "action": [float(a) for a in action],
                                  "frames": n})
                    episode, written = episode + 1, written + 1
        (out / split).mkdir(parents=True, exist_ok=True)
        tmp = out / split / ".index.json.tmp"
        tmp.write_text(json.dumps(index, indent=1))
        os.replace(tmp, out / split / "index.json")
        counts[split] = episode
    return counts
