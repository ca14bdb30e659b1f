"""The paper's test protocol (spec 04-evaluation.md): deterministic conditional rollouts, only the
predicted frames scored, mean and std over all (video, frame) pairs; PSNR / SSIM / LPIPS as piqa
1.3.x computes them, MED / MED10 on Balls-Interaction, FVD on request. Writes a results JSON, a
CSV of per-step curves and a PNG plot of each metric against the prediction step.

Horizons follow the official scripts: `horizon` is the total clip length H (conditioning frames
included), so "Balls 10 -> 50" is cond 10, horizon 50, i.e. 40 predicted frames.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import torch
from PIL import Image, ImageDraw
from torch import Tensor

from . import checkpoint
from .config import Config
from .metrics import LPIPS, ground_truth_xy, med_errors, med_summary, particles_to_xy, psnr, ssim
from .storage import atomic_write
from .data import batch_frames
from .viz import font

# (conditioning frames, total frames H) of the paper's test tables, per dataset name.
PAPER_PROTOCOLS = {"balls": (10, 50), "obj3d": (6, 50), "obj3d128": (6, 50), "clevrer": (10, 100),
                   "phyre": (10, 100), "traffic": (6, 50)}
# The paper's test numbers (Tables 2 and 3), shown beside ours.
PAPER_RESULTS = {
    "balls": {"DDLP": {"med10": 0.149, "lpips": 0.18, "lpips_std": 0.15},
              "G-SWM": {"med10": 0.256, "lpips": 0.23, "lpips_std": 0.15},
              "DDLP (No RPE)": {"med10": 0.157, "lpips": 0.194},
              "DLP (No Tracking)": {"med10": 2.736, "lpips": 0.393}},
    "obj3d128": {"DDLP": {"psnr": 31.29, "psnr_std": 5.22, "ssim": 0.923, "ssim_std": 0.04,
                          "lpips": 0.088, "lpips_std": 0.06}},
    "traffic": {"DDLP": {"psnr": 24.4, "psnr_std": 1.02, "ssim": 0.61, "ssim_std": 0.06,
                         "lpips": 0.15, "lpips_std": 0.02}},
    "clevrer": {"DDLP": {"psnr": 29.21, "psnr_std": 6.16, "ssim": 0.92, "ssim_std": 0.04,
                         "lpips": 0.134, "lpips_std": 0.08}},
    "phyre": {"DDLP": {"psnr": 26.98, "psnr_std": 5.3, "ssim": 0.95, "ssim_std": 0.04,
                       "lpips": 0.055, "lpips_std": 0.04}},
}
IMPLEMENTATION = {
    "psnr": "piqa 1.3.1 PSNR: 10*log10(L^2 / (MSE + 1e-8)), MSE over C*H*W, L = 1 (ddlp.metrics.psnr)",
    "ssim": "piqa 1.3.1 SSIM: Gaussian window 11 / sigma 1.5, per RGB channel, no padding, "
            "C1 = (0.01 L)^2, C2 = (0.03 L)^2, mean over channels and positions (ddlp.metrics.ssim)",
    "lpips": "piqa 1.3.1 LPIPS(network='vgg'): ImageNet-normalised input, VGG-16 relu1_2..relu5_3, "
             "unit-normalised features (eps 1e-10), spatial mean, LPIPS v0.1 linear weights (ddlp.metrics.LPIPS)",
    "med": "G-SWM MED: (x, y) in image-side units from the top-left edge, Hungarian matching once, "
           "Euclidean error averaged over matched balls, plain mean over episodes; MED10 = sum of "
           "the first 10 predicted steps (ddlp.metrics.med)",
}
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "lpips": False, "med": False}
CHUNK = 64                     # images per metric call (bounds LPIPS memory)


# ------------------------------------------------------------------------------ protocol
@dataclass
class Protocol:
    """What is rolled out and scored. `horizon` is the total clip length H (cond included)."""
    cond: int
    horizon: int
    deterministic: bool = True
    batch_size: int = 10
    med_horizon: Optional[int] = None     # total frames of the MED curve (default: horizon)
    med_match: str = "first_pred"         # match at t = cond ('first_pred') or cond - 1 ('last_cond')
    med_coords: str = "exact"             # 'exact' (pixel centres) or 'naive' ((u + 1) / 2)

    @property
    def predicted(self) -> int:
        return self.horizon - self.cond

    @property
    def total(self) -> int:
        """Frames each clip must have: enough for the image metrics and the MED curve."""
        return max(self.horizon, self.med_horizon or 0)

    def check(self) -> "Protocol":
        if self.cond < 1:
            raise ValueError(f"need at least one conditioning frame, got cond={self.cond}")
        if self.horizon <= self.cond:
            raise ValueError(f"horizon is the total clip length (conditioning frames included) and must "
                             f"exceed cond: got cond={self.cond}, horizon={self.horizon}")
        if self.med_horizon is not None and self.med_horizon <= self.cond:
            raise ValueError(f"med_horizon ({self.med_horizon}) must exceed cond ({self.cond})")
        if self.med_match not in ("first_pred", "last_cond"):
            raise ValueError(f"med_match must be 'first_pred' or 'last_cond', got {self.med_match!r}")
        if self.med_coords not in ("exact", "naive"):
            raise ValueError(f"med_coords must be 'exact' or 'naive', got {self.med_coords!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        return self


def paper_protocol(dataset: str, config: Config, cond: Optional[int] = None,
                   horizon: Optional[int] = None, **kw) -> tuple[Protocol, bool]:
    """The paper's (cond, H) for `dataset`, each overridable; for other datasets the config's
    cond_steps and animation_horizon. Returns the protocol and whether it is the paper's."""
    default = PAPER_PROTOCOLS.get(dataset, (config.cond_steps, config.animation_horizon))
    c, h = cond or default[0], horizon or default[1]
    return Protocol(c, h, **kw).check(), dataset in PAPER_PROTOCOLS and (c, h) == default


