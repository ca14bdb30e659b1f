"""Balls-Interaction (the G-SWM benchmark): an independent simulator, renderer, HDF5 writer and loader.

Conventions (spec 05-datasets.md, section 1):

* Stored ``positions`` are ball centres ``(x, y)`` in pixels with x = column, y = row and the
  origin at the top-left *edge* of the image, so ``positions / 64`` is the edge-normalised centre.
  Velocities are in px/frame; ``sizes`` holds the half-size 8.0 ("radius" for collisions and walls).
* Rendering reproduces the geometry of G-SWM's warped ``circle16`` sprite with an exact
  area-coverage disc of radius 7.53 px centred at ``(x - 0.47, y - 0.47)`` in *pixel-centre*
  coordinates (pixel k spans [k - 0.5, k + 0.5]); balls are composited in index order on a black
  float canvas and converted to uint8 by truncation.
* The loader returns ``positions_px`` exactly as stored, and ``positions`` in the DDLP particle
  convention ``(row, col)`` in [-1, 1], where -1/+1 are the centres of the first/last pixel
  (``align_corners=True``): pixel-centre index ``pos_px - 0.5`` mapped by ``k / (S - 1) * 2 - 1``.
  The 0.03 px the renderer adds on top of the exact 0.5 edge-to-centre shift is a sprite
  artefact and is not "corrected" here.
* Randomness uses numpy's legacy ``RandomState`` with the G-SWM call order, so the trajectories of
  the official data can be regenerated from the split seeds (train 7, val 8, test 9).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

CANVAS = 64                       # image and camera size, px
N_BALLS = 3
SEQLEN = 100
RADIUS = 8.0                      # half-size used by the physics (walls, collisions) and stored in `sizes`
SPEED = 3.0                       # initial speed of every ball, px/frame
SUBSTEPS = 10                     # physics updates per frame
EPS = 1.0 / SUBSTEPS
MAX_ATTEMPTS = 1000               # placement tries per ball before giving up
COLOURS = {"blue": (0, 0, 255), "red": (255, 0, 0), "yellow": (255, 255, 0),
           "fuchsia": (255, 0, 255), "aqua": (0, 255, 255)}
SPLIT_SEEDS = {"train": 7, "val": 8, "test": 9}
FULL_SPLITS = {"train": 5000, "val": 200, "test": 200}
# Equivalent disc of the affinely warped 17x17 sprite (radius 8 sprite px scaled by 16/17).
RENDER_RADIUS = 7.53
RENDER_SHIFT = 0.47               # disc centre = stored position - shift, in pixel-centre coordinates
KEYS = ("imgs", "layers", "positions", "velocities", "masses", "sizes", "ids", "present",
        "colors", "shapes", "in_camera")          # HDF5 datasets, in creation order
LOADER_KEYS = ("imgs", "positions", "sizes", "ids", "in_camera")
_CHUNK = 8                        # episodes simulated/rendered together: amortises the per-step overhead


# ----------------------------------------------------------------------------------------------
# Physics
# ----------------------------------------------------------------------------------------------

def _draw_initial(rng: np.random.RandomState, n_balls: int, speed: float
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Colours [O, 3] in [0, 1], positions [O, 2] and velocities [O, 2], in G-SWM's draw order.

    G-SWM also calls ``choice`` on the one-element mass, layer, size and shape lists; a choice
    among one element draws no random numbers, so those calls are omitted without changing the
    stream.
    """
    names = rng.choice(list(COLOURS), n_balls)                 # with replacement
    colours = np.array([COLOURS[str(n)] for n in names], dtype=np.float64) / 255.0
    vel = rng.randn(n_balls, 2)
    vel = vel / np.linalg.norm(vel, axis=1, keepdims=True) * speed
    pos = np.zeros((n_balls, 2))
    for k in range(n_balls):
        for _ in range(MAX_ATTEMPTS):
            p = rng.uniform(low=RADIUS, high=CANVAS - RADIUS, size=2)
            if np.all(((p - pos[:k]) ** 2).sum(-1) >= (2 * RADIUS) ** 2):
                break
        else:
            raise RuntimeError(f"could not place ball {k} without overlap in {MAX_ATTEMPTS} attempts")
        pos[k] = p
    return colours, pos, vel


