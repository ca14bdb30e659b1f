"""`ddlp tune-pint`: train a DDLP's PINT alone on its frozen encoder's posteriors."""
from __future__ import annotations

import argparse
import dataclasses

EPILOG = """\
The encoder, decoder and background stay as they are; only PINT's weights change (the same
dynamics KL as in training, on many clips at once). --clips training clips are encoded once
(their first --frames frames), then PINT trains on random windows of timestep_horizon + 1 frames
of them, with a fresh posterior sample each time. Useful after a short run whose predictions
stand still or drift. The tuned model is written to --out (a model directory).

examples:
  ddlp tune-pint runs/quickstart --data.root data/balls --out runs/quickstart/tuned
  ddlp tune-pint runs/obj3d/best --data.root data/obj3d --steps 5000 --clips 2048 --out runs/obj3d/tuned
  ddlp tune-pint runs/balls --reset --position-only-trunk --spread-anchors --centred-positions --dropout 0 --symmetric --max-minutes 10 --steps 100000 --out runs/balls/tuned
"""


def cmd_tune_pint(args) -> int:
    from ..storage import save_pretrained
    from ..data.registry import build_dataset
    from ..checkpoint import resolve_checkpoint
    from ..model import DDLP, ParticleModel, reconfigured
    from ..pint_tuning import encode_posteriors, tune_pint
    path, info = resolve_checkpoint(args.checkpoint, use_last=args.use_last)
    model = ParticleModel.from_pretrained(path)
    if not isinstance(model, DDLP):
        raise ValueError(f"{path} is a single-image DLP model; tune-pint needs a DDLP (video) model")
    switches = {k: True for k in ("spread_anchors", "centred_positions") if getattr(args, k)}
    if switches:
        model = reconfigured(model, **switches)
    config = model.config
    if args.frames is not None and args.frames < config.timestep_horizon + 1:
        raise ValueError(f"--frames must be at least timestep_horizon + 1 = {config.timestep_horizon + 1}")
    # the training split yields clips of timestep_horizon + 1 frames: ask for longer ones
    # (a copy: the model's own config is left as it was trained)
    data = build_dataset(dataclasses.replace(config, timestep_horizon=args.frames - 1) if args.frames else config,
                         "train", root=args.data_root)
    cache = encode_posteriors(model, data, args.clips, frames=args.frames, seed=args.seed, progress=True)
    stats = tune_pint(model, cache, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                       bias_lr=args.bias_lr, reset=args.reset, position_only_trunk=args.position_only_trunk,
                       seed=args.seed, max_minutes=args.max_minutes, dropout=args.dropout,
                       symmetric=args.symmetric)
    save_pretrained(model, args.out)
    print(f"{info['source']} {path}: dynamics KL {stats['pint_loss_before']:.4g} -> "
          f"{stats['pint_loss_after']:.4g} after {stats['pint_steps']} steps on {stats['pint_clips']} clips; "
          f"wrote {args.out}")
    return 0


def add_parser(sub) -> None:
    # `tune-prior` was this command's first name; scripts that use it keep working
    p = sub.add_parser("tune-pint", aliases=["tune-prior"], help="train PINT alone on a frozen DDLP encoder",
                       description="Encode training clips with a trained DDLP (frozen) and optimise only "
                       "its PINT prior on them.", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a training run directory (best/, else the latest checkpoint) or a "
                   "model directory")
    p.add_argument("--data.root", dest="data_root", help="training data folder (default: the config's root)")
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--steps", type=int, default=2000, help="optimizer steps (default 2000)")
    p.add_argument("--batch-size", type=int, default=64, help="clips per step (default 64)")
    p.add_argument("--clips", type=int, default=512, help="training clips to encode (default 512)")
    p.add_argument("--frames", type=int, help="frames of each clip to encode (default: all; at least "
                   "timestep_horizon + 1)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak Adam learning rate, cosine decay to 0 (default 2e-3)")
    p.add_argument("--bias-lr", type=float, default=0.01, help="peak learning rate of the relative-bias "
                   "tables (default 0.01)")
    p.add_argument("--reset", action="store_true", help="start PINT from fresh weights, set up as a "
                   "'stand still' predictor of the data")
    p.add_argument("--position-only-trunk", action="store_true", help="the transformer learns from the "
                   "position term of the dynamics KL only, the other terms train their own heads "
                   "(docs/training.md)")
    p.add_argument("--spread-anchors", action="store_true", help="encode (and save the model) with the "
                   "first frame's particles started a glimpse apart, as the quickstart does (docs/training.md)")
    p.add_argument("--centred-positions", action="store_true", help="PINT learns (and the saved model "
                   "predicts) the centres of the objects the particles draw rather than their glimpse "
                   "centres, as the quickstart does (docs/training.md)")
    p.add_argument("--dropout", type=float, help="PINT's dropout while it trains here (default: its own, "
                   "0.1; the quickstart uses 0: faster steps, better rollouts in a fixed time)")
    p.add_argument("--symmetric", action="store_true", help="mirror each training window by a random "
                   "symmetry of the square (flips, axis swap), for scenes whose motion has them, such as "
                   "Balls (docs/training.md)")
    p.add_argument("--max-minutes", type=float, help="stop after this much time")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--use-last", action="store_true", help="in a run directory, use the latest checkpoint")
    p.set_defaults(fn=cmd_tune_pint)