# ------------------------------------------------------------------------------ loading
def ablation_of(config: Config) -> dict:
    """Which row of the paper's ablation (Table 2) a model belongs to."""
    # `no_tracking` is a config field in versions that implement the ablation; in older ones a
    # `--set no_tracking=true` lands in `extra` and the model ignores it, which must not be hidden.
    implemented = "no_tracking" in {f.name for f in dataclasses.fields(Config)}
    no_tracking = bool(getattr(config, "no_tracking", False)) if implemented else False
    no_rpe = not config.pint_relative_bias
    removed = [label for label, off in (("No Tracking", no_tracking), ("No RPE", no_rpe)) if off]
    out = {"name": f"{'DLP' if no_tracking else 'DDLP'} ({', '.join(removed)})" if removed else "DDLP",
           "no_tracking": no_tracking, "no_rpe": no_rpe, "pint_relative_bias": config.pint_relative_bias}
    if not implemented and config.extra.get("no_tracking"):
        out["warning"] = "config asks for no_tracking but this ddlp version does not implement it (ignored)"
    return out


def load_video_model(path: str | Path, use_last: bool = False, device: str = "cpu"):
    """checkpoint.load_video_model, with the paper's ablation the model belongs to in its description."""
    model, info = checkpoint.load_video_model(path, use_last, device)
    info["ablation"] = ablation_of(model.config)
    return model, info


def load_lpips(enabled: bool = True, vgg_weights: Optional[str] = None, lpips_weights: Optional[str] = None,
               download: bool = True) -> tuple[Optional[LPIPS], Optional[str]]:
    """The LPIPS metric, or None and the reason it is unavailable (other metrics go on)."""
    from .nn.vgg import WeightsNotFound
    if not enabled:
        return None, "disabled (--no-lpips)"
    try:
        return LPIPS.pretrained(vgg_weights, lpips_weights, download=download), None
    except (WeightsNotFound, ValueError, RuntimeError) as e:
        return None, str(e)


# ------------------------------------------------------------------------------ scoring
@dataclass
class Scores:
    """Raw per-(video, step) values of one evaluation."""
    pred: dict[str, Tensor] = field(default_factory=dict)     # name -> [N, H - c] predicted frames
    cond: dict[str, Tensor] = field(default_factory=dict)     # name -> [N, c] reconstructions
    med: Optional[Tensor] = None                              # [N, med_H - c] per-step errors
    fvd: Optional[dict] = None
    videos: int = 0
    baselines: dict[str, "Scores"] = field(default_factory=dict)   # predictor name -> its scores