def simulate(positions: np.ndarray, velocities: np.ndarray, seqlen: int = SEQLEN
             ) -> tuple[np.ndarray, np.ndarray]:
    """Roll out initial states [E, O, 2] -> (positions, velocities) [E, T, O, 2]; frame 0 = input.

    Batched over episodes E because the per-sub-step Python overhead, not arithmetic, dominates;
    every operation is element-wise per episode, so a batch gives bit-identical results to
    episodes simulated one by one. Collisions are handled pair by pair (i = 0..O-1, j < i) with
    velocities updated by earlier pairs, exactly as in G-SWM.
    """
    pos = np.asarray(positions, dtype=np.float64)
    vel = np.asarray(velocities, dtype=np.float64)
    n_obj = pos.shape[1]
    out_pos = np.empty((pos.shape[0], seqlen, n_obj, 2))
    out_vel = np.empty_like(out_pos)
    out_pos[:, 0], out_vel[:, 0] = pos, vel
    pairs = [(i, j) for i in range(n_obj) for j in range(i)]
    for t in range(1, seqlen):
        for _ in range(SUBSTEPS):
            nxt = pos + EPS * vel
            vel = np.where(nxt - RADIUS < 0, np.abs(vel), vel)       # np.where copies: no aliasing
            vel = np.where(nxt + RADIUS > CANVAS, -np.abs(vel), vel)
            nxt = pos + EPS * vel
            for i, j in pairs:
                d = nxt[:, i] - nxt[:, j]                              # [E, 2]
                dist2 = d[:, 0] ** 2 + d[:, 1] ** 2
                hit = dist2 < (2 * RADIUS) ** 2
                if not hit.any():
                    continue
                n = d[hit] / np.sqrt(dist2[hit])[:, None]
                vi, vj = vel[hit, i], vel[hit, j]
                ni = n[:, 0] * vi[:, 0] + n[:, 1] * vi[:, 1]
                nj = n[:, 0] * vj[:, 0] + n[:, 1] * vj[:, 1]
                # Equal unit masses: 2 m_j / (m_i + m_j) = 1, the normal components are exchanged.
                vel[hit, i] = vi + n * (nj - ni)[:, None]
                vel[hit, j] = vj + n * (ni - nj)[:, None]
            pos = pos + EPS * vel
        out_pos[:, t], out_vel[:, t] = pos, vel
    return out_pos, out_vel


def simulate_episode(rng: np.random.RandomState, seqlen: int = SEQLEN, *, n_balls: int = N_BALLS,
                     speed: float = SPEED) -> dict[str, np.ndarray]:
    """One episode's trajectory: ``positions``/``velocities`` [T, O, 2] (x, y) and ``colors`` [O, 3]."""
    colours, pos, vel = _draw_initial(rng, n_balls, speed)
    positions, velocities = simulate(pos[None], vel[None], seqlen)
    return {"positions": positions[0], "velocities": velocities[0], "colors": colours}


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------

def _quadrant_area(x: np.ndarray, y: np.ndarray, r: float) -> np.ndarray:
    """Area of the origin-centred disc of radius r inside {u <= x, v <= y} (broadcasting).

    Closed form, so pixel coverage is exact without supersampling:
    S(t) = (t sqrt(r^2 - t^2) + r^2 asin(t / r)) / 2 is an antiderivative of the half-chord, the
    part left of x is 2 S(x) + pi r^2 / 2, and Q below is the cap beyond |y| left of x.
    """
    def s(t):
        return 0.5 * (t * np.sqrt(np.maximum(r * r - t * t, 0.0)) + r * r * np.arcsin(t / r))

    x = np.clip(x, -r, r)
    a = np.minimum(np.abs(y), r)
    half = np.sqrt(r * r - a * a)                       # half-chord at |y|
    m = np.clip(x, -half, half)
    cap = s(m) + s(half) - a * (m + half)
    return np.where(y >= 0, 2 * s(x) + 0.5 * np.pi * r * r - cap, cap)


