"""The ELBO of DLPv2 and DDLP, term by term as the official implementation computes it.

Conventions worth knowing (all reproduced on purpose, see docs/official-differences.md):
reconstruction is a per-image *sum* of squared errors; the Chamfer-KL is weighted by
0.5 * kl_balance; features and depth KL of the burn-in frames are weighted by kl_balance, but
not the PINT (dynamics) KL; the DDLP loss is divided by the number of frames; the burn-in
background KL averages over feature dims; the future-frame discount multiplies reconstruction
and KL of frames after burn-in.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import Config
from .nn.precision import full_precision

if TYPE_CHECKING:                  # the model's output type; losses sit below the model
    from .model import Output
from .particles import Particles


# ---------------------------------------------------------------------------- primitives
def gaussian_kl(mu: Tensor, logvar: Tensor, mu_p, logvar_p, dim: int | tuple = -1) -> Tensor:
    """KL(N(mu, e^logvar) || N(mu_p, e^logvar_p)), summed over `dim`; in float32 (autocast-safe)."""
    mu, logvar = full_precision(mu), full_precision(logvar)
    mu_p = full_precision(mu_p) if isinstance(mu_p, Tensor) else mu_p
    logvar_p = full_precision(torch.as_tensor(logvar_p, dtype=mu.dtype, device=mu.device))
    kl = -0.5 * (1 + logvar - logvar_p - logvar.exp() / logvar_p.exp()
                 - (mu - mu_p).pow(2) / logvar_p.exp())
    return kl.sum(dim)


def beta_divergence(a: Tensor, b: Tensor, a_p, b_p) -> Tensor:
    """KL(Beta(a, b) || Beta(a_p, b_p)) element-wise (1e-5 inside lgamma/digamma, as upstream),
    in float32 (lgamma/digamma in bf16 lose the small differences the KL is made of)."""
    a, b = full_precision(a), full_precision(b)
    a_p = full_precision(torch.as_tensor(a_p, dtype=a.dtype, device=a.device))
    b_p = full_precision(torch.as_tensor(b_p, dtype=a.dtype, device=a.device))
    eps = 1e-5

    def log_beta(x, y):
        return torch.lgamma(x + eps) + torch.lgamma(y + eps) - torch.lgamma(x + y + eps)

    return (log_beta(a_p, b_p) - log_beta(a, b) + (a - a_p) * torch.digamma(a + eps)
            + (b - b_p) * torch.digamma(b + eps) + (a_p - a + b_p - b) * torch.digamma(a + b + eps))


def chamfer_kl(points: Tensor, targets: Tensor, logvar_p: float = 0.0) -> Tensor:
    """Chamfer-KL between point sets [..., K, 2] (logvar 0) and [..., L, 2] (logvar_p): for
    every point the KL to its nearest target and vice versa, summed. Returns [...]."""
    pair = gaussian_kl(points[..., :, None, :], torch.zeros_like(points)[..., :, None, :],
                       targets[..., None, :, :], logvar_p)              # [..., K, L]
    return pair.min(-2).values.sum(-1) + pair.min(-1).values.sum(-1)


def pixel_sse(rec: Tensor, target: Tensor) -> Tensor:
    """Per-image sum of squared errors over the last three dims (float32: a bf16 sum of 12k terms
    keeps ~3 significant digits)."""
    return (full_precision(rec) - full_precision(target)).pow(2).sum((-3, -2, -1))


ReconLoss = Callable[[Tensor, Tensor], Tensor]   # (rec [N,3,h,w], target) -> per-image [N]


def psnr(rec: Tensor, target: Tensor) -> Tensor:
    """The training log's PSNR: one MSE pooled over the whole batch, as the official trainer logs
    it. Evaluation reports `metrics.image.psnr` instead (per image, then averaged, as piqa);
    the two differ when images differ in error, so each keeps its own published convention."""
    with torch.no_grad():
        return -10 * torch.log10((full_precision(rec) - full_precision(target)).pow(2).mean())


@dataclass
class ConstantPrior:
    """Constant priors of the burn-in frames (warm-up overrides some)."""
    offset_logvar: float
    scale_mu: float
    scale_logvar: float
    beta_a: float
    beta_b: float
    chamfer_logvar: float

    @classmethod
    def from_config(cls, c: Config, warmup: bool = False) -> "ConstantPrior":
        if warmup:
            return cls(math.log(0.01), c.mu_scale_prior, math.log(0.01), 0.2, 0.1, math.log(c.sigma ** 2))
        return cls(math.log(c.offset_std ** 2), c.mu_scale_prior, math.log(c.scale_std ** 2),
                   c.obj_on_alpha, c.obj_on_beta, math.log(c.sigma ** 2))


def _recon(out: Output, x: Tensor, warmup: bool, recon: ReconLoss, per_particle_sum: bool,
           min_side: int = 0) -> Tensor:
    """Per-image (normal) or per-glimpse (warm-up) reconstruction loss, leading dims kept.
    Warm-up compares each decoded glimpse's RGB with the glimpse the encoder saw (resized up to
    `min_side` for the perceptual loss)."""
    if not warmup:
        lead = x.shape[:-3]
        return recon(out.rec.reshape(-1, *x.shape[-3:]), x.reshape(-1, *x.shape[-3:])).view(lead)
    g = out.glimpses.shape[-1]
    lead = out.glimpses.shape[:-3]
    target = out.glimpses.reshape(-1, 3, g, g)
    pred = out.foreground.glimpses[..., 1:, :, :].reshape(-1, 3, g, g)
    if g < min_side:
        resize = lambda t: F.interpolate(t, size=(min_side, min_side), mode="bilinear", align_corners=False)  # noqa: E731
        target, pred = resize(target), resize(pred)
    r = recon(pred, target).view(lead)
    return r.sum(-1) if per_particle_sum else r


def default_recon(config: Config) -> tuple[ReconLoss, int]:
    """The reconstruction loss of the config and the glimpse side it needs in warm-up."""
    if config.recon_loss_type == "vgg":
        from .nn.vgg import VGGPerceptualLoss
        return VGGPerceptualLoss.pretrained(), 32
    return pixel_sse, 0


def _static_kl_terms(p, kp: Tensor, pr: ConstantPrior) -> dict[str, Tensor]:
    """Per-image sums of every constant-prior KL term, shapes = leading dims of `p`."""
    return dict(
        chamfer=chamfer_kl(p.anchor, kp, pr.chamfer_logvar),
        offset=gaussian_kl(p.offset_mu, p.position_logvar, 0.0, pr.offset_logvar).sum(-1),
        scale=gaussian_kl(p.scale_mu, p.scale_logvar, pr.scale_mu, pr.scale_logvar).sum(-1),
        depth=gaussian_kl(p.depth_mu, p.depth_logvar, 0.0, 0.0).sum(-1),
        obj_on=beta_divergence(p.transparency_a, p.transparency_b, pr.beta_a, pr.beta_b).sum(-1),
        features=gaussian_kl(p.features_mu, p.features_logvar, 0.0, 0.0).sum(-1),
    )


def _combine(kl_kp, kl_scale, kl_on, kl_feat, kl_bg, kl_depth, kl_balance):
    return kl_kp + kl_scale + kl_on + kl_balance * (kl_feat + kl_bg + kl_depth)


# ---------------------------------------------------------------------------- DLPv2
def dlp_elbo(out: Output, x: Tensor, config: Config, *, warmup: bool = False, noisy: bool = False,
             recon: Optional[ReconLoss] = None, beta_kl: Optional[float] = None,
             beta_rec: Optional[float] = None, kl_balance: Optional[float] = None) -> dict[str, Tensor]:
    """Single-image ELBO; x [B, 3, H, W]. Returns the loss and its logged parts."""
    c = config
    beta_kl = c.beta_kl if beta_kl is None else beta_kl
    beta_rec = c.beta_rec if beta_rec is None else beta_rec
    kl_balance = c.kl_balance if kl_balance is None else kl_balance
    recon, min_side = (recon, 32 if c.recon_loss_type == "vgg" else 0) if recon else default_recon(c)
    p = out.posterior
    loss_rec = _recon(out, x, warmup, recon, False, min_side).mean()
    if warmup:
        loss_rec = loss_rec + 0 * out.rec.mean()   # keeps every parameter in the graph (DDP)
    t = _static_kl_terms(p, out.proposals, ConstantPrior.from_config(c, warmup or noisy))
    kl_bg = gaussian_kl(p.bg_mu, p.bg_logvar, 0.0, 0.0).mean()
    kl_kp = 0.5 * kl_balance * t["chamfer"].mean() + t["offset"].mean()
    kl = _combine(kl_kp, t["scale"].mean(), t["obj_on"].mean(), t["features"].mean(), kl_bg,
                  t["depth"].mean(), kl_balance)
    loss = objective_scale(c) * (beta_rec * loss_rec + beta_kl * kl)
    return _logs(loss, out, x, warmup, config, kl=kl, loss_rec=loss_rec, kl_kp=kl_kp,
                 kl_feat=t["features"].mean() + kl_bg, kl_on=t["obj_on"].mean(),
                 kl_scale=t["scale"].mean(), kl_depth=t["depth"].mean())


def dynamics_kl(p: Particles, q: Particles, ns: int, disc: Tensor) -> Tensor:
    """KL of the posterior frames ns..T from PINT's prior of them (prior index t - 1), summed
    over attributes and particles, weighted per frame by `disc`, summed over frames, mean over clips."""
    post, pri = p[:, ns:], q[:, ns - 1:]
    position_mu = post.anchor.detach() + post.offset_mu if post.anchor is not None else post.position_mu
    dyn = (gaussian_kl(position_mu, post.position_logvar, pri.position_mu, pri.position_logvar).sum(-1)
           + gaussian_kl(post.scale_mu, post.scale_logvar, pri.scale_mu, pri.scale_logvar).sum(-1)
           + gaussian_kl(post.depth_mu, post.depth_logvar, pri.depth_mu, pri.depth_logvar).sum(-1)
           + gaussian_kl(post.features_mu, post.features_logvar, pri.features_mu, pri.features_logvar).sum(-1)
           + beta_divergence(post.transparency_a, post.transparency_b, pri.transparency_a, pri.transparency_b).sum(-1)
           + gaussian_kl(post.bg_mu, post.bg_logvar, pri.bg_mu, pri.bg_logvar))     # [B, J]
    return (disc * dyn).sum(1).mean()


# ---------------------------------------------------------------------------- DDLP
def ddlp_elbo(out: Output, x: Tensor, config: Config, *, warmup: bool = False, noisy: bool = False,
              discount: Optional[Sequence[float] | Tensor] = None, recon: Optional[ReconLoss] = None,
              beta_kl: Optional[float] = None, beta_dyn: Optional[float] = None,
              beta_rec: Optional[float] = None, beta_dyn_rec: Optional[float] = None,
              kl_balance: Optional[float] = None, num_static: Optional[int] = None) -> dict[str, Tensor]:
    """Video ELBO; x [B, T+1, 3, H, W]. Burn-in frames (t < num_static) use the constant priors,
    later frames PINT's prediction, weighted by `discount` (default: all ones)."""
    c = config
    beta_kl = c.beta_kl if beta_kl is None else beta_kl
    beta_dyn = c.beta_dyn if beta_dyn is None else beta_dyn
    beta_rec = c.beta_rec if beta_rec is None else beta_rec
    beta_dyn_rec = c.beta_dyn_rec if beta_dyn_rec is None else beta_dyn_rec
    kl_balance = c.kl_balance if kl_balance is None else kl_balance
    ns = c.num_static_frames if num_static is None else num_static
    recon, min_side = (recon, 32 if c.recon_loss_type == "vgg" else 0) if recon else default_recon(c)
    B, T1 = x.shape[:2]
    if T1 != c.timestep_horizon + 1:
        raise ValueError(f"the DDLP loss needs timestep_horizon + 1 = {c.timestep_horizon + 1} "
                         f"frames, got {T1}")
    if out.dynamics is None:
        raise ValueError("the DDLP loss needs the PINT prior: run the model with dynamics=True")
    J = T1 - ns
    disc = torch.ones(J, dtype=x.dtype, device=x.device) if discount is None else \
        torch.as_tensor(discount, dtype=x.dtype, device=x.device)[:J]
    if disc.numel() < J:
        raise ValueError(f"discount needs at least {J} entries, got {disc.numel()}")

    r = _recon(out, x, warmup, recon, True, min_side)                      # [B, T+1]
    loss_rec = r[:, :ns].sum(1).mean() + (beta_dyn_rec * disc * r[:, ns:]).sum(1).mean()
    if warmup:
        loss_rec = loss_rec + 0 * out.rec.mean()

    p, q = out.posterior, out.dynamics
    burn = p[:, :ns]
    t = _static_kl_terms(burn, out.proposals[:, :ns], ConstantPrior.from_config(c, warmup or noisy))
    per_clip = {k: v.sum(1).mean() for k, v in t.items()}                  # sum over frames, mean over clips
    # Official quirk: the burn-in background KL sums over frames and *averages* over features.
    kl_bg = gaussian_kl(burn.bg_mu, burn.bg_logvar, 0.0, 0.0, dim=1).mean()
    kl_kp = 0.5 * kl_balance * per_clip["chamfer"] + per_clip["offset"]
    kl = _combine(kl_kp, per_clip["scale"], per_clip["obj_on"], per_clip["features"], kl_bg,
                  per_clip["depth"], kl_balance)

    kl_dyn = dynamics_kl(p, q, ns, disc)

    loss = objective_scale(c) * (beta_rec * loss_rec + beta_kl * kl) / T1 + dynamics_weight(c, beta_dyn) * kl_dyn
    return _logs(loss, out, x, warmup, config, kl=kl, loss_rec=loss_rec, kl_kp=kl_kp,
                 kl_feat=per_clip["features"] + kl_bg, kl_on=per_clip["obj_on"],
                 kl_scale=per_clip["scale"], kl_depth=per_clip["depth"], kl_dyn=kl_dyn)


