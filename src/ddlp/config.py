"""Typed configuration. Field names are those of the official `hparams.json` / `configs/*.json`
files, so those files load unchanged; keys that only concern the official scripts (paths,
devices, plotting) are kept in `extra` and written back on save.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, Optional

PRESETS = ("balls", "obj3d", "obj3d128", "traffic", "phyre", "clevrer",
           "shapes", "obj3d_img", "obj3d128_img", "traffic_img",   # official, unchanged
           "balls_small")                                          # ours: trains on a laptop CPU


class ConfigError(ValueError):
    """A configuration value that the model cannot be built with."""


class JsonConfig:
    """A dataclass stored as one flat JSON object. Keys that are not fields are kept in `extra`
    and written back, so a file read and saved again loses nothing (the official files carry
    paths and plotting options the model never reads)."""

    extra: dict[str, Any]

    def validate(self):
        return self

    @classmethod
    def adapt(cls, known: dict[str, Any], extra: dict[str, Any], raw: dict[str, Any]) -> None:
        """Hook: rename or infer fields of an older or foreign file in place."""

    @classmethod
    def from_dict(cls, d: dict[str, Any], **overrides):
        d = {**d, **overrides}
        fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "extra"}
        known = {k: v for k, v in d.items() if k in fields}
        extra = {**d.get("extra", {}), **{k: v for k, v in d.items() if k not in fields and k != "extra"}}
        cls.adapt(known, extra, d)
        for key, value in known.items():       # JSON has no tuples, Python callers may pass them
            if str(fields[key].type).startswith("list") and isinstance(value, tuple):
                known[key] = list(value)
        return cls(**known, extra=extra).validate()

    @classmethod
    def from_json(cls, path: str | Path, **overrides):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(d, **overrides)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        extra = d.pop("extra")
        return {**extra, **d}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())


_TYPES = {"int": int, "float": (int, float), "bool": bool, "str": str, "dict[str, Any]": dict}


# ---------------------------------------------------------------- data options
# Options of the data loaders, not of the model. They are stored flat in the config file as
# `data_<field>` keys (kept in `extra`, beside the official keys) and read as `config.data`:
#
#     data_format      custom data: auto | frames | videos | npy | hdf5            (default auto)
#     data_frame_size  side of the square frames the loader produces             (default: the dataset's own)
#     data_episode_len frames per episode: cuts a single long sequence into episodes, caps longer
#                      ones, and is the assumed length of videos (CLEVRER: 100, PHYRE: 100, Traffic
#                      evaluation episodes: 50)
#     data_split       custom data without train/val/test folders: fractions of episodes, in
#                      order, for train, val and test                            (default [0.8, 0.1, 0.1])
#     data_cache       a folder for decoded, resized episodes (uint8 .npy, memory-mapped on reuse)
#     data_key         the HDF5 dataset / .npz array holding the frames           (default: guessed)
#     data_start_frame frames skipped at the start of every episode              (CLEVRER videos: 18)

FORMATS = ("auto", "frames", "videos", "npy", "hdf5")


@dataclass(frozen=True)
class DataOptions:
    """Typed, checked data options (see the comment above)."""
    format: str = "auto"
    frame_size: Optional[int] = None
    episode_len: Optional[int] = None
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    cache: Optional[str] = None
    key: Optional[str] = None
    start_frame: Optional[int] = None

    @classmethod
    def from_extra(cls, extra: dict[str, Any]) -> "DataOptions":
        """Options from a config's `extra` dict (keys `data_<field>`), checked with clear messages."""
        values = {f.name: extra[f"data_{f.name}"] for f in fields(cls) if extra.get(f"data_{f.name}") is not None}
        for name in ("frame_size", "episode_len"):
            v = values.get(name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"data_{name} must be a positive integer, got {v!r}")
        start = values.get("start_frame")
        if start is not None and (isinstance(start, bool) or not isinstance(start, int) or start < 0):
            raise ValueError(f"data_start_frame must be an integer >= 0, got {start!r}")
        if values.get("format", "auto") not in FORMATS:
            raise ValueError(f"data_format must be one of {', '.join(FORMATS)}, got {values['format']!r}")
        if "split" in values:
            values["split"] = _fractions(values["split"])
        for name in ("cache", "key"):
            if name in values:
                values[name] = str(values[name])
        return cls(**values)


def _fractions(value: Any) -> tuple[float, float, float]:
    ok = isinstance(value, (list, tuple)) and len(value) == 3 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in value)
    if not ok or not 0 < sum(value) <= 1 + 1e-9:
        raise ValueError(f"data_split must be three fractions >= 0 for train, val and test with a sum in "
                         f"(0, 1], e.g. [0.8, 0.1, 0.1]; got {value!r}")
    return tuple(float(v) for v in value)


