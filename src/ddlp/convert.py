"""Official checkpoints -> ddlp.

The official layout is generated from the config (the same layer plans our modules are built
from), so every official key has exactly one destination and anything missing, unexpected or of
the wrong shape is reported by name.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import Tensor

from .config import Config
from .nn.blocks import LayerSpec, background_decoder_plan, encoder_plan, glimpse_decoder_plan, upsampling_plan


class ConversionError(ValueError):
    pass


KeyMap = dict[str, Optional[str]]   # official key -> our key (None: derived from config, dropped)


def _conv_layers(official: str, ours: str, plan: list[LayerSpec]) -> Iterator[tuple[str, str]]:
    for i, spec in enumerate(plan):
        base = f"{official}{spec.name}.main."
        conv = f"conv_{spec.c_in}_to_{spec.c_out}"
        yield f"{base}{conv}.weight", f"{ours}{i}.conv.weight"
        if spec.bias:
            yield f"{base}{conv}.bias", f"{ours}{i}.conv.bias"
        if spec.norm:
            for p in ("weight", "bias"):
                yield f"{base}grouupnorm_{spec.c_out}.{p}", f"{ours}{i}.norm.{p}"


def _keypoint_cnn(official: str, ours: str, plan: list[LayerSpec]) -> Iterator[tuple[str, str]]:
    yield from _conv_layers(f"{official}main.", f"{ours}layers.", plan)
    for p in ("weight", "bias"):
        yield f"{official}keymap.{p}", f"{ours}keymap.{p}"


def _linear(official: str, ours: str, bias: bool = True) -> Iterator[tuple[str, str]]:
    yield f"{official}.weight", f"{ours}.weight"
    if bias:
        yield f"{official}.bias", f"{ours}.bias"


def _seq(official: str, ours: str, indices=(0, 2)) -> Iterator[tuple[str, str]]:
    for i in indices:
        yield from _linear(f"{official}.{i}", f"{ours}.{i}")


def official_key_map(c: Config) -> KeyMap:
    """Every key of an official state dict for config `c`, in official order."""
    g, H = c.glimpse_size, c.image_size
    keys: KeyMap = {k: None for k in ("logvar_kp", "mu_scale_prior", "logvar_scale_p",
                                      "logvar_offset_p", "obj_on_a_p", "obj_on_b_p")}

    def add(pairs):
        keys.update(dict(pairs))

    fg = "fg_module."
    add(_keypoint_cnn(f"{fg}prior.enc.", "prior.cnn.", encoder_plan(3, c.prior_channels, c.patch_size)))
    if c.filtering_heuristic == "none":
        m, o = f"{fg}particle_mixer.", "mixer."
        add(_keypoint_cnn(f"{m}cnn.", f"{o}cnn.", encoder_plan(3, c.prior_channels, g)))
        add(_seq(f"{m}conv", f"{o}token_mixing.fn"))
        add(_seq(f"{m}dense", f"{o}channel_mixing.fn"))
        add(_linear(f"{m}pos_projection", f"{o}position_projection"))
        add(_linear(f"{m}conv_projection", f"{o}glimpse_projection"))
        add(_seq(f"{m}mixer.0.fn", f"{o}token_mixing.fn"))
        add(_linear(f"{m}mixer.0.norm", f"{o}token_mixing.norm"))
        add(_seq(f"{m}mixer.1.fn", f"{o}channel_mixing.fn"))
        add(_linear(f"{m}mixer.1.norm", f"{o}channel_mixing.norm"))
        add(_linear(f"{m}mixer.2", f"{o}norm"))
        add(_linear(f"{m}mixer.3", f"{o}to_weights"))
    a, o = f"{fg}particle_attribute_enc.", "attribute_encoder."
    c_in = 4 if c.use_correlation_heatmaps else 3
    add(_keypoint_cnn(f"{a}cnn.", f"{o}cnn.", encoder_plan(c_in, c.prior_channels, g)))
    add(_linear(f"{a}projection", f"{o}projection"))
    add(_seq(f"{a}backbone", f"{o}backbone"))
    for off, ours in (("x_head", "offset_y_head"), ("y_head", "offset_x_head"),
                      ("scale_xy_head", "scale_head"), ("obj_on_head", "transparency_head"),
                      ("depth_head", "depth_head")):
        add(_linear(f"{a}{off}", f"{o}{ours}"))
    a, o = f"{fg}particle_features_enc.", "appearance_encoder."
    add(_keypoint_cnn(f"{a}cnn.", f"{o}cnn.", encoder_plan(3, c.prior_channels, g)))
    add(_linear(f"{a}projection", f"{o}projection"))
    add(_seq(f"{a}backbone", f"{o}backbone"))
    add(_linear(f"{a}features_head", f"{o}features_head"))
    add(_seq(f"{fg}object_dec.fc", "glimpse_decoder.fc", (0, 2, 4)))
    plan = glimpse_decoder_plan(g)
    for alias in ("main.", "decode."):     # the official decoder is registered twice
        add(_conv_layers(f"{fg}object_dec.{alias}", "glimpse_decoder.cnn.", plan))

    bg = "bg_module."
    add(_keypoint_cnn(f"{bg}bg_cnn_enc.", "background.cnn.",
                      encoder_plan(3, c.enc_channels, H, first_kernel=7)))
    add(_seq(f"{bg}bg_enc", "background.encoder_mlp", (0, 2, 4)))
    add(_seq(f"{bg}latent_to_feat_map.mlp", "background.decoder_mlp", (0, 2, 4)))
    f = H // 2 ** (len(c.enc_channels) - 1)
    add(_conv_layers(f"{bg}latent_to_feat_map.cnn.", "background.upsample.",
                     upsampling_plan(int(math.log2(f)) - 3)))
    plan = background_decoder_plan(c.enc_channels)
    add(_conv_layers(f"{bg}dec.main.", "background.decoder_cnn.", plan[:-1]))
    final = plan[-1]
    add(((f"{bg}dec.final_conv.main.conv_{final.c_in}_to_{final.c_out}.{p}",
          f"background.decoder_cnn.{len(plan) - 1}.conv.{p}") for p in ("weight", "bias")))

    if c.is_video:
        add(_pint_key_map(c))
    return keys


def _pint_key_map(c: Config) -> Iterator[tuple[str, Optional[str]]]:
    d, o = "dyn_module.", "pint."
    for off, ours in (("xy", "position"), ("scale", "scale"), ("obj_on", "transparency"),
                      ("depth", "depth"), ("features", "features"), ("particle", "particle"),
                      ("bg_features", "background")):
        yield from _seq(f"{d}particle_projection.{off}_projection", f"{o}embedding.{ours}")
    t = f"{d}particle_transformer."
    for i in range(c.pint_layers):
        b, ob = f"{t}blocks.{i}.", f"{o}blocks.{i}."
        for ln in ("ln1", "ln2"):
            yield from _linear(f"{b}{ln}", f"{ob}{ln}")
        yield f"{b}attn.mask", None
        for lin in ("key", "query", "value", "proj"):
            yield from _linear(f"{b}attn.{lin}", f"{ob}attn.{lin}", bias=False)
        yield f"{b}attn.rel_pos_bias.rel_pos_bias", f"{ob}attn.bias.time"
        yield f"{b}attn.rel_pos_bias.particle_rel_pos_bias", f"{ob}attn.bias.particle"
        yield from _linear(f"{b}mlp.fc_1", f"{ob}mlp.0")
        yield from _linear(f"{b}mlp.proj", f"{ob}mlp.2")
    yield from _linear(f"{t}ln_f", f"{o}ln_f")
    yield from _linear(f"{t}head", f"{o}head", bias=False)
    r = f"{d}particle_decoder."
    yield from _seq(f"{r}backbone", f"{o}readout.backbone")
    for off, ours in (("x_head", "position_y_head"), ("y_head", "position_x_head"),
                      ("scale_xy_head", "scale_head"), ("obj_on_head", "transparency_head"),
                      ("depth_head", "depth_head"), ("features_head", "features_head"),
                      ("bg_features_head", "bg_features_head")):
        yield from _linear(f"{r}{off}", f"{o}readout.{ours}")


def _expected_buffers(c: Config) -> dict[str, float]:
    return {"logvar_kp": math.log(c.sigma ** 2), "mu_scale_prior": c.mu_scale_prior,
            "logvar_scale_p": math.log(c.scale_std ** 2), "logvar_offset_p": math.log(c.offset_std ** 2),
            "obj_on_a_p": c.obj_on_alpha, "obj_on_b_p": c.obj_on_beta}


def key_problems(key_map: dict, official: dict, missing_text: str, unexpected_text: str,
                 limit: int) -> list[str]:
    """Messages for official keys the map expects but the checkpoint lacks, and the reverse."""
    missing = [k for k in key_map if k not in official]
    unexpected = [k for k in official if k not in key_map]
    return [f"{len(keys)} {text}: " + ", ".join(keys[:limit]) + (" ..." if len(keys) > limit else "")
            for keys, text in ((missing, missing_text), (unexpected, unexpected_text)) if keys]


def convert_state_dict(official: dict[str, Tensor], config: Config,
                       reference: Optional[dict[str, Tensor]] = None) -> dict[str, Tensor]:
    """Official state dict -> ours. `reference` (our model's state dict) enables shape checks."""
    key_map = official_key_map(config)
    problems = key_problems(key_map, official, "keys missing from the checkpoint",
                            "unexpected keys in the checkpoint", limit=20)
    out: dict[str, Tensor] = {}
    for key, ours in key_map.items():
        if key not in official:
            continue
        value = official[key]
        if ours is None:
            if key in _expected_buffers(config):
                want = _expected_buffers(config)[key]
                if abs(float(value) - want) > 1e-4 * max(1.0, abs(want)):
                    problems.append(f"{key} = {float(value):.6g} but the hparams give {want:.6g}")
            elif key.endswith("attn.mask") and value.shape[-1] != config.timestep_horizon:
                problems.append(f"{key} has shape {tuple(value.shape)}: checkpoint trained with "
                                f"timestep_horizon={value.shape[-1]}, hparams say {config.timestep_horizon}")
            continue
        if ours in out:   # aliases of one tensor must agree
            if not torch.equal(out[ours], value):
                problems.append(f"{key} should equal its alias but differs")
            continue
        out[ours] = value.detach().clone().contiguous().float()
    if reference is not None:
        for k, v in out.items():
            if k in reference and reference[k].shape != v.shape:
                official_name = next(o for o, ours in key_map.items() if ours == k)
                problems.append(f"{official_name}: shape {tuple(v.shape)} in the checkpoint, "
                                f"{tuple(reference[k].shape)} expected from the hparams")
        absent = [k for k in reference if k not in out]
        if absent and all(k in official for k in key_map):   # missing keys were reported above
            problems.append(f"parameters not provided: {', '.join(absent[:20])}")
    if problems:
        raise ConversionError("official checkpoint does not match its hparams:\n  - "
                              + "\n  - ".join(problems))
    return out


def load_official(path: str | Path) -> dict[str, Tensor]:
    """Read an official .pth (a plain state dict, or a dict holding one under 'model')."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - report any unpickling failure the same way
        raise ConversionError(f"{path} is not a readable PyTorch checkpoint: {e}") from None
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise ConversionError(f"{path} does not hold a state dict")
    return obj


def from_official(state_dict: dict[str, Tensor], config: Config):
    """Build our model from an official state dict."""
    from .model import build_model
    model = build_model(config)
    ours = convert_state_dict(state_dict, config, model.state_dict())
    model.load_state_dict(ours, strict=True)
    return model


def convert_checkpoint(checkpoint: str | Path, hparams: str | Path, out_dir: str | Path,
                       model: Optional[str] = None):
    """`ddlp convert`: official .pth + hparams.json -> a ddlp model directory."""
    overrides = {"model": model} if model else {}
    config = Config.from_json(hparams, **overrides)
    net = from_official(load_official(checkpoint), config)
    from .storage import save_pretrained
    save_pretrained(net, out_dir, source=f"converted from the official implementation's checkpoint "
                                         f"{Path(checkpoint).name} (taldatech/ddlp) by ddlp convert")
    return net