def render(positions: np.ndarray, colors: np.ndarray, size: int = CANVAS
           ) -> tuple[np.ndarray, np.ndarray]:
    """Frames for ball centres [..., O, 2] (x, y) px and colours [..., O, 3] (broadcast) in [0, 1].

    Returns uint8 images [..., size, size, 3] and ``in_camera`` [..., O] (drawing the ball changed
    the frame). Each ball touches at most a P x P pixel patch; coverage is computed and composited
    only there, vectorised over all frames.
    """
    positions = np.asarray(positions, dtype=np.float64)
    lead, n_obj = positions.shape[:-2], positions.shape[-2]
    pos = positions.reshape(-1, n_obj, 2)
    col = np.broadcast_to(colors, positions.shape[:-1] + (3,)).reshape(-1, n_obj, 3)
    n_frames = pos.shape[0]
    patch = min(int(np.floor(2 * RENDER_RADIUS)) + 2, size)     # cells a disc can touch per axis
    steps = np.arange(patch + 1)
    # Flat pixel indices: one index array per gather/scatter is much faster than three.
    canvas = np.zeros((n_frames * size * size, 3))                   # lazily zeroed; only patches are touched
    imgs = np.zeros((n_frames * size * size, 3), dtype=np.uint8)
    in_camera = np.zeros((n_frames, n_obj), dtype=bool)
    pixels = []
    for k in range(n_obj):
        # Disc centre in pixel-centre coordinates; first row/column of its patch, kept on canvas
        # (a disc partly outside still fits: its visible part spans at most `patch` cells).
        cx, cy = pos[:, k, 0] - RENDER_SHIFT, pos[:, k, 1] - RENDER_SHIFT
        c0 = np.clip(np.floor(cx - RENDER_RADIUS + 0.5), 0, size - patch).astype(int)
        r0 = np.clip(np.floor(cy - RENDER_RADIUS + 0.5), 0, size - patch).astype(int)
        u = (c0[:, None] + steps - 0.5 - cx[:, None])[:, None, :]   # cell edges relative to centre
        v = (r0[:, None] + steps - 0.5 - cy[:, None])[:, :, None]
        area = _quadrant_area(u, v, RENDER_RADIUS)                   # [F, P+1, P+1]
        strip = area[:, :, 1:] - area[:, :, :-1]                     # column differences first so
        alpha = strip[:, 1:] - strip[:, :-1]                         # empty cells come out exactly 0
        # Differencing areas of ~180 px^2 leaves ~1e-13 noise; snap so covered/empty cells are exact.
        alpha = np.where(alpha < 1e-9, 0.0, np.where(alpha > 1 - 1e-9, 1.0, alpha))[..., None]
        rows = (np.arange(n_frames)[:, None] * size + r0[:, None] + steps[:-1])[:, :, None]
        idx = rows * size + (c0[:, None] + steps[:-1])[:, None, :]  # [F, P, P]
        old = canvas[idx]                                            # [F, P, P, 3]
        new = old * (1 - alpha) + col[:, k, None, None, :] * alpha
        canvas[idx] = new
        in_camera[:, k] = (new != old).any(axis=(1, 2, 3))
        pixels.append(idx)
    for idx in pixels:                                               # final values of touched pixels
        imgs[idx] = (canvas[idx] * 255).astype(np.uint8)             # truncation, as G-SWM
    return imgs.reshape(lead + (size, size, 3)), in_camera.reshape(lead + (n_obj,))


# ----------------------------------------------------------------------------------------------
# Episodes, splits and files
# ----------------------------------------------------------------------------------------------

def episode_seeds(n_episodes: int, split_seed: int) -> np.ndarray:
    """Per-episode seeds: G-SWM draws them all from one master RandomState(split_seed)."""
    return np.random.RandomState(split_seed).randint(0, 2 ** 32 - 1, size=n_episodes)


def _track_ids(in_camera: np.ndarray) -> np.ndarray:
    """Ids [E, T, O]: a fresh id (1, 2, ... in time-then-object order) each time a ball enters view."""
    prev = np.zeros_like(in_camera[:, :1])
    starts = in_camera & ~np.concatenate([prev, in_camera[:, :-1]], axis=1)
    ids = np.zeros(in_camera.shape)
    for e in range(in_camera.shape[0]):
        ids[e][starts[e]] = np.arange(1, starts[e].sum() + 1)        # row-major = time, then object
    return np.maximum.accumulate(ids, axis=1) * in_camera            # ids only grow within an episode


def generate_episodes(seeds: np.ndarray, seqlen: int = SEQLEN) -> dict[str, np.ndarray]:
    """All §1.2 arrays for episodes with the given seeds, keyed and typed as in the HDF5 files."""
    draws = [_draw_initial(np.random.RandomState(s), N_BALLS, SPEED) for s in seeds]
    colours = np.stack([d[0] for d in draws])
    positions, velocities = simulate(np.stack([d[1] for d in draws]), np.stack([d[2] for d in draws]),
                                     seqlen)
    imgs, visible = render(positions, colours[:, None])
    in_camera = visible.astype(np.float64)
    shape = positions.shape[:3]                                      # [E, T, O]
    return {
        "imgs": imgs,
        "layers": np.zeros(shape),
        "positions": positions * in_camera[..., None],
        "velocities": velocities,
        "masses": np.ones(shape),
        "sizes": RADIUS * in_camera,
        "ids": _track_ids(visible),
        "present": np.ones(shape),
        "colors": np.repeat(colours[:, None], seqlen, axis=1),
        "shapes": np.zeros(shape),                                   # sprite 0 = circle16
        "in_camera": in_camera,
    }


