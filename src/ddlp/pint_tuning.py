"""Train PINT alone on cached posteriors of a frozen DDLP encoder.

With the encoder fixed, the dynamics KL is the only term of the ELBO that depends on PINT's
weights, so this optimises the same objective as joint training, one block of coordinates at a
time. It pays off when the joint run was short: PINT needs far more clips than the encoder to pick
up the motion, and a cached clip costs PINT's forward pass only, not an image encoding.

    clips --encode once--> PosteriorCache [N, L, K, ...] (distributions, not samples)
          --random windows of timestep_horizon + 1 frames, fresh posterior samples--> PINT
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .encoder import reparameterize
from .losses import dynamics_kl, dynamics_weight
from .model import DDLP
from .particles import Particles
from .pint import PINT, RelativeBias
from .data import batch_frames


class PosteriorCache:
    """Posterior distributions of N tracked clips of L frames ([N, L, K, ...] Particles, as
    `DDLP.encode(..., deterministic=False)` returns them). `sample` draws training windows with a
    fresh sample of every attribute, as a training step would see them."""

    def __init__(self, particles: Particles):
        if particles.position_logvar is None or particles.transparency_a is None:
            raise ValueError("a PosteriorCache needs posterior distributions (encode with deterministic=False)")
        self.particles = particles

    def __len__(self) -> int:
        return self.particles.position.shape[0]

    @property
    def frames(self) -> int:
        return self.particles.position.shape[1]

    def windows(self, n: int, length: int, generator: Optional[torch.Generator] = None) -> Particles:
        """n windows of `length` consecutive frames from random clips: [n, length, K, ...]."""
        if length > self.frames:
            raise ValueError(f"windows of {length} frames do not fit the cached clips of {self.frames}")
        p = self.particles
        clip = torch.randint(len(self), (n,), generator=generator)
        start = torch.randint(self.frames - length + 1, (n,), generator=generator)
        frames = start[:, None] + torch.arange(length)
        return p.map(lambda t: t[clip[:, None], frames])

    def sample(self, n: int, length: int, generator: Optional[torch.Generator] = None) -> Particles:
        """Windows as `windows`, with values drawn anew from the cached distributions."""
        return resample(self.windows(n, length, generator))

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        from .storage import atomic_write
        tensors = {k: v.contiguous() for k, v in vars(self.particles).items() if v is not None}
        atomic_write(Path(path), lambda p: save_file(tensors, p, metadata={"format": "ddlp-posteriors",
                                                                             "fields": json.dumps(sorted(tensors))}))

    @classmethod
    def load(cls, path: str | Path) -> "PosteriorCache":
        from safetensors.torch import load_file
        return cls(Particles(**load_file(str(path))))


def resample(p: Particles) -> Particles:
    """Particles whose values are fresh samples of their posterior distributions."""
    draw = lambda mu, logvar: reparameterize(mu, logvar, False)  # noqa: E731
    beta = torch.distributions.Beta(p.transparency_a, p.transparency_b, validate_args=False)
    return p.replace(position=draw(p.position_mu, p.position_logvar), scale=draw(p.scale_mu, p.scale_logvar),
                     depth=draw(p.depth_mu, p.depth_logvar), transparency=beta.sample(),
                     features=draw(p.features_mu, p.features_logvar),
                     bg_features=draw(p.bg_mu, p.bg_logvar))


def symmetry_centre(p: Particles, visible: float = 0.5, tail: float = 1e-3) -> Tensor:
    """(y, x) centre of the region the visible particles of `p` move in: the midpoint of the
    `tail` and 1 - `tail` quantiles of their posterior means inside the image ([-1, 1]). In a box
    with walls (Balls) the objects reach every wall, and this is the centre the box is symmetric
    about, read from the particles rather than assumed (on Balls it comes out 0.05 px from the
    image centre). Particles off the image draw nothing, so they say nothing about the box; one
    Balls encoder kept 1.3 % of its visible particles near x = -2.7, which put the centre at
    x = -0.86 before they were left out."""
    mu = p.position_mu.float()
    on = p.transparency_a / (p.transparency_a + p.transparency_b) > visible
    inside = (mu.abs() <= 1).all(-1)
    for keep in (on & inside, on):
        if keep.any():
            mu = mu[keep]
            break
    else:                                   # none is on: all of them
        mu = mu.reshape(-1, 2)
    if mu.shape[0] > 2 ** 20:      # torch.quantile's limit on its input; a subsample is as good here
        mu = mu[torch.randperm(mu.shape[0], generator=torch.Generator().manual_seed(0))[: 2 ** 20]]
    return (torch.quantile(mu, tail, dim=0) + torch.quantile(mu, 1 - tail, dim=0)) / 2


def mirror(p: Particles, centre: Tensor, generator: Optional[torch.Generator] = None) -> Particles:
    """Windows [n, ...] each mapped by one of the 8 symmetries of a square about `centre` (y, x),
    drawn at random: flip y or not, flip x or not, swap the axes or not. Positions and anchors
    turn about the centre, offsets turn, per-axis scales and variances swap; appearance is kept.
    For scenes whose dynamics have these symmetries (Balls: a square box, no gravity), this shows
    PINT 8x as many distinct trajectories."""
    n = p.position.shape[0]
    swap = torch.randint(2, (n,), generator=generator).bool().to(p.position.device)
    sign = (1 - 2 * torch.randint(2, (n, 2), generator=generator)).to(p.position)
    shape = (n,) + (1,) * (p.position.dim() - 2) + (2,)
    swap, sign, centre = swap.view(shape[:-1] + (1,)), sign.view(shape), centre.to(p.position)

    def axes(t):
        return None if t is None else torch.where(swap, t.flip(-1), t)

    def turn(t):
        return None if t is None else sign * axes(t)

    def about_centre(t):
        return None if t is None else centre + turn(t - centre)

    return p.replace(position=about_centre(p.position), position_mu=about_centre(p.position_mu),
                     anchor=about_centre(p.anchor), offset_mu=turn(p.offset_mu),
                     position_logvar=axes(p.position_logvar), scale=axes(p.scale),
                     scale_mu=axes(p.scale_mu), scale_logvar=axes(p.scale_logvar))


@torch.no_grad()
def encode_posteriors(model: DDLP, dataset: Dataset, clips: int, frames: Optional[int] = None,
                      batch_size: int = 8, seed: int = 0, max_minutes: Optional[float] = None,
                      progress: bool = False) -> PosteriorCache:
    """Stochastic tracking posteriors of `clips` clips drawn at random from `dataset` (their first
    `frames` frames; default all), detached; fewer if `max_minutes` run out first (at least one
    batch, which is why batches are small: a trained quickstart model encodes 8 clips of 50 Balls
    frames as fast per frame as 16, 190-225 frames/s on a 2-core AVX2 EPYC, in half the time a
    tight budget must grant)."""
    from tqdm.auto import tqdm
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(dataset), generator=g)[:clips].tolist()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    start = time.time()
    loader = DataLoader(torch.utils.data.Subset(dataset, idx), batch_size=batch_size)
    for batch in tqdm(loader, desc="encode clips", unit="batch", disable=not progress, leave=False):
        x = batch_frames(batch)[:, :frames].to(device)
        out.append(model.encode(x, deterministic=False))
        if max_minutes is not None and time.time() - start > 60 * max_minutes:
            break
    model.train(was_training)
    return PosteriorCache(Particles.cat(out, 0))


@torch.no_grad()
def start_from_stand_still(pint: PINT, posteriors: Particles, recency_bias: float = 4.0,
                           value_std: float = 0.1) -> None:
    """Initialise a fresh PINT as the best "stand still" predictor of `posteriors` [N, T, K, ...],
    from where learning the motion is quick.

    * Every Gaussian head predicts no change, with the variance that minimises the KL of such a
      guess: the mean squared frame-to-frame change of the posterior means plus the mean posterior
      variance. From the default log-variance 0 (a standard deviation of half the image side) the
      KL's pull on the predicted positions is ~200x weaker on Balls.
    * The transparency head starts at the posteriors' mean log a and log b.
    * Attention head h of every layer starts biased (+recency_bias on both relative-bias tables)
      towards the same particle h frames back, so the tokens see their particle's recent history
      from the first step (velocity is a difference of two such reads).
    * The attention's value and output projections start at std `value_std` instead of 0.02:
      what a head reads then reaches the residual stream with a gain of ~0.6 (std * sqrt(dim),
      twice, at dim 64) instead of ~0.03, so the gradient that builds the velocity read-out does
      not start near zero (Balls, 1500 steps, two seeds: teacher-forced error 0.78 / 0.87 px
      against 1.09 / 0.94 px).
    """
    def stand_still_logvar(mu: Tensor, logvar: Tensor) -> Tensor:     # [N, T, ..., d] -> [d]
        change = (mu[:, 1:] - mu[:, :-1]).pow(2).flatten(0, -2).mean(0)
        return (change + logvar.exp().flatten(0, -2).mean(0)).clamp_min(1e-8).log()

    p = posteriors
    r = pint.readout
    position = stand_still_logvar(p.position_mu, p.position_logvar)
    r.position_y_head.bias[1], r.position_x_head.bias[1] = position[0], position[1]
    r.scale_head.bias[2:] = stand_still_logvar(p.scale_mu, p.scale_logvar)
    r.features_head.bias[p.features.shape[-1]:] = stand_still_logvar(p.features_mu, p.features_logvar)
    if p.bg_mu is not None:
        r.bg_features_head.bias[p.bg_mu.shape[-1]:] = stand_still_logvar(p.bg_mu, p.bg_logvar)
    r.transparency_head.bias[0] = p.transparency_a.clamp_min(1e-5).log().mean()
    r.transparency_head.bias[1] = p.transparency_b.clamp_min(1e-5).log().mean()
    for block in pint.blocks:
        block.attn.value.weight.normal_(0, value_std)
        block.attn.proj.weight.normal_(0, value_std)
    for table in (m for m in pint.modules() if isinstance(m, RelativeBias)):
        M, N, heads = table.max_frames, table.n_tokens, table.time.shape[1]
        table.particle[N - 1] += recency_bias                     # offset 0: the same particle
        for h in range(heads):
            table.time[M - 1 - min(h, M - 1), h] += recency_bias  # offset -h: h frames back


def tune_pint(model: DDLP, posteriors: PosteriorCache | Dataset, *, steps: Optional[int] = 2000,
               batch_size: int = 64, clips: int = 512, lr: float = 2e-3, bias_lr: float = 0.01,
               reset: bool = False, position_only_trunk: bool = False, seed: int = 0,
               max_minutes: Optional[float] = None, dropout: Optional[float] = None,
               symmetric: bool = False, progress: bool = True) -> dict:
    """Optimise `model.pint` on the dynamics KL of frozen-encoder posteriors (a PosteriorCache, or
    a dataset of which `clips` clips are encoded first); the rest of the model is left untouched.

    * `reset` replaces PINT by fresh weights set up by `start_from_stand_still` (a trained PINT
      stuck at "stand still" learns the motion more slowly than a new one).
    * `position_only_trunk`: the transformer learns from the position term of the KL only; the
      other terms train their own output heads (PINT.read). Same outputs, same loss; on Balls the
      transparency and scale terms otherwise swamp the trunk's gradient (docs/training.md).
    * The learning rate follows a cosine from `lr` to 0 over `steps` or `max_minutes`, whichever
      ends first (steps=None: time only).
    * `dropout` replaces PINT's dropout probability (0.1) while it trains here: at 0 a step costs
      ~20 % less on a CPU (no Bernoulli masks) and, in a fixed time, the rollouts are better
      (Balls, 5 minutes, two encoders: MED10 0.53 / 0.53 against 0.61 / 0.60).
    * `symmetric`: every training window is mirrored at random (`mirror`, about the cache's
      `symmetry_centre`), for scenes whose dynamics are the same under the square's symmetries.
    Returns the loss before and after (on 512 windows), and the steps taken.
    """
    c = model.config
    if not isinstance(model, DDLP):
        raise TypeError("tune_pint needs a DDLP model (it trains the PINT prior)")
    if steps is None and max_minutes is None:
        raise ValueError("tune_pint needs a number of steps or a time budget (max_minutes)")
    torch.manual_seed(seed)
    cache = posteriors if isinstance(posteriors, PosteriorCache) else encode_posteriors(model, posteriors, clips, seed=seed)
    ns, length = c.num_static_frames, c.timestep_horizon + 1
    device = next(model.parameters()).device
    disc = torch.ones(length - ns, device=device)
    g = torch.Generator().manual_seed(seed)
    n_probe = min(512, 8 * len(cache))
    probe = cache.sample(n_probe, length, g).to(device)
    centre = symmetry_centre(cache.particles) if symmetric else None

    def loss_of(p: Particles) -> Tensor:
        prior = model.pint(p[:, :-1], position_only_trunk=position_only_trunk)
        return dynamics_weight(c) * dynamics_kl(p, prior, ns, disc)

    was_training = model.training
    model.eval()
    with torch.no_grad():
        before = float(loss_of(probe))
    if reset:
        model.pint.load_state_dict(model.build_pint().state_dict())
        start_from_stand_still(model.pint, cache.windows(n_probe, length, g).to(device))
    # Small eps: PINT's gradients are ~1e-5, where the trainer's eps of 1e-4 would damp them. The
    # relative-bias tables have their own learning rate: after start_from_stand_still they already
    # hold the recency bias, and a small step keeps it (Balls, 1.5 min: teacher-forced position
    # error 1.75 px with bias_lr 1e-2, 2.08 px with 1e-1; 2.59 px from a plain fresh PINT).
    tables = [t for m in model.pint.modules() if isinstance(m, RelativeBias) for t in m.parameters()]
    rest = [t for t in model.pint.parameters() if all(t is not b for b in tables)]
    opt = torch.optim.Adam([dict(params=rest, lr=lr), dict(params=tables, lr=bias_lr)], eps=1e-8, foreach=True)
    base_lrs = [lr, bias_lr]
    if dropout is not None:
        model.pint.set_dropout(dropout)
    model.pint.train()
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, desc="train PINT", dynamic_ncols=True)
    start, step = time.time(), 0
    while True:
        progress_made = 0.0 if steps is None else step / steps if steps > 0 else 1.0
        if max_minutes is not None:
            progress_made = max(progress_made, (time.time() - start) / (60 * max_minutes) if max_minutes > 0 else 1.0)
        if progress_made >= 1:
            break
        for group, base in zip(opt.param_groups, base_lrs):
            group["lr"] = base * 0.5 * (1 + math.cos(math.pi * progress_made))
        batch = cache.sample(batch_size, length)
        loss = loss_of((mirror(batch, centre) if symmetric else batch).to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if bar is not None:
            if step % 50 == 1:          # reading the loss waits for the device: not every step
                bar.set_postfix(kl_dyn=f"{float(loss.detach()):.3f}", refresh=False)
            bar.update(1)
    if bar is not None:
        bar.close()
    model.pint.eval()
    with torch.no_grad():
        after = float(loss_of(probe))
    model.train(was_training)
    return dict(pint_loss_before=before, pint_loss_after=after, pint_steps=step, pint_clips=len(cache),
                pint_seconds=time.time() - start,
                **({} if centre is None else dict(pint_symmetry_centre=centre.tolist())))