def image_scores(pred: Tensor, gt: Tensor, lpips: Optional[LPIPS] = None) -> dict[str, Tensor]:
    """PSNR, SSIM (and LPIPS) of images [N, 3, H, W] in [0, 1], one value per image, in chunks."""
    out: dict[str, list[Tensor]] = {"psnr": [], "ssim": [], "mse": []}
    if lpips is not None:
        out["lpips"] = []
    for i in range(0, len(pred), CHUNK):
        p, g = pred[i:i + CHUNK], gt[i:i + CHUNK]
        out["psnr"].append(psnr(g, p))
        out["ssim"].append(ssim(g, p))
        out["mse"].append((p - g).square().flatten(1).mean(1))
        if lpips is not None:
            out["lpips"].append(lpips(g, p))
    return {k: torch.cat(v).float().cpu() for k, v in out.items()}


class _Collector:
    """Accumulates one predictor's per-batch values into Scores."""

    def __init__(self):
        self.pred: dict[str, list[Tensor]] = {}
        self.cond: dict[str, list[Tensor]] = {}
        self.med: list[Tensor] = []

    def add(self, name: str, values: Tensor, where: str = "pred") -> None:
        getattr(self, where).setdefault(name, []).append(values)

    def scores(self, videos: int) -> Scores:
        return Scores({k: torch.cat(v) for k, v in self.pred.items()},
                      {k: torch.cat(v) for k, v in self.cond.items()},
                      torch.cat(self.med) if self.med else None, None, videos)


def _med_of(xy: Tensor, presence: Tensor, truth: tuple[Tensor, Tensor], protocol: Protocol) -> Tensor:
    """Per-step MED [B, med_H - c] of positions xy [B, T, K, 2] in G-SWM units."""
    c = protocol.cond
    match_t = c if protocol.med_match == "first_pred" else c - 1
    return med_errors(xy, presence, *truth, match_t=match_t)[:, c:protocol.med_horizon or protocol.horizon]


@torch.no_grad()
def score_rollouts(model, clips: Iterable, protocol: Protocol, lpips: Optional[LPIPS] = None,
                   med: bool = True, i3d=None, progress: bool = True, total: Optional[int] = None,
                   baselines: bool = False) -> Scores:
    """Roll the model out on every batch of `clips` (dicts with "frames" [B, T, 3, S, S], or
    tensors) and score it. MED is computed when `med` and the batches carry ball positions.
    With `baselines`, the predictors of ddlp.baselines are scored the same way from the same
    conditioning posterior (Scores.baselines), and, where the data carry ball positions, the same
    predictors applied to those positions ("ground_truth_*", MED only)."""
    from tqdm.auto import tqdm

    from .baselines import BASELINES, extrapolate, predict_particles
    from .metrics.fvd import i3d_features
    device = next(model.parameters()).device
    S, c, H = model.config.image_size, protocol.cond, protocol.horizon
    steps = protocol.total - c
    collect: dict[str, _Collector] = {"model": _Collector()}
    feats: tuple[list[Tensor], list[Tensor]] = ([], [])
    n = 0
    for batch in tqdm(clips, desc="evaluate", unit="batch", total=total, disable=not progress):
        frames = batch_frames(batch)[:, :protocol.total].to(device).float()
        B = frames.shape[0]
        flat = lambda x: x.reshape(-1, *x.shape[2:])  # noqa: E731
        posterior = model.encode(frames[:, :c], deterministic=protocol.deterministic)
        trajectories = {"model": model.predict(posterior, steps, protocol.deterministic)}
        if baselines:
            trajectories.update({b: predict_particles(posterior, steps, b) for b in BASELINES})
        truth = ground_truth_xy(batch, protocol.total, S) if med else None
        for name, particles in trajectories.items():
            out = model.decode(particles).clamp(0, 1)
            acc = collect.setdefault(name, _Collector())
            for metric, v in image_scores(flat(out[:, c:H]), flat(frames[:, c:H]), lpips).items():
                acc.add(metric, v.view(B, H - c))
            if truth is not None:
                xy = particles_to_xy(particles.position.cpu(), S, protocol.med_coords)
                acc.med.append(_med_of(xy, particles.transparency.cpu(), truth, protocol))
            if name == "model":
                rec, seen = flat(out[:, :c]), flat(frames[:, :c])
                acc.add("psnr", psnr(seen, rec).cpu().view(B, c), "cond")
                acc.add("mse", (rec - seen).square().flatten(1).mean(1).cpu().view(B, c), "cond")
                if i3d is not None:
                    feats[0].append(i3d_features(i3d, frames[:, :H]))
                    feats[1].append(i3d_features(i3d, out[:, :H]))
        if baselines and truth is not None:
            xy, seen = truth
            for b in BASELINES:
                guess = extrapolate(xy[:, :c], steps, b)
                acc = collect.setdefault(f"ground_truth_{b}", _Collector())
                acc.med.append(_med_of(guess, seen[:, :protocol.total].double(), truth, protocol))
        n += B
    if n == 0:
        raise ValueError("the evaluation set is empty")
    scores = collect.pop("model").scores(n)
    scores.baselines = {name: acc.scores(n) for name, acc in collect.items()}
    if i3d is not None:
        from .metrics import frechet_distance
        real, fake = torch.cat(feats[0]), torch.cat(feats[1])
        scores.fvd = {"value": frechet_distance(real, fake), "videos": n, "frames": H,
                      "feature_dim": int(real.shape[1]),
                      "note": "whole clips (conditioning reconstructions included), as LPWM; "
                              "with few videos the covariances are rank-deficient"}
    return scores


