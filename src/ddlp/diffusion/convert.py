"""Official DiffuseDDLP checkpoints (`saves/model.pth` of train_diffuse_ddlp.py) -> ours.

The official file is {step, model: GaussianDiffusionPINT state, opt, ema: EMA state, scaler}.
The denoiser weights are the `model.`-prefixed entries of `model` and the `ema_model.model.`
entries of `ema` (the EMA copy, which is what the official generator samples with). Noise
schedule buffers and causal-mask buffers are derived from the config: they are checked, not
loaded.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from ..convert import ConversionError, KeyMap, _linear, _seq, key_problems
from .latents import LatentStats, fingerprint
from .model import DiffuseDDLP, DiffusionConfig, load_ddlp

SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
                    "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
                    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
                    "p2_loss_weight")


def denoiser_key_map(layers: int) -> KeyMap:
    """Official PINTDenoiser keys -> our DiffuseDDLP keys (None: a derived buffer)."""
    keys: KeyMap = {}
    keys.update(_linear("time_mlp.1", "denoiser.time_mlp.0"))
    keys.update(_linear("time_mlp.3", "denoiser.time_mlp.2"))
    keys.update(_seq("particle_projection", "denoiser.projection"))
    t = "particle_transformer."
    for i in range(layers):
        b, o = f"{t}blocks.{i}.", f"denoiser.blocks.{i}."
        for ln in ("ln1", "ln2"):
            keys.update(_linear(f"{b}{ln}", f"{o}{ln}"))
        keys[f"{b}attn.mask"] = None
        for lin in ("key", "query", "value", "proj"):
            keys.update(_linear(f"{b}attn.{lin}", f"{o}attn.{lin}", bias=False))
        keys[f"{b}attn.rel_pos_bias.rel_pos_bias"] = f"{o}attn.bias.time"
        keys[f"{b}attn.rel_pos_bias.particle_rel_pos_bias"] = f"{o}attn.bias.particle"
        keys.update(_linear(f"{b}mlp.fc_1", f"{o}mlp.0"))
        keys.update(_linear(f"{b}mlp.proj", f"{o}mlp.2"))
    keys.update(_linear(f"{t}ln_f", "denoiser.ln_f"))
    keys.update(_linear(f"{t}head", "denoiser.head", bias=False))
    keys.update(_seq("particle_decoder", "denoiser.readout"))
    return keys


def _layers_in(sd: dict[str, Tensor]) -> int:
    blocks = {k.split(".")[2] for k in sd if k.startswith("particle_transformer.blocks.")}
    return len(blocks)


def convert_denoiser(official: dict[str, Tensor], model: DiffuseDDLP) -> dict[str, Tensor]:
    """Un-prefixed official denoiser state -> a state dict for `model` (its normaliser and
    buffers taken from `model`). Raises ConversionError naming every mismatch."""
    c = model.config
    key_map = denoiser_key_map(c.pint_layers)
    reference = model.state_dict()
    problems = key_problems(key_map, official, "denoiser keys missing", "unexpected denoiser keys", limit=12)
    out = dict(reference)
    for key, ours in key_map.items():
        if key not in official:
            continue
        value = official[key]
        if ours is None:
            if value.shape[-1] != c.diffuse_frames:
                problems.append(f"{key} has shape {tuple(value.shape)}: trained with diffuse_frames="
                                f"{value.shape[-1]}, the config says {c.diffuse_frames}")
            continue
        if tuple(value.shape) != tuple(reference[ours].shape):
            problems.append(f"{key}: shape {tuple(value.shape)} in the checkpoint, {tuple(reference[ours].shape)} "
                            "expected from the DDLP's hparams")
            continue
        out[ours] = value.detach().clone().float().contiguous()
    if problems:
        raise ConversionError("official DiffuseDDLP checkpoint does not match the DDLP / config:\n  - "
                              + "\n  - ".join(problems))
    return out


def check_schedule(official: dict[str, Tensor], model: DiffuseDDLP) -> None:
    """The checkpoint's schedule buffers must be ours (same N, same cosine schedule)."""
    betas = official.get("betas")
    if betas is None:
        return
    ours = model.schedule.betas
    if betas.shape != ours.shape:
        raise ConversionError(f"the checkpoint was trained with {betas.numel()} diffusion steps, the config says "
                              f"{ours.numel()}")
    if not torch.allclose(betas.float(), ours, atol=1e-6):
        raise ConversionError(f"the checkpoint's noise schedule differs from the {model.config.beta_schedule} "
                              "schedule")


def load_official_diffusion(path: str | Path) -> dict:
    """{'model': GaussianDiffusionPINT state, 'ema': EMA state or None, 'step': int}."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ConversionError(f"{path} is not a readable PyTorch checkpoint: {e}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict):
        raise ConversionError(f"{path} is not an official DiffuseDDLP checkpoint (no 'model' state)")
    if not any(k.startswith("model.particle_transformer.") for k in obj["model"]):
        raise ConversionError(f"{path} holds no DiffuseDDLP denoiser ('model.particle_transformer.*' keys)")
    return dict(model=obj["model"], ema=obj.get("ema") if isinstance(obj.get("ema"), dict) else None,
                step=int(obj.get("step", 0) or 0))


def _strip(sd: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def convert_official(checkpoint: str | Path, ddlp_dir: str | Path, stats: str | Path,
                     hparams: Optional[str | Path] = None, weights: str = "ema") -> DiffuseDDLP:
    """Our DiffuseDDLP from an official checkpoint, our (converted) DDLP it was trained on, its
    `latent_stats.pth` (or ours) and optionally its `diffusion_hparams.json`."""
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    ckpt = load_official_diffusion(checkpoint)
    ddlp = load_ddlp(ddlp_dir)
    official = ckpt["model"]
    if weights == "ema":
        if ckpt["ema"] is None:
            raise ConversionError(f"{checkpoint} has no EMA state; pass --weights model")
        official = _strip(ckpt["ema"], "ema_model.")
    denoiser = _strip(official, "model.")
    overrides = {}
    if hparams is not None:
        hp = json.loads(Path(hparams).read_text())
        for key in ("diffuse_frames", "diffusion_num_steps", "loss_type", "particle_norm", "lr", "batch_size",
                    "train_num_steps"):
            if key in hp:
                overrides[key] = hp[key]
    else:   # infer what the checkpoint itself says
        mask = next((v for k, v in denoiser.items() if k.endswith("attn.mask")), None)
        if mask is not None:
            overrides["diffuse_frames"] = int(mask.shape[-1])
        if "betas" in official:
            overrides["diffusion_num_steps"] = int(official["betas"].numel())
    layers = _layers_in(denoiser)
    if layers and layers != ddlp.config.pint_layers:
        overrides["pint_layers"] = layers
    config = DiffusionConfig.from_ddlp(ddlp.config, ddlp_dir=str(ddlp_dir), ddlp_fingerprint=fingerprint(ddlp),
                                       **overrides)
    model = DiffuseDDLP(config)
    check_schedule(official, model)
    model.load_state_dict(convert_denoiser(denoiser, model))
    latent = LatentStats.load(stats)
    latent.check(config.layout, None, f"the statistics in {stats}")
    model.normalizer.set_stats(latent)
    return model.eval()
