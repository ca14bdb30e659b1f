"""What every data reader shares: the file kinds it recognises, the error it raises for a file
it cannot use, and the resize of float clips. `data.reader.read_clip` reads one clip."""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor

VIDEO_SUFFIXES = (".mp4", ".gif", ".webm", ".avi", ".mov", ".mkv")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
ARRAY_SUFFIXES = (".npy", ".npz")


class ClipError(ValueError):
    """A clip that cannot be read; the message names the file."""

    def __str__(self) -> str:
        # A DataLoader worker re-raises it with the worker's whole traceback as the message; the
        # user needs only the last line (ours), without the class-name prefix.
        msg = super().__str__()
        if "Original Traceback" in msg:
            last = [line for line in msg.strip().splitlines() if line.strip()][-1]
            msg = last.split("ClipError: ", 1)[-1]
        return msg


def resize(frames: Tensor, size: Optional[int]) -> Tensor:
    """Float frames [..., H, W] in [0, 1] -> [..., size, size] (bilinear, antialiased); None keeps them."""
    if size is None or frames.shape[-2:] == (size, size):
        return frames
    return F.interpolate(frames, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=True).clamp(0, 1)
