"""DiffuseDDLP training: DDPM on the cached latents of a frozen DDLP, Adam, gradient clipping,
an EMA of the weights (torch.optim.swa_utils) used for every sample, exact resume.

A run directory holds:
    config.json                the DiffuseDDLP config
    ddlp/                      a copy of the frozen DDLP (config.json + model.safetensors)
    latents.safetensors        raw training tokens [M, tau, K + 1, F] (encoded once)
    latent_stats.safetensors   the normalisation statistics
    checkpoints/step-N/        model.safetensors (online weights), ema.safetensors, config.json,
                               state.pt (optimizer, step, EMA count, RNG); checkpoints/latest
    model/                     the EMA model for sampling (config.json + model.safetensors)
    metrics.jsonl, figures/    losses; previews of the first tau frames of EMA samples
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ..checkpoint import load_state, rng_state, set_rng_state, write_checkpoint
from ..nn.precision import autocast, full_precision
from ..storage import atomic_write, save_pretrained
from .latents import STATS_FILE, LatentStats, default_clips, encode_dataset, fingerprint, load_tokens, save_tokens
from .model import DiffuseDDLP, DiffusionConfig, load_ddlp, resolve_ddlp_dir

LATENTS_FILE = "latents.safetensors"


@dataclass
class DiffusionTrainOptions:
    run_dir: str = "runs/diffuse_ddlp"
    max_steps: Optional[int] = None        # default: the config's train_num_steps
    max_minutes: Optional[float] = None
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    preview_every: int = 1000              # 0: no preview figures
    preview_samples: int = 4
    preview_ddim_steps: int = 50
    log_every: int = 50
    progress: bool = True
    device: Optional[str] = None           # default: cuda when available, else cpu
    precision: str = "fp32"                # fp32, bf16 or auto: autocast of the denoiser's forward and loss


def ema_decay(step: int, config: DiffusionConfig) -> float:
    """Official EMA warm-up at EMA update counter `step` (0 = after the first optimizer step):
    a plain copy up to `ema_update_after_step` + 1, then min(max, 1 - (1 + e)^-power)."""
    e = step - config.ema_update_after_step - 1
    if e <= 0:
        return 0.0
    return min(config.ema_decay, 1 - (1 + e) ** -config.ema_power)


class DiffusionTrainer:
    def __init__(self, model: DiffuseDDLP, tokens: Tensor, options: Optional[DiffusionTrainOptions] = None,
                 ddlp=None):
        """`tokens`: raw (un-normalised) training tokens [M, tau, K + 1, F]; `ddlp` (optional)
        decodes preview figures."""
        self.model, self.opt, self.ddlp = model, options or DiffusionTrainOptions(), ddlp
        c = self.config = model.config
        self.run_dir = Path(self.opt.run_dir)
        if tokens.ndim != 4 or tuple(tokens.shape[1:]) != model.token_shape:
            raise ValueError(f"training tokens have shape {tuple(tokens.shape)}, the model expects "
                             f"[M, {', '.join(map(str, model.token_shape))}]")
        self.tokens = tokens.float()
        self.data = self._normalised()
        torch.manual_seed(c.seed)
        params = list(model.denoiser.parameters())
        self.optimizer = torch.optim.Adam(params, lr=c.lr, betas=tuple(c.adam_betas), foreach=True)
        # torch's EMA container; the decay changes with the step (official warm-up), so the
        # averaging function is re-made from get_ema_multi_avg_fn before each update.
        self.ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.0))
        self.ema.requires_grad_(False)
        self.step = 0
        self.losses: list[float] = []
        self._perm: tuple[int, Tensor] = (-1, torch.empty(0))

    @torch.no_grad()
    def _normalised(self) -> Tensor:
        device = self.model.normalizer.fg_mean.device
        return self.model.normalizer.normalize(self.tokens.to(device))

    # -------------------------------------------------------------------- data order
    def batch_indices(self, step: int) -> Tensor:
        """A function of (seed, step) only, so a resumed run sees the same batches."""
        M, B, seed = self.data.shape[0], self.config.batch_size, self.config.seed
        if M < B:   # fewer clips than a batch: draw with replacement
            g = torch.Generator().manual_seed(seed * 1_000_003 + step)
            return torch.randint(M, (B,), generator=g)
        per_epoch = M // B
        epoch, i = divmod(step, per_epoch)
        if self._perm[0] != epoch:
            g = torch.Generator().manual_seed(seed * 100_003 + epoch)
            self._perm = (epoch, torch.randperm(M, generator=g))
        return self._perm[1][i * B:(i + 1) * B]

    # -------------------------------------------------------------------- one step
    def train_step(self) -> float:
        model, c = self.model, self.config
        model.train()
        x0 = self.data[self.batch_indices(self.step)]
        with autocast(self.opt.precision, x0.device):
            loss = full_precision(model.loss(x0))
        if not torch.isfinite(loss):
            raise RuntimeError(f"the diffusion loss became {float(loss)} at step {self.step}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if c.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.denoiser.parameters(), c.grad_clip)
        self.optimizer.step()
        self.step += 1
        self.update_ema()
        value = float(loss.detach())
        self.losses.append(value)
        return value

    def update_ema(self) -> None:
        counter = self.step - 1
        if counter % self.config.ema_update_every:
            return
        self.ema.multi_avg_fn = get_ema_multi_avg_fn(ema_decay(counter, self.config))
        self.ema.update_parameters(self.model)

    @property
    def ema_model(self) -> DiffuseDDLP:
        return self.ema.module

    # -------------------------------------------------------------------- checkpoints
    def state(self) -> dict:
        return dict(step=self.step, optimizer=self.optimizer.state_dict(),
                    n_averaged=self.ema.n_averaged.clone(), rng=rng_state())

    def save_checkpoint(self) -> Path:
        """checkpoints/step-N/ with the EMA weights beside the model (checkpoint.write_checkpoint);
        model/ refreshed with the EMA model."""
        from safetensors.torch import save_file
        ema = {k: v.detach().contiguous().cpu() for k, v in self.ema_model.state_dict().items()}
        final = write_checkpoint(self.run_dir, self.step, self.model, self.state(), self.opt.keep_checkpoints,
                                 extra={"ema.safetensors": lambda p: save_file(ema, p, metadata={"format": "pt"})})
        save_pretrained(self.ema_model, self.run_dir / "model")
        return final

    def resume(self) -> bool:
        """Continue from the run's latest checkpoint; False when there is none."""
        from safetensors.torch import load_file

        from ..checkpoint import latest_checkpoint
        ckpt = latest_checkpoint(self.run_dir)
        if ckpt is None:
            return False
        device = str(self.model.normalizer.fg_mean.device)
        self.model.load_state_dict(load_file(ckpt / "model.safetensors", device=device))
        self.ema_model.load_state_dict(load_file(ckpt / "ema.safetensors", device=device))
        st = load_state(ckpt / "state.pt", map_location=device)
        self.optimizer.load_state_dict(st["optimizer"])
        self.ema.n_averaged.copy_(st["n_averaged"])
        self.step = st["step"]
        self.data = self._normalised()      # the checkpoint carries the statistics
        set_rng_state(st["rng"])
        return True

    # -------------------------------------------------------------------- outputs
    def log(self, record: dict) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def write_preview(self) -> Optional[Path]:
        """Decoded first tau frames of a few EMA samples (DDIM), one row per sample."""
        if self.ddlp is None or not self.opt.preview_samples:
            return None
        try:
            from ..viz import grid, save_figure, to_pil
            from ..model import DECODE_CHUNK
            from .sampler import sample_tokens
            from .tokens import from_tokens
            model = self.ema_model.eval()
            g = torch.Generator(device=model.schedule.betas.device).manual_seed(self.config.seed)
            steps = min(self.opt.preview_ddim_steps, model.schedule.steps)
            tokens = sample_tokens(model, self.opt.preview_samples, "ddim", steps, generator=g)
            particles = from_tokens(model.normalizer.unnormalize(tokens), model.layout)
            with torch.no_grad():
                frames = self.ddlp.decode(particles, max_images=DECODE_CHUNK)
            zoom = max(1, 128 // frames.shape[-1])
            rows = [[to_pil(f, zoom) for f in video] for video in frames]
            return save_figure(grid(rows), self.run_dir / "figures" / f"sample-{self.step:08d}.png")
        except Exception as e:  # noqa: BLE001 - a figure must never stop a training run
            print(f"warning: could not write the preview figure: {e}")
            return None

    # -------------------------------------------------------------------- the loop
    def train(self) -> dict:
        c, o = self.config, self.opt
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(self.run_dir / "config.json", lambda p: Path(p).write_text(c.to_json()))
        total = o.max_steps if o.max_steps is not None else c.train_num_steps
        start, recent = time.time(), []
        bar = None
        if o.progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=total, initial=min(self.step, total), desc="diffuse train", dynamic_ncols=True)
        try:
            while self.step < total:
                recent.append(self.train_step())
                if bar is not None:
                    bar.set_postfix(loss=f"{recent[-1]:.4f}", refresh=False)
                    bar.update(1)
                if self.step % o.log_every == 0:
                    self.log(dict(step=self.step, loss=sum(recent) / len(recent),
                                  ema_decay=ema_decay(self.step - 1, c), minutes=(time.time() - start) / 60))
                    recent = []
                if o.preview_every and self.step % o.preview_every == 0:
                    self.write_preview()
                out_of_time = o.max_minutes is not None and time.time() - start > 60 * o.max_minutes
                if out_of_time:
                    break
                if self.step % o.checkpoint_every == 0 and self.step < total:
                    self.save_checkpoint()
        finally:
            if bar is not None:
                bar.close()
        if recent:
            self.log(dict(step=self.step, loss=sum(recent) / len(recent), ema_decay=ema_decay(self.step - 1, c),
                          minutes=(time.time() - start) / 60))
        self.save_checkpoint()
        return dict(step=self.step, loss=self.losses[-1] if self.losses else float("nan"))


