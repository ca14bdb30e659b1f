"""Training for DLP and DDLP: one plain loop, the official schedule, exact resume.

Runs unchanged under `python`, `torchrun` and `accelerate launch` (accelerate handles
processes and mixed precision). Per batch: forward -> ELBO -> backward -> Adam step; per epoch:
StepLR, validation ELBO, figures, checkpoints. Warm-up epochs (glimpse-level reconstruction) and
"noisy" epochs (randomised glimpse scale and alphas) as in the official trainer, and the
future-frame weights ramp up over the first iterations.

A run directory holds:
    config.json            the resolved config
    checkpoints/step-N/    model.safetensors, config.json, state.pt (optimizer, schedule, RNG, counters)
    checkpoints/latest     name of the newest complete checkpoint (replaced atomically)
    best/                  model with the best validation ELBO (or PSNR: TrainOptions.best_by)
    metrics.jsonl          one line per evaluation
    figures/               nine-row figures and rollout GIFs
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from .checkpoint import BEST_RULES, checkpoint_path, latest_checkpoint, load_state, rng_state, set_rng_state, write_checkpoint
from .config import Config
from .data import batch_frames
from .losses import elbo
from .model import ParticleModel, build_model, with_fresh_pint
from .nn.precision import autocast, resolve_precision
from .storage import atomic_write, save_pretrained


class TrainingError(RuntimeError):
    pass


TRACKER_PSNR_MARGIN = 6.0   # dB below the best validation PSNR so far within which best_by="val_track_px"
                            # picks the best tracker: Balls' colour plateau sits 10-15 dB below (Trainer._replaces_best)


@dataclass
class TrainOptions:
    run_dir: str = "runs/ddlp"
    max_steps: Optional[int] = None         # stop after this many optimizer steps
    max_minutes: Optional[float] = None     # stop (after a checkpoint) when this much time has passed
    num_workers: int = 2
    precision: str = "auto"                 # 'auto': bf16 where the hardware has it natively, else fp32; 'fp32' (or 'no'), 'bf16', 'fp16'
    compile: bool = False
    low_memory: bool = False                # recompute the decoders' activations in backward (less RAM)
    grad_accum: int = 1
    grad_clip: Optional[float] = None       # clip the global gradient norm (the official code does not)
    checkpoint_every: int = 500             # steps
    keep_checkpoints: int = 2
    eval_batches: int = 8
    tensorboard: bool = True
    progress: bool = True
    vgg_weights: Optional[str] = None
    figures: bool = True
    best_by: str = "val_loss"               # best/: lowest validation ELBO (official), highest "val_psnr",
                                            # or lowest "val_track_px" (data with object positions) among
                                            # validations within TRACKER_PSNR_MARGIN of the best PSNR
    anneal: float = 0.0                     # last share of max_steps (without them, of max_minutes) over which
                                            # the learning rate falls to 0 along a cosine; 0: the official schedule
    track_with: dict = field(default_factory=dict)  # weightless config fields (model.WEIGHTLESS_FIELDS) of the
                                            # posterior val_track_px measures: the one used after training
    validate_at_stop: bool = False          # also validate (and maybe keep as best) the weights a step or time
                                            # limit stops at mid-epoch; annealed runs always do


# ------------------------------------------------------------------------------ data order
class EpochSampler(Sampler[int]):
    """Shuffled indices from a generator seeded by (seed, epoch), sharded across processes and
    able to start mid-epoch: the order depends on nothing but these numbers, so a resumed run
    sees exactly the batches an uninterrupted one would."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.epoch, self.skip_batches = 0, 0

    def order(self) -> Tensor:
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        return torch.randperm(self.n, generator=g)[self.rank::self.world]

    def batches_per_epoch(self) -> int:
        return (self.n // self.world) // self.batch_size

    def __iter__(self) -> Iterator[int]:
        idx = self.order()[: self.batches_per_epoch() * self.batch_size]
        return iter(idx[self.skip_batches * self.batch_size:].tolist())

    def __len__(self) -> int:
        return (self.batches_per_epoch() - self.skip_batches) * self.batch_size


# ------------------------------------------------------------------------------ the objective
class Objective(nn.Module):
    """Model + ELBO in one module, so DDP wraps exactly what is differentiated."""

    def __init__(self, model: ParticleModel, vgg_weights: Optional[str] = None):
        super().__init__()
        self.model = model
        self.recon = None
        if model.config.recon_loss_type == "vgg":
            from .nn.vgg import VGGPerceptualLoss
            self.recon = VGGPerceptualLoss.pretrained(vgg_weights)

    def forward(self, x: Tensor, warmup: bool, noisy: bool, discount: Optional[Tensor]):
        c = self.model.config
        if not c.is_video and x.ndim == 5 and not c.use_tracking:
            x = x.flatten(0, 1)                 # a single-image model sees every frame of a clip
        # train_enc_prior false: the proposals reach the encoder detached, as the official trainer does
        out = self.model(x, warmup=warmup, noisy=noisy, train_proposer=c.train_enc_prior)
        kwargs = dict(warmup=warmup, noisy=noisy, recon=self.recon)
        if c.is_video:
            kwargs["discount"] = discount
        return elbo(out, x, c, **kwargs), out


def future_weights(iteration: int, config: Config, iters_per_epoch: int, device=None) -> Tensor:
    """Official ramp of the future-frame weights: frame j after burn-in reaches weight 1 after
    (j + 1) * W // T iterations, W = max(warmup_epoch, 1) * max(ramp_min, iters_per_epoch)."""
    T = config.timestep_horizon
    W = max(config.warmup_epoch, 1) * max(config.dyn_ramp_min_iters, iters_per_epoch)
    step = max(W // T, 1)
    thresholds = step * torch.arange(1, T + 1, dtype=torch.float32, device=device)
    return (iteration / thresholds).clamp(0, 1)


def particle_stats(out) -> dict[str, float]:
    """What practitioners watch: visible particles, mean glimpse scale, Beta parameters."""
    p = out.posterior
    return dict(on=float(p.transparency.detach().sum(-1).mean()),
                scale=float(torch.sigmoid(p.scale.detach()).mean()),
                a=float(p.transparency_a.detach().mean()), b=float(p.transparency_b.detach().mean()))


# ------------------------------------------------------------------------------ trainer
class Trainer:
    def __init__(self, config: Config, train_set: Dataset, val_set: Optional[Dataset] = None,
                 options: Optional[TrainOptions] = None, model: Optional[ParticleModel] = None):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.config, self.opt = config, options or TrainOptions()
        if self.opt.best_by not in BEST_RULES:
            raise ValueError(f"best_by must be one of {', '.join(BEST_RULES)}, got {self.opt.best_by!r}")
        if not 0 <= self.opt.anneal <= 1:
            raise ValueError(f"anneal is a share of the run, between 0 and 1; got {self.opt.anneal}")
        if self.opt.anneal and self.opt.max_steps is None and self.opt.max_minutes is None:
            raise ValueError("anneal needs the run's length: max_steps or max_minutes")
        self.run_dir = Path(self.opt.run_dir)
        # Without a GPU, accelerate only forms a multi-process (gloo) group when told cpu=True.
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.precision, self.precision_reason = resolve_precision(self.opt.precision, device)
        # bf16 is plain autocast here (Trainer.autocast): accelerate keeps one mixed precision per
        # process, and another Trainer in the same process (a notebook, the quickstart after a
        # test run) may ask for another. fp16 needs accelerate's gradient scaler.
        self.acc = Accelerator(mixed_precision="fp16" if self.precision == "fp16" else "no", cpu=device == "cpu",
                               gradient_accumulation_steps=self.opt.grad_accum)
        set_seed(config.seed)
        self._check_writable()
        self.model = model or build_model(config)
        self.model.low_memory = self.opt.low_memory
        self.loss_fn = Objective(self.model, self.opt.vgg_weights)   # unwrapped; prepare() may wrap it
        params = [p for p in self.model.parameters() if p.requires_grad]
        # foreach: on the CPU torch would pick its per-parameter loop, whose optimizer step over
        # balls_small's ~200 tensors takes 30 % longer; the update is bitwise the same (tests/test_train.py)
        self.optimizer = torch.optim.Adam(params, lr=config.lr, betas=tuple(config.adam_betas),
                                          eps=config.adam_eps, weight_decay=config.weight_decay, foreach=True)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, 1, config.scheduler_gamma)
        self.objective, self.optimizer = self.acc.prepare(self.loss_fn, self.optimizer)
        if self.opt.compile and self.acc.device.type == "cpu":
            # torch 2.13 compiles the training step on the CPU since the padding became one autograd
            # function, but it takes minutes and measured no faster than eager (docs/performance.md)
            raise TrainingError("--compile is not supported for training on the CPU: torch 2.13 takes about "
                                "4 minutes to compile this model there and the compiled step measured no "
                                "faster than eager; run without --compile")
        self.forward = torch.compile(self.objective) if self.opt.compile else self.objective

        self.train_set, self.val_set = train_set, val_set
        check_data(train_set, config, "training")
        if val_set is not None:
            check_data(val_set, config, "validation")
        self.sampler = EpochSampler(len(train_set), config.batch_size, config.seed,
                                    self.acc.process_index, self.acc.num_processes)
        if self.sampler.batches_per_epoch() == 0:
            raise TrainingError(f"the training set has {len(train_set)} items: fewer than one batch "
                                f"of {config.batch_size} per process")
        self.loader = DataLoader(train_set, batch_size=config.batch_size, sampler=self.sampler,
                                 num_workers=self.opt.num_workers, drop_last=True,
                                 pin_memory=self.acc.device.type == "cuda",
                                 generator=torch.Generator())   # keeps the global RNG stream untouched
        self.epoch = self.step_in_epoch = self.global_step = self.iteration = 0
        self.best_val = math.inf
        self.best_psnr = self.top_psnr = -math.inf   # best/'s validation PSNR, and the highest so far
        self.skipped_steps = 0
        self.last_val: dict = {}                # the latest validation metrics (progress bar)
        self.writer = None
        self.losses: list[float] = []           # per step, this process (for tests and plots)

    # -------------------------------------------------------------------- helpers
    @property
    def steps_per_epoch(self) -> int:
        full = self.sampler.batches_per_epoch() // self.opt.grad_accum
        return min(full, self.config.epoch_steps) if self.config.epoch_steps else full

    def _check_writable(self) -> None:
        if not self.acc.is_main_process:
            return
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            probe = self.run_dir / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise TrainingError(f"cannot write to the run directory {self.run_dir}: {e.strerror}") from None

    def log(self, record: dict) -> None:
        if not self.acc.is_main_process:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is None and self.opt.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(str(self.run_dir / "tb"))
            except ImportError:
                self.opt.tensorboard = False
        if self.writer is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    self.writer.add_scalar(k, v, record.get("step", self.global_step))

    # -------------------------------------------------------------------- checkpoints
    def state(self) -> dict:
        return dict(epoch=self.epoch, step_in_epoch=self.step_in_epoch, global_step=self.global_step,
                    iteration=self.iteration, best_val=self.best_val, best_psnr=self.best_psnr,
                    top_psnr=self.top_psnr,
                    optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(), rng=rng_state())

    def save_checkpoint(self) -> Path:
        """checkpoints/step-N/ of this step (see checkpoint.write_checkpoint), on the main process."""
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            write_checkpoint(self.run_dir, self.global_step, self.model, self.state(), self.opt.keep_checkpoints)
        self.acc.wait_for_everyone()
        return checkpoint_path(self.run_dir, self.global_step)

    def resume(self, run_dir: Optional[Path] = None) -> bool:
        ckpt = latest_checkpoint(run_dir or self.run_dir)
        if ckpt is None:
            return False
        from safetensors.torch import load_file
        self.model.load_state_dict(load_file(ckpt / "model.safetensors"))
        st = load_state(ckpt / "state.pt")
        self.optimizer.load_state_dict(st["optimizer"])
        self.scheduler.load_state_dict(st["scheduler"])
        for k in ("epoch", "step_in_epoch", "global_step", "iteration", "best_val"):
            setattr(self, k, st[k])
        self.best_psnr, self.top_psnr = st.get("best_psnr", -math.inf), st.get("top_psnr", -math.inf)
        set_rng_state(st["rng"])
        return True

    def autocast(self):
        """The training precision's autocast context (fp32: none)."""
        if self.precision == "bf16":
            return autocast("bf16", self.acc.device)
        return self.acc.autocast()

    # -------------------------------------------------------------------- evaluation

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Validation ELBO (stochastic posterior, no warm-up, all future frames weighted 1) and
        deterministic reconstruction PSNR, as the official trainer; for DDLP also how well it
        predicts (`prediction_errors`)."""
        if self.val_set is None:
            return {}
        model = self.model
        model.eval()
        loader = DataLoader(self.val_set, batch_size=self.config.batch_size, shuffle=False, num_workers=0)
        tracker = with_fresh_pint(model, **self.opt.track_with).eval() if self.opt.track_with else model
        totals: dict[str, float] = {}
        errors: dict[str, list[Tensor]] = {}
        n = 0
        for i, batch in enumerate(loader):
            if i >= self.opt.eval_batches:
                break
            x = self._clip(batch_frames(batch)).to(self.acc.device)
            with self.autocast():
                logs, _ = self.loss_fn(x, False, False, None)
            for k, v in logs.items():
                totals[k] = totals.get(k, 0.0) + float(v)
            if self.config.is_video:
                for k, v in prediction_errors(model, batch, self.acc.device, tracker=tracker).items():
                    errors.setdefault(k, []).append(v)
            n += 1
        model.train()
        out = {f"val_{k}": v / max(n, 1) for k, v in totals.items()}
        return {**out, **summarize_prediction(errors, self.config.image_size)}

    def _clip(self, x: Tensor) -> Tensor:
        """Validation episodes are longer than training clips: take the first T + 1 frames."""
        if self.config.is_video and x.ndim == 5:
            return x[:, : self.config.timestep_horizon + 1]
        return x

    def write_figures(self, batch) -> None:
        if not (self.opt.figures and self.acc.is_main_process):
            return
        try:
            from . import viz
            model = self.model.eval()
            x = self._clip(batch_frames(batch))[:2].to(self.acc.device)
            with torch.no_grad():
                out = model(x, deterministic=True)
                fig = viz.nine_row_figure(x, out, topk=self.config.topk)
                folder = self.run_dir / "figures"
                folder.mkdir(exist_ok=True)
                fig.save(folder / f"epoch-{self.epoch:03d}.png")
                if self.writer is not None:
                    self.writer.add_image("figure", np.asarray(fig), self.epoch, dataformats="HWC")
                if self.config.is_video:
                    frames = batch_frames(batch)[:1].to(self.acc.device)
                    cond = min(self.config.cond_steps, frames.shape[1] - 1, self.config.timestep_horizon)
                    steps = max(frames.shape[1] - cond, 1)
                    pred, particles = model.rollout(frames, steps, cond)
                    imgs = viz.rollout_frames(frames[0], pred[0], particles[0], cond_steps=cond)
                    viz.save_video(imgs, folder / f"rollout-epoch-{self.epoch:03d}.gif")
        except Exception as e:  # noqa: BLE001 - a figure must never stop a training run
            print(f"warning: could not write figures: {e}")
        finally:
            self.model.train()

    # -------------------------------------------------------------------- the loop
    def train(self) -> dict:
        c, acc = self.config, self.acc
        if acc.is_main_process:
            atomic_write(self.run_dir / "config.json", lambda p: Path(p).write_text(c.to_json()))
            print(f"precision: {'fp32' if self.precision == 'no' else self.precision} ({self.precision_reason})")
            self.log(dict(step=self.global_step, precision=self.precision, precision_reason=self.precision_reason,
                          best_by=self.opt.best_by, anneal=self.opt.anneal))
        start = time.time()
        num_epochs = c.num_epochs
        bar = None
        if self.opt.progress and acc.is_main_process:
            from tqdm.auto import tqdm
            # With only a time budget the number of steps is unknown: show the rate, not an ETA.
            total = self.opt.max_steps or (None if self.opt.max_minutes else num_epochs * self.steps_per_epoch)
            bar = tqdm(total=total, initial=self.global_step, desc="train", dynamic_ncols=True)
        last: dict = {}
        stop = False
        while self.epoch < num_epochs and not stop:
            warmup = self.epoch < c.warmup_epoch
            noisy = self.epoch < c.warmup_epoch + 1
            self.sampler.epoch, self.sampler.skip_batches = self.epoch, self.step_in_epoch * self.opt.grad_accum
            self.objective.train()
            first_batch = None
            for batch in self.loader:
                if self.opt.anneal:
                    self._set_lr(self.anneal_factor(time.time() - start))
                x = batch_frames(batch).to(acc.device, non_blocking=True)
                first_batch = first_batch if first_batch is not None else batch
                disc = future_weights(self.iteration, c, self.steps_per_epoch, acc.device) if c.is_video else None
                with acc.accumulate(self.objective), self.autocast():
                    logs, out = self.forward(x, warmup, noisy, disc)
                    loss = logs["loss"]
                    if not torch.isfinite(loss):
                        raise TrainingError(
                            f"loss became {float(loss.detach())} at step {self.global_step} (epoch {self.epoch}); "
                            f"the last good checkpoint is in {self.run_dir / 'checkpoints'}")
                    acc.backward(loss)
                    if not acc.sync_gradients or self._gradients_ok():
                        self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                if not acc.sync_gradients:
                    continue
                self.iteration += 1
                self.global_step += 1
                self.step_in_epoch += 1
                last = {k: float(v.detach()) for k, v in logs.items()}
                self.losses.append(last["loss"])
                if bar is not None:
                    st = particle_stats(out)
                    val = {k: f"{self.last_val[k]:.3g}" for k in ("val_med10", "val_pred_step1_px")
                           if self.last_val.get(k) is not None}
                    bar.set_postfix(epoch=self.epoch, loss=f"{last['loss']:.4g}", kl=f"{last['kl']:.3g}",
                                    dyn=f"{last.get('kl_dyn', 0):.3g}", psnr=f"{last['psnr']:.2f}",
                                    on=f"{st['on']:.2f}", s=f"{st['scale']:.2f}", **val, refresh=False)
                    bar.update(1)
                if self.global_step % 50 == 0:
                    self.log(dict(step=self.global_step, epoch=self.epoch, lr=self.optimizer.param_groups[0]["lr"],
                                  **{f"train_{k}": v for k, v in last.items()}, **particle_stats(out)))
                out_of_time = self.opt.max_minutes is not None and time.time() - start > 60 * self.opt.max_minutes
                out_of_steps = self.opt.max_steps is not None and self.global_step >= self.opt.max_steps
                if self.step_in_epoch >= self.steps_per_epoch or out_of_time or out_of_steps:
                    stop = out_of_time or out_of_steps
                    break
                if self.global_step % self.opt.checkpoint_every == 0:
                    self.save_checkpoint()
            if self.step_in_epoch >= self.steps_per_epoch:
                self._end_epoch(first_batch)
            elif stop and self.step_in_epoch and (self.opt.anneal or self.opt.validate_at_stop):
                # the weights an annealed run stops at are likely the best, and a budget run must
                # not lose its last steps; the random streams are put back so that a resumed run
                # goes on as an uninterrupted one
                state = rng_state()
                self._validate()
                set_rng_state(state)
            if stop:
                break
        self.save_checkpoint()
        if bar is not None:
            bar.close()
        if self.writer is not None:
            self.writer.close()
        return last

    def _gradients_ok(self) -> bool:
        """Clip the gradient norm if asked; False (and a note) when it is not finite. An Adam step
        on inf/NaN gradients would make every weight NaN, so that step is skipped instead."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = self.acc.clip_grad_norm_(params, self.opt.grad_clip or float("inf"))
        if torch.isfinite(norm):
            return True
        self.skipped_steps += 1
        print(f"warning: non-finite gradients at step {self.global_step}; update skipped "
              f"({self.skipped_steps} so far)")
        if self.skipped_steps > 100:
            raise TrainingError(f"more than 100 updates skipped for non-finite gradients (last at step "
                                f"{self.global_step}); the last good checkpoint is in {self.run_dir / 'checkpoints'}")
        return False

    def anneal_factor(self, seconds: float) -> float:
        """The learning rate's share of the official schedule's: 1 until the last `anneal` share
        of max_steps (without them, of max_minutes), then a cosine down to 0. A time limit that
        ends a step-counted run first cuts it short unannealed: annealing early would stop
        training before the encoder has learnt to track (docs/training.md)."""
        if self.opt.max_steps:
            done = self.global_step / self.opt.max_steps
        else:
            done = seconds / (60 * self.opt.max_minutes)
        into = (done - (1 - self.opt.anneal)) / self.opt.anneal
        return 0.5 * (1 + math.cos(math.pi * min(max(into, 0.0), 1.0)))

    def _set_lr(self, factor: float) -> None:
        for group, scheduled in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = scheduled * factor

    def _validate(self) -> None:
        metrics = self.last_val = self.evaluate()
        record = dict(step=self.global_step, epoch=self.epoch, **metrics)
        value = metrics.get(self.opt.best_by, math.nan)   # val_track_px: only data with positions have it
        score = BEST_RULES[self.opt.best_by][0] * value if math.isfinite(value) else math.inf
        psnr = metrics.get("val_psnr", math.nan)
        if math.isfinite(psnr):
            self.top_psnr = max(self.top_psnr, psnr)
        if self._replaces_best(score, psnr) and self.acc.is_main_process:
            self.best_val, self.best_psnr = score, psnr
            save_pretrained(self.model, self.run_dir / "best")
            record.update(best=True, best_by=self.opt.best_by)
        self.log(record)

    def _replaces_best(self, score: float, psnr: float) -> bool:
        """Whether a validation scoring `score` (lower is better) at `psnr` replaces best/.

        By tracking error, only validations that reconstruct within TRACKER_PSNR_MARGIN of the best
        validation PSNR so far compete: an encoder can place its particles on the objects while
        it still draws them in the wrong colours, and such an encoder once won on tracking alone
        (docs/training.md). best/ then holds the best tracker among the validations still within
        the margin, and its weights give way to the first one within it when it falls out.
        `top_psnr` already counts this validation's."""
        if self.opt.best_by != "val_track_px":
            return score < self.best_val
        eligible = lambda p: math.isfinite(p) and p >= self.top_psnr - TRACKER_PSNR_MARGIN  # noqa: E731
        return math.isfinite(score) and eligible(psnr) and (score < self.best_val or not eligible(self.best_psnr))

    def _end_epoch(self, batch) -> None:
        self._validate()
        if batch is not None and (self.epoch + 1) % self.config.eval_epoch_freq == 0:
            self.write_figures(batch)
        self._set_lr(1.0)               # StepLR steps from the lr it set, not an annealed one
        self.scheduler.step()
        self.epoch += 1
        self.step_in_epoch = 0
        self.save_checkpoint()


PREDICTION_STEPS = 10      # MED10's horizon


@torch.no_grad()
def prediction_errors(model, batch, device, steps: int = PREDICTION_STEPS, tracker=None) -> dict[str, Tensor]:
    """Errors of deterministic rollouts from the first cond_steps frames of a validation batch:
    "step1_px" [B]: distance in pixels between PINT's first predicted positions and the
    posterior's in that frame, averaged over particles weighted by their transparency. When the
    batch carries ball positions: "track" [B, T]: the same distance as MED between the object
    centres of `tracker`'s posterior (default `model`: the same weights, maybe other weightless
    fields) and the balls (how well the encoder tracks; it bounds how well PINT can predict),
    and "med" [B, steps]: G-SWM's MED per step, when the clips are long enough."""
    from .metrics import ground_truth_xy, med_errors, particles_to_xy
    frames = batch_frames(batch).to(device)
    cond = min(model.config.cond_steps, model.config.timestep_horizon)
    if frames.shape[1] <= cond:
        return {}
    S = model.config.image_size
    tracked = min(frames.shape[1], cond + steps)
    posterior = model.encode(frames[:, :tracked])
    predicted = model.predict(posterior[:, :cond], steps)
    w = posterior.transparency[:, cond]
    px = (predicted.position[:, cond] - posterior.position[:, cond]).norm(dim=-1) * (S - 1) / 2
    out = {"step1_px": ((px * w).sum(-1) / w.sum(-1).clamp_min(1e-8)).cpu()}
    truth = ground_truth_xy(batch, tracked, S)
    if truth is not None:
        tracker = tracker or model
        centres = tracker.encode(frames[:, :tracked]) if tracker is not model else posterior
        centres = centres if tracker.config.centred_positions else tracker.to_object_centres(centres)
        xy = particles_to_xy(centres.position.cpu(), S)
        out["track"] = med_errors(xy, centres.transparency.cpu(), *truth, match_t=cond)
    if truth is not None and frames.shape[1] >= cond + steps:
        xy = particles_to_xy(predicted.position.cpu(), S)
        out["med"] = med_errors(xy, predicted.transparency.cpu(), *truth, match_t=cond)[:, cond:]
    return out


def summarize_prediction(errors: dict[str, list[Tensor]], image_size: int) -> dict[str, float]:
    """val_pred_step1_px (PINT's one-step position error against the posterior, pixels) and,
    with ball positions, val_track_px (the posterior's mean distance to the balls, pixels),
    val_med10 (sum of the first ten per-step MEDs) and val_med_step1_px."""
    from .metrics import med_summary
    out = {}
    if errors.get("step1_px"):
        out["val_pred_step1_px"] = float(torch.cat(errors["step1_px"]).double().mean())
    if errors.get("track"):
        out["val_track_px"] = float(torch.cat(errors["track"]).double().nanmean()) * image_size
    if errors.get("med"):
        med = med_summary(torch.cat(errors["med"]), PREDICTION_STEPS)
        out["val_med10"] = med["med10"]
        out["val_med_step1_px"] = med["per_step"][0] * image_size
    return out


def check_data(dataset: Dataset, config: Config, what: str) -> None:
    """Fail before training, with the reason, when the data cannot feed this model."""
    if len(dataset) == 0:
        raise TrainingError(f"the {what} set is empty")
    x = batch_frames(dataset[0])
    size = config.image_size
    if x.shape[-3:] != (3, size, size):
        raise TrainingError(f"the {what} data have frames of shape {tuple(x.shape[-3:])}, but the "
                            f"config expects (3, {size}, {size}): set image_size or resize the data")
    if config.is_video and what == "training" and (x.ndim != 4 or x.shape[0] != config.timestep_horizon + 1):
        raise TrainingError(f"DDLP trains on clips of timestep_horizon + 1 = {config.timestep_horizon + 1} "
                            f"frames; the {what} set yields items of shape {tuple(x.shape)}")