# ------------------------------------------------------------------------------ summaries
def _stats(values: Tensor) -> dict:
    """Mean and unbiased std over every (video, step) value, and the per-step curve."""
    v = values.double()
    return {"mean": float(v.mean()), "std": float(v.flatten().std()) if v.numel() > 1 else math.nan,
            "n": int(v.numel()), "per_step": v.mean(0).tolist(),
            "per_step_std": v.std(0).tolist() if v.shape[0] > 1 else [math.nan] * v.shape[1]}


def summarize(scores: Scores, protocol: Protocol, lpips_reason: Optional[str] = None,
              med_reason: Optional[str] = None, lpips_weights: Optional[dict] = None) -> dict:
    """The "metrics" section of the results JSON. `lpips_weights`: LPIPS.provenance (files, origin,
    cross-check status and the label the number is reported under)."""
    metrics: dict = {}
    for name in ("psnr", "ssim", "lpips"):
        if name in scores.pred:
            metrics[name] = {**_stats(scores.pred[name]), "implementation": IMPLEMENTATION[name],
                             "value_range": [0.0, 1.0], "higher_is_better": HIGHER_IS_BETTER[name]}
            if name == "lpips" and lpips_weights is not None:
                metrics[name].update(label=lpips_weights["label"], weights=lpips_weights)
        else:
            metrics[name] = {"available": False, "reason": lpips_reason or "not computed",
                             "implementation": IMPLEMENTATION[name]}
    if scores.med is not None:
        med = med_summary(scores.med)
        metrics["med"] = {**med, "implementation": IMPLEMENTATION["med"], "unit": "image side (1.0 = 64 px on Balls)",
                          "coordinates": protocol.med_coords,
                          "matching": f"Hungarian on squared distance, once at t = "
                                      f"{protocol.cond if protocol.med_match == 'first_pred' else protocol.cond - 1}"
                                      f" ({protocol.med_match}); candidates: transparency > 0.5 "
                                      "(all particles if fewer than balls); pairs kept for the whole rollout",
                          "higher_is_better": False}
    else:
        metrics["med"] = {"available": False, "reason": med_reason or "the data carry no ground-truth positions"}
    recon = scores.cond.get("psnr")
    if recon is not None:
        metrics["reconstruction_psnr"] = {"mean": float(recon.double().mean()),
                                          "note": "conditioning frames (not part of the protocol)"}
    if scores.fvd is not None:
        metrics["fvd"] = scores.fvd
    if scores.baselines:
        metrics["baselines"] = {name: _baseline_metrics(name, b) for name, b in scores.baselines.items()}
    return metrics