# ---------------------------------------------------------------------------- a run from a DDLP
def copy_ddlp(source: Path, run_dir: Path) -> Path:
    """Copy the DDLP model files into run_dir/ddlp (a run samples on its own)."""
    target = run_dir / "ddlp"
    if (target / "model.safetensors").is_file():
        return target
    tmp = run_dir / ".ddlp.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy2(source / name, tmp / name)
    os.replace(tmp, target)
    return target


def prepare_run(ddlp_path: str | Path, options: DiffusionTrainOptions, *, data_root: Optional[str] = None,
                stats_path: Optional[str | Path] = None, overrides: Optional[dict] = None,
                clips: Optional[str] = None, max_clips: Optional[int] = None, encode_batch: int = 32,
                resume: bool = False) -> DiffusionTrainer:
    """Everything `ddlp diffuse train` does before the loop: load the frozen DDLP, encode (or
    reuse) the training latents, get the statistics, build or restore the model."""
    from ..data.registry import build_dataset
    run_dir = Path(options.run_dir)
    device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
    existing = (run_dir / "config.json").is_file() and (run_dir / "checkpoints").is_dir()
    if existing and not resume:
        raise ValueError(f"{run_dir} already holds a DiffuseDDLP run: pass --resume to continue it or "
                         "choose another --run-dir")
    if resume:
        if not existing:
            raise FileNotFoundError(f"{run_dir} has no DiffuseDDLP run to resume (no config.json / checkpoints)")
        config = DiffusionConfig.from_json(run_dir / "config.json")
        if overrides:
            config = DiffusionConfig.from_dict({**config.to_dict(), **overrides})
        ddlp = load_ddlp(run_dir / "ddlp")
        fp = fingerprint(ddlp)
        tokens = load_tokens(run_dir / LATENTS_FILE, fp)
        if tokens is None:
            raise FileNotFoundError(f"{run_dir / LATENTS_FILE} is missing or belongs to another DDLP")
        ddlp.to(device)
        model = DiffuseDDLP(config).to(device)
        trainer = DiffusionTrainer(model, tokens, options, ddlp)
        if not trainer.resume():
            raise FileNotFoundError(f"{run_dir} has no complete checkpoint to resume from")
        return trainer

    source = resolve_ddlp_dir(ddlp_path)
    ddlp = load_ddlp(source)
    fp = fingerprint(ddlp)
    ddlp.to(device)
    config = DiffusionConfig.from_ddlp(ddlp.config, ddlp_dir=str(source), ddlp_fingerprint=fp, **(overrides or {}))
    if ddlp.config.timestep_horizon + 1 < config.diffuse_frames:
        raise ValueError(f"the DDLP's training clips have {ddlp.config.timestep_horizon + 1} frames, fewer than "
                         f"the diffuse_frames={config.diffuse_frames} to generate")
    run_dir.mkdir(parents=True, exist_ok=True)
    stats = None
    if stats_path is not None:
        stats = LatentStats.load(stats_path)
        stats.check(config.layout, fp, f"the statistics in {stats_path}")
    # the frozen DDLP encodes deterministically, so its latents are computed once per run
    dcfg = ddlp.config if data_root is None else type(ddlp.config).from_dict({**ddlp.config.to_dict(),
                                                                              "root": data_root})
    tokens = encode_dataset(ddlp, build_dataset(dcfg, "train"), config.diffuse_frames,
                            clips or default_clips(dcfg.ds), max_clips, encode_batch, options.progress)
    save_tokens(tokens, run_dir / LATENTS_FILE, fp)
    if stats is None:
        stats = LatentStats.from_tokens(tokens, config.layout, fp)
    stats.save(run_dir / STATS_FILE)
    copy_ddlp(source, run_dir)
    model = DiffuseDDLP(dataclasses.replace(config, ddlp_fingerprint=fp)).to(device)
    model.normalizer.set_stats(stats)
    return DiffusionTrainer(model, tokens, options, ddlp)
