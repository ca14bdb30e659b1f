"""MED / MED10: the mean Euclidean distance between predicted and true object positions, as in the
G-SWM Balls-Interaction benchmark (spec 04-evaluation.md, section 6).

Coordinates are G-SWM's: (x, y) = (column, row) in units of the image side, measured from the
top-left image *edge* (ground truth: stored pixel positions / S). Particle positions are (row,
col) in [-1, 1] with -1/+1 at the *centres* of the first/last pixel (align_corners), so the exact
conversion adds half a pixel: x = ((col + 1) / 2 * (S - 1) + 0.5) / S. The "naive" option,
x = (col + 1) / 2, is kept for comparison; it is off by up to 0.5 / S near the borders.

Per episode, particles and balls are paired once (Hungarian assignment on squared distances at one
frame, normally the first predicted one) and the pairs are kept for the whole rollout; the error
of a step is the mean over pairs of the Euclidean distance. Episode averages are plain means (one
NaN spoils its step, as in G-SWM) and MED10 is the *sum* of the first ten step values.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from torch import Tensor

MAX_D2 = 1.0            # G-SWM: pairs further apart than this (squared, image-side units) never match
MIN_PRESENCE = 0.5      # particles with transparency above this are candidates (G-SWM's z_pres > 0.5)


def particles_to_xy(position: Tensor, image_size: int, mapping: str = "exact") -> Tensor:
    """Particle positions [..., 2] (row, col) in [-1, 1] -> [..., 2] (x, y) in image-side units."""
    rc = position.double()
    if mapping == "exact":
        unit = ((rc + 1) / 2 * (image_size - 1) + 0.5) / image_size
    elif mapping == "naive":
        unit = (rc + 1) / 2
    else:
        raise ValueError(f"unknown coordinate mapping {mapping!r}; use 'exact' or 'naive'")
    return unit.flip(-1)


def xy_to_particles(xy: Tensor, image_size: int) -> Tensor:
    """Inverse of the exact mapping: (x, y) in image-side units -> (row, col) in [-1, 1]."""
    return ((xy.double() * image_size - 0.5) / (image_size - 1) * 2 - 1).flip(-1)


def ground_truth_xy(batch, frames: int, image_size: int) -> Optional[tuple[Tensor, Tensor]]:
    """Ball centres (x, y) in image-side units [B, T, O, 2] and visibility [B, T, O] of the first
    `frames` frames of a batch, if it carries them (Balls: stored pixel positions / S; else the
    (row, col) [-1, 1] `positions`); None otherwise."""
    if not isinstance(batch, dict) or "in_camera" not in batch:
        return None
    if "positions_px" in batch:
        xy = batch["positions_px"][:, :frames].double() / image_size
    elif "positions" in batch:
        xy = particles_to_xy(batch["positions"][:, :frames], image_size, "exact")
    else:
        return None
    return xy, batch["in_camera"][:, :frames] > 0


def linear_assignment(cost: np.ndarray) -> list[tuple[int, int]]:
    """Minimum-cost one-to-one assignment of the rows and columns of a rectangular `cost` matrix
    (Hungarian algorithm with potentials). NaN/inf entries are forbidden pairs: they are never
    returned (a row whose only options are forbidden stays unassigned)."""
    cost = np.asarray(cost, dtype=np.float64)
    if cost.size == 0:
        return []
    transpose = cost.shape[0] > cost.shape[1]
    c = cost.T if transpose else cost
    finite = np.isfinite(c)
    big = (np.abs(c[finite]).max() + 1) * (c.size + 1) if finite.any() else 1.0
    c = np.where(finite, c, big)
    n, m = c.shape                                   # n <= m: every row gets a column
    u, v = np.zeros(n + 1), np.zeros(m + 1)
    owner = np.zeros(m + 1, dtype=int)               # owner[j]: row (1-based) holding column j
    for i in range(1, n + 1):
        owner[0], j0 = i, 0
        best, way, used = np.full(m + 1, np.inf), np.zeros(m + 1, dtype=int), np.zeros(m + 1, dtype=bool)
        while owner[j0] != 0:
            used[j0] = True
            i0 = owner[j0]
            free = ~used[1:]
            reduced = c[i0 - 1] - u[i0] - v[1:]
            better = free & (reduced < best[1:])
            best[1:][better] = reduced[better]
            way[1:][better] = j0
            candidates = np.where(free, best[1:], np.inf)
            j1 = int(np.argmin(candidates)) + 1
            delta = candidates[j1 - 1]
            u[owner[used]] += delta
            v[used] -= delta
            best[1:][free] -= delta
            j0 = j1
        while j0:                                    # flip the augmenting path
            j1 = way[j0]
            owner[j0] = owner[j1]
            j0 = j1
    pairs = [(owner[j] - 1, j - 1) for j in range(1, m + 1) if owner[j]]
    pairs = [(b, a) if transpose else (a, b) for a, b in pairs]
    return sorted((r, k) for r, k in pairs if finite[(k, r) if transpose else (r, k)])


def match_once(pred_xy: Tensor, presence: Tensor, gt_xy: Tensor, gt_valid: Tensor,
               min_presence: float = MIN_PRESENCE, max_d2: float = MAX_D2,
               fallback: bool = True) -> list[tuple[int, int]]:
    """(ball, particle) pairs for one frame: pred_xy [K, 2], presence [K], gt_xy [O, 2], gt_valid [O].

    Candidates are the particles with presence > min_presence (all particles if `fallback` and
    there are fewer candidates than visible balls); pairs with squared distance > max_d2 are
    forbidden."""
    balls = torch.nonzero(gt_valid > 0).flatten().tolist()
    cand = torch.nonzero(presence > min_presence).flatten().tolist()
    if fallback and len(cand) < len(balls):
        cand = list(range(pred_xy.shape[0]))
    if not balls or not cand:
        return []
    d2 = torch.cdist(gt_xy[balls].double(), pred_xy[cand].double()).square().cpu().numpy()
    d2[d2 > max_d2] = np.nan
    return [(balls[i], cand[j]) for i, j in linear_assignment(d2)]


def med_errors(pred_xy: Tensor, presence: Tensor, gt_xy: Tensor, gt_valid: Tensor, match_t: int,
               **match_kw) -> Tensor:
    """Per-step errors [B, T] of particles pred_xy [B, T, K, 2] (presence [B, T, K]) against balls
    gt_xy [B, T, O, 2] (gt_valid [B, T, O]), all in the same (x, y) units, with the pairs fixed at
    frame `match_t`. A step is the mean over pairs whose ball is visible there; NaN without any."""
    B, T = pred_xy.shape[:2]
    out = torch.full((B, T), math.nan, dtype=torch.float64)
    for b in range(B):
        pairs = match_once(pred_xy[b, match_t], presence[b, match_t], gt_xy[b, match_t],
                           gt_valid[b, match_t], **match_kw)
        if not pairs:
            continue
        balls, parts = zip(*pairs)
        d = (pred_xy[b][:, list(parts)].double() - gt_xy[b][:, list(balls)].double()).norm(dim=-1)  # [T, P]
        seen = (gt_valid[b][:, list(balls)] > 0).to(d.dtype)
        out[b] = (d * seen).sum(-1) / seen.sum(-1)                      # 0 / 0 -> NaN when none visible
    return out.to(pred_xy.device)


def med_summary(errors: Tensor, first: int = 10) -> dict:
    """errors [N episodes, S scored steps] -> per-step curve (plain mean over episodes), MED over
    the first `first` steps (sum, G-SWM's MED10; None when fewer steps were scored) and the mean
    over every (episode, step) entry."""
    per_step = errors.double().mean(0)
    n = min(first, per_step.numel())
    return dict(med10=float(per_step[:n].sum()) if n == first else None,
                med_overall=float(errors.double().mean()),
                per_step=per_step.tolist(), steps_summed=n, episodes=int(errors.shape[0]))
