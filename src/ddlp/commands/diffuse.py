"""`ddlp diffuse ...`: DiffuseDDLP, unconditional video generation with a DDPM over particles."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from . import add_precision_option


def _threads(args) -> None:
    if getattr(args, "threads", None):
        import torch
        torch.set_num_threads(args.threads)


def cmd_stats(args) -> int:
    from ..data.registry import build_dataset
    from ..diffusion.latents import STATS_FILE, LatentStats, default_clips, describe, encode_dataset, fingerprint
    from ..diffusion.model import load_ddlp, resolve_ddlp_dir
    from ..diffusion.tokens import TokenLayout
    _threads(args)
    source = resolve_ddlp_dir(args.ddlp)
    ddlp = load_ddlp(source)
    config = ddlp.config
    if args.data_root:
        config = type(config).from_dict({**config.to_dict(), "root": args.data_root})
    t = time.time()
    clips = args.clips or default_clips(config.ds)
    tokens = encode_dataset(ddlp, build_dataset(config, "train"), args.frames, clips, args.max_clips,
                            args.batch_size, not args.no_progress)
    layout = TokenLayout.from_ddlp(ddlp.config)
    stats = LatentStats.from_tokens(tokens, layout, fingerprint(ddlp))
    out = Path(args.out) if args.out else source / STATS_FILE
    stats.save(out)
    print(describe(stats, layout))
    print(f"latent statistics of {tokens.shape[0]} clips x {args.frames} frames ({time.time() - t:.1f}s) -> {out}")
    return 0


def _read_config(args) -> dict:
    if not args.config:
        return {}
    path = Path(args.config)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def _overrides(args) -> dict:
    # official diffuse_ddlp.json keys; its device, ds_root and result_dir belong to the official scripts
    d = _read_config(args)
    keep = ("batch_size", "lr", "train_num_steps", "diffusion_num_steps", "loss_type", "particle_norm",
            "diffuse_frames")
    overrides = {k: d[k] for k in keep if k in d}
    for key, attr in (("batch_size", "batch_size"), ("lr", "lr"), ("diffusion_num_steps", "diffusion_steps"),
                      ("loss_type", "loss"), ("particle_norm", "norm"), ("diffuse_frames", "frames"),
                      ("train_num_steps", "train_steps"), ("seed", "seed"), ("dropout", "dropout"),
                      ("objective", "objective")):
        value = getattr(args, attr, None)
        if value is not None:
            overrides[key] = value
    return overrides


def cmd_train(args) -> int:
    from ..diffusion.train import DiffusionTrainOptions, prepare_run
    _threads(args)
    if not args.resume and not args.ddlp:
        args.ddlp = _read_config(args).get("ddlp_dir")
        if not args.ddlp:
            raise ValueError("pass --ddlp RUN_OR_MODEL_DIR (the trained DDLP), or --resume to continue a run")
    opts = DiffusionTrainOptions(run_dir=args.run_dir, max_steps=args.max_steps, max_minutes=args.max_minutes,
                                 checkpoint_every=args.checkpoint_every, preview_every=args.preview_every,
                                 progress=not args.no_progress, device=args.device, precision=args.precision)
    trainer = prepare_run(args.ddlp, opts, data_root=args.data_root, stats_path=args.stats,
                          overrides=_overrides(args), clips=args.clips, max_clips=args.max_clips,
                          resume=args.resume)
    if args.resume:
        print(f"resumed {args.run_dir} at step {trainer.step}")
    n = sum(p.numel() for p in trainer.model.denoiser.parameters())
    c = trainer.config
    print(f"DiffuseDDLP: {trainer.tokens.shape[0]} training clips of {c.diffuse_frames} frames x "
          f"{c.n_kp_enc + 1} tokens, denoiser {n:,} parameters, {c.diffusion_num_steps} diffusion steps, "
          f"{c.loss_type} loss, {c.particle_norm} normalisation")
    result = trainer.train()
    print(f"done: {result['step']} steps, last loss {result['loss']:.4g}; EMA model in {Path(args.run_dir) / 'model'}")
    return 0


def _load_for_sampling(run: Path, ddlp_arg):
    """(DiffuseDDLP with EMA weights, DDLP) from a run or model directory."""
    from ..diffusion.latents import fingerprint
    from ..diffusion.model import DiffuseDDLP, load_ddlp
    from ..diffusion.sampler import check_compatible
    if not run.exists():
        raise FileNotFoundError(f"DiffuseDDLP run or model directory not found: {run}")
    model_dir = run / "model" if (run / "model" / "model.safetensors").is_file() else run
    model = DiffuseDDLP.from_pretrained(model_dir)
    if ddlp_arg:
        ddlp_dir = Path(ddlp_arg)
    elif (model_dir / "ddlp").is_dir():
        ddlp_dir = model_dir / "ddlp"
    elif (model_dir.parent / "ddlp").is_dir():
        ddlp_dir = model_dir.parent / "ddlp"
    elif model.config.ddlp_dir:
        ddlp_dir = Path(model.config.ddlp_dir)
    else:
        raise FileNotFoundError(f"no DDLP found for {run}: pass --ddlp")
    ddlp = load_ddlp(ddlp_dir)
    check_compatible(model, ddlp, lambda: fingerprint(ddlp))
    return model, ddlp


def cmd_sample(args) -> int:
    import torch

    from ..diffusion.sampler import generate
    from ..nn.precision import autocast
    from ..viz import grid, rollout_frames, save_figure, save_video, to_pil
    _threads(args)
    run = Path(args.run_dir)
    if args.num < 1:
        raise ValueError(f"--num must be >= 1, got {args.num}")
    model, ddlp = _load_for_sampling(run, args.ddlp)
    tau = model.config.diffuse_frames
    if args.frames < tau:
        raise ValueError(f"--frames {args.frames} is below tau={tau}, the number of frames the diffusion "
                         f"model generates; ask for at least {tau}")
    out = Path(args.out) if args.out else run / "samples"
    device = args.device or "cpu"
    model.to(device)
    ddlp.to(device)
    g = torch.Generator(device=device).manual_seed(args.seed)
    zoom = max(1, 128 // ddlp.config.image_size)
    firsts, totals, written = [], [], []
    for start in range(0, args.num, args.batch_size):
        n = min(args.batch_size, args.num - start)
        with autocast(args.precision, device):
            video, particles, timings = generate(model, ddlp, n, args.frames, args.sampler, args.steps, args.eta,
                                                 g, progress=not args.no_progress)
        totals.append(timings)
        for i, clip in enumerate(video):
            plain = [to_pil(f, zoom) for f in clip]
            # labelled frames: "t=k diffusion" (green) for the tau sampled frames, "PINT" (red) after
            frames = plain if args.plain else rollout_frames(
                None, clip, particles[i] if args.particles else None, cond_steps=tau, zoom=zoom,
                phases=("diffusion", "PINT"))
            path = out / f"video-{start + i:03d}.{args.format}"
            save_video(frames, path, fps=args.fps)
            written.append(path)
            firsts.append(plain[:tau])
    figure = save_figure(grid(firsts), out / "first-frames.png")
    s = sum(t.sampling for t in totals)
    u = sum(t.unroll for t in totals)
    d = sum(t.decoding for t in totals)
    steps = model.schedule.steps if args.sampler == "ddpm" else (args.steps or 50)
    print(f"{args.num} videos x {args.frames} frames ({args.sampler}, {steps} steps): sampling {s:.2f}s, "
          f"PINT unroll {u:.2f}s, decoding {d:.2f}s")
    print(f"wrote {len(written)} {args.format.upper()}s to {out}/ and the first {tau} frames of each in {figure}")
    return 0


def cmd_convert(args) -> int:
    from ..diffusion.convert import convert_official
    t = time.time()
    model = convert_official(args.checkpoint, args.ddlp, args.stats, args.hparams, args.weights)
    model.save_pretrained(args.out)
    n = sum(p.numel() for p in model.denoiser.parameters())
    print(f"converted {args.checkpoint} ({args.weights} weights) -> {args.out} (denoiser {n:,} parameters, "
          f"{model.config.diffuse_frames} frames, {model.config.diffusion_num_steps} steps, {time.time() - t:.1f}s)")
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data.root", dest="data_root", help="dataset folder (overrides the DDLP config's root)")
    p.add_argument("--clips", choices=["first", "all"],
                   help="'first': the first frames of every episode (official for Balls/OBJ3D/CLEVRER/PHYRE); "
                   "'all': every training window (official for Traffic). Default: as upstream for the dataset")
    p.add_argument("--max-clips", type=int, help="encode at most this many clips")


def add_parser(sub) -> None:
    p = sub.add_parser("diffuse", help="DiffuseDDLP: unconditional video generation with a diffusion model "
                       "over particles", description="DiffuseDDLP (paper section 5.4, appendix B): a DDPM learns "
                       "the particles of the first tau frames of a frozen DDLP; PINT unrolls them into a video.")
    dsub = p.add_subparsers(dest="diffuse_command", metavar="STEP")

    s = dsub.add_parser("stats", help="latent statistics (min/max/mean/std) of a DDLP's training latents",
                        description="Encode the first tau frames of the training clips with a frozen DDLP and "
                        "store per-feature statistics for normalising the diffusion tokens.")
    s.add_argument("--ddlp", required=True, metavar="RUN_OR_MODEL_DIR", help="the trained DDLP (model directory "
                   "or `ddlp train` run directory)")
    s.add_argument("--frames", type=int, default=4, help="tau, frames per clip (default 4)")
    s.add_argument("--out", help="statistics file (default <ddlp model dir>/latent_stats.safetensors)")
    s.add_argument("--batch-size", type=int, default=32, help="clips per encoding batch (default 32)")
    _data(s)
    _common(s)
    s.set_defaults(fn=cmd_stats)

    t = dsub.add_parser("train", help="train the DDPM on the latents of a frozen DDLP",
                        description="Train DiffuseDDLP: encodes the DDLP's training clips once "
                        "(RUN_DIR/latents.safetensors), then trains the PINT denoiser with EMA. Checkpoints in "
                        "RUN_DIR/checkpoints/, the EMA model for sampling in RUN_DIR/model/.")
    t.add_argument("--ddlp", metavar="RUN_OR_MODEL_DIR", help="the trained DDLP (model or `ddlp train` run directory)")
    t.add_argument("--run-dir", default="runs/diffuse_ddlp", help="output folder (default runs/diffuse_ddlp)")
    t.add_argument("--resume", action="store_true", help="continue RUN_DIR from its latest checkpoint")
    t.add_argument("--config", help="a diffuse_ddlp.json (official keys: batch_size, lr, train_num_steps, "
                   "diffusion_num_steps, loss_type, particle_norm, diffuse_frames; ddlp_dir if no --ddlp); "
                   "command-line options override it")
    t.add_argument("--stats", help="latent statistics file from `ddlp diffuse stats` or an official "
                   "latent_stats.pth (default: computed from the encoded clips)")
    t.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (default train_num_steps)")
    t.add_argument("--max-minutes", type=float, help="stop (with a checkpoint) after this much wall time")
    t.add_argument("--train-steps", type=int, help="train_num_steps of the config (default 700000)")
    t.add_argument("--batch-size", type=int, help="default 32")
    t.add_argument("--lr", type=float, help="Adam learning rate (default 8e-5)")
    t.add_argument("--diffusion-steps", type=int,
                   help="N, diffusion steps for training and DDPM sampling (default 1000)")
    t.add_argument("--loss", choices=["l1", "l2"], help="default l1 (official)")
    t.add_argument("--norm", choices=["minmax", "std"], help="particle normalisation (default minmax)")
    t.add_argument("--objective", choices=["pred_x0", "pred_noise"],
                   help="network target: clean tokens (official code, default) or the noise (paper text)")
    t.add_argument("--frames", type=int, help="tau, generated frames (default 4)")
    t.add_argument("--dropout", type=float, help="denoiser dropout (default 0.1)")
    t.add_argument("--seed", type=int)
    t.add_argument("--checkpoint-every", type=int, default=1000, help="steps between checkpoints (default 1000)")
    t.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    add_precision_option(t, "the denoiser's training step")
    t.add_argument("--preview-every", type=int, default=1000,
                   help="steps between preview figures (DDIM-50 EMA samples, first tau frames); 0: none")
    _data(t)
    _common(t)
    t.set_defaults(fn=cmd_train)

    g = dsub.add_parser("sample", help="generate videos with a trained DiffuseDDLP",
                        description="Sample particles of the first tau frames with the EMA denoiser (eval mode), "
                        "unroll them with the DDLP's PINT and decode: one GIF/MP4 per video and a grid PNG of "
                        "the first tau frames (one row per video).")
    g.add_argument("run_dir", metavar="RUN_DIR",
                   help="a `ddlp diffuse train` run directory or a DiffuseDDLP model directory")
    g.add_argument("--num", type=int, default=8, help="videos to generate (default 8)")
    g.add_argument("--frames", type=int, default=100, help="frames per video, at least tau (default 100)")
    g.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm",
                   help="ddpm: ancestral sampling with the trained steps (paper); ddim: deterministic, fewer steps")
    g.add_argument("--steps", type=int, help="DDIM steps (default 50)")
    g.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0: deterministic)")
    g.add_argument("--batch-size", type=int, default=8, help="videos generated at once (default 8)")
    g.add_argument("--format", choices=["gif", "mp4"], default="gif")
    g.add_argument("--fps", type=float, default=10)
    g.add_argument("--particles", action="store_true", help="draw the particles and their trails on the videos")
    g.add_argument("--plain", action="store_true", help="raw frames, without the t=k labels and borders")
    g.add_argument("--out", help="output folder (default RUN_DIR/samples)")
    g.add_argument("--ddlp", help="the DDLP model directory (default RUN_DIR/ddlp)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", help="cpu (default), cuda, ...")
    add_precision_option(g, "sampling, the PINT unroll and decoding")
    _common(g)
    g.set_defaults(fn=cmd_sample)

    c = dsub.add_parser("convert", help="convert an official DiffuseDDLP checkpoint (saves/model.pth)",
                        description="Official DiffuseDDLP checkpoint -> a DiffuseDDLP model directory.")
    c.add_argument("checkpoint", help="official saves/model.pth")
    c.add_argument("--ddlp", required=True, help="the DDLP it was trained on, already converted with `ddlp convert`")
    c.add_argument("--stats", required=True, help="its latent_stats.pth")
    c.add_argument("--hparams", help="its diffusion_hparams.json (default: inferred from the checkpoint)")
    c.add_argument("--weights", choices=["ema", "model"], default="ema", help="EMA (default, as the official "
                   "generator) or online weights")
    c.add_argument("--out", required=True, help="output model directory")
    c.set_defaults(fn=cmd_convert)

    p.set_defaults(fn=lambda args: (p.print_help(), 0)[1])
