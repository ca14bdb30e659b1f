"""Predictors that learn nothing, to tell whether a model's dynamics learned anything.

* "stand_still": every later frame repeats the last observed one.
* "constant_velocity": positions move on by the step between the last two observed frames;
  every other attribute stands still.

Both apply to particle trajectories (the posterior of the conditioning frames) and to plain
position arrays such as a dataset's ground-truth ball centres.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .particles import Particles

BASELINES = ("stand_still", "constant_velocity")


def extrapolate(x: Tensor, steps: int, baseline: str) -> Tensor:
    """Observed values x [B, T, ...] (T >= 2 for constant_velocity) -> [B, T + steps, ...]."""
    if baseline not in BASELINES:
        raise ValueError(f"unknown baseline {baseline!r}; expected one of {BASELINES}")
    last = x[:, -1:]
    k = torch.arange(1, steps + 1, dtype=x.dtype, device=x.device).view(1, steps, *[1] * (x.ndim - 2))
    if baseline == "stand_still":
        future = last.expand(-1, steps, *x.shape[2:])
    else:
        if x.shape[1] < 2:
            raise ValueError("constant_velocity needs at least two observed frames")
        future = last + k * (last - x[:, -2:-1])
    return torch.cat([x, future], 1)


def predict_particles(history: Particles, steps: int, baseline: str) -> Particles:
    """Extend particle values [B, T, K, ...] by `steps` frames of a baseline: positions follow
    `extrapolate`, everything else repeats the last frame."""
    values = history.values()
    still = values.map(lambda t: extrapolate(t, steps, "stand_still"))
    return still.replace(position=extrapolate(values.position, steps, baseline))
