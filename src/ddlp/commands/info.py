"""`ddlp info` (a model's size and configuration) and `ddlp demo` (encode a generated clip, draw its particles)."""
from __future__ import annotations

import time
from pathlib import Path


def _model_from(args):
    from ..config import Config
    from ..model import ParticleModel, build_model
    if getattr(args, "model_dir", None):
        return ParticleModel.from_pretrained(args.model_dir)
    return build_model(Config.preset(args.preset))


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

    from ..data.synthetic import moving_discs
    from ..viz import draw_particles, grid, to_pil
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


def add_parser(sub) -> None:
    from ..config import PRESETS
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
