""""What if...?" editing (paper section 5.3): change particles of the first frames, roll PINT on.

    clip -> DDLP posterior of the conditioning frames -> edits on chosen particles over a frame
         range (default the 4 burn-in frames) -> deterministic PINT rollout -> decoded frames

The original and the edited rollouts go through the very same code (encode once, then one
`rollout_particles` call each), so an edit that changes nothing reproduces the original bit for bit.

Conventions: positions are (y, x) = (row, col) in [-1, 1]; a user-facing "dx" is the column
(horizontal, positive = right) and "dy" the row (positive = down). Scale is stored pre-sigmoid and
the glimpse covers sigmoid(scale) of the image per axis, so a scale factor m multiplies that
fraction: scale' = logit(m * sigmoid(scale)). Transparency is in [0, 1].
"""
from __future__ import annotations

import contextlib
import csv
import io
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from .model import DECODE_CHUNK
from .particles import Particles
from .viz import FAINT, font

BURN_IN = 4                      # the paper's tau: edits default to these frames where no model says otherwise
ATTRIBUTES = ("position", "scale", "depth", "transparency", "features", "bg_features")
OPERATIONS = {"position": ("add", "set"), "scale": ("mul", "set"), "depth": ("add", "set"),
              "transparency": ("set",), "features": ("copy", "swap", "set"),
              "bg_features": ("add", "set")}


class EditError(ValueError):
    """An edit that cannot be applied to these particles; the message says why."""


