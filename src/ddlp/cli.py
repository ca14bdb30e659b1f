"""The `ddlp` command line."""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import time
from pathlib import Path


def _plugin_commands() -> list[str]:
    """Modules of ddlp/commands/: each defines add_parser(subparsers) and imports nothing heavy
    at module level, so `ddlp --help` stays fast."""
    from . import commands
    return sorted(m.name for m in pkgutil.iter_modules(commands.__path__))


def _model_from(args):
    from .config import Config
    from .model import ParticleModel, build_model
    if getattr(args, "model_dir", None):
        return ParticleModel.from_pretrained(args.model_dir)
    return build_model(Config.preset(args.preset))


def cmd_convert(args) -> int:
    from .convert import convert_checkpoint
    t = time.time()
    model = convert_checkpoint(args.checkpoint, args.hparams, args.out, model=args.model)
    n = sum(p.numel() for p in model.parameters())
    print(f"converted {args.checkpoint} -> {args.out} ({type(model).__name__}, {n:,} parameters, "
          f"{time.time() - t:.1f}s)")
    return 0


def cmd_parity(args) -> int:
    from .parity import main
    return main(args.fixtures + (["--atol", str(args.atol)] if args.atol else []))


def cmd_info(args) -> int:
    import json
    model = _model_from(args)
    c = model.config
    n = sum(p.numel() for p in model.parameters())
    print(f"{type(model).__name__}: {n:,} parameters")
    for name, child in model.named_children():
        print(f"  {name:<20} {sum(p.numel() for p in child.parameters()):>12,}")
    print(f"image {c.image_size}px, {c.n_kp_enc} particles, glimpse {c.glimpse_size}px, "
          f"{c.learned_feature_dim} features" + (f", PINT {c.pint_layers}x{c.pint_heads}x{c.pint_dim}, "
                                                 f"T={c.timestep_horizon}" if c.is_video else ""))
    if args.json:
        print(json.dumps(c.to_dict(), indent=2))
    return 0


