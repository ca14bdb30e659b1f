"""Pictures of particles: frames with particles drawn on them, the DLP/DDLP nine-row diagnostic
figure, rollout animations, and atomic image / video writers.

Geometry: a normalised coordinate c in [-1, 1] (align_corners convention: -1 and +1 are the
centres of the first and last pixel) sits at pixel (c + 1) / 2 * (n - 1). In a tile enlarged
`zoom` times (nearest), pixel v of the source has its centre at v * zoom + (zoom - 1) / 2.

Particles whose transparency is below `FAINT` are drawn faded everywhere (not skipped), so the
"all particles" row really shows all of them while switched-off ones stay recognisable.
"""
from __future__ import annotations

import colorsys
import contextlib
import functools
import math
import os
import secrets
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from .nn.glimpse import square_masks
from .particles import Particles

FAINT = 0.1                      # transparency below which a particle is drawn faded
FADED_ALPHA = 90                 # opacity (of 255) of faded markers
MIN_TILE = 128                   # tiles are enlarged to at least this many pixels wide
BACKDROP = (20, 20, 20)
TEXT = (230, 230, 230)
PROPOSAL_COLOUR = (255, 230, 0)
COND_COLOUR = (40, 200, 60)
PRED_COLOUR = (230, 40, 40)

Box = tuple[float, float, float, float]  # (x0, y0, x1, y1) in tile pixels


# ---------------------------------------------------------------------------------- basics
def particle_colours(k: int) -> list[tuple[int, int, int]]:
    """One distinct, saturated colour per particle index (stable across frames)."""
    return [tuple(int(255 * c) for c in colorsys.hsv_to_rgb(i / max(k, 1), 0.85, 1.0)) for i in range(k)]


def to_pil(image: Tensor, zoom: int = 1) -> Image.Image:
    """[3, H, W] float in [0, 1] -> RGB PIL image, optionally enlarged (nearest)."""
    arr = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    img = Image.fromarray(arr)
    return img.resize((img.width * zoom, img.height * zoom), Image.NEAREST) if zoom > 1 else img


def auto_zoom(width: int, min_tile: int = MIN_TILE) -> int:
    """Smallest integer enlargement that makes a tile at least `min_tile` pixels wide."""
    return max(1, math.ceil(min_tile / width))


def to_pixel(coord, n: int, zoom: int = 1):
    """Normalised coordinate(s) -> pixel-centre coordinate(s) in a tile enlarged `zoom` times."""
    return (coord + 1) / 2 * (n - 1) * zoom + (zoom - 1) / 2


@functools.lru_cache(maxsize=8)
def font(size: int = 12) -> ImageFont.ImageFont:
    """Pillow's default font at `size` px where Pillow can scale it."""
    try:
        return ImageFont.load_default(size=size)      # Pillow >= 10.1: scalable default font
    except TypeError:
        return ImageFont.load_default()


def _overlay(img: Image.Image, paint: Callable[[ImageDraw.ImageDraw], None]) -> Image.Image:
    """Run `paint` on a transparent layer and composite it, so faded markers really blend."""
    layer = Image.new("RGBA", img.size, (0, 0, 0, 0))
    paint(ImageDraw.Draw(layer))
    return Image.alpha_composite(img.convert("RGBA"), layer).convert("RGB")