def generate_split(n_episodes: int, split_seed: int, seqlen: int = SEQLEN) -> dict[str, np.ndarray]:
    """A whole split in memory (use `write_balls` for large splits: it streams to disk)."""
    return generate_episodes(episode_seeds(n_episodes, split_seed), seqlen)


def _write_split(path: Path, n_episodes: int, split_seed: int, seqlen: int, progress: bool) -> None:
    """Stream one split to `path` through a temporary file, so `path` is complete or absent."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    seeds = episode_seeds(n_episodes, split_seed)
    try:
        with h5py.File(tmp, "w") as f, tqdm(total=n_episodes, desc=f"balls {path.stem}",
                                            unit="ep", disable=not progress) as bar:
            for start in range(0, n_episodes, _CHUNK):
                chunk = generate_episodes(seeds[start:start + _CHUNK], seqlen)
                for k in KEYS:
                    if start == 0:                                   # contiguous, uncompressed, in order
                        f.create_dataset(k, shape=(n_episodes,) + chunk[k].shape[1:], dtype=chunk[k].dtype)
                    f[k][start:start + len(chunk[k])] = chunk[k]
                bar.update(len(chunk["imgs"]))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_balls(out_dir: str | os.PathLike, episodes: dict[str, int] | None = None,
                seqlen: int = SEQLEN, progress: bool = True) -> Path:
    """Write ``<out_dir>/{split}.hdf5`` for each split in `episodes` (default 5000/200/200) and
    ``version.txt``; returns `out_dir`. Files readable by this loader and the G-SWM/DDLP loaders."""
    episodes = dict(FULL_SPLITS if episodes is None else episodes)
    unknown = sorted(set(episodes) - set(SPLIT_SEEDS))
    if unknown:
        raise ValueError(f"unknown Balls split(s) {unknown}; expected some of {list(SPLIT_SEEDS)}")
    bad = {s: n for s, n in episodes.items() if n < 1}
    if bad or seqlen < 1:
        raise ValueError(f"need at least one episode per split and seqlen >= 1, got {episodes}, seqlen={seqlen}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for split, n in episodes.items():
        _write_split(out / f"{split}.hdf5", n, SPLIT_SEEDS[split], seqlen, progress)
    (out / "version.txt").write_text(time.strftime("%Y-%m-%d %H:%M:%S") + "\n")
    return out


# ----------------------------------------------------------------------------------------------
# Loader
# ----------------------------------------------------------------------------------------------

_SPLIT_FILES = {"train": ("train",), "val": ("val", "valid"), "valid": ("val", "valid"), "test": ("test",)}


def _split_file(root: str | os.PathLike, split: str) -> Path:
    """`<root>/<split>.hdf5`, also under a `BALLS_INTERACTION` subfolder and with val/valid aliased."""
    root = Path(root)
    if split not in _SPLIT_FILES:
        raise ValueError(f"unknown Balls split {split!r}; expected one of {list(_SPLIT_FILES)}")
    if root.is_file():
        raise ValueError(f"{root} is a file; the Balls dataset root is the folder that holds train.hdf5, "
                         f"val.hdf5 and test.hdf5 (here perhaps {root.parent}). To train on the frames of "
                         f"this one file, use --dataset custom --data.root {root}")
    if not root.is_dir():
        raise FileNotFoundError(f"Balls dataset folder not found: {root}")
    candidates = [folder / f"{name}.hdf5" for folder in (root, root / "BALLS_INTERACTION")
                  for name in _SPLIT_FILES[split]]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"Balls split {split!r} not found; looked for "
                            + ", ".join(str(p) for p in candidates))


def _check_file(path: Path) -> tuple[int, int, int]:
    """Validate the layout once, up front; returns (episodes, frames per episode, image size)."""
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise ValueError(f"{path} is not a readable HDF5 file (corrupt or another format): {err}") from err
    with f:
        missing = [k for k in LOADER_KEYS if not isinstance(f.get(k), h5py.Dataset)]
        if missing:
            raise ValueError(f"{path} lacks the Balls dataset keys {missing} (found {sorted(f.keys())})")
        imgs = f["imgs"]
        if imgs.ndim != 5 or imgs.shape[2:] != (CANVAS, CANVAS, 3) or imgs.dtype != np.uint8:
            raise ValueError(f"{path}: 'imgs' is {imgs.dtype} {imgs.shape}, expected uint8 "
                             f"[episodes, frames, {CANVAS}, {CANVAS}, 3]")
        n, t = imgs.shape[:2]
        n_obj = f["positions"].shape[2] if f["positions"].ndim == 4 else -1
        expected = {"positions": (n, t, n_obj, 2), "sizes": (n, t, n_obj), "ids": (n, t, n_obj),
                    "in_camera": (n, t, n_obj)}
        wrong = {k: f[k].shape for k, s in expected.items() if f[k].shape != s or n_obj < 0}
        if wrong:
            raise ValueError(f"{path}: arrays do not fit 'imgs' {imgs.shape}: {wrong}; expected "
                             "positions [N, T, O, 2] and sizes/ids/in_camera [N, T, O]")
        if n == 0 or t == 0:
            raise ValueError(f"{path} holds an empty split ('imgs' shape {imgs.shape})")
        return n, t, imgs.shape[2]


class BallsDataset(Dataset):
    """Balls-Interaction clips from ``<root>/<split>.hdf5`` (our files or the G-SWM downloads).

    * ``train``: every window of `clip_len` consecutive frames (stride 1) of every episode,
      item i = (episode i // W, first frame i % W) with W = T - clip_len + 1; clip_len None = T.
    * ``val``/``valid``/``test``: one item per whole episode (callers slice what they need);
      `clip_len`, if given, only has to fit in the episodes.
    * ``image=True``: every frame of every episode as a single image (any split).

    Items are dicts: ``frames`` float32 [L, 3, 64, 64] in [0, 1]; ``positions`` float32 [L, O, 2]
    (row, col) in [-1, 1] (align_corners); ``positions_px`` float64 [L, O, 2] stored (x, y) px;
    ``in_camera``, ``ids``, ``sizes`` float64 [L, O]. With ``image=True`` the L axis is dropped.
    The HDF5 file is opened on first access in each process and kept open (h5py handles cannot be
    pickled or shared across a fork), so DataLoader workers each get their own handle.
    """

    def __init__(self, root: str | os.PathLike, split: str, clip_len: int | None = None,
                 image: bool = False) -> None:
        self.path = _split_file(root, split)
        self.n_episodes, self.episode_len, self.image_size = _check_file(self.path)
        if clip_len is not None and not 1 <= clip_len <= self.episode_len:
            raise ValueError(f"clip_len={clip_len} does not fit the {self.episode_len}-frame episodes "
                             f"of {self.path}")
        if image and clip_len not in (None, 1):
            raise ValueError(f"image=True yields single frames; got clip_len={clip_len}")
        self.image = image
        if image:
            self.clip_len, self.windows = 1, self.episode_len
        elif split == "train":
            self.clip_len = clip_len or self.episode_len
            self.windows = self.episode_len - self.clip_len + 1
        else:
            self.clip_len, self.windows = self.episode_len, 1
        self._h5: h5py.File | None = None
        self._pid = -1

    def __len__(self) -> int:
        return self.n_episodes * self.windows

    def _file(self) -> h5py.File:
        if self._h5 is None or self._pid != os.getpid():
            self._h5, self._pid = h5py.File(self.path, "r"), os.getpid()
        return self._h5

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_h5": None, "_pid": -1}

    def close(self) -> None:
        """Release the file handle of this process (it is reopened on the next access)."""
        if self._h5 is not None and self._pid == os.getpid():
            self._h5.close()
        self._h5 = None

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        episode, start = divmod(index % len(self), self.windows)
        window = slice(start, start + self.clip_len)
        f = self._file()
        imgs = f["imgs"][episode, window]                                 # [L, S, S, 3] uint8
        pos_px = np.asarray(f["positions"][episode, window], dtype=np.float64)
        row_col = (pos_px[..., ::-1] - 0.5) / (self.image_size - 1) * 2 - 1
        item = {
            "frames": torch.from_numpy(imgs).permute(0, 3, 1, 2).float().div_(255),
            "positions": torch.from_numpy(row_col.astype(np.float32)),
            "positions_px": torch.from_numpy(pos_px),
            **{k: torch.from_numpy(np.asarray(f[k][episode, window], dtype=np.float64))
               for k in ("in_camera", "ids", "sizes")},
        }
        return {k: v[0] for k, v in item.items()} if self.image else item
