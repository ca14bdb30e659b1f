"""Why the quickstart plateaus: the appearance path (glimpse -> features -> glimpse) on its own.

    python benchmarks/glimpse_autoencoder.py [--steps 300] [--preset balls_small] [--seeds 0 1]

Ball glimpses are cut at the true ball centres of generated Balls-Interaction frames (no jitter),
and only the appearance encoder and the glimpse decoder of a freshly built model are trained, with
the preset's Adam settings, `beta_kl` and as many glimpses per step as one training batch holds
(batch x frames x particles). The printed figure is the PSNR of the decoded RGB glimpses on 300
held-out glimpses, for three variants:

* official: the model as built (GroupNorm after each hidden conv of the glimpse decoder);
* no-groupnorm: the same with the decoder's GroupNorms removed (PyTorch's default conv init);
* oracle-features: official decoder fed the ball colour instead of learned features.

In a full training run the official decoder first paints every ball in the mean colour and only
separates colours after about a thousand steps (docs/training.md, "Session 5"); these numbers show
that the slow part is the encoder and decoder learning together through the GroupNorms, not either
alone. Removing them is not a fix by itself: in full runs it let the particles drift off the balls.
"""
from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn

from ddlp.config import Config
from ddlp.data.balls import generate_split
from ddlp.losses import gaussian_kl, pixel_sse
from ddlp.metrics.med import xy_to_particles
from ddlp.model import build_model
from ddlp.nn.glimpse import crop


def ball_glimpses(n_episodes: int, size: int, anchor_s: float, seed: int) -> torch.Tensor:
    """Glimpses [N, 3, size, size] centred on every ball of every frame."""
    data = generate_split(n_episodes, split_seed=seed, seqlen=20)
    frames = torch.from_numpy(data["imgs"]).flatten(0, 1).permute(0, 3, 1, 2).float() / 255
    side = frames.shape[-1]
    row_col = xy_to_particles(torch.from_numpy(data["positions"]).flatten(0, 1) / side, side).float()
    return crop(frames, row_col, torch.full_like(row_col, anchor_s), size).flatten(0, 1)


def centre_colour(glimpses: torch.Tensor) -> torch.Tensor:
    c = glimpses.shape[-1] // 2
    return glimpses[..., c - 2:c + 2, c - 2:c + 2].mean((-2, -1))


def train(variant: str, config: Config, train_set: torch.Tensor, test_set: torch.Tensor, steps: int,
          per_step: int, images_per_step: int, seed: int) -> list[float]:
    torch.manual_seed(seed)
    model = build_model(config)
    encoder, decoder = model.appearance_encoder, model.glimpse_decoder
    if variant == "no-groupnorm":
        for block in decoder.cnn:
            if hasattr(block, "norm"):
                block.norm = nn.Identity()
        for m in decoder.cnn.modules():
            if isinstance(m, nn.Conv2d):
                m.reset_parameters()
    F = config.learned_feature_dim

    def features(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if variant == "oracle-features":
            mu = torch.cat([centre_colour(g) * 3 - 1.5, g.new_zeros(len(g), F - 3)], 1)
            return mu, torch.full_like(mu, -10.0)
        return encoder(g)

    params = list(decoder.parameters()) + ([] if variant == "oracle-features" else list(encoder.parameters()))
    opt = torch.optim.Adam(params, lr=config.lr, betas=tuple(config.adam_betas), eps=config.adam_eps)
    curve = []
    for step in range(steps + 1):
        if step % 50 == 0:
            with torch.no_grad():
                mse = ((decoder(features(test_set)[0])[:, 1:] - test_set) ** 2).mean()
            curve.append(-10 * math.log10(float(mse)))
        if step == steps:
            break
        g = train_set[torch.randint(len(train_set), (per_step,))]
        mu, logvar = features(g)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        rec = pixel_sse(decoder(z)[:, 1:], g).sum() / images_per_step
        kl = gaussian_kl(mu, logvar, 0.0, 0.0).sum() / images_per_step
        opt.zero_grad()
        (rec + config.beta_kl * kl).backward()
        opt.step()
    return curve


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="balls_small")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--variants", nargs="+", default=["official", "no-groupnorm", "oracle-features"])
    args = ap.parse_args()
    config = Config.preset(args.preset)
    if config.learned_feature_dim < 3:
        raise SystemExit("oracle-features needs learned_feature_dim >= 3")
    g = config.glimpse_size
    train_set = ball_glimpses(40, g, config.anchor_s, seed=7)
    test_set = ball_glimpses(8, g, config.anchor_s, seed=9)[:300]
    images = config.batch_size * (config.timestep_horizon + 1)
    per_step = images * config.n_kp_enc
    print(f"{args.preset}: {g}x{g} glimpses, {per_step} per step, lr {config.lr:g}, "
          f"{torch.get_num_threads()} threads; glimpse PSNR (dB) every 50 steps")
    for variant in args.variants:
        for seed in args.seeds:
            t0 = time.time()
            curve = train(variant, config, train_set, test_set, args.steps, per_step, images, seed)
            print(f"{variant:16s} seed {seed}: " + " ".join(f"{p:5.1f}" for p in curve)
                  + f"   ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
