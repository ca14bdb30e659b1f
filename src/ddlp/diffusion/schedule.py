"""The DDPM noise schedule: forward noising q(x_t | x_0) and the Gaussian posterior
q(x_{t-1} | x_t, x_0) used by ancestral sampling.

Step indices follow the code convention t = 0 ... N-1 (paper step t + 1). Everything is computed
in float64 and stored as float32, as the official implementation does, so checkpoints trained
there sample identically here.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def cosine_betas(steps: int, s: float = 0.008) -> Tensor:
    """Nichol & Dhariwal's cosine schedule: alpha_bar(u) = cos^2(((u / N) + s) / (1 + s) * pi / 2),
    normalised by alpha_bar(0); betas clipped to [0, 0.999]. float64 [N]."""
    u = torch.linspace(0, steps, steps + 1, dtype=torch.float64)
    alpha_bar = torch.cos((u / steps + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = alpha_bar / alpha_bar[0]
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(0, 0.999)


def linear_betas(steps: int) -> Tensor:
    """Ho et al.'s linear schedule, rescaled so that any N spans the same noise range."""
    scale = 1000 / steps
    return torch.linspace(scale * 1e-4, scale * 0.02, steps, dtype=torch.float64)


SCHEDULES = {"cosine": cosine_betas, "linear": linear_betas}


def _gather(values: Tensor, t: Tensor, ndim: int) -> Tensor:
    """values[t] shaped [B, 1, ..., 1] to broadcast against a [B, ...] tensor of `ndim` dims."""
    return values[t].view(-1, *([1] * (ndim - 1)))


class NoiseSchedule(nn.Module):
    """Per-step constants of a DDPM as (non-persistent) float32 buffers of length N."""

    def __init__(self, steps: int = 1000, kind: str = "cosine"):
        super().__init__()
        if kind not in SCHEDULES:
            raise ValueError(f"unknown noise schedule {kind!r}; choose from {', '.join(SCHEDULES)}")
        if steps < 2:
            raise ValueError(f"a DDPM needs at least 2 diffusion steps, got {steps}")
        self.steps, self.kind = steps, kind
        betas = SCHEDULES[kind](steps)
        alphas = 1 - betas
        alpha_bar = torch.cumprod(alphas, 0)
        alpha_bar_prev = torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])
        posterior_variance = betas * (1 - alpha_bar_prev) / (1 - alpha_bar)
        for name, value in {
            "betas": betas,
            "alphas_cumprod": alpha_bar,
            "alphas_cumprod_prev": alpha_bar_prev,
            "sqrt_alphas_cumprod": alpha_bar.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1 - alpha_bar).sqrt(),
            "sqrt_recip_alphas_cumprod": (1 / alpha_bar).sqrt(),
            "sqrt_recipm1_alphas_cumprod": (1 / alpha_bar - 1).sqrt(),
            "posterior_variance": posterior_variance,
            # The posterior variance is 0 at t = 0: clip before the log.
            "posterior_log_variance_clipped": posterior_variance.clamp(min=1e-20).log(),
            "posterior_mean_coef1": betas * alpha_bar_prev.sqrt() / (1 - alpha_bar),
            "posterior_mean_coef2": (1 - alpha_bar_prev) * alphas.sqrt() / (1 - alpha_bar),
        }.items():
            self.register_buffer(name, value.float(), persistent=False)

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise, t [B] long."""
        n = x0.ndim
        return (_gather(self.sqrt_alphas_cumprod, t, n) * x0
                + _gather(self.sqrt_one_minus_alphas_cumprod, t, n) * noise)

    def q_posterior(self, x0: Tensor, xt: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        n = xt.ndim
        mean = _gather(self.posterior_mean_coef1, t, n) * x0 + _gather(self.posterior_mean_coef2, t, n) * xt
        return mean, _gather(self.posterior_variance, t, n), _gather(self.posterior_log_variance_clipped, t, n)

    def noise_from_x0(self, xt: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        """The noise that takes x0 to xt at step t."""
        n = xt.ndim
        return ((_gather(self.sqrt_recip_alphas_cumprod, t, n) * xt - x0)
                / _gather(self.sqrt_recipm1_alphas_cumprod, t, n))

    def x0_from_noise(self, xt: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        n = xt.ndim
        return (_gather(self.sqrt_recip_alphas_cumprod, t, n) * xt
                - _gather(self.sqrt_recipm1_alphas_cumprod, t, n) * noise)

    def extra_repr(self) -> str:
        return f"steps={self.steps}, kind={self.kind!r}"
