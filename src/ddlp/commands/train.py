"""`ddlp train`: train a DLP or DDLP model under python, torchrun or accelerate launch."""
from __future__ import annotations

from pathlib import Path


def _train_config(args):
    from ..config import Config, parse_overrides
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
    from ..config import Config
    from ..data.registry import build_dataset
    from ..checkpoint import latest_checkpoint
    from ..train import Trainer, TrainOptions
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
                        figures=not args.no_figures, anneal=args.anneal, best_by=args.best_by,
                        # tracked as `ddlp tune-pint --spread-anchors --centred-positions` will see it
                        track_with=dict(spread_anchors=True, centred_positions=True)
                        if args.best_by == "val_track_px" else {})
    trainer = Trainer(config, train_set, val_set, opts)
    if args.resume:
        trainer.resume()
        print(f"resumed {args.run_dir} at step {trainer.global_step} (epoch {trainer.epoch})")
    last = trainer.train()
    if trainer.acc.is_main_process:
        print(f"done: {trainer.global_step} steps, last loss {last.get('loss', float('nan')):.4g}; "
              f"run in {args.run_dir}")
    return 0


def add_parser(sub) -> None:
    from ..config import PRESETS
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
    p.add_argument("--anneal", type=float, default=0.0, metavar="SHARE",
                   help="let the learning rate fall to 0 along a cosine over the last SHARE (0-1) of --max-steps "
                   "(without it, of --max-minutes); default 0: the official schedule (the quickstart anneals "
                   "the last 0.4 of 3000 steps: docs/training.md)")
    p.add_argument("--best-by", default="val_loss", choices=["val_loss", "val_psnr", "val_track_px"],
                   help="what chooses RUN_DIR/best: lowest validation ELBO (the default, as the official code), "
                   "highest validation PSNR, or lowest tracking error against the objects' true positions "
                   "(data that carry them, such as Balls) among validations within 6 dB of the best validation "
                   "PSNR so far, measured with spread anchors and object centres as "
                   "ddlp tune-pint --spread-anchors --centred-positions and the quickstart use the encoder")
    p.add_argument("--num-epochs", type=int, help="override num_epochs")
    p.add_argument("--epoch-steps", type=int, help="batches per epoch (default: a full pass)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any config key (repeatable)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "no", "bf16", "fp16"],
                   help="autocast precision: auto (the default: bf16 where the hardware has it natively, i.e. "
                   "AMX/AVX512-BF16 CPUs and GPUs of compute capability 8+, else fp32), fp32 (or no, "
                   "accelerate's name for it), bf16, fp16; "
                   "the run's log and metrics.jsonl say which was used")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (GPU only: on the CPU "
                   "it compiles for minutes and ran no faster)")
    p.add_argument("--low-memory", action="store_true", help="recompute the decoders (background CNNs, "
                   "glimpse decoding and pasting) in the backward pass: about half the activations kept, for "
                   "7-14%% more time per step (docs/performance.md)")
    p.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--grad-clip", type=float, help="clip the global gradient norm to this value "
                   "(default: no clipping, as the official code)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    p.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints")
    p.add_argument("--vgg-weights", help="VGG-16 ImageNet weights file for recon_loss_type vgg")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-figures", action="store_true")
    p.set_defaults(fn=cmd_train)
