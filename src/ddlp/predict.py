"""Video prediction from a clip on disk: condition a DDLP on its first frames, roll PINT out, and
write what people want to look at (GIF + MP4, ground truth beside prediction, particles with their
trails, optional glimpse boxes) and what programs want to read (the particles as .npz and JSON).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from .particles import Particles
from .storage import atomic_write
from .viz import FAINT



@torch.no_grad()
def predict_clip(model, frames: Tensor, cond: int, horizon: int,
                 deterministic: bool = True) -> tuple[Tensor, Particles]:
    """Frames [T, 3, S, S] in [0, 1] -> (frames [horizon, 3, S, S] in [0, 1]: reconstructions of
    the `cond` conditioning frames, then predictions; particles [horizon, K, ...])."""
    if horizon <= cond:
        raise ValueError(f"horizon is the total number of output frames (conditioning included) and must "
                         f"exceed cond: got cond={cond}, horizon={horizon}")
    if cond < 1:
        raise ValueError(f"need at least one conditioning frame, got cond={cond}")
    if frames.shape[0] < cond:
        raise ValueError(f"the clip has {frames.shape[0]} frames, fewer than the {cond} conditioning frames")
    device = next(model.parameters()).device
    out, particles = model.rollout(frames[None, :cond].to(device), horizon - cond, cond, deterministic=deterministic)
    return out[0].clamp(0, 1).cpu(), particles[0].to("cpu")


# ------------------------------------------------------------------------------ pictures
def _zoom_position(position: Tensor, size: int, zoom: int) -> Tensor:
    """Normalised positions for a `size` image, re-expressed for the same image enlarged `zoom`
    times (nearest), so that they land on the same pixel centres."""
    px = (position + 1) / 2 * (size - 1) * zoom + (zoom - 1) / 2
    return px / (size * zoom - 1) * 2 - 1


def _boxed(pred: Tensor, particles: Particles, zoom: int) -> Tensor:
    """Prediction frames enlarged `zoom` times with each visible particle's glimpse box drawn."""
    from .viz import particle_colours, scale_boxes, to_pil
    S = pred.shape[-1]
    colours = particle_colours(particles.num_particles)
    out = []
    for t in range(pred.shape[0]):
        img = to_pil(pred[t], zoom)
        draw = ImageDraw.Draw(img)
        on = particles.transparency[t].reshape(-1)
        for k, box in enumerate(scale_boxes(particles[t], (S, S), zoom)):
            if on[k] >= FAINT:
                draw.rectangle(box, outline=colours[k], width=1)
        out.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255)
    return torch.stack(out)


def prediction_frames(gt: Optional[Tensor], pred: Tensor, particles: Particles, cond: int, boxes: bool = False,
                      trajectories: bool = True, trail: int = 10) -> list[Image.Image]:
    """One picture per step: ground truth (when there is one) beside the prediction with particles,
    their trails and optionally their glimpse boxes."""
    from .viz import auto_zoom, rollout_frames
    if not boxes:
        return rollout_frames(gt, pred, particles, cond_steps=cond, trajectories=trajectories, trail=trail)
    S = pred.shape[-1]
    zoom = auto_zoom(S)
    big = lambda x: x.repeat_interleave(zoom, -1).repeat_interleave(zoom, -2)  # noqa: E731
    moved = particles.replace(position=_zoom_position(particles.position, S, zoom))
    return rollout_frames(None if gt is None else big(gt), _boxed(pred, particles, zoom), moved,
                          cond_steps=cond, trajectories=trajectories, zoom=1, trail=trail)


# ------------------------------------------------------------------------------ particles on disk
def particle_arrays(particles: Particles, cond: int, image_size: int) -> dict[str, np.ndarray]:
    """Plain arrays of a rollout's particles ([T, K, ...] per frame)."""
    p = particles.map(lambda t: t.detach().float().cpu())
    T = p.position.shape[0]
    arrays = {
        "position": p.position.numpy(),                                        # [T, K, 2] (row, col) in [-1, 1]
        "position_px": ((p.position + 1) / 2 * (image_size - 1)).numpy(),      # pixel centres (row, col)
        "scale": p.scale.numpy(),                                              # [T, K, 2] pre-sigmoid
        "glimpse_size": torch.sigmoid(p.scale).numpy(),                        # fraction of the image side
        "depth": p.depth.reshape(T, -1).numpy(),
        "transparency": p.transparency.reshape(T, -1).numpy(),
        "features": p.features.numpy(),
        "predicted": np.arange(T) >= cond,
        "cond_steps": np.array(cond),
        "image_size": np.array(image_size),
    }
    if p.bg_features is not None:
        arrays["bg_features"] = p.bg_features.numpy()
    return arrays


