"""DLP (DLPv2, single images) and DDLP (videos: tracking posterior + PINT prior).

    frames -> keypoint proposals (one per patch) -> posterior particles (tracked over time)
           -> glimpse decoder + depth/alpha stitching + background -> reconstruction
           -> PINT over particles[0..T-1] -> dynamics prior of particles[1..T]
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .config import Config
from .decoder import Background, Foreground, GlimpseDecoder, alpha_centres, stitch
from .encoder import (AppearanceEncoder, AttributeEncoder, FrameEncoding, add_features, encode_frame,
                      reparameterize)
from .nn.blocks import init_conv_weights
from .particles import Particles
from .pint import PINT
from .proposals import ParticleMixer, KeypointProposer

# Images decoded at once where applications turn long rollouts into video: bounds their memory.
DECODE_CHUNK = 100


@dataclass
class Output:
    """Everything a forward pass produces. Leading dims: [B] (DLP) or [B, T] (DDLP)."""
    rec: Tensor                    # [..., 3, H, W] reconstruction
    posterior: Particles           # posterior particles, background included
    proposals: Tensor              # [..., L, 2] keypoint proposals (detached: Chamfer targets)
    foreground: Foreground         # stitched particles, masks, decoded RGBA glimpses
    bg: Tensor                     # [..., 3, H, W] decoded background
    glimpses: Tensor               # [..., K, 3, g, g] appearance glimpses (warm-up targets)
    bg_encoder_mask: Tensor        # [..., 1, H, W]
    dynamics: Optional[Particles] = None   # DDLP: PINT's prior of frames 1..T, [B, T, ...]


def _flat(t: Tensor, n: int) -> Tensor:
    """Merge the first n dims."""
    return t.reshape(-1, *t.shape[n:])


class ParticleModel(nn.Module):
    """Parts shared by DLP and DDLP: keypoint proposer, glimpse encoders, decoders, background."""

    # Training option (`ddlp train --low-memory`): recompute the decoders' activations in backward
    # instead of keeping them. The background CNNs at full resolution and the pasted glimpses hold
    # most of a step's activations for a fifth of its compute (docs/performance.md).
    low_memory: bool = False

    def __init__(self, config: Config):
        super().__init__()
        c = self.config = config.validate()
        g, H = c.glimpse_size, c.image_size
        replicate = c.pad_mode != "zeros"
        # named `prior` as in the official state dict (fg_module.prior.*), so checkpoints map 1:1
        spacing = c.anchor_s * (c.kp_range[1] - c.kp_range[0]) if c.spread_anchors else 0.0
        self.prior = KeypointProposer(H, c.patch_size, c.prior_channels, c.n_kp_prior,
                                      c.filtering_heuristic, replicate, c.n_kp_enc, spacing)
        self.mixer = (ParticleMixer(self.prior.n_patches, c.n_kp_enc, H, g, c.prior_channels)
                      if c.filtering_heuristic == "none" else None)
        self.attribute_encoder = AttributeEncoder(c.prior_channels, g, H, c.use_correlation_heatmaps,
                                                  c.kp_activation)
        self.appearance_encoder = AppearanceEncoder(c.prior_channels, g, c.learned_feature_dim)
        self.glimpse_decoder = GlimpseDecoder(c.learned_feature_dim, g)
        self.background = Background(H, c.enc_channels, c.bg_features_dim, g, replicate)
        init_conv_weights(self)
        # mkldnn/cuDNN convolutions run natively in NHWC; with NCHW weights every conv and its
        # backward pays a layout conversion (measured: ~35 % of a CPU training step).
        self.to(memory_format=torch.channels_last)

    # ------------------------------------------------------------------ pieces
    def check_input(self, x: Tensor, video: bool) -> None:
        c = self.config
        want = f"[B, T, 3, {c.image_size}, {c.image_size}]" if video else f"[B, 3, {c.image_size}, {c.image_size}]"
        ndim = 5 if video else 4
        if not torch.is_tensor(x) or x.ndim != ndim or x.shape[-3:] != (c.ch, c.image_size, c.image_size):
            got = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"expected {'frames' if video else 'images'} of shape {want} for this "
                             f"config, got {got}")
        if not x.is_floating_point():
            raise ValueError(f"expected float images in [0, 1], got dtype {x.dtype}")

    def propose(self, x: Tensor, train_proposer: bool = True, heuristic: Optional[str] = None) -> Tensor:
        """Anchor initialisation [B, L, 2] (graph kept when train_proposer)."""
        kp, _, _ = self.prior(x, heuristic)
        if not train_proposer:
            kp = 0 * kp + kp.detach()
        return kp

    def _encode(self, x: Tensor, anchors: Tensor, *, deterministic: bool, warmup: bool, noisy: bool,
                prev: Optional[FrameEncoding] = None, refine: bool = True,
                describe: bool = True) -> FrameEncoding:
        return encode_frame(
            self.attribute_encoder, self.appearance_encoder, x, anchors, self.config.n_kp_enc,
            self.config.anchor_s, deterministic=deterministic, warmup=warmup, noisy=noisy,
            prev_glimpses=None if prev is None else prev.glimpses.detach(),
            prev_scale=None if prev is None else prev.particles.scale.detach(), refine=refine,
            describe=describe)

    def _recompute_in_backward(self, fn, *args):
        if self.low_memory and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)   # replays the RNG too (noisy alpha)
        return fn(*args)

    def decode_foreground(self, p: Particles, noisy: bool = False, centred: bool = False) -> Foreground:
        """Stitched particles for particles of any leading shape. `centred`: the positions are
        object centres (see `to_object_centres`), so each glimpse goes back to its own centre."""
        return self._recompute_in_backward(self._decode_foreground, p, noisy, centred)

    def _decode_glimpses(self, features: Tensor) -> Tensor:
        """RGBA glimpses [N, K, 4, g, g] of features [..., K, F], leading dims merged into N."""
        K, g = features.shape[-2], self.config.glimpse_size
        return self.glimpse_decoder(features.reshape(-1, features.shape[-1])).view(-1, K, 4, g, g)

    def _decode_foreground(self, p: Particles, noisy: bool, centred: bool = False) -> Foreground:
        lead = p.batch_shape
        n = len(lead)
        decoded = self._decode_glimpses(p.features)
        position, scale = _flat(p.position, n), _flat(p.scale, n)
        if centred:
            position = position - alpha_centres(decoded, scale).to(position.dtype)
        fg = stitch(decoded, position, scale, _flat(p.depth, n),
                    _flat(p.transparency, n), self.config.image_size, noisy)
        return Foreground(*(t.view(*lead, *t.shape[1:]) for t in
                            (fg.image, fg.bg_mask, fg.alpha_masks, fg.glimpses)))

    def attach_background(self, x: Tensor, p: Particles, deterministic: bool) -> tuple[Particles, Tensor]:
        """Background posterior of images x [..., 3, H, W] whose particles are p [..., K, ...]:
        p with its background fields filled, and the encoder mask [..., 1, H, W]."""
        lead = p.batch_shape
        n = len(lead)
        mask = self.background.encoder_mask(_flat(p.position, n), _flat(p.transparency, n))
        mu, logvar = self._recompute_in_backward(self.background.encode, _flat(x, n), mask)
        z = reparameterize(mu, logvar, deterministic)
        view = lambda t: t.view(*lead, *t.shape[1:])  # noqa: E731
        return p.replace(bg_features=view(z), bg_mu=view(mu), bg_logvar=view(logvar)), view(mask)

    def decode_background(self, features: Tensor) -> Tensor:
        """Background features [..., F] -> images [..., 3, H, W]."""
        bg = self._recompute_in_backward(self.background.decode, features.reshape(-1, features.shape[-1]))
        return bg.view(*features.shape[:-1], *bg.shape[1:])

    def reconstruct(self, x: Tensor, p: Particles, proposals: Tensor, glimpses: Tensor, *,
                    deterministic: bool, noisy: bool) -> Output:
        """Decode posterior particles (foreground, then the background they leave visible)."""
        fg = self.decode_foreground(p, noisy)
        posterior, mask = self.attach_background(x, p, deterministic)
        bg = self.decode_background(posterior.bg_features)
        return Output(fg.bg_mask * bg + fg.image, posterior, proposals, fg, bg, glimpses, mask)

    def decode(self, p: Particles, max_images: Optional[int] = None) -> Tensor:
        """Frames from particles (background features required): [..., 3, H, W]. For particles
        [B, T, K, ...], `max_images` bounds memory by decoding that many images at a time."""
        if max_images is not None and len(p.batch_shape) == 2:
            B, T = p.batch_shape
            chunk = max(1, max_images // B)
            if chunk < T:
                return torch.cat([self.decode(p[:, s:s + chunk]) for s in range(0, T, chunk)], 1)
        fg = self.decode_foreground(p, centred=self.config.centred_positions)
        return fg.bg_mask * self.decode_background(p.bg_features) + fg.image

    def to_object_centres(self, p: Particles) -> Particles:
        """p with its positions (and position means) moved from the glimpse centres to the centres
        of the objects the glimpse decoder draws there (`decoder.alpha_centres` of the mean
        features and scale). A particle's glimpse centre is a gauge: the decoder can draw its
        object anywhere in the glimpse, and trained models do, by up to a pixel per colour on
        Balls; the object centre is where the particle's object is (docs/training.md)."""
        features = p.features if p.features_mu is None else p.features_mu
        scale = p.scale if p.scale_mu is None else p.scale_mu
        shift = alpha_centres(self._decode_glimpses(features), _flat(scale, len(p.batch_shape)))
        centre = p.position + shift.view(p.position.shape).to(p.position.dtype)
        # The appearance encoder looked at the glimpse around the *sampled* position, so the object
        # centre it describes is relative to that sample, in a stochastic posterior as well: it is
        # the new mean (position_mu + shift would subtract the sampling noise from the centre).
        # anchor + offset_mu is the mean the dynamics KL reads (losses.dynamics_kl): keep them agreeing
        return p.replace(position=centre, position_mu=None if p.position_mu is None else centre,
                         offset_mu=None if p.anchor is None else centre - p.anchor)

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, directory: str | Path, metrics: Optional[dict] = None) -> None:
        """config.json, model.safetensors and a model card (README.md, with `metrics` if given)."""
        from .storage import save_pretrained
        save_pretrained(self, directory, metrics=metrics)

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str = "cpu",
                        revision: Optional[str] = None) -> "ParticleModel":
        """A model from a local model directory or a Hugging Face Hub id ("org/name"; needs
        `ddlp[hub]`). Called on DLP or DDLP, it refuses a model of the other kind."""
        from .storage import read_pretrained
        config, weights = read_pretrained(directory, map_location, revision)
        model = build_model(config)
        model.load_state_dict(weights)
        model = model.to(map_location)
        if not isinstance(model, cls):
            raise TypeError(f"{directory} holds a {type(model).__name__} model, not a {cls.__name__}; "
                            f"use {type(model).__name__}.from_pretrained or ParticleModel.from_pretrained")
        return model

    def push_to_hub(self, repo_id: str, **kwargs) -> str:
        """Upload to the Hugging Face Hub (see ddlp.checkpoint.push_to_hub); returns the commit URL."""
        from .storage import push_to_hub
        return push_to_hub(self, repo_id, **kwargs)

    def track(self, x: Tensor, *, deterministic: bool = False, warmup: bool = False,
              noisy: bool = False, train_proposer: bool = True,
              proposal_frames: Optional[int] = None) -> tuple[Particles, Tensor, Tensor]:
        """Tracking posterior of frames [B, T, 3, H, W] (no background).

        Proposals come from the first `proposal_frames` frames (DDLP: the burn-in frames).
        Frame 0 refines the first K proposals into anchors; every later frame is anchored at the
        previous positions, with the previous glimpses as correlation templates. Returns
        particles [B, T, K, ...], proposals [B, T, L, 2] (detached; later frames repeat the last
        proposal frame) and the appearance glimpses [B, T, K, 3, g, g].
        """
        B, T = x.shape[:2]
        if self.config.no_tracking:
            return self._encode_frames_independently(x, deterministic=deterministic, warmup=warmup,
                                                     noisy=noisy, train_proposer=train_proposer)
        ns = min(proposal_frames or self.config.num_static_frames, T)
        heuristic = "random" if (warmup or noisy) and proposal_frames else None
        kp = self.propose(_flat(x[:, :ns], 2), train_proposer, heuristic).view(B, ns, -1, 2)
        # Tracking needs each frame's positions and glimpses before the next frame; the
        # appearance features do not, so their CNN runs once over all frames afterwards.
        flags = dict(deterministic=deterministic, warmup=warmup, noisy=noisy, describe=False)
        frames = [self._encode(x[:, 0], kp[:, 0], **flags)]
        for t in range(1, T):
            prev = frames[-1]
            frames.append(self._encode(x[:, t], prev.particles.position.detach(), prev=prev,
                                       refine=False, **flags))
        kp = kp.detach()
        kp = torch.cat([kp, kp[:, -1:].expand(B, T - ns, -1, -1)], 1)
        glimpses = torch.stack([f.glimpses for f in frames], 1)            # [B, T, K, 3, g, g]
        particles = add_features(self.appearance_encoder, Particles.stack([f.particles for f in frames]),
                                 glimpses, deterministic)
        return particles, kp, glimpses

    def _encode_frames_independently(self, x: Tensor, **flags) -> tuple[Particles, Tensor, Tensor]:
        """The "no tracking" ablation: each frame gets its own proposals and DLP encoding, so a
        particle index does not follow an object from frame to frame. All frames in one batch."""
        B, T = x.shape[:2]
        train_proposer = flags.pop("train_proposer")
        frames = _flat(x, 2)
        kp = self.propose(frames, train_proposer)
        anchors = kp if self.mixer is None else self.mixer(frames, kp)
        enc = self._encode(frames, anchors, **flags)
        view = lambda t: t.view(B, T, *t.shape[1:])  # noqa: E731
        return enc.particles.map(view), view(kp.detach()), view(enc.glimpses)


