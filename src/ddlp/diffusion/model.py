"""DiffuseDDLP: a DDPM over the particle tokens of the first tau frames of a frozen DDLP.

The model directory has the layout of every ddlp model (`config.json` + `model.safetensors`,
written atomically); the weights include the latent statistics, so a directory samples on its
own given the DDLP it was trained for (checked by the DDLP's weights fingerprint).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..config import JsonConfig
from .denoiser import ParticleDenoiser
from .latents import NORM_MODES, LatentNormalizer
from .schedule import SCHEDULES, NoiseSchedule
from .tokens import TokenLayout

KIND = "diffuse_ddlp"
OBJECTIVES = ("pred_x0", "pred_noise")


@dataclass
class DiffusionConfig(JsonConfig):
    """Names follow the official `configs/diffuse_ddlp.json` where one exists."""
    n_kp_enc: int = 6                  # K, from the DDLP
    learned_feature_dim: int = 3       # m, from the DDLP
    bg_learned_feature_dim: int = 3    # m_bg, from the DDLP
    diffuse_frames: int = 4            # tau
    pint_dim: int = 256                # denoiser width (the DDLP's pint_dim)
    pint_heads: int = 8
    pint_layers: int = 6
    dropout: float = 0.1
    diffusion_num_steps: int = 1000
    beta_schedule: str = "cosine"
    objective: str = "pred_x0"
    loss_type: str = "l1"
    particle_norm: str = "minmax"
    # training (official defaults)
    batch_size: int = 32
    lr: float = 8e-5
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    grad_clip: float = 1.0
    train_num_steps: int = 700000
    ema_decay: float = 0.995
    ema_update_every: int = 10
    ema_update_after_step: int = 100
    ema_power: float = 2 / 3
    seed: int = 0
    # provenance
    ddlp_fingerprint: Optional[str] = None
    ddlp_dir: Optional[str] = None
    ds: Optional[str] = None
    model: str = KIND
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def layout(self) -> TokenLayout:
        return TokenLayout(self.n_kp_enc, self.learned_feature_dim, self.bg_learned_feature_dim)

    def validate(self) -> "DiffusionConfig":
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)
        need(self.model == KIND, f"not a DiffuseDDLP config (model={self.model!r})")
        need(self.diffuse_frames >= 1, f"diffuse_frames must be >= 1, got {self.diffuse_frames}")
        need(self.diffusion_num_steps >= 2, f"diffusion_num_steps must be >= 2, got {self.diffusion_num_steps}")
        need(self.beta_schedule in SCHEDULES, f"beta_schedule must be one of {', '.join(SCHEDULES)}")
        need(self.objective in OBJECTIVES, f"objective must be one of {', '.join(OBJECTIVES)}")
        need(self.loss_type in ("l1", "l2"), f"loss_type must be 'l1' or 'l2', got {self.loss_type!r}")
        need(self.particle_norm in NORM_MODES, f"particle_norm must be one of {', '.join(NORM_MODES)}")
        need(self.pint_dim % self.pint_heads == 0, f"pint_dim ({self.pint_dim}) must be divisible by "
             f"pint_heads ({self.pint_heads})")
        need(self.batch_size >= 1 and self.lr > 0, "batch_size must be >= 1 and lr > 0")
        return self

    @classmethod
    def from_ddlp(cls, ddlp_config, **overrides) -> "DiffusionConfig":
        """Denoiser sized from the DDLP's PINT, as the official trainer does."""
        c = ddlp_config
        base = dict(n_kp_enc=c.n_kp_enc, learned_feature_dim=c.learned_feature_dim,
                    bg_learned_feature_dim=c.bg_features_dim, pint_dim=c.pint_dim,
                    pint_heads=c.pint_heads, pint_layers=c.pint_layers, ds=c.ds)
        return cls.from_dict({**base, **overrides})


class DiffuseDDLP(nn.Module):
    """Denoiser + noise schedule + latent normaliser. Works in normalised token space."""

    def __init__(self, config: DiffusionConfig):
        super().__init__()
        c = self.config = config.validate()
        self.layout = c.layout
        self.schedule = NoiseSchedule(c.diffusion_num_steps, c.beta_schedule)
        self.denoiser = ParticleDenoiser(self.layout.token_dim, self.layout.n_tokens, c.diffuse_frames,
                                         c.pint_dim, c.pint_heads, c.pint_layers, c.dropout)
        self.normalizer = LatentNormalizer(self.layout, c.particle_norm)
        self.register_buffer("padding_mask", self.layout.padding_mask(), persistent=False)

    @property
    def token_shape(self) -> tuple[int, int, int]:
        return self.config.diffuse_frames, self.layout.n_tokens, self.layout.token_dim

    def predict_x0(self, xt: Tensor, t: Tensor, **kw) -> Tensor:
        """The network's clean-token estimate, whatever its objective."""
        out = self.denoiser(xt, t, **kw)
        return out if self.config.objective == "pred_x0" else self.schedule.x0_from_noise(xt, t, out)

    def loss(self, x0: Tensor, t: Optional[Tensor] = None, noise: Optional[Tensor] = None) -> Tensor:
        """DDPM loss of normalised clean tokens x0 [B, tau, K + 1, F]: L1 (or L2) between the
        prediction and its target, times the padding mask, averaged over all elements (masked
        slots count as zeros, as upstream)."""
        if tuple(x0.shape[1:]) != self.token_shape:
            raise ValueError(f"expected tokens [B, {', '.join(map(str, self.token_shape))}], got {tuple(x0.shape)}")
        B = x0.shape[0]
        if t is None:
            t = torch.randint(0, self.schedule.steps, (B,), device=x0.device)
        if noise is None:
            noise = torch.randn_like(x0)
        xt = self.schedule.q_sample(x0, t, noise)
        out = self.denoiser(xt, t)
        target = x0 if self.config.objective == "pred_x0" else noise
        err = (out - target).abs() if self.config.loss_type == "l1" else (out - target) ** 2
        return (err * self.padding_mask).mean()

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, directory: str | Path) -> None:
        from ..storage import save_pretrained
        save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str = "cpu") -> "DiffuseDDLP":
        """A saved model, in eval mode (ready to sample)."""
        from safetensors.torch import load_file
        directory = Path(directory)
        for name in ("config.json", "model.safetensors"):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory} is not a DiffuseDDLP model directory: {name} is missing")
        try:
            kind = json.loads((directory / "config.json").read_text()).get("model")
        except json.JSONDecodeError as e:
            raise ValueError(f"{directory / 'config.json'} is not valid JSON: {e}") from None
        if kind != KIND:
            raise ValueError(f"{directory} holds a {kind!r} model, not a DiffuseDDLP model")
        model = cls(DiffusionConfig.from_json(directory / "config.json"))
        model.load_state_dict(load_file(directory / "model.safetensors", device=map_location))
        return model.to(map_location).eval()


# ---------------------------------------------------------------------------- the frozen DDLP
def resolve_ddlp_dir(path: str | Path) -> Path:
    """A DDLP model directory, given it, a Hub id or a `ddlp train` run directory (its best/
    model, else its latest checkpoint)."""
    from ..checkpoint import resolve_checkpoint
    return resolve_checkpoint(path)[0]


def load_ddlp(path: str | Path, map_location: str = "cpu"):
    """The frozen DDLP (eval mode, no gradients) from a model or run directory."""
    from ..checkpoint import load_video_model
    return load_video_model(path, device=map_location, purpose="DiffuseDDLP")[0]