def objective_scale(config: Config) -> float:
    """Factor on the whole objective: the official trainer multiplies it by 1e-3 with the VGG
    perceptual loss (whose values are ~1e3x the MSE sums), by 1 otherwise."""
    return 1e-3 if config.recon_loss_type == "vgg" else 1.0


def dynamics_weight(config: Config, beta_dyn: Optional[float] = None) -> float:
    """Factor of the dynamics KL in the video ELBO (objective scale x beta_dyn / (T + 1)): the
    only term through which PINT learns, in joint training and in `ddlp tune-pint` alike."""
    beta_dyn = config.beta_dyn if beta_dyn is None else beta_dyn
    return objective_scale(config) * beta_dyn / (config.timestep_horizon + 1)


def _logs(loss, out, x, warmup, config, *, kl, loss_rec, kl_kp, kl_feat, kl_on, kl_scale,
          kl_depth, kl_dyn=None) -> dict[str, Tensor]:
    logs = dict(loss=loss,
                psnr=torch.zeros((), device=x.device) if warmup else psnr(out.rec, x),
                kl=kl, loss_rec=loss_rec,
                obj_on_l1=out.posterior.transparency.detach().abs().sum(-1).mean(),
                loss_kl_kp=kl_kp, loss_kl_feat=kl_feat, loss_kl_obj_on=kl_on,
                loss_kl_scale=kl_scale, loss_kl_depth=kl_depth)
    if kl_dyn is not None:
        logs["kl_dyn"] = kl_dyn
    return logs


def elbo(out: Output, x: Tensor, config: Config, **kwargs) -> dict[str, Tensor]:
    return (ddlp_elbo if config.is_video else dlp_elbo)(out, x, config, **kwargs)