class DLP(ParticleModel):
    """DLPv2: particles of single images."""

    def encode(self, images: Tensor, deterministic: bool = True) -> Particles:
        return self(images, deterministic=deterministic).posterior

    def forward(self, x: Tensor, deterministic: bool = False, warmup: bool = False,
                noisy: bool = False, train_proposer: bool = True) -> Output:
        if self.config.use_tracking and x.ndim == 5:
            return self._forward_tracked(x, deterministic, warmup, noisy, train_proposer)
        self.check_input(x, video=False)
        kp = self.propose(x, train_proposer)
        anchors = kp if self.mixer is None else self.mixer(x, kp)
        enc = self._encode(x, anchors, deterministic=deterministic, warmup=warmup, noisy=noisy)
        return self.reconstruct(x, enc.particles, kp.detach(), enc.glimpses,
                                deterministic=deterministic, noisy=noisy)

    def _forward_tracked(self, x, deterministic, warmup, noisy, train_proposer) -> Output:
        """use_tracking: particles tracked over a clip, proposals (and the Chamfer-KL) on every
        frame; the loss still treats frames as independent images."""
        self.check_input(x, video=True)
        p, kp, glimpses = self.track(x, deterministic=deterministic, warmup=warmup, noisy=noisy,
                                     train_proposer=train_proposer, proposal_frames=x.shape[1])
        return self.reconstruct(x, p, kp, glimpses, deterministic=deterministic, noisy=noisy)