@dataclass
class Config(JsonConfig):
    # --- model: which one
    model: str = "ddlp"                    # 'ddlp' (video, PINT) or 'dlp' (single image, DLPv2)
    # --- particles and encoders
    image_size: int = 64
    ch: int = 3
    enc_channels: list[int] = field(default_factory=lambda: [32, 64, 128])
    prior_channels: list[int] = field(default_factory=lambda: [16, 32, 64])
    patch_size: int = 8
    n_kp: int = 1                          # proposals per patch (only 1 is supported, as upstream)
    n_kp_prior: int = 12                   # proposals kept after filtering (L)
    n_kp_enc: int = 6                      # particles (K)
    learned_feature_dim: int = 3           # appearance features per particle
    bg_learned_feature_dim: int | None = None   # background features (default: same)
    anchor_s: float = 0.25                 # glimpse side as a fraction of the image
    kp_range: list[float] = field(default_factory=lambda: [-1, 1])
    kp_activation: str = "tanh"
    pad_mode: str = "replicate"
    sigma: float = 1.0                     # std of the proposal prior in the Chamfer-KL
    dropout: float = 0.0                   # accepted for compatibility; unused upstream too
    use_resblock: bool = False
    filtering_heuristic: str = "variance"
    spread_anchors: bool = False           # ours: first-frame anchors a glimpse apart (docs/training.md)
    centred_positions: bool = False        # ours: positions outside the model are object centres (docs/training.md)
    use_correlation_heatmaps: bool = True
    enable_enc_attn: bool = False
    use_tracking: bool = False             # DLP only: track over a 5-D input
    # --- priors
    scale_std: float = 0.3
    offset_std: float = 0.2
    obj_on_alpha: float = 0.1
    obj_on_beta: float = 0.1
    # --- dynamics (DDLP)
    timestep_horizon: int = 10             # T: PINT context; training clips have T + 1 frames
    predict_delta: bool = True
    pint_layers: int = 6
    pint_heads: int = 8
    pint_dim: int = 256
    pint_relative_bias: bool = True        # False: learned absolute embeddings ("No RPE" ablation)
    pint_velocity_input: bool = False      # ours: PINT also embeds each particle's last move (docs/training.md)
    no_tracking: bool = False              # True: every frame encoded alone ("DLP (No Tracking)" row)
    num_static_frames: int = 4             # burn-in frames with the constant prior
    # --- loss
    recon_loss_type: str = "mse"           # 'mse' or 'vgg'
    beta_kl: float = 0.1
    beta_rec: float = 1.0
    beta_dyn: float = 0.1
    beta_dyn_rec: float = 1.0
    kl_balance: float = 0.001
    # --- optimisation and schedule
    batch_size: int = 32
    lr: float = 2e-4
    num_epochs: int = 150
    warmup_epoch: int = 1
    weight_decay: float = 0.0
    scheduler_gamma: float = 0.95
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-4
    train_enc_prior: bool = True
    start_dyn_epoch: int = 0
    cond_steps: int = 10
    animation_horizon: int = 100
    eval_epoch_freq: int = 1
    eval_im_metrics: bool = True
    topk: int = 6
    # --- ddlp additions (absent from official files; defaults reproduce the official schedule)
    epoch_steps: int | None = None         # batches per "epoch" (None: one pass over the data)
    dyn_ramp_min_iters: int = 10000        # future-frame weights ramp over max(this, epoch) iters
    seed: int = 0
    # --- data
    ds: str = "balls"
    root: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    # ---------------------------------------------------------------- derived values
    @property
    def glimpse_size(self) -> int:
        """Glimpse side in pixels (numpy-style half-even rounding, as upstream)."""
        return int(round(self.anchor_s * (self.image_size - 1)))

    @property
    def bg_features_dim(self) -> int:
        return self.bg_learned_feature_dim or self.learned_feature_dim

    @property
    def mu_scale_prior(self) -> float:
        a = 0.75 * self.anchor_s
        return math.log(a / (1 - a + 1e-5))

    @property
    def is_video(self) -> bool:
        return self.model == "ddlp"

    @property
    def data(self) -> DataOptions:
        """The data loaders' options (the `data_*` keys), typed and checked."""
        return DataOptions.from_extra(self.extra)

    # ---------------------------------------------------------------- validation
    def check_types(self) -> None:
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), f.type.replace(" | None", "")
            if value is None and "None" in f.type:
                continue
            want = _TYPES.get(kind, list if kind.startswith("list") else object)
            numeric_bool = kind in ("int", "float") and isinstance(value, bool)
            if numeric_bool or not isinstance(value, want):
                raise ConfigError(f"{f.name} must be of type {kind}, got {value!r}")

    def validate(self) -> "Config":
        def need(ok: bool, msg: str):
            if not ok:
                raise ConfigError(msg)

        self.check_types()
        need(self.model in ("ddlp", "dlp"), f"model must be 'ddlp' or 'dlp', got {self.model!r}")
        need(self.ch == 3, f"only RGB images are supported (ch=3), got ch={self.ch}")
        need(self.image_size > 0 and self.image_size & (self.image_size - 1) == 0,
             f"image_size must be a power of two, got {self.image_size}")
        need(self.patch_size > 0 and self.image_size % self.patch_size == 0,
             f"patch_size ({self.patch_size}) must divide image_size ({self.image_size})")
        need(self.patch_size >= 2 ** (len(self.prior_channels) - 1),
             f"patch_size {self.patch_size} is too small for {len(self.prior_channels)} prior stages")
        g = self.glimpse_size
        need(g >= 16 and g & (g - 1) == 0,
             f"anchor_s={self.anchor_s} gives a {g}px glimpse at image_size {self.image_size}; "
             "the glimpse decoder needs a power of two >= 16 (e.g. anchor_s 0.25 at 64px)")
        need(g >= 2 ** (len(self.prior_channels) - 1), "glimpse smaller than the glimpse CNN's stride")
        f = self.image_size // 2 ** (len(self.enc_channels) - 1)
        need(f >= 8 and f & (f - 1) == 0,
             f"enc_channels has {len(self.enc_channels)} stages: the background map would be {f}px "
             "(must be a power of two >= 8)")
        need(self.n_kp == 1, f"n_kp must be 1 (as in every published config), got {self.n_kp}")
        need(self.n_kp_enc >= 1, f"n_kp_enc must be >= 1, got {self.n_kp_enc}")
        n_patches = (self.image_size // self.patch_size) ** 2
        kept = n_patches if self.filtering_heuristic == "none" else min(self.n_kp_prior, n_patches)
        need(kept >= self.n_kp_enc or self.filtering_heuristic == "none",
             f"n_kp_enc ({self.n_kp_enc}) exceeds the {kept} proposals kept by the prior "
             f"(n_kp_prior={self.n_kp_prior}, {n_patches} patches)")
        need(self.filtering_heuristic in ("variance", "distance", "random", "none"),
             f"unknown filtering_heuristic {self.filtering_heuristic!r}")
        need(not (self.model == "ddlp" and self.filtering_heuristic == "none"),
             "filtering_heuristic 'none' (particle mixer) is only available for the DLP model")
        need(not (self.model == "dlp" and self.centred_positions),
             "centred_positions is a DDLP option (PINT learns object centres); the DLP model has no PINT")
        need(self.kp_activation in ("tanh", "sigmoid"), f"unknown kp_activation {self.kp_activation!r}")
        need(list(self.kp_range) == [-1, 1], "only kp_range [-1, 1] is supported")
        need(not self.enable_enc_attn, "enable_enc_attn (unused by every published config) is not implemented")
        need(not self.use_resblock, "use_resblock (unused by every published config) is not implemented")
        need(self.start_dyn_epoch == 0, f"start_dyn_epoch {self.start_dyn_epoch}: holding the dynamics back for the "
             "first epochs (the official static-ELBO warm start, 0 in every published config) is not implemented")
        need(self.recon_loss_type in ("mse", "vgg"), "recon_loss_type must be 'mse' or 'vgg'")
        need(self.pint_dim % self.pint_heads == 0,
             f"pint_dim ({self.pint_dim}) must be divisible by pint_heads ({self.pint_heads})")
        need(self.timestep_horizon >= 1, "timestep_horizon must be >= 1")
        need(0 < self.anchor_s < 1, f"anchor_s must be in (0, 1), got {self.anchor_s}")
        try:
            self.data
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return self

    # ---------------------------------------------------------------- I/O
    @classmethod
    def adapt(cls, known: dict[str, Any], extra: dict[str, Any], raw: dict[str, Any]) -> None:
        if "cdim" in extra:
            known.setdefault("ch", extra.pop("cdim"))
        if "model" not in raw:
            # Official files do not say which trainer they belong to. The single-image trainer's
            # configs are the ones that set use_tracking=False explicitly.
            known["model"] = "dlp" if raw.get("use_tracking") is False else "ddlp"

    @classmethod
    def preset(cls, name: str, **overrides) -> "Config":
        """One of the official configurations shipped with the package (see PRESETS)."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
        text = resources.files("ddlp").joinpath("configs", f"{name}.json").read_text()
        d = json.loads(text)
        # The official files name the authors' own disks; a preset looks under ./data/<dataset>
        # unless --data.root says otherwise.
        if d.get("root") is None or Path(str(d["root"])).is_absolute():
            d["root"] = f"data/{d.get('ds', name)}"
        return cls.from_dict(d, **overrides)


def parse_overrides(items: Optional[list[str]]) -> dict[str, Any]:
    """`--set KEY=VALUE` items as a dict; VALUE is read as JSON where it parses (numbers, booleans,
    lists), else kept as a string."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out