def cmd_demo(args) -> int:
    """Build (or load) a model, encode a generated clip, draw the particles."""
    import torch

    from .data.synthetic import moving_discs
    from .viz import draw_particles, grid, to_pil
    torch.manual_seed(args.seed)
    model = _model_from(args).eval()
    c = model.config
    frames = moving_discs(frames=args.frames, size=c.image_size, n_discs=3, seed=args.seed)
    t = time.time()
    with torch.no_grad():
        if c.is_video:
            out = model(frames, deterministic=True)
            rec, p = out.rec[0], out.posterior[0]
            video = frames[0]
        else:
            out = model(frames[0], deterministic=True)
            rec, p, video = out.rec, out.posterior, frames[0]
    dt = time.time() - t
    zoom = max(1, 256 // c.image_size)
    rows = [[draw_particles(video[i], p[i], zoom) for i in range(len(video))],
            [to_pil(rec[i], zoom) for i in range(len(video))]]
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    grid(rows, labels=["particles", "recon"]).save(out_path)
    kind = "video model (DDLP)" if c.is_video else "image model (DLPv2)"
    print(f"{kind}: encoded {len(video)} frames of {c.image_size}px with {c.n_kp_enc} particles "
          f"in {dt:.2f}s -> {out_path}")
    if not args.model_dir:
        print("note: untrained weights; particles sit where the patch prior proposes them. "
              "Use --model-dir with a trained or converted model for meaningful particles.")
    return 0


def _train_config(args):
    from .config import Config, parse_overrides
    overrides = parse_overrides(args.set)
    for key in ("batch_size", "seed", "num_epochs", "epoch_steps"):
        if getattr(args, key, None) is not None:
            overrides[key] = getattr(args, key)
    if args.data_root:
        overrides["root"] = args.data_root
    if args.dataset:
        overrides["ds"] = args.dataset
    if args.config:
        return Config.from_json(args.config, **overrides)
    return Config.preset(args.preset, **overrides)


def cmd_train(args) -> int:
    from .config import Config
    from .data.registry import build_dataset
    from .checkpoint import latest_checkpoint
    from .train import Trainer, TrainOptions
    if args.resume:
        run = Path(args.resume)
        if not (run / "config.json").is_file():
            raise FileNotFoundError(f"{run} is not a training run (no config.json)")
        if latest_checkpoint(run) is None:
            raise FileNotFoundError(f"{run} has no complete checkpoint to resume from")
        config = Config.from_json(run / "config.json")
        args.run_dir = str(run)
    else:
        config = _train_config(args)
    train_set = build_dataset(config, "train")
    val_set = build_dataset(config, "val")
    opts = TrainOptions(run_dir=args.run_dir, max_steps=args.max_steps, max_minutes=args.max_minutes,
                        num_workers=args.workers, precision=args.precision, compile=args.compile,
                        low_memory=args.low_memory,
                        grad_accum=args.grad_accum, grad_clip=args.grad_clip,
                        checkpoint_every=args.checkpoint_every,
                        progress=not args.no_progress, vgg_weights=args.vgg_weights,
                        figures=not args.no_figures)
    trainer = Trainer(config, train_set, val_set, opts)
    if args.resume:
        trainer.resume()
        print(f"resumed {args.run_dir} at step {trainer.global_step} (epoch {trainer.epoch})")
    last = trainer.train()
    if trainer.acc.is_main_process:
        print(f"done: {trainer.global_step} steps, last loss {last.get('loss', float('nan')):.4g}; "
              f"run in {args.run_dir}")
    return 0


def cmd_quickstart(args) -> int:
    from .quickstart import run
    run(out_dir=args.out, data_dir=args.data, minutes=args.minutes, train_episodes=args.episodes,
        test_episodes=args.test_episodes, seed=args.seed, workers=args.workers,
        position_only_trunk=not args.full_trunk, progress=not args.no_progress)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .config import PRESETS
    from .quickstart import ENCODE_SHARE, JOINT_SHARE
    ap = argparse.ArgumentParser(prog="ddlp", description="Deep Dynamic Latent Particles: "
                                 "object-centric video prediction with latent particles.")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("convert", help="convert an official checkpoint (.pth + hparams.json)",
                       description="Convert an official DLPv2/DDLP checkpoint into a ddlp model "
                       "directory (model.safetensors + config.json).")
    p.add_argument("checkpoint", help="official .pth file (a state dict)")
    p.add_argument("--hparams", required=True, help="the hparams.json / configs/*.json it was trained with")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--model", choices=["ddlp", "dlp"], help="override the model type "
                   "(default: 'dlp' when the hparams set use_tracking=false, else 'ddlp')")
    p.set_defaults(fn=cmd_convert)

    p = sub.add_parser("parity", help="check our model against official fixture files")
    p.add_argument("fixtures", nargs="+")
    p.add_argument("--atol", type=float, default=None)
    p.set_defaults(fn=cmd_parity)

    p = sub.add_parser("train", help="train a DLP or DDLP model",
                       description="Train DLPv2 (image presets) or DDLP (video presets). Runs under "
                       "python, torchrun and accelerate launch.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", default="balls_small", choices=PRESETS, help="configuration (default balls_small)")
    src.add_argument("--config", help="a config JSON (ours or an official hparams.json)")
    src.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its latest checkpoint")
    p.add_argument("--data.root", dest="data_root", help="dataset folder (overrides the config's root)")
    p.add_argument("--dataset", help="dataset name (default: the config's ds)")
    p.add_argument("--run-dir", default="runs/ddlp", help="output folder (default runs/ddlp)")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    p.add_argument("--max-minutes", type=float, help="stop after this much wall time")
    p.add_argument("--num-epochs", type=int, help="override num_epochs")
    p.add_argument("--epoch-steps", type=int, help="batches per epoch (default: a full pass)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any config key (repeatable)")
    p.add_argument("--precision", default="no", choices=["no", "bf16", "fp16", "auto"],
                   help="autocast precision: no (fp32, the default), bf16, fp16, or auto (bf16 where the hardware "
                   "has it natively: AMX/AVX512-BF16 CPUs, GPUs of compute capability 8+; else fp32)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (GPU only: torch "
                   "2.13 cannot compile its backward on the CPU)")
    p.add_argument("--low-memory", action="store_true", help="recompute the background CNNs in the "
                   "backward pass: about half the activation memory for ~15%% more compute")
    p.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--grad-clip", type=float, help="clip the global gradient norm to this value "
                   "(default: no clipping, as the official code)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    p.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints")
    p.add_argument("--vgg-weights", help="VGG-16 ImageNet weights file for recon_loss_type vgg")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-figures", action="store_true")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("quickstart", help="generate Balls data, train a small DDLP on the CPU within a "
                       "time budget, evaluate it (paper protocol, with baselines) and write a prediction GIF",
                       description="Generate Balls-Interaction episodes, train the balls_small DDLP for --minutes "
                       "of wall time (data generation and evaluation not counted), evaluate it with the paper's "
                       "protocol (10 -> 50 frames, MED10) beside 'stand still' and 'constant velocity' baselines, "
                       "and write OUT/prediction.gif, OUT/metrics.json and OUT/eval/.",
                       epilog=f"The budget is split: {JOINT_SHARE:.0%} joint training (the official ELBO and "
                       f"schedule), up to {ENCODE_SHARE:.0%} encoding training clips with the best encoder, the "
                       "rest training PINT alone on those cached posteriors (docs/training.md).")
    p.add_argument("--out", default="runs/quickstart", help="run directory (default runs/quickstart)")
    p.add_argument("--data", default="data/balls", help="where the generated data go (default data/balls)")
    p.add_argument("--minutes", type=float, default=15.0, help="training budget in minutes, all phases "
                   "(default 15)")
    p.add_argument("--episodes", type=int, default=300, help="training episodes to generate (default 300)")
    p.add_argument("--test-episodes", type=int, default=128, help="held-out episodes to generate and "
                   "evaluate on (default 128)")
    p.add_argument("--full-trunk", action="store_true", help="train PINT's transformer on every term of the "
                   "dynamics KL (default: the position term only; docs/training.md)")
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=cmd_quickstart)

    for module in _plugin_commands():
        importlib.import_module(f"ddlp.commands.{module}").add_parser(sub)

    for name, fn, hlp in (("info", cmd_info, "print a model's size and configuration"),
                          ("demo", cmd_demo, "encode a generated clip and draw its particles")):
        p = sub.add_parser(name, help=hlp, description=hlp)
        src = p.add_mutually_exclusive_group()
        src.add_argument("--preset", default="balls", choices=PRESETS, help="official configuration (default balls)")
        src.add_argument("--model-dir", help="a ddlp model directory (from `ddlp convert` or training) or a "
                         "Hugging Face Hub id (org/name; needs ddlp[hub])")
        if name == "info":
            p.add_argument("--json", action="store_true", help="also print the full config")
        else:
            p.add_argument("--out", default="outputs/demo.png", help="PNG to write (default outputs/demo.png)")
            p.add_argument("--frames", type=int, default=6, help="frames in the generated clip")
            p.add_argument("--seed", type=int, default=0)
        p.set_defaults(fn=fn)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if not getattr(args, "fn", None):
        ap.print_help()
        return 0
    from .config import ConfigError
    from .convert import ConversionError
    from .train import TrainingError
    try:
        return args.fn(args)
    except (ConfigError, ConversionError, FileNotFoundError, ValueError, TrainingError) as e:
        print(f"ddlp {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