class DDLP(ParticleModel):
    """DDLP: DLPv2 particles tracked over video frames, with the PINT dynamics prior."""

    def __init__(self, config: Config):
        super().__init__(config)
        self.pint = self.build_pint()

    def build_pint(self) -> PINT:
        """A freshly initialised PINT for this config."""
        c = self.config
        return PINT(c.n_kp_enc, c.learned_feature_dim, c.bg_features_dim, c.pint_dim,
                    c.pint_heads, c.pint_layers, c.timestep_horizon,
                    predict_delta=c.predict_delta, activation=c.kp_activation,
                    relative_bias=c.pint_relative_bias, velocity_input=c.pint_velocity_input)

    def encode(self, frames: Tensor, deterministic: bool = True) -> Particles:
        """Posterior particles of a clip [B, T, 3, H, W], background included."""
        self.check_input(frames, video=True)
        p, _, _ = self.track(frames, deterministic=deterministic)
        p = self.attach_background(frames, p, deterministic)[0]     # its mask needs glimpse centres
        return self.to_object_centres(p) if self.config.centred_positions else p

    def forward(self, x: Tensor, deterministic: bool = False, warmup: bool = False,
                noisy: bool = False, train_proposer: bool = True, dynamics: bool = True) -> Output:
        self.check_input(x, video=True)
        if self.config.centred_positions:
            raise ValueError("centred_positions models are trained with glimpse centres: ELBO training sees "
                             "them, only PINT (ddlp tune-pint) and inference see object centres; set "
                             "centred_positions to false in the config to train the whole model")
        p, kp, glimpses = self.track(x, deterministic=deterministic, warmup=warmup, noisy=noisy,
                                     train_proposer=train_proposer)
        out = self.reconstruct(x, p, kp, glimpses, deterministic=deterministic, noisy=noisy)
        if dynamics:   # teacher-forced: PINT sees the posterior of frames 0..T-1
            out.dynamics = self.pint(out.posterior[:, :-1])
        return out

    @torch.no_grad()
    def rollout(self, frames: Tensor, steps: int, cond_steps: Optional[int] = None,
                deterministic: bool = True) -> tuple[Tensor, Particles]:
        """Encode `cond_steps` frames of `frames` [B, >=cond_steps, 3, H, W], predict `steps`
        more with PINT. Returns frames [B, cond_steps + steps, 3, H, W] (reconstructions of the
        conditioning frames, then predictions) and their particles."""
        cond = cond_steps or self.config.timestep_horizon
        if frames.ndim == 5 and frames.shape[1] < cond:
            raise ValueError(f"need at least cond_steps={cond} frames, got {frames.shape[1]}")
        history = self.predict(self.encode(frames[:, :cond], deterministic=deterministic), steps, deterministic)
        return self.decode(history), history

    def predict(self, history: Particles, steps: int, deterministic: bool = True) -> Particles:
        """Extend particles [B, T, K, ...] by `steps` PINT steps: [B, T + steps, K, ...] (values
        only); see `PINT.rollout`."""
        return self.pint.rollout(history, steps, deterministic)