def _radius(tile_width: int) -> int:
    return max(3, tile_width // 40)


def _np(t: Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


# ---------------------------------------------------------------------------------- geometry
def _centres(position: Tensor, hw: tuple[int, int], zoom: int) -> np.ndarray:
    """Positions [..., 2] (y, x) -> pixel centres [..., 2] (y, x) in the zoomed tile."""
    pos = _np(position)
    return np.stack([to_pixel(pos[..., 0], hw[0], zoom), to_pixel(pos[..., 1], hw[1], zoom)], -1)


def scale_boxes(p: Particles, hw: tuple[int, int], zoom: int = 1) -> list[Box]:
    """Glimpse windows (centre +- sigmoid(scale) per axis, normalised units) in tile pixels."""
    pos, half = _np(p.position), _np(torch.sigmoid(p.scale.float()))
    boxes = []
    for (y, x), (hy, hx) in zip(pos, half):
        y0, y1 = to_pixel(np.array([y - hy, y + hy]), hw[0], zoom)
        x0, x1 = to_pixel(np.array([x - hx, x + hx]), hw[1], zoom)
        boxes.append(tuple(round(float(v)) for v in (x0, y0, x1, y1)))   # PIL would truncate
    return boxes


def mask_boxes(p: Particles, size: int, side: int, zoom: int = 1) -> list[Optional[Box]]:
    """Outlines of the background-encoder squares (side `side` pixels), built with the model's own
    `square_masks`, so the boxes show exactly what is hidden from the background encoder
    (clipped at the image border; None when a square lies wholly outside)."""
    masks = square_masks(p.position.detach().float().cpu()[None], size, side)[0, :, 0] > 0
    boxes: list[Optional[Box]] = []
    for m in masks:
        rows, cols = m.any(1).nonzero().flatten(), m.any(0).nonzero().flatten()
        if len(rows) == 0 or len(cols) == 0:
            boxes.append(None)
            continue
        y0, y1, x0, x1 = int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])
        boxes.append((x0 * zoom, y0 * zoom, (x1 + 1) * zoom - 1, (y1 + 1) * zoom - 1))
    return boxes


# ---------------------------------------------------------------------------------- markers
def _dot(draw: ImageDraw.ImageDraw, y: float, x: float, r: int, colour, alpha: int, width: int = 1) -> None:
    draw.ellipse([x - r, y - r, x + r, y + r], fill=(*colour, alpha), outline=(0, 0, 0, alpha), width=width)


def _cross(draw: ImageDraw.ImageDraw, y: float, x: float, r: int, colour) -> None:
    """A plus sign with a dark halo, legible on light and dark backgrounds."""
    for fill, w in (((0, 0, 0, 255), 4), ((*colour, 255), 2)):
        draw.line([x - r, y, x + r, y], fill=fill, width=w)
        draw.line([x, y - r, x, y + r], fill=fill, width=w)


def _alpha(transparency: float) -> int:
    return 255 if transparency >= FAINT else FADED_ALPHA


def draw_on(img: Image.Image, p: Particles, hw: tuple[int, int], zoom: int, *,
            keep: Optional[Sequence[int]] = None, boxes: Optional[Sequence[Optional[Box]]] = None,
            highlight: Sequence[int] = (), skip_below: Optional[float] = None) -> Image.Image:
    """Draw particles p ([K, ...], one frame of an hw image) on an already zoomed tile: a filled dot
    per particle in its own colour, optional boxes; faint particles faded and drawn underneath."""
    K = p.num_particles
    colours, on = particle_colours(K), _np(p.transparency).reshape(K)
    yx = _centres(p.position, hw, zoom)
    order = sorted(range(K) if keep is None else keep, key=lambda k: on[k])
    if skip_below is not None:
        order = [k for k in order if on[k] >= skip_below]
    r = _radius(img.width)

    def paint(draw: ImageDraw.ImageDraw) -> None:
        for k in order:                                   # boxes first, so that no box hides a dot
            if boxes is not None and boxes[k] is not None:
                width = 3 if k in highlight else 1
                draw.rectangle(boxes[k], outline=(*colours[k], _alpha(on[k])), width=width)
        for k in order:
            bold = k in highlight
            _dot(draw, yx[k, 0], yx[k, 1], r + bold, colours[k], _alpha(on[k]), 1 + bold)
    return _overlay(img, paint)


def draw_particles(image: Tensor, p: Particles, zoom: int = 4, boxes: bool = True,
                   min_transparency: float = FAINT, highlight: Sequence[int] = ()) -> Image.Image:
    """Frame [3, H, W] with its particles p ([K, ...], one frame) drawn on it: a dot per particle
    and optionally its glimpse box. Particles below `min_transparency` are left out here."""
    hw = tuple(image.shape[-2:])
    return draw_on(to_pil(image, zoom), p, hw, zoom, boxes=scale_boxes(p, hw, zoom) if boxes else None,
                   highlight=highlight, skip_below=min_transparency)


def draw_proposals(image: Tensor, proposals: Tensor, zoom: int = 1, colour=PROPOSAL_COLOUR) -> Image.Image:
    """Frame [3, H, W] with prior keypoint proposals [L, 2] drawn as small crosses of one colour."""
    img = to_pil(image, zoom)
    yx = _centres(proposals, tuple(image.shape[-2:]), zoom)
    r = _radius(img.width)
    return _overlay(img, lambda draw: [_cross(draw, y, x, r, colour) for y, x in yx])


