"""`ddlp convert` (official checkpoints) and `ddlp parity` (checks against official fixtures)."""
from __future__ import annotations

import time


def cmd_convert(args) -> int:
    from ..convert import convert_checkpoint
    t = time.time()
    model = convert_checkpoint(args.checkpoint, args.hparams, args.out, model=args.model)
    n = sum(p.numel() for p in model.parameters())
    print(f"converted {args.checkpoint} -> {args.out} ({type(model).__name__}, {n:,} parameters, "
          f"{time.time() - t:.1f}s)")
    return 0


def cmd_parity(args) -> int:
    from ..parity import main
    return main(args.fixtures + (["--atol", str(args.atol)] if args.atol else []))


def add_parser(sub) -> None:
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