BASELINE_NOTES = {
    "stand_still": "the last conditioning frame's posterior particles repeated",
    "constant_velocity": "posterior positions extrapolated from the last two conditioning frames "
                         "(other attributes repeated)",
    "ground_truth_stand_still": "the true ball positions of the last conditioning frame repeated (MED only)",
    "ground_truth_constant_velocity": "the true ball positions extrapolated from the last two conditioning "
                                      "frames (MED only)",
}


def _baseline_metrics(name: str, scores: Scores) -> dict:
    """What a baseline predictor scored: mean, std and per-step curve of each metric computed."""
    out: dict = {"predictor": BASELINE_NOTES.get(name, name)}
    out.update({m: _stats(v) for m, v in scores.pred.items() if m in ("psnr", "ssim", "lpips")})
    if scores.med is not None:
        out["med"] = med_summary(scores.med)
    return out


def flat_summary(metrics: dict) -> dict:
    """The official `last_val_image_metrics.json` keys (psnr, psnr_std, ...) plus med10."""
    out = {}
    for name in ("psnr", "ssim", "lpips"):
        m = metrics.get(name, {})
        if "mean" in m:
            out[name], out[f"{name}_std"] = m["mean"], m["std"]
    if metrics.get("med", {}).get("med10") is not None:
        out["med10"] = metrics["med"]["med10"]
    for name, b in metrics.get("baselines", {}).items():
        if b.get("med", {}).get("med10") is not None:
            out[f"med10_{name}"] = b["med"]["med10"]
        if "psnr" in b:
            out[f"psnr_{name}"] = b["psnr"]["mean"]
    if "fvd" in metrics:
        out["fvd"] = metrics["fvd"]["value"]
    return out


def _finite(x):
    """JSON without NaN/inf (null instead), so strict parsers accept it."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


# ------------------------------------------------------------------------------ outputs
CURVES = ("psnr", "ssim", "lpips", "med")


def _curves(metrics: dict) -> dict[str, dict]:
    """Column name -> a metric's summary with a per-step curve: the model's ("psnr", ...) and
    each baseline's ("psnr_stand_still", ...)."""
    curves = {m: metrics[m] for m in CURVES if "per_step" in metrics.get(m, {})}
    for baseline, b in metrics.get("baselines", {}).items():
        curves.update({f"{m}_{baseline}": b[m] for m in CURVES if "per_step" in b.get(m, {})})
    return curves


def curve_rows(metrics: dict, cond: int) -> list[dict]:
    """One row per prediction step k = 1.. (frame t = cond + k - 1): every metric's mean and std,
    then the baselines' means."""
    curves = _curves(metrics)
    steps = max((len(v["per_step"]) for v in curves.values()), default=0)
    rows = []
    for k in range(steps):
        row = {"step": k + 1, "frame": cond + k}
        for name, v in curves.items():
            row[name] = v["per_step"][k] if k < len(v["per_step"]) else None
            if "per_step_std" in v:
                row[f"{name}_std"] = v["per_step_std"][k] if k < len(v["per_step_std"]) else None
        rows.append(row)
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    fields = list(rows[0]) if rows else ["step", "frame"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None or (isinstance(v, float) and not math.isfinite(v)) else v)
                         for k, v in row.items()})
    atomic_write(path, lambda p: Path(p).write_text(buf.getvalue()))


# The model in blue with its std band; each baseline in a colour of its own, without a band.
SERIES_COLOURS = {"model": (30, 80, 200), "stand_still": (200, 60, 40), "constant_velocity": (230, 150, 20),
                  "ground_truth_stand_still": (150, 90, 160), "ground_truth_constant_velocity": (60, 160, 90)}


@dataclass
class Series:
    """One line of a chart: per-step means (and an optional +-1 std band)."""
    label: str
    mean: list
    std: Optional[list] = None
    colour: tuple = SERIES_COLOURS["model"]


def _finite_points(series: Series, x0: int) -> list[tuple[int, float, Optional[float]]]:
    std = series.std or [None] * len(series.mean)
    return [(k, m, s if s is not None and math.isfinite(s) else None)
            for k, (m, s) in enumerate(zip(series.mean, std), start=x0) if m is not None and math.isfinite(m)]


