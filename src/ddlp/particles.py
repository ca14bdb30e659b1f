"""The `Particles` type: the one vocabulary every part of ddlp speaks.

A particle is a position (y, x) in [-1, 1] (row first, as in the official code; the centre of its
glimpse, or of the object drawn in it for models with `centred_positions`), a scale
(pre-sigmoid, (y, x): the glimpse covers sigmoid(scale) of the image per axis), a depth (smaller
is in front), a transparency in [0, 1] and an appearance feature vector. Every image also has one
background particle, represented by its feature vector. Each attribute comes with the parameters
of the distribution it was drawn from where one exists (Gaussian mu/logvar, Beta a/b).

Shapes: per-frame tensors are [..., K, d]; the leading dims are [B] for images and [B, T] for
videos. Background tensors are [..., F_bg].
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Callable, Optional

import torch
from torch import Tensor


@dataclass
class Particles:
    position: Tensor                      # [..., K, 2] (y, x)
    scale: Tensor                         # [..., K, 2] pre-sigmoid (y, x)
    depth: Tensor                         # [..., K, 1]
    transparency: Tensor                  # [..., K]
    features: Tensor                      # [..., K, F]
    bg_features: Optional[Tensor] = None  # [..., F_bg]

    position_mu: Optional[Tensor] = None
    position_logvar: Optional[Tensor] = None
    anchor: Optional[Tensor] = None       # posterior only: z_a, the centre of the offset
    offset_mu: Optional[Tensor] = None    # posterior only: position_mu = anchor + offset_mu
    scale_mu: Optional[Tensor] = None
    scale_logvar: Optional[Tensor] = None
    depth_mu: Optional[Tensor] = None
    depth_logvar: Optional[Tensor] = None
    transparency_a: Optional[Tensor] = None
    transparency_b: Optional[Tensor] = None
    features_mu: Optional[Tensor] = None
    features_logvar: Optional[Tensor] = None
    bg_mu: Optional[Tensor] = None
    bg_logvar: Optional[Tensor] = None

    # ------------------------------------------------------------------ shape helpers
    @property
    def num_particles(self) -> int:
        return self.position.shape[-2]

    @property
    def batch_shape(self) -> torch.Size:
        """Leading dims: [B] for images, [B, T] for videos."""
        return self.position.shape[:-2]

    def map(self, fn: Callable[[Tensor], Tensor]) -> "Particles":
        """Apply `fn` to every tensor field (None stays None)."""
        return Particles(**{f.name: (None if (v := getattr(self, f.name)) is None else fn(v))
                            for f in fields(self)})

    def detach(self) -> "Particles":
        return self.map(Tensor.detach)

    def to(self, *args, **kwargs) -> "Particles":
        return self.map(lambda t: t.to(*args, **kwargs))

    def __getitem__(self, index) -> "Particles":
        """Index the leading (batch / time) dims, e.g. `p[:, 3]` is frame 3 of a video."""
        if not isinstance(index, tuple):
            index = (index,)
        return self.map(lambda t: t[index])

    def replace(self, **changes) -> "Particles":
        return dataclasses.replace(self, **changes)

    def means(self) -> "Particles":
        """The deterministic particles: every value replaced by its distribution's mean."""
        changes = {}
        for value, mean in (("position", "position_mu"), ("scale", "scale_mu"),
                            ("depth", "depth_mu"), ("features", "features_mu"),
                            ("bg_features", "bg_mu")):
            if getattr(self, mean) is not None:
                changes[value] = getattr(self, mean)
        if self.transparency_a is not None:
            changes["transparency"] = self.transparency_a / (self.transparency_a + self.transparency_b)
        return self.replace(**changes)

    @staticmethod
    def stack(items: list["Particles"], dim: int = 1) -> "Particles":
        """Stack per-frame particles along a new time dim (default 1: [B, T, ...])."""
        return Particles._join(items, lambda ts: torch.stack(ts, dim))

    @staticmethod
    def cat(items: list["Particles"], dim: int = 1) -> "Particles":
        """Concatenate along an existing dim (default 1: time)."""
        return Particles._join(items, lambda ts: torch.cat(ts, dim))

    @staticmethod
    def _join(items: list["Particles"], join) -> "Particles":
        out = {}
        for f in fields(Particles):
            values = [getattr(p, f.name) for p in items]
            out[f.name] = None if any(v is None for v in values) else join(values)
        return Particles(**out)

    def values(self) -> "Particles":
        """Only the sampled values, without distribution parameters."""
        return Particles(self.position, self.scale, self.depth, self.transparency,
                         self.features, self.bg_features)