def grid(rows: list[list[Image.Image]], pad: int = 2, labels: Optional[list[str]] = None) -> Image.Image:
    """Tile equally sized images row by row on a dark background, labels in a left column."""
    h, w = rows[0][0].height, rows[0][0].width
    label_font = font(12)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = 0 if not labels else int(max(probe.textlength(s, font=label_font) for s in labels)) + 10
    cols = max(len(r) for r in rows)
    out = Image.new("RGB", (label_w + cols * (w + pad) + pad, len(rows) * (h + pad) + pad), BACKDROP)
    draw = ImageDraw.Draw(out)
    for i, row in enumerate(rows):
        if labels:
            draw.text((4, pad + i * (h + pad) + h // 2), labels[i], fill=TEXT, font=label_font, anchor="lm")
        for j, im in enumerate(row):
            out.paste(im, (label_w + pad + j * (w + pad), pad + i * (h + pad)))
    return out


# ---------------------------------------------------------------------------------- nine rows
NINE_ROW_LABELS = ("ground truth", "posterior", "reconstruction", "prior proposals", "top-{k}",
                   "foreground", "scale boxes", "bg-enc mask", "background")


def _columns(x: Tensor, max_frames: int) -> list[tuple[int, ...]]:
    """Indices of the leading dims shown as columns: frames of clip 0, or the first images."""
    if x.ndim == 5:
        return [(0, t) for t in range(min(x.shape[1], max_frames))]
    if x.ndim == 4:
        return [(i,) for i in range(min(x.shape[0], max_frames))]
    raise ValueError(f"expected images [B, 3, H, W] or clips [B, T, 3, H, W], got shape {tuple(x.shape)}")


def _top_k(transparency: Tensor, k: int) -> list[int]:
    return torch.topk(transparency.detach().float().reshape(-1), k).indices.tolist()


def nine_row_tiles(x: Tensor, out, topk: Optional[int] = None,
                   max_frames: int = 8) -> tuple[list[str], list[list[Image.Image]]]:
    """The tiles of `nine_row_figure`, row by row (nine rows, one column per frame / image)."""
    cols = _columns(x, max_frames)
    hw = tuple(x.shape[-2:])
    zoom = auto_zoom(hw[1])
    side = out.glimpses.shape[-1]
    K = out.posterior.num_particles
    k = K if topk is None else max(0, min(int(topk), K))
    rows: list[list[Image.Image]] = [[] for _ in range(9)]
    for idx in cols:
        gt, p = x[idx], out.posterior[idx].detach().to("cpu")
        gt_tile = to_pil(gt, zoom)
        shaded = gt * (0.35 + 0.65 * out.bg_encoder_mask[idx].to(gt))   # what the bg encoder sees
        tiles = [gt_tile,
                 draw_on(gt_tile, p, hw, zoom),
                 to_pil(out.rec[idx], zoom),
                 draw_proposals(gt, out.proposals[idx], zoom),
                 draw_on(gt_tile, p, hw, zoom, keep=_top_k(p.transparency, k)),
                 to_pil(out.foreground.image[idx], zoom),
                 draw_on(gt_tile, p, hw, zoom, boxes=scale_boxes(p, hw, zoom)),
                 draw_on(to_pil(shaded, zoom), p, hw, zoom, boxes=mask_boxes(p, hw[0], side, zoom)),
                 to_pil(out.bg[idx], zoom)]
        for row, tile in zip(rows, tiles):
            row.append(tile)
    labels = [s.format(k=k) for s in NINE_ROW_LABELS]
    return labels, rows


@torch.no_grad()
def nine_row_figure(x: Tensor, out, topk: Optional[int] = None, max_frames: int = 8) -> Image.Image:
    """The official DLP/DDLP diagnostic figure for input x and its model `Output`.

    x: images [B, 3, H, W] (columns: the first `max_frames` images) or clips [B, T, 3, H, W]
    (columns: the first `max_frames` frames of clip 0). Rows: ground truth; all posterior
    particles; reconstruction; prior proposals (crosses); the `topk` most opaque particles
    (default all); foreground only; glimpse (scale) boxes; background-encoder mask squares over
    the image as the background encoder sees it (covered parts darkened); decoded background.
    Tiles are enlarged (nearest) to at least 128 px so that markers stay legible.
    """
    labels, rows = nine_row_tiles(x, out, topk, max_frames)
    return grid(rows, labels=labels)


# ---------------------------------------------------------------------------------- rollouts
def _one_clip(frames: Tensor) -> Tensor:
    return frames[0] if frames.ndim == 5 else frames


def _trail(draw: ImageDraw.ImageDraw, pts: np.ndarray, colour, fade: float) -> None:
    """Segments of a particle's recent path, oldest faintest."""
    n = len(pts) - 1
    for i in range(n):
        a = int(255 * fade * (i + 1) / (n + 1))
        draw.line([pts[i, 1], pts[i, 0], pts[i + 1, 1], pts[i + 1, 0]], fill=(*colour, a), width=2)


def _draw_rollout_particles(img: Image.Image, yx: np.ndarray, on: np.ndarray, t: int,
                            trail: int) -> Image.Image:
    """Particles of frame t (yx [T, K, 2] tile pixels, on [T, K]) with trails of `trail` steps."""
    K = yx.shape[1]
    colours, r = particle_colours(K), _radius(img.width)
    order = sorted(range(K), key=lambda k: on[t, k])

    def paint(draw: ImageDraw.ImageDraw) -> None:
        if trail > 0 and t > 0:
            for k in order:
                _trail(draw, yx[max(0, t - trail):t + 1, k], colours[k], _alpha(on[t, k]) / 255)
        for k in order:
            _dot(draw, yx[t, k, 0], yx[t, k, 1], r, colours[k], _alpha(on[t, k]))
    return _overlay(img, paint)


def _framed(tile: Image.Image, colour, border: int) -> Image.Image:
    out = Image.new("RGB", (tile.width + 2 * border, tile.height + 2 * border), colour)
    out.paste(tile, (border, border))
    return out


def _rollout_frame(tiles: list[Image.Image], titles: list[tuple[str, tuple]], borders: list[tuple],
                   header: int = 18, border: int = 3, gap: int = 4) -> Image.Image:
    w, h = tiles[0].width + 2 * border, tiles[0].height + 2 * border
    out = Image.new("RGB", (len(tiles) * (w + gap) + gap, header + h + gap), BACKDROP)
    draw = ImageDraw.Draw(out)
    for j, (tile, (title, colour), frame_colour) in enumerate(zip(tiles, titles, borders)):
        left = gap + j * (w + gap)
        draw.text((left + 2, header // 2), title, fill=colour, font=font(12), anchor="lm")
        out.paste(_framed(tile, frame_colour, border), (left, header))
    return out


@torch.no_grad()
def rollout_frames(gt: Optional[Tensor], pred: Tensor, particles: Optional[Particles] = None,
                   cond_steps: int = 0, trajectories: bool = True, zoom: Optional[int] = None,
                   trail: int = 10, phases: tuple[str, str] = ("cond", "pred")) -> list[Image.Image]:
    """One picture per time step of a rollout: ground truth (left) beside the prediction (right).

    gt / pred: [T, 3, H, W] or [B, T, 3, H, W] (clip 0 is shown); gt may be None (prediction only)
    or shorter than pred (later steps get an empty "no ground truth" tile, so every picture has
    the same size). particles ([T, K, ...] or [B, T, K, ...]) are drawn on the prediction, with a
    fading trail of their last `trail` positions when `trajectories`. Conditioning steps
    (t < cond_steps) get a green border and "cond", predicted steps a red one and "pred"; `phases`
    renames the two (generated videos: the diffusion model's frames, then PINT's).
    """
    pred = _one_clip(pred)
    gt = None if gt is None else _one_clip(gt)
    hw = tuple(pred.shape[-2:])
    zoom = zoom or auto_zoom(hw[1])
    yx = on = None
    if particles is not None:
        p = particles[0] if particles.position.ndim == 4 else particles
        yx, on = _centres(p.position, hw, zoom), _np(p.transparency).reshape(p.position.shape[:2])
    frames = []
    for t in range(pred.shape[0]):
        tile = to_pil(pred[t], zoom)
        if yx is not None:
            tile = _draw_rollout_particles(tile, yx, on, t, trail if trajectories else 0)
        cond = t < cond_steps
        colour = COND_COLOUR if cond else PRED_COLOUR
        tiles, titles, borders = [tile], [(f"t={t} {phases[0] if cond else phases[1]}", colour)], [colour]
        if gt is not None:
            tiles.insert(0, to_pil(gt[t], zoom) if t < len(gt) else _blank(tile.size, "no ground truth"))
            titles.insert(0, ("ground truth", TEXT))
            borders.insert(0, (90, 90, 90))
        frames.append(_rollout_frame(tiles, titles, borders))
    return frames


def _blank(size: tuple[int, int], text: str) -> Image.Image:
    img = Image.new("RGB", size, (45, 45, 45))
    ImageDraw.Draw(img).text((size[0] // 2, size[1] // 2), text, fill=(160, 160, 160), font=font(11),
                             anchor="mm")
    return img


# ---------------------------------------------------------------------------------- writers
@contextlib.contextmanager
def _atomic(path: Path) -> Iterator[Path]:
    """A temporary file beside `path` that replaces it only once fully written, so readers never
    see a half-written picture or video (and a crash leaves no truncated file behind)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.stem}.{os.getpid()}.{secrets.token_hex(4)}.tmp{path.suffix}"
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))   # umask applies (mkstemp: 0600)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def save_figure(img: Image.Image, path: str | os.PathLike) -> Path:
    """Write a picture atomically (PNG unless the suffix names another Pillow format)."""
    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower(), None) if path.suffix else "PNG"
    if fmt is None:
        raise ValueError(f"cannot save a picture as {path.suffix!r} ({path}); use .png")
    with _atomic(path) as tmp:
        img.save(tmp, format=fmt)
    return path


def _padded(frames: Sequence[Image.Image], multiple: int = 1) -> list[Image.Image]:
    """All frames on canvases of one size (the largest, rounded up to `multiple`)."""
    w = max(f.width for f in frames)
    h = max(f.height for f in frames)
    w, h = -(-w // multiple) * multiple, -(-h // multiple) * multiple
    out = []
    for f in frames:
        f = f.convert("RGB")
        if f.size != (w, h):
            canvas = Image.new("RGB", (w, h), BACKDROP)
            canvas.paste(f, (0, 0))
            f = canvas
        out.append(f)
    return out


def _require_ffmpeg() -> None:
    try:
        import imageio_ffmpeg
        imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError) as e:
        raise ImportError("writing .mp4 needs the ffmpeg plugin of imageio: `pip install imageio-ffmpeg` "
                          "(or `pip install ddlp[video]`), or save a .gif instead") from e


def _write_gif(frames: list[Image.Image], path: Path, fps: float) -> None:
    frames[0].save(path, format="GIF", save_all=True, append_images=frames[1:],
                   duration=max(20, round(1000 / fps)), loop=0)


def _write_mp4(frames: list[Image.Image], path: Path, fps: float) -> None:
    import imageio.v2 as iio
    with iio.get_writer(path, format="FFMPEG", mode="I", fps=fps, codec="libx264",
                        pixelformat="yuv420p", macro_block_size=16) as writer:
        for f in frames:
            writer.append_data(np.asarray(f))


def save_video(frames: Sequence[Image.Image], path: str | os.PathLike, fps: float = 10) -> Path:
    """Write frames as an animated .gif (loops forever) or an H.264 .mp4, chosen by the suffix.

    Frames of different sizes are padded to the largest (and, for mp4, to multiples of 16, which
    the codec needs). The file appears atomically; parent folders are created. Note that Pillow
    stores identical consecutive GIF frames once, with their durations added.
    """
    path = Path(path)
    writers = {".gif": _write_gif, ".mp4": _write_mp4}
    suffix = path.suffix.lower()
    if suffix not in writers:
        raise ValueError(f"unknown video format {path.suffix!r} for {path}: use .gif or .mp4")
    if not frames:
        raise ValueError("save_video needs at least one frame")
    if suffix == ".mp4":
        _require_ffmpeg()
    frames = _padded(frames, 16 if suffix == ".mp4" else 1)
    with _atomic(path) as tmp:
        writers[suffix](frames, tmp, fps)
    return path