def _panel(name: str, series: list[Series], x0: int = 1, w: int = 340, h: int = 230) -> Image.Image:
    """One line chart: each series' mean against the prediction step, with its +-1 std band;
    a legend when there is more than one series."""
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img, "RGBA")
    left, right, top, bottom = 52, 10, 24, 32
    lines = [(s, _finite_points(s, x0)) for s in series]
    lines = [(s, pts) for s, pts in lines if pts]
    draw.text((w // 2, 4), f"{name.upper()} per prediction step", fill="black", font=font(12), anchor="mt")
    draw.rectangle([left, top, w - right, h - bottom], outline=(120, 120, 120))
    if not lines:
        draw.text((w // 2, h // 2), "no finite values", fill="gray", font=font(11), anchor="mm")
        return img
    every = [p for _, pts in lines for p in pts]
    lo = min(m - (s or 0) for _, m, s in every)
    hi = max(m + (s or 0) for _, m, s in every)
    lo, hi = (lo - 0.5, hi + 0.5) if hi - lo < 1e-12 else (lo, hi)
    k0 = min(k for k, _, _ in every)
    k1 = max(max(k for k, _, _ in every), k0 + 1)
    X = lambda k: left + (k - k0) / (k1 - k0) * (w - left - right)  # noqa: E731
    Y = lambda v: h - bottom - (v - lo) / (hi - lo) * (h - top - bottom)  # noqa: E731
    for s, pts in lines:
        band = [(k, m, sd) for k, m, sd in pts if sd is not None]
        if len(band) > 1:
            poly = [(X(k), Y(m + sd)) for k, m, sd in band] + [(X(k), Y(m - sd)) for k, m, sd in reversed(band)]
            draw.polygon(poly, fill=(*s.colour, 50))
        line = [(X(k), Y(m)) for k, m, _ in pts]
        if len(line) > 1:
            draw.line(line, fill=s.colour, width=2)
        else:
            draw.ellipse([line[0][0] - 2, line[0][1] - 2, line[0][0] + 2, line[0][1] + 2], fill=s.colour)
    tick_font = font(10)
    for i in range(5):
        v = lo + (hi - lo) * i / 4
        draw.text((left - 4, Y(v)), f"{v:.3g}", fill="black", font=tick_font, anchor="rm")
        k = round(k0 + (k1 - k0) * i / 4)
        draw.text((X(k), h - bottom + 4), str(k), fill="black", font=tick_font, anchor="mt")
    draw.text((w // 2, h - 4), "prediction step (1 = first predicted frame)", fill="black", font=tick_font, anchor="mb")
    if len(lines) > 1:
        for i, (s, _) in enumerate(lines):
            y = top + 4 + 11 * i
            draw.line([(left + 6, y + 5), (left + 18, y + 5)], fill=s.colour, width=2)
            draw.text((left + 22, y), s.label.replace("_", " "), fill="black", font=font(9))
    return img


def plot_curves(metrics: dict, title: str) -> Image.Image:
    """A row of line charts, one per metric with a per-step curve: the model's with its std
    band, and the baselines' (when evaluated) beside it."""
    panels = []
    for m in CURVES:
        series = [Series("model", metrics[m]["per_step"], metrics[m].get("per_step_std"))] \
            if "per_step" in metrics.get(m, {}) else []
        for baseline, b in metrics.get("baselines", {}).items():
            if "per_step" in b.get(m, {}):
                series.append(Series(baseline, b[m]["per_step"], colour=SERIES_COLOURS.get(baseline, (90, 90, 90))))
        if series:
            panels.append(_panel(m, series))
    if not panels:
        panels = [Image.new("RGB", (340, 230), "white")]
    out = Image.new("RGB", (sum(p.width for p in panels), panels[0].height + 22), "white")
    ImageDraw.Draw(out).text((6, 4), title, fill="black", font=font(13))
    x = 0
    for p in panels:
        out.paste(p, (x, 22))
        x += p.width
    return out


def write_report(results: dict, out_dir: Path, stem: str) -> dict[str, Path]:
    """<stem>_metrics.json, <stem>_per_step.csv and <stem>_per_step.png under out_dir."""
    from .viz import save_figure
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{stem}_metrics.json", "csv": out_dir / f"{stem}_per_step.csv",
             "png": out_dir / f"{stem}_per_step.png"}
    results["files"] = {k: str(v) for k, v in paths.items()}
    text = json.dumps(_finite(results), indent=2)
    atomic_write(paths["json"], lambda p: Path(p).write_text(text))
    write_csv(curve_rows(results["metrics"], results["protocol"]["cond"]), paths["csv"])
    p = results["protocol"]
    title = (f"{results['checkpoint'].get('ablation', {}).get('name', 'model')} on {results['data']['dataset']}/"
             f"{results['data']['split']}: {results['data']['videos']} videos, cond {p['cond']} -> H {p['horizon']}")
    save_figure(plot_curves(results["metrics"], title), paths["png"])
    return paths


# ------------------------------------------------------------------------------ the command
@dataclass
class EvalOptions:
    dataset: Optional[str] = None          # default: the model config's ds
    root: Optional[str] = None             # default: the model config's root
    split: str = "test"
    cond: Optional[int] = None             # default: the paper's, per dataset
    horizon: Optional[int] = None          # total frames H; default: the paper's
    med_horizon: Optional[int] = None
    med_match: str = "first_pred"
    med_coords: str = "exact"
    med: bool = True
    batch_size: int = 10
    max_videos: Optional[int] = None
    deterministic: bool = True
    use_last: bool = False
    device: Optional[str] = None
    lpips: bool = True
    vgg_weights: Optional[str] = None
    lpips_weights: Optional[str] = None
    download: bool = True
    fvd_i3d: Optional[str] = None
    baselines: bool = False
    out_dir: Optional[str] = None
    precision: str = "fp32"                 # fp32, bf16 or auto (nn.precision.autocast)
    progress: bool = True


def check_clips(dataset, model_size: int, needed: int, where: str) -> int:
    """Fail with the reason when the data cannot be scored by this model; returns the clip length."""
    if len(dataset) == 0:
        raise ValueError(f"{where} is empty")
    frames = batch_frames(dataset[0])
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"{where} yields items of shape {tuple(frames.shape)}; evaluation needs whole "
                         "clips [T, 3, H, W] (is this an image dataset or a DLP config?)")
    if tuple(frames.shape[-2:]) != (model_size, model_size):
        raise ValueError(f"{where} has {frames.shape[-2]}x{frames.shape[-1]} frames but the model works on "
                         f"{model_size}x{model_size}: evaluate with data of the model's size")
    if frames.shape[0] < needed:
        raise ValueError(f"{where} clips have {frames.shape[0]} frames, fewer than the {needed} the protocol "
                         f"needs (conditioning + predicted frames); lower --horizon / --cond")
    return int(frames.shape[0])


def evaluate_checkpoint(path: str | Path, opts: Optional[EvalOptions] = None) -> dict:
    """Everything `ddlp evaluate` does; returns the results dict (also written to disk)."""
    opts = opts or EvalOptions()
    from torch.utils.data import DataLoader, Subset

    from .data.registry import build_dataset
    t0 = time.time()
    device = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, info = load_video_model(path, opts.use_last, device)
    config = model.config
    name = opts.dataset or config.ds
    protocol, is_paper = paper_protocol(name, config, opts.cond, opts.horizon, deterministic=opts.deterministic,
                                        batch_size=opts.batch_size, med_horizon=opts.med_horizon,
                                        med_match=opts.med_match, med_coords=opts.med_coords)
    root = opts.root or config.root
    dataset = build_dataset(config, opts.split, root, name=name)
    length = check_clips(dataset, config.image_size, protocol.total, f"dataset {name!r} split {opts.split!r}")
    if opts.max_videos is not None:
        dataset = Subset(dataset, range(min(opts.max_videos, len(dataset))))
    lpips, lpips_reason = load_lpips(opts.lpips, opts.vgg_weights, opts.lpips_weights, opts.download)
    if lpips is not None:
        lpips = lpips.to(device)
    i3d = None
    if opts.fvd_i3d:
        from .metrics.fvd import MIN_FRAMES, load_i3d
        if protocol.horizon < MIN_FRAMES:
            raise ValueError(f"FVD needs clips of at least {MIN_FRAMES} frames, horizon is {protocol.horizon}")
        i3d = load_i3d(opts.fvd_i3d, device)
    loader = DataLoader(dataset, batch_size=protocol.batch_size, shuffle=False, num_workers=0)
    print(f"evaluating {info['ablation']['name']} from {info['path']} on {name}/{opts.split}: {len(dataset)} "
          f"videos, cond {protocol.cond} -> H {protocol.horizon} ({protocol.predicted} predicted frames"
          f"{', paper protocol' if is_paper else ''}), {'deterministic' if protocol.deterministic else 'sampled'}")
    if lpips is None:
        print(f"note: LPIPS unavailable: {lpips_reason}")
    elif lpips.provenance is not None:
        from .metrics.lpips import provenance_line
        print(f"LPIPS weights: {provenance_line(lpips.provenance)}")
    from .nn.precision import autocast, inference_precision
    precision = inference_precision(opts.precision, device)
    with autocast(precision, device):
        scores = score_rollouts(model, loader, protocol, lpips, med=opts.med, i3d=i3d, progress=opts.progress,
                                total=len(loader), baselines=opts.baselines)
    med_reason = None if opts.med else "disabled (--no-med)"
    metrics = summarize(scores, protocol, lpips_reason, med_reason,
                        lpips_weights=lpips.provenance if lpips is not None else None)
    from . import __version__
    results = {
        "summary": flat_summary(metrics),
        "metrics": metrics,
        "protocol": {**asdict(protocol), "predicted": protocol.predicted, "paper_protocol": is_paper,
                     "scored_frames": f"t in [{protocol.cond}, {protocol.horizon}) of each clip (predictions only)",
                     "averaging": "mean and unbiased std (n - 1) over all (video, predicted frame) pairs",
                     "clamp": "predictions clamped to [0, 1] before scoring",
                     "horizon_meaning": "total frames H including the conditioning frames"},
        "checkpoint": info,
        "data": {"dataset": name, "root": str(root), "split": opts.split, "videos": scores.videos,
                 "frames_per_clip": length, "image_size": config.image_size},
        "paper": PAPER_RESULTS.get(name, {}),
        "device": str(device), "precision": precision,
        "elapsed_s": round(time.time() - t0, 2), "ddlp_version": __version__,
    }
    out_dir = Path(opts.out_dir) if opts.out_dir else Path(info.get("run", info["path"])) / "eval"
    write_report(results, out_dir, f"{name}_{opts.split}")
    return results


def format_summary(results: dict) -> str:
    """A few lines for the terminal: our numbers beside the paper's."""
    s, m = results["summary"], results["metrics"]
    lines = []
    for key in ("psnr", "ssim", "lpips"):
        if key in s:
            lines.append(f"  {key.upper():<6} {s[key]:.4g} +- {s[f'{key}_std']:.3g}")
            if m[key].get("label", key.upper()) != key.upper():
                lines[-1] += f"   [{m[key]['label']}: {m[key]['weights']['note']}]"
        else:
            lines.append(f"  {key.upper():<6} unavailable (reason above and in the JSON)")
    if "med10" in s:
        lines.append(f"  MED10  {s['med10']:.4g}   (mean over all predicted steps {m['med']['med_overall']:.4g})")
    if "fvd" in s:
        lines.append(f"  FVD    {s['fvd']:.4g}   ({m['fvd']['videos']} videos)")
    for name, b in m.get("baselines", {}).items():
        parts = [f"MED10 {b['med']['med10']:.4g}" if b.get("med", {}).get("med10") is not None else None,
                 f"PSNR {b['psnr']['mean']:.4g}" if "psnr" in b else None]
        lines.append(f"  baseline {name}: " + ", ".join(p for p in parts if p))
    for who, numbers in results.get("paper", {}).items():
        lines.append(f"  paper, {who}: " + ", ".join(f"{k} {v}" for k, v in numbers.items()))
    return "\n".join(lines)