@dataclass(frozen=True)
class Edit:
    """One change of one attribute of some particles over a frame range.

    attribute: one of ATTRIBUTES. op: 'add' / 'set' (value), 'mul' (scale: multiply the glimpse
    size), 'copy' (features of `source` into `particles`), 'swap' (features of particles[0] and
    `source`). frames: (start, stop) of absolute frame indices, stop exclusive, None = open
    (stop beyond the conditioning frames re-applies the edit to every predicted frame in that
    range); frames=None uses the default range of `what_if` (the burn-in frames).
    """
    attribute: str
    op: str
    particles: tuple[int, ...] = ()
    value: Optional[tuple[float, ...]] = None
    source: Optional[int] = None
    frames: Optional[tuple[int, Optional[int]]] = None

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "Edit":
        """Build an Edit from its JSON form (`to_dict`), checking the field types."""
        if not isinstance(d, dict):
            raise EditError(f"an edit must be a JSON object, got {type(d).__name__}")
        unknown = set(d) - {"attribute", "op", "particles", "value", "source", "frames"}
        if unknown:
            raise EditError(f"unknown edit field(s) {sorted(unknown)}")
        try:
            value = d.get("value")
            if value is not None:
                value = tuple(float(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
            frames = d.get("frames")
            if frames is not None:
                frames = (int(frames[0]), None if frames[1] is None else int(frames[1]))
            return Edit(attribute=str(d["attribute"]), op=str(d["op"]),
                        particles=tuple(_index(k) for k in d.get("particles", ())), value=value,
                        source=None if d.get("source") is None else _index(d["source"]), frames=frames)
        except (KeyError, TypeError, IndexError, ValueError) as e:
            if isinstance(e, EditError):
                raise
            raise EditError(f"malformed edit {d!r}: {type(e).__name__}: {e}") from e


def _index(k) -> int:
    if isinstance(k, bool) or not float(k).is_integer():
        raise EditError(f"particle indices are integers, got {k!r}")
    return int(k)


def _ids(particles: int | Iterable[int]) -> tuple[int, ...]:
    return (particles,) if isinstance(particles, int) else tuple(particles)


# ------------------------------------------------------------------------------ edit builders
def move(particles: int | Iterable[int], dx: float = 0.0, dy: float = 0.0, frames=None) -> Edit:
    """Shift positions by dx (columns, right) and dy (rows, down), in [-1, 1] units."""
    return Edit("position", "add", _ids(particles), (float(dy), float(dx)), frames=frames)


def place(particles: int | Iterable[int], x: float, y: float, frames=None) -> Edit:
    """Set positions to (x, y) = (column, row) in [-1, 1]."""
    return Edit("position", "set", _ids(particles), (float(y), float(x)), frames=frames)


def rescale(particles: int | Iterable[int], factor: float | tuple[float, float], frames=None) -> Edit:
    """Multiply the glimpse size (fraction of the image per axis) by `factor` (or (fy, fx))."""
    f = (float(factor),) * 2 if isinstance(factor, (int, float)) else tuple(float(v) for v in factor)
    return Edit("scale", "mul", _ids(particles), f, frames=frames)


def set_depth(particles: int | Iterable[int], depth: float, frames=None) -> Edit:
    """Set the depth (smaller is in front)."""
    return Edit("depth", "set", _ids(particles), (float(depth),), frames=frames)


def shift_depth(particles: int | Iterable[int], delta: float, frames=None) -> Edit:
    """Add `delta` to the depth (negative brings the particle forward)."""
    return Edit("depth", "add", _ids(particles), (float(delta),), frames=frames)


def set_transparency(particles: int | Iterable[int], value: float, frames=None) -> Edit:
    """Set the transparency (0 = invisible, 1 = opaque)."""
    return Edit("transparency", "set", _ids(particles), (float(value),), frames=frames)


def hide(particles: int | Iterable[int], frames=None) -> Edit:
    """Switch particles off over the edit range; PINT may switch them on again later."""
    return set_transparency(particles, 0.0, frames)


def show(particles: int | Iterable[int], frames=None) -> Edit:
    return set_transparency(particles, 1.0, frames)


def remove(particles: int | Iterable[int], start: int = 0) -> Edit:
    """Switch particles off from `start` on, predicted frames included (K stays fixed: PINT is
    built for K particles, so a removed particle is an invisible one)."""
    return set_transparency(particles, 0.0, (start, None))


def copy_features(source: int, particles: int | Iterable[int], frames=None) -> Edit:
    """Give `particles` the appearance features of `source` (frame by frame)."""
    return Edit("features", "copy", _ids(particles), source=int(source), frames=frames)


def swap_features(a: int, b: int, frames=None) -> Edit:
    """Exchange the appearance features of particles a and b."""
    return Edit("features", "swap", (int(a),), source=int(b), frames=frames)


# ------------------------------------------------------------------------------ applying edits
def _check(edit: Edit, K: int, F: int, F_bg: Optional[int]) -> None:
    if edit.attribute not in ATTRIBUTES:
        raise EditError(f"unknown attribute {edit.attribute!r}; expected one of {', '.join(ATTRIBUTES)}")
    if edit.op not in OPERATIONS[edit.attribute]:
        raise EditError(f"operation {edit.op!r} does not apply to {edit.attribute}; "
                        f"use one of {', '.join(OPERATIONS[edit.attribute])}")
    if edit.attribute != "bg_features" and not edit.particles:
        raise EditError(f"{edit.attribute} edit names no particle")
    for k in edit.particles + (() if edit.source is None else (edit.source,)):
        if not 0 <= k < K:
            raise EditError(f"particle {k} does not exist: this model has {K} particles (0..{K - 1})")
    if edit.op in ("copy", "swap"):
        if edit.source is None:
            raise EditError(f"features {edit.op} needs a source particle")
        return
    sizes = {"position": (2,), "scale": (1, 2), "depth": (1,), "transparency": (1,),
             "features": (F,), "bg_features": (F_bg,)}[edit.attribute]
    if edit.value is None or len(edit.value) not in sizes:
        raise EditError(f"{edit.attribute} {edit.op} needs {' or '.join(map(str, sizes))} value(s), "
                        f"got {edit.value!r}")
    if not all(math.isfinite(v) for v in edit.value):
        raise EditError(f"{edit.attribute} {edit.op}: values must be finite numbers, got {edit.value}")
    if edit.attribute == "transparency" and not 0 <= edit.value[0] <= 1:
        raise EditError(f"transparency must lie in [0, 1], got {edit.value[0]}")
    if edit.attribute == "scale" and edit.op == "mul" and min(edit.value) <= 0:
        raise EditError(f"scale factors must be positive, got {edit.value}")
    if edit.attribute == "scale" and edit.op == "set" and not all(0 < v < 1 for v in edit.value):
        raise EditError(f"a set scale is the glimpse size as a fraction of the image, in (0, 1); got {edit.value}")


def frame_span(edit: Edit, default: tuple[int, int]) -> tuple[int, Optional[int]]:
    start, stop = edit.frames if edit.frames is not None else default
    if start < 0 or (stop is not None and stop <= start):
        raise EditError(f"bad frame range {start}:{'' if stop is None else stop} "
                        "(need 0 <= start < stop)")
    return start, stop


def _logit_times(z: Tensor, m: Tensor) -> Tensor:
    """logit(m * sigmoid(z)), written as z + log m + log(1 - s) - log(1 - m s) so that m = 1
    returns z bit for bit (the zero edit must not perturb anything)."""
    s = torch.sigmoid(z)
    return z + torch.log(m) + (torch.log1p(-s) - torch.log1p(-m * s))


def apply_edits(p: Particles, edits: Sequence[Edit], default_frames: tuple[int, int] = (0, BURN_IN),
                offset: int = 0) -> Particles:
    """Particles [B, T, K, ...] (absolute frames offset..offset+T-1) with `edits` applied in order.

    Each edit acts on the frames of its range that fall inside this window; later edits see the
    results of earlier ones. Raises EditError for a particle that does not exist, a position outside
    the image, a glimpse larger than the image and other values the model cannot represent.
    """
    K, T = p.num_particles, p.position.shape[1]
    F = p.features.shape[-1]
    F_bg = None if p.bg_features is None else p.bg_features.shape[-1]
    values = {a: getattr(p, a) for a in ATTRIBUTES}
    cloned: set[str] = set()

    def field_(name: str) -> Tensor:
        if name not in cloned:
            if values[name] is None:
                raise EditError(f"these particles have no {name}")
            values[name] = values[name].clone()
            cloned.add(name)
        return values[name]

    for edit in edits:
        _check(edit, K, F, F_bg)
        start, stop = frame_span(edit, default_frames)
        lo, hi = max(start - offset, 0), T if stop is None else min(stop - offset, T)
        if lo >= hi:
            continue
        ts, ks = slice(lo, hi), list(edit.particles)
        t = field_(edit.attribute)
        if edit.op == "copy":
            t[:, ts, ks] = t[:, ts, edit.source, None].clone()
            continue
        if edit.op == "swap":
            a, b = edit.particles[0], edit.source
            t[:, ts, [a, b]] = t[:, ts, [b, a]]
            continue
        v = torch.tensor(edit.value, dtype=t.dtype, device=t.device)
        if edit.attribute == "bg_features":
            t[:, ts] = t[:, ts] + v if edit.op == "add" else v.expand_as(t[:, ts])
        elif edit.attribute == "transparency":
            t[:, ts, ks] = v[0]
        elif edit.attribute == "scale":
            old = t[:, ts, ks]
            if edit.op == "mul":
                if bool((torch.sigmoid(old) * v >= 1).any()):
                    raise EditError(f"scale x{_fmt(edit.value)} makes the glimpse of particle(s) "
                                    f"{_fmt(ks)} as large as the image or larger; use a smaller factor")
                t[:, ts, ks] = _logit_times(old, v)
            else:
                t[:, ts, ks] = torch.logit(v).expand_as(old)
        else:
            old = t[:, ts, ks]
            t[:, ts, ks] = old + v if edit.op == "add" else v.expand_as(old)
            if edit.attribute == "position":
                _check_inside(t[:, ts, ks], old, ks, lo + offset)
    changes = {a: values[a] for a in cloned}
    return p.replace(**changes)


def _fmt(v) -> str:
    return ",".join(f"{x:g}" if isinstance(x, float) else str(x) for x in v)


def _check_inside(pos: Tensor, old: Tensor, ks: list[int], first: int) -> None:
    """pos, old [B, T', K', 2]: raise if an edit puts a position outside [-1, 1]. Tracked
    particles may already sit slightly outside; moving them no further out is allowed."""
    bad = ((pos.abs() > 1) & (pos.abs() > old.abs())).any(-1)
    if bool(bad.any()):
        b, t, j = (int(i) for i in bad.nonzero()[0])
        y, x = pos[b, t, j].tolist()
        raise EditError(f"the edit moves particle {ks[j]} outside the image in frame {first + t}: "
                        f"(x, y) = ({x:.3f}, {y:.3f}); positions must stay within [-1, 1]")


# ------------------------------------------------------------------------------ rollouts
@contextlib.contextmanager
def _eval_mode(model) -> Iterator[None]:
    """PINT has dropout: a rollout in train mode would not be deterministic."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was)


def check_ddlp(model) -> None:
    """Raise ValueError unless `model` is a DDLP (video model with PINT)."""
    from .model import DDLP
    if not isinstance(model, DDLP):
        kind = type(model).__name__
        raise ValueError(f"what-if editing needs a DDLP video model (with PINT dynamics), got a {kind}"
                         + (" (single-image DLPv2)" if kind == "DLP" else ""))


def as_clip(frames: Tensor) -> Tensor:
    """[T, 3, H, W] or [B, T, 3, H, W] -> [B, T, 3, H, W]."""
    if not torch.is_tensor(frames) or frames.ndim not in (4, 5):
        shape = tuple(frames.shape) if torch.is_tensor(frames) else type(frames).__name__
        raise ValueError(f"expected frames [T, 3, H, W] or [B, T, 3, H, W], got {shape}")
    return frames[None] if frames.ndim == 4 else frames


def burn_in(model) -> int:
    """The model's burn-in (config.num_static_frames): the default conditioning and edit frames."""
    return int(model.config.num_static_frames)


def encode_conditioning(model, frames: Tensor, cond_steps: Optional[int] = None) -> Particles:
    """Deterministic posterior values of the first `cond_steps` frames (default: the model's
    burn-in): [B, cond, K, ...]."""
    check_ddlp(model)
    cond_steps = cond_steps or burn_in(model)
    frames = as_clip(frames)
    if frames.shape[1] < cond_steps:
        raise ValueError(f"the clip has {frames.shape[1]} frame(s), fewer than the {cond_steps} "
                         "conditioning (burn-in) frames what-if needs")
    with _eval_mode(model):
        return model.encode(frames[:, :cond_steps], deterministic=True).values()


def rollout_particles(model, history: Particles, horizon: int, edits: Sequence[Edit] = (),
                      default_frames: tuple[int, int] = (0, BURN_IN), progress: bool = False) -> Particles:
    """Extend particles [B, T, K, ...] by `horizon` deterministic PINT steps; edits whose range
    reaches a predicted frame are re-applied to it right after it is predicted."""
    T0 = history.position.shape[1]
    late = [e for e in edits if (frame_span(e, default_frames)[1] or math.inf) > T0]
    edit = (lambda t, p: apply_edits(p, late, default_frames, offset=t)) if late else None
    with _eval_mode(model):
        return model.pint.rollout(history, horizon, deterministic=True, edit=edit, progress=progress)


def decode(model, p: Particles) -> Tensor:
    """Frames [B, T, 3, H, W] in [0, 1] from particles [B, T, K, ...]."""
    with _eval_mode(model):
        return model.decode(p, max_images=DECODE_CHUNK).clamp(0, 1)


@dataclass
class WhatIfResult:
    """Both rollouts: frames [B, cond + horizon, 3, H, W] and their particle values."""
    original: Tensor
    edited: Tensor
    original_particles: Particles
    edited_particles: Particles
    cond_steps: int
    edit_frames: tuple[int, int]
    edits: list[Edit] = field(default_factory=list)

    @property
    def touched(self) -> list[int]:
        """Particles named by any edit (to highlight)."""
        out: set[int] = set()
        for e in self.edits:
            out.update(e.particles)
            if e.source is not None and e.op == "swap":
                out.add(e.source)
        return sorted(out)


def what_if(model, frames: Tensor, edits: Sequence[Edit], horizon: int, *, cond_steps: Optional[int] = None,
            edit_frames: Optional[tuple[int, int]] = None, posterior: Optional[Particles] = None,
            progress: bool = False) -> WhatIfResult:
    """Original and edited rollouts of a clip.

    frames: [T, 3, H, W] or [B, T, 3, H, W] with T >= cond_steps (default: the model's burn-in,
        config.num_static_frames; 4 for the paper's configs).
    edits: `Edit`s (see move, place, rescale, hide, copy_features, ...), applied in order.
    horizon: frames predicted by PINT after the conditioning frames.
    edit_frames: default (start, stop) of edits without their own range: (0, min(burn-in, cond_steps)).
    posterior: the conditioning particles if already encoded (skips the encoder).
    """
    check_ddlp(model)
    cond = int(burn_in(model) if cond_steps is None else cond_steps)
    if cond < 1 or horizon < 0:
        raise ValueError(f"need cond_steps >= 1 and horizon >= 0, got {cond} and {horizon}")
    span = tuple(edit_frames) if edit_frames is not None else (0, min(burn_in(model), cond))
    if not 0 <= span[0] < span[1] or span[0] >= cond:
        raise ValueError(f"edit frames {span[0]}:{span[1]} must start inside the {cond} conditioning frames")
    if posterior is None:
        posterior = encode_conditioning(model, frames, cond)
    edits = list(edits)
    edited_cond = apply_edits(posterior, edits, span)
    original = rollout_particles(model, posterior, horizon, (), span, progress)
    edited = rollout_particles(model, edited_cond, horizon, edits, span, progress)
    return WhatIfResult(decode(model, original), decode(model, edited), original, edited, cond, span, edits)


# ------------------------------------------------------------------------------ loading
def load_ddlp(path: str | Path, map_location: str = "cpu"):
    """A DDLP from a model directory, Hub id or training run folder (its `best/` model, else its
    latest checkpoint), in eval mode. ValueError if it is not a DDLP."""
    from .checkpoint import load_video_model
    model, info = load_video_model(path, device=map_location, purpose="what-if editing")
    try:
        check_ddlp(model)
    except ValueError as e:
        raise ValueError(f"{info['path']}: {e}") from None
    return model


# ------------------------------------------------------------------------------ outputs
def _panel(frame: Tensor, p: Particles, t: int, touched: Sequence[int], zoom: int, trail: int,
           draw_particles: bool) -> Image.Image:
    """One frame (zoomed) with particle dots, fading trails and rings around edited particles."""
    from .viz import draw_on, particle_colours, to_pil, to_pixel
    hw = tuple(frame.shape[-2:])
    img = to_pil(frame, zoom)
    if not draw_particles:
        return img
    K = p.num_particles
    pos = p.position[max(0, t - trail):t + 1].detach().float().cpu().numpy()
    yx = np.stack([to_pixel(pos[..., 0], hw[0], zoom), to_pixel(pos[..., 1], hw[1], zoom)], -1)
    layer = Image.new("RGBA", img.size, (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    colours = particle_colours(K)
    for k in range(K):
        pts = [(float(x), float(y)) for y, x in yx[:, k]]
        if len(pts) > 1:
            d.line(pts, fill=(*colours[k], 200), width=2 if k in touched else 1)
    r = max(3, img.width // 40) + 4
    for k in touched:
        y, x = yx[-1, k]
        d.ellipse([x - r, y - r, x + r, y + r], outline=(255, 255, 255, 255), width=2)
    img = Image.alpha_composite(img.convert("RGBA"), layer).convert("RGB")
    return draw_on(img, p[t], hw, zoom, highlight=list(touched))


def side_by_side_frames(result: WhatIfResult, zoom: Optional[int] = None, trail: int = 10,
                        particles: bool = True, index: int = 0) -> list[Image.Image]:
    """One picture per frame: original rollout (left) beside the edited one (right), particles and
    trails drawn, edited particles ringed in white; conditioning frames framed green, predicted red."""
    from .viz import auto_zoom
    orig, edit = result.original[index], result.edited[index]
    po, pe = result.original_particles[index], result.edited_particles[index]
    zoom = zoom or auto_zoom(orig.shape[-1], 192)
    label_font, header, gap, border = font(12), 18, 6, 3
    out = []
    for t in range(orig.shape[0]):
        cond = t < result.cond_steps
        colour = (40, 200, 60) if cond else (230, 40, 40)
        tiles = [(_panel(orig[t], po, t, [], zoom, trail, particles), f"original t={t}"),
                 (_panel(edit[t], pe, t, result.touched, zoom, trail, particles),
                  f"what-if t={t}{' (edited)' if cond and t >= result.edit_frames[0] else ''}")]
        w, h = tiles[0][0].width + 2 * border, tiles[0][0].height + 2 * border
        canvas = Image.new("RGB", (2 * w + 3 * gap, header + h + gap), (20, 20, 20))
        draw = ImageDraw.Draw(canvas)
        for j, (tile, title) in enumerate(tiles):
            left = gap + j * (w + gap)
            draw.text((left + 2, header // 2), title, fill=colour, font=label_font, anchor="lm")
            draw.rectangle([left, header, left + w - 1, header + h - 1], fill=colour)
            canvas.paste(tile, (left + border, header + border))
        out.append(canvas)
    return out


TRAJECTORY_FIELDS = ("rollout", "t", "particle", "x", "y", "scale_x", "scale_y", "depth", "transparency",
                     "predicted")


def trajectory_rows(result: WhatIfResult, index: int = 0) -> list[dict]:
    """Per rollout, frame and particle: position (x, y in [-1, 1]), glimpse size (fraction of the
    image, per axis), depth, transparency and whether the frame is predicted."""
    rows = []
    for name, p in (("original", result.original_particles), ("edited", result.edited_particles)):
        p = p[index]
        pos, size = p.position.cpu(), torch.sigmoid(p.scale).cpu()
        depth, on = p.depth.cpu(), p.transparency.cpu()
        for t in range(pos.shape[0]):
            for k in range(pos.shape[1]):
                rows.append(dict(rollout=name, t=t, particle=k, x=float(pos[t, k, 1]), y=float(pos[t, k, 0]),
                                 scale_x=float(size[t, k, 1]), scale_y=float(size[t, k, 0]),
                                 depth=float(depth[t, k, 0]), transparency=float(on[t, k]),
                                 predicted=int(t >= result.cond_steps)))
    return rows


def write_trajectories(result: WhatIfResult, path: str | Path, index: int = 0) -> Path:
    """Both rollouts' particle trajectories as CSV (atomic)."""
    from .storage import atomic_write
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=TRAJECTORY_FIELDS)
    writer.writeheader()
    for row in trajectory_rows(result, index):
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    path = Path(path)
    atomic_write(path, lambda tmp: Path(tmp).write_text(buf.getvalue()))
    return path


def trajectory_figure(result: WhatIfResult, zoom: Optional[int] = None, index: int = 0) -> Image.Image:
    """The first frame (dimmed) with every particle's whole path: original thin, edited thick;
    a dot marks where each path starts."""
    from .viz import auto_zoom, particle_colours, to_pil, to_pixel
    frame = result.original[index, 0]
    hw = tuple(frame.shape[-2:])
    zoom = zoom or auto_zoom(hw[1], 256)
    img = Image.blend(to_pil(frame, zoom), Image.new("RGB", (hw[1] * zoom, hw[0] * zoom)), 0.55)
    d = ImageDraw.Draw(img)
    K = result.original_particles.num_particles
    colours = particle_colours(K)
    for p, width in ((result.original_particles, 1), (result.edited_particles, 3)):
        pos = p[index].position.cpu().numpy()
        on = p[index].transparency.cpu().numpy()
        for k in range(K):
            if on[:, k].max() < FAINT:
                continue
            pts = [(float(to_pixel(x, hw[1], zoom)), float(to_pixel(y, hw[0], zoom))) for y, x in pos[:, k]]
            d.line(pts, fill=colours[k], width=width)
            x0, y0 = pts[0]
            d.ellipse([x0 - 3, y0 - 3, x0 + 3, y0 + 3], fill=colours[k])
    d.text((4, 4), "thin: original   thick: what-if", fill=(230, 230, 230), font=font(11))
    return img