CONVENTIONS = {
    "position": "(row, col) in [-1, 1]; -1 and +1 are the centres of the first and last pixel",
    "position_px": "(row, col) in pixels, pixel-centre coordinates (0 = centre of the first pixel)",
    "scale": "glimpse scale before the sigmoid, (row, col)",
    "glimpse_size": "sigmoid(scale): glimpse side as a fraction of the image side",
    "depth": "smaller is in front",
    "transparency": "in [0, 1], 1 = opaque",
    "frames": "t < cond_steps: posterior particles of the input frames; t >= cond_steps: PINT predictions",
}


def particle_json(arrays: dict[str, np.ndarray], meta: dict) -> dict:
    """The same particles as a JSON-friendly dict: one entry per frame, one per particle."""
    r = lambda a: np.round(np.asarray(a, dtype=np.float64), 6).tolist()  # noqa: E731
    frames = []
    for t in range(arrays["position"].shape[0]):
        entry = {"t": t, "predicted": bool(arrays["predicted"][t]), "particles": [
            {"id": k, "position": r(arrays["position"][t, k]), "position_px": r(arrays["position_px"][t, k]),
             "scale": r(arrays["scale"][t, k]), "glimpse_size": r(arrays["glimpse_size"][t, k]),
             "depth": r(arrays["depth"][t, k]), "transparency": r(arrays["transparency"][t, k]),
             "features": r(arrays["features"][t, k])}
            for k in range(arrays["position"].shape[1])]}
        if "bg_features" in arrays:
            entry["bg_features"] = r(arrays["bg_features"][t])
        frames.append(entry)
    return {**meta, "conventions": CONVENTIONS, "frames": frames}


def save_particles(arrays: dict[str, np.ndarray], meta: dict, npz: Path, json_path: Path) -> None:
    def write_npz(tmp):
        with open(tmp, "wb") as f:                # a file object: np.savez would append .npz to a name
            np.savez(f, **arrays)
    atomic_write(npz, write_npz)
    text = json.dumps(particle_json(arrays, meta), indent=1)
    atomic_write(json_path, lambda p: Path(p).write_text(text))


# ------------------------------------------------------------------------------ the command
def predict(checkpoint: str | os.PathLike, input_path: str | os.PathLike, out_dir: str | os.PathLike,
            cond: Optional[int] = None, horizon: Optional[int] = None, deterministic: bool = True,
            boxes: bool = False, trajectories: bool = True, trail: int = 10, fps: float = 10,
            formats: tuple[str, ...] = ("gif", "mp4"), use_last: bool = False,
            device: Optional[str] = None, episode: Optional[int] = None, split: str = "test",
            precision: str = "fp32") -> dict:
    """Everything `ddlp predict` does; returns the written paths and a few facts. `episode` and
    `split` pick the clip where `input_path` holds several (data.reader.read_clip); `precision`:
    fp32, bf16 or auto (nn.precision.autocast)."""
    from .data.reader import read_clip
    from .checkpoint import load_video_model
    from .nn.precision import autocast, inference_precision
    from .viz import save_video
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, info = load_video_model(checkpoint, use_last, device)
    c = model.config
    cond = cond or c.cond_steps
    horizon = horizon or max(c.animation_horizon, cond + 1)
    frames = read_clip(input_path, size=c.image_size, episode=episode, split=split)
    precision = inference_precision(precision, device)
    with autocast(precision, device):
        pred, particles = predict_clip(model, frames, cond, horizon, deterministic)
    gt = frames[:horizon]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pictures = prediction_frames(gt, pred, particles, cond, boxes, trajectories, trail)
    written: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for fmt in formats:
        try:
            written[fmt] = str(save_video(pictures, out / f"prediction.{fmt}", fps=fps))
        except ImportError as e:                  # no imageio-ffmpeg: keep the GIF and say why
            skipped[fmt] = str(e)
    meta = {"input": str(input_path), "episode": episode, "checkpoint": info, "image_size": c.image_size, "cond_steps": cond,
            "horizon": horizon, "input_frames": int(frames.shape[0]), "deterministic": deterministic,
            "precision": precision}
    save_particles(particle_arrays(particles, cond, c.image_size), meta, out / "particles.npz",
                   out / "particles.json")
    written.update(npz=str(out / "particles.npz"), json=str(out / "particles.json"))
    return {"files": written, "skipped": skipped, "input_frames": int(frames.shape[0]), "cond": cond,
            "horizon": horizon, "ground_truth_frames": int(gt.shape[0]), "model": info}
