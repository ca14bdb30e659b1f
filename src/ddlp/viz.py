"""Pictures of particles: frames with particles drawn on them, and simple strips."""
from __future__ import annotations

import colorsys
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from .particles import Particles


def particle_colours(k: int) -> list[tuple[int, int, int]]:
    return [tuple(int(255 * c) for c in colorsys.hsv_to_rgb(i / max(k, 1), 0.85, 1.0)) for i in range(k)]


def to_pil(image: Tensor, zoom: int = 1) -> Image.Image:
    """[3, H, W] float in [0, 1] -> RGB PIL image, optionally enlarged (nearest)."""
    arr = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    img = Image.fromarray(arr)
    return img.resize((img.width * zoom, img.height * zoom), Image.NEAREST) if zoom > 1 else img


def draw_particles(image: Tensor, p: Particles, zoom: int = 4, boxes: bool = True,
                   min_transparency: float = 0.1, highlight: Sequence[int] = ()) -> Image.Image:
    """Frame [3, H, W] with its particles p ([K, ...], one frame) drawn on it: a dot per
    particle (faded when transparent) and optionally the glimpse box given by its scale."""
    img = to_pil(image, zoom)
    draw = ImageDraw.Draw(img)
    side = img.width - 1
    colours = particle_colours(p.num_particles)
    for k in range(p.num_particles):
        on = float(p.transparency[k])
        if on < min_transparency:
            continue
        y, x = ((p.position[k].float() + 1) / 2 * side).tolist()
        col = colours[k] if on > 0.5 else tuple(c // 2 for c in colours[k])
        r = max(2, zoom)
        width = 3 if k in highlight else 1
        draw.ellipse([x - r, y - r, x + r, y + r], outline=col, width=width)
        if boxes:
            sy, sx = (torch.sigmoid(p.scale[k].float()) * side / 2).tolist()
            draw.rectangle([x - sx, y - sy, x + sx, y + sy], outline=col, width=width)
    return img


def grid(rows: list[list[Image.Image]], pad: int = 2, labels: Optional[list[str]] = None) -> Image.Image:
    """Tile equally sized images row by row on a dark background."""
    h, w = rows[0][0].height, rows[0][0].width
    label_w = 0 if not labels else 70
    cols = max(len(r) for r in rows)
    out = Image.new("RGB", (label_w + cols * (w + pad) + pad, len(rows) * (h + pad) + pad), (20, 20, 20))
    draw = ImageDraw.Draw(out)
    for i, row in enumerate(rows):
        if labels:
            draw.text((4, pad + i * (h + pad) + h // 2 - 5), labels[i], fill=(230, 230, 230))
        for j, im in enumerate(row):
            out.paste(im, (label_w + pad + j * (w + pad), pad + i * (h + pad)))
    return out