WEIGHTLESS_FIELDS = ("spread_anchors", "centred_positions")    # config fields that change no weight's shape or meaning


def reconfigured(model: ParticleModel, **fields) -> ParticleModel:
    """`model` with the same weights and WEIGHTLESS_FIELDS of its config changed."""
    wrong = sorted(k for k in fields if k not in WEIGHTLESS_FIELDS)
    if wrong:
        raise ValueError(f"only {', '.join(WEIGHTLESS_FIELDS)} can change without new weights, not {', '.join(wrong)}")
    other = build_model(dataclasses.replace(model.config, **fields)).to(next(model.parameters()).device)
    other.load_state_dict(model.state_dict())
    return other.train(model.training)


def with_fresh_pint(model: DDLP, **fields) -> DDLP:
    """A DDLP with `model`'s weights outside PINT and a freshly built PINT whose config fields
    (pint_* keys, e.g. pint_velocity_input=True, and WEIGHTLESS_FIELDS) may differ: for training
    PINT alone on a frozen encoder (ddlp.pint_tuning) with another PINT than the joint run's."""
    wrong = sorted(k for k in fields if not k.startswith("pint_") and k not in WEIGHTLESS_FIELDS)
    if wrong:
        raise ValueError(f"only PINT fields (pint_*) and {', '.join(WEIGHTLESS_FIELDS)} can change, "
                         f"not {', '.join(wrong)}")
    fresh = DDLP(dataclasses.replace(model.config, **fields)).to(next(model.parameters()).device)
    kept = {k: v for k, v in model.state_dict().items() if not k.startswith("pint.")}
    missing, unexpected = fresh.load_state_dict(kept, strict=False)
    assert not unexpected and all(k.startswith("pint.") for k in missing), (missing, unexpected)
    return fresh.train(model.training)


def build_model(config: Config) -> ParticleModel:
    return (DDLP if config.is_video else DLP)(config)
