"""Sampling: DDPM ancestral sampling (the trained number of steps, as the paper and the official
code) and deterministic DDIM with fewer steps (a documented extra), then the video: un-normalise,
unroll the DDLP's PINT deterministically, decode.

The loops do no per-step work beyond the network itself: attention masks (relative bias + causal
mask), the time-embedding table and fused q/k/v weights are prepared once per call
(`SamplingPlan`), schedule constants are Python floats, the noise buffer is reused, and
everything runs under `torch.inference_mode()`.
Call them on a model in eval mode (EMA weights): `generate` does so.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from ..model import DECODE_CHUNK
from ..particles import Particles
from .denoiser import SamplingPlan
from .model import DiffuseDDLP
from .tokens import TokenLayout, from_tokens

SAMPLERS = ("ddpm", "ddim")


@dataclass
class Timings:
    """Seconds spent per stage of `generate`."""
    sampling: float = 0.0
    unroll: float = 0.0
    decoding: float = 0.0

    @property
    def total(self) -> float:
        return self.sampling + self.unroll + self.decoding


def _progress(iterable, total: int, enabled: bool, desc: str):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


class _Prepared:
    """Per-call constants of one sampling run."""

    def __init__(self, model: DiffuseDDLP, n: int, generator: Optional[torch.Generator], clip: bool):
        sched = model.schedule
        self.model, self.generator = model, generator
        self.shape = (n, *model.token_shape)
        self.x = torch.randn(self.shape, generator=generator, device=sched.betas.device)
        self.net = SamplingPlan(model.denoiser, sched.steps, self.x)
        self.bounds = model.normalizer.clip_bounds() if clip else None
        self.pred_x0 = model.config.objective == "pred_x0"
        self.recip = sched.sqrt_recip_alphas_cumprod.tolist()
        self.recipm1 = sched.sqrt_recipm1_alphas_cumprod.tolist()

    def x0(self, x: Tensor, t: int) -> Tensor:
        """Clipped clean-token estimate at step t."""
        out = self.net(x, t)
        if not self.pred_x0:
            out = self.recip[t] * x - self.recipm1[t] * out
        if self.bounds is not None:
            out = torch.clamp(out, self.bounds[0], self.bounds[1])
        return out

    def noise_from_x0(self, x: Tensor, t: int, x0: Tensor) -> Tensor:
        return (self.recip[t] * x - x0) / self.recipm1[t]


@torch.inference_mode()
def ddpm_sample(model: DiffuseDDLP, n: int, generator: Optional[torch.Generator] = None,
                clip: bool = True, progress: bool = False) -> Tensor:
    """Ancestral sampling with all N trained steps -> normalised tokens [n, tau, K + 1, F]:
    x_{t-1} = mean(x0_hat, x_t) + sqrt(posterior variance) z, no noise at t = 0."""
    run = _Prepared(model, n, generator, clip)
    sched = model.schedule
    c1, c2 = sched.posterior_mean_coef1.tolist(), sched.posterior_mean_coef2.tolist()
    sd = (0.5 * sched.posterior_log_variance_clipped).exp().tolist()
    x, noise = run.x, torch.empty_like(run.x)
    for t in _progress(reversed(range(sched.steps)), sched.steps, progress, "DDPM"):
        x0 = run.x0(x, t)
        if t > 0:
            torch.randn(run.shape, generator=generator, out=noise)
            x = c1[t] * x0 + c2[t] * x + sd[t] * noise
        else:
            x = c1[t] * x0 + c2[t] * x
    return x


def ddim_times(total: int, steps: int) -> list[tuple[int, int]]:
    """(t, t_next) pairs from total - 1 down to -1 (the official spacing)."""
    if not 1 <= steps <= total:
        raise ValueError(f"DDIM steps must be between 1 and the {total} trained steps, got {steps}")
    times = list(reversed(torch.linspace(-1, total - 1, steps + 1).int().tolist()))
    return list(zip(times[:-1], times[1:]))


@torch.inference_mode()
def ddim_sample(model: DiffuseDDLP, n: int, steps: int = 50, eta: float = 0.0,
                generator: Optional[torch.Generator] = None, clip: bool = True,
                progress: bool = False) -> Tensor:
    """DDIM (Song et al.) with `steps` network evaluations; eta = 0 is deterministic given the
    initial noise. Normalised tokens [n, tau, K + 1, F]."""
    run = _Prepared(model, n, generator, clip)
    abar = model.schedule.alphas_cumprod.tolist()
    pairs = ddim_times(model.schedule.steps, steps)
    x, noise = run.x, torch.empty_like(run.x)
    for t, t_next in _progress(pairs, len(pairs), progress, "DDIM"):
        x0 = run.x0(x, t)
        if t_next < 0:
            x = x0
            continue
        eps = run.noise_from_x0(x, t, x0)
        a, an = abar[t], abar[t_next]
        sigma = eta * ((1 - a / an) * (1 - an) / (1 - a)) ** 0.5
        x = an ** 0.5 * x0 + (1 - an - sigma ** 2) ** 0.5 * eps
        if sigma > 0:
            torch.randn(run.shape, generator=generator, out=noise)
            x = x + sigma * noise
    return x


def sample_tokens(model: DiffuseDDLP, n: int, sampler: str = "ddpm", steps: Optional[int] = None,
                  eta: float = 0.0, generator: Optional[torch.Generator] = None,
                  progress: bool = False) -> Tensor:
    """Normalised tokens from either sampler (DDIM default: 50 steps)."""
    if sampler == "ddpm":
        if steps not in (None, model.schedule.steps):
            raise ValueError(f"DDPM sampling uses the {model.schedule.steps} trained steps; use --sampler ddim "
                             f"for {steps}")
        return ddpm_sample(model, n, generator, progress=progress)
    if sampler == "ddim":
        return ddim_sample(model, n, steps or 50, eta, generator, progress=progress)
    raise ValueError(f"unknown sampler {sampler!r}; choose from {', '.join(SAMPLERS)}")


# ---------------------------------------------------------------------------- particles -> video
def check_compatible(model: DiffuseDDLP, ddlp, fingerprint: Optional[Callable[[], str]] = None) -> None:
    """Raise ValueError unless `ddlp` is the DDLP `model` was trained for."""
    layout, want = model.layout, TokenLayout.from_ddlp(ddlp.config)
    if layout != want:
        raise ValueError(f"this DiffuseDDLP model generates {layout.n_particles} particles with "
                         f"{layout.features_dim} features, but the DDLP has {want.n_particles} with "
                         f"{want.features_dim}: it was trained for a different DDLP")
    if fingerprint is not None and model.config.ddlp_fingerprint:
        got = fingerprint()
        if got != model.config.ddlp_fingerprint:
            raise ValueError(f"this DiffuseDDLP model was trained on the latents of a different DDLP "
                             f"(fingerprint {model.config.ddlp_fingerprint}, given DDLP {got})")


@torch.inference_mode()
def generate(model: DiffuseDDLP, ddlp, n: int, frames: int = 100, sampler: str = "ddpm",
             steps: Optional[int] = None, eta: float = 0.0, generator: Optional[torch.Generator] = None,
             progress: bool = False) -> tuple[Tensor, Particles, Timings]:
    """n unconditional videos: (frames [n, frames, 3, H, W], particles, timings).
    Sets both models to eval mode."""
    tau = model.config.diffuse_frames
    if frames < tau:
        raise ValueError(f"cannot make {frames}-frame videos: the diffusion model generates the first "
                         f"tau={tau} frames, so --frames must be at least {tau}")
    check_compatible(model, ddlp)
    model.eval()
    ddlp.eval()
    timings = Timings()
    t0 = time.perf_counter()
    tokens = sample_tokens(model, n, sampler, steps, eta, generator, progress)
    particles = from_tokens(model.normalizer.unnormalize(tokens), model.layout)
    t1 = time.perf_counter()
    particles = ddlp.pint.rollout(particles, frames - tau)
    t2 = time.perf_counter()
    video = ddlp.decode(particles, max_images=DECODE_CHUNK)
    t3 = time.perf_counter()
    timings.sampling, timings.unroll, timings.decoding = t1 - t0, t2 - t1, t3 - t2
    return video, particles, timings
