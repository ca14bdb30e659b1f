"""Train PINT alone on the posteriors of a frozen DDLP encoder.

With the encoder fixed, the dynamics KL is the only term of the ELBO that depends on PINT's
weights, so this optimises the same objective as joint training, one block of coordinates at a
time. It pays off when the joint run was short: PINT needs more clips than the encoder to pick up
the motion (on Balls, a few thousand clips of 7 frames before it beats "stand still"), and
posteriors of hundreds of clips cost one forward pass each here instead of a full training step.
"""
from __future__ import annotations

import time
from typing import Optional

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .losses import dynamics_kl
from .model import DDLP
from .particles import Particles
from .pint import PINT, RelativeBias
from .train import _frames


@torch.no_grad()
def encode_posteriors(model: DDLP, dataset: Dataset, clips: int, batch_size: int = 32,
                      seed: int = 0) -> Particles:
    """Stochastic posteriors (as training sees them) of `clips` clips drawn from `dataset`,
    detached, [N, T + 1, K, ...]."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(dataset), generator=g)[:clips].tolist()
    T1 = model.config.timestep_horizon + 1
    out = []
    for batch in DataLoader(torch.utils.data.Subset(dataset, idx), batch_size=batch_size):
        x = _frames(batch)[:, :T1]
        x = x.to(next(model.parameters()).device)
        out.append(model.encode(x, deterministic=False))
    return Particles.cat(out, 0)


@torch.no_grad()
def start_from_stand_still(pint: PINT, posteriors: Particles, recency_bias: float = 4.0) -> None:
    """Initialise a fresh PINT where learning the motion is quick.

    * Its log-variance outputs start at the log mean squared frame-to-frame change of each
      attribute in `posteriors`: the variance of a "stand still" guess. From the default
      log-variance 0 (a standard deviation of half the image side) the KL's pull on the predicted
      positions is ~200x weaker (Balls: log-variance -5.4), and Adam at lr 1e-3 needs thousands
      of steps to shrink it.
    * Attention head h of every layer starts biased (+recency_bias on both relative-bias tables)
      towards the same particle h frames back, so the tokens see their particle's recent history
      from the first step (velocity is a difference of two such reads).
    """
    def log_change(v: Tensor) -> Tensor:        # [N, T, ..., d] -> [d]
        return (v[:, 1:] - v[:, :-1]).pow(2).flatten(0, -2).mean(0).clamp_min(1e-8).log()

    r = pint.readout
    position = log_change(posteriors.position)
    r.position_y_head.bias[1], r.position_x_head.bias[1] = position[0], position[1]
    r.scale_head.bias[2:] = log_change(posteriors.scale)
    F = posteriors.features.shape[-1]
    r.features_head.bias[F:] = log_change(posteriors.features)
    if posteriors.bg_features is not None:
        r.bg_features_head.bias[posteriors.bg_features.shape[-1]:] = log_change(posteriors.bg_features)
    for table in (m for m in pint.modules() if isinstance(m, RelativeBias)):
        M, N, heads = table.max_frames, table.n_tokens, table.time.shape[1]
        table.particle[N - 1] += recency_bias                     # offset 0: the same particle
        for h in range(heads):
            table.time[M - 1 - min(h, M - 1), h] += recency_bias  # offset -h: h frames back


def tune_prior(model: DDLP, dataset: Dataset, *, steps: int = 2000, batch_size: int = 64,
               clips: int = 512, lr: float = 1e-3, bias_lr: float = 0.01, reset: bool = False,
               seed: int = 0, max_minutes: Optional[float] = None, progress: bool = True) -> dict:
    """Optimise `model.pint` on the dynamics KL of frozen-encoder posteriors; the rest of the model
    is left untouched. `reset` replaces PINT by fresh weights set up by `start_from_stand_still`
    (a trained PINT stuck predicting "stand still" learns the motion more slowly than a new one).
    Returns the loss before and after, and the steps taken."""
    c = model.config
    if not isinstance(model, DDLP):
        raise TypeError("tune_prior needs a DDLP model (it trains the PINT prior)")
    torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    posteriors = encode_posteriors(model, dataset, clips, seed=seed)
    ns, n = c.num_static_frames, posteriors.position.shape[0]
    disc = torch.ones(c.timestep_horizon + 1 - ns, device=posteriors.position.device)

    def loss_of(p: Particles):
        return c.beta_dyn * dynamics_kl(p, model.pint(p[:, :-1]), ns, disc) / (c.timestep_horizon + 1)

    with torch.no_grad():
        before = float(loss_of(posteriors))
    if reset:
        model.pint.load_state_dict(model.build_pint().state_dict())
        start_from_stand_still(model.pint, posteriors)
    # Small eps: PINT's gradients are ~1e-5, where the trainer's eps of 1e-4 would damp them. The
    # relative-bias tables have their own learning rate: after start_from_stand_still they already
    # hold the recency bias, and a small step keeps it (Balls, 1.5 min: teacher-forced position
    # error 1.75 px with bias_lr 1e-2, 2.08 px with 1e-1; 2.59 px from a plain fresh PINT).
    tables = [t for m in model.pint.modules() if isinstance(m, RelativeBias) for t in m.parameters()]
    rest = [t for t in model.pint.parameters() if all(t is not b for b in tables)]
    opt = torch.optim.Adam([dict(params=rest), dict(params=tables, lr=bias_lr)], lr=lr, eps=1e-8)
    model.pint.train()
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, desc="tune PINT", dynamic_ncols=True)
    start, step = time.time(), 0
    for step in range(1, steps + 1):
        loss = loss_of(posteriors[torch.randint(n, (batch_size,))])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if bar is not None:
            bar.set_postfix(kl_dyn=f"{float(loss.detach()):.3f}", refresh=False)
            bar.update(1)
        if max_minutes is not None and time.time() - start > 60 * max_minutes:
            break
    if bar is not None:
        bar.close()
    model.pint.eval()
    with torch.no_grad():
        after = float(loss_of(posteriors))
    model.train(was_training)
    return dict(prior_loss_before=before, prior_loss_after=after, prior_steps=step, prior_clips=n)
