"""`ddlp predict`: condition a DDLP on the first frames of a video and write the prediction."""
from __future__ import annotations

import argparse

from . import add_precision_option

EPILOG = """\
outputs (in --out): prediction.gif and prediction.mp4 (ground truth beside the prediction,
particles with their trails; conditioning frames framed green, predictions red), particles.npz
and particles.json (every particle of every output frame: position, scale, depth, transparency,
features; conventions inside the JSON).

examples:
  ddlp predict runs/quickstart --input clip.mp4 --cond 6 --horizon 100 --out outputs/clip
  ddlp predict runs/obj3d/best --input data/obj3d/test/7 --boxes
  ddlp predict runs/quickstart --input data/balls/test.hdf5 --episode 3
"""


def cmd_predict(args) -> int:
    from ..predict import predict
    formats = tuple(f.strip().lower() for f in args.formats.split(",") if f.strip())
    unknown = sorted(set(formats) - {"gif", "mp4"})
    if unknown or not formats:
        raise ValueError(f"--formats takes gif and/or mp4 (comma separated), got {args.formats!r}")
    res = predict(args.checkpoint, args.input, args.out, cond=args.cond, horizon=args.horizon,
                  deterministic=not args.sample, boxes=args.boxes, trajectories=not args.no_trajectories,
                  trail=args.trail, fps=args.fps, formats=formats, use_last=args.use_last, device=args.device,
                  episode=args.episode, split=args.split, precision=args.precision)
    print(f"conditioned on {res['cond']} of {res['input_frames']} input frames, {res['horizon'] - res['cond']} "
          f"predicted (horizon {res['horizon']})")
    if res["ground_truth_frames"] < res["horizon"]:
        print(f"note: the input ends after {res['ground_truth_frames']} frames; later steps show no ground truth")
    for fmt, why in res["skipped"].items():
        print(f"note: no .{fmt} written: {why}")
    print("wrote " + ", ".join(res["files"].values()))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("predict", help="predict the continuation of a video (GIF/MP4 + particles)",
                       description="Condition a DDLP on the first --cond frames of a clip (a video, a folder "
                       "of frames, an .npy/.npz/.hdf5 array or an episode of a dataset), predict up to --horizon frames, and write videos "
                       "and the particles.", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a training run directory (best/, else the latest checkpoint) or a "
                   "model directory (model.safetensors + config.json)")
    p.add_argument("--input", required=True, help="video file (.mp4, .gif, ...), folder of frames, .npy/.npz or "
                   ".h5/.hdf5 array, or a dataset folder; frames are resized to the model's image size")
    p.add_argument("--episode", type=int, help="episode to use where --input holds several (an HDF5 or "
                   "array file of episodes, a dataset folder; default 0)")
    p.add_argument("--split", default="test", help="split of a dataset folder with train/val/test files or "
                   "folders (default test)")
    p.add_argument("--cond", type=int, help="conditioning frames (default: the config's cond_steps)")
    p.add_argument("--horizon", type=int, help="total output frames, conditioning included "
                   "(default: the config's animation_horizon)")
    p.add_argument("--out", default="outputs/predict", help="output folder (default outputs/predict)")
    p.add_argument("--boxes", action="store_true", help="also draw each particle's glimpse (scale) box")
    p.add_argument("--no-trajectories", action="store_true", help="draw particles without their trails")
    p.add_argument("--trail", type=int, default=10, help="trail length in frames (default 10)")
    p.add_argument("--fps", type=float, default=10, help="frames per second of the videos (default 10)")
    p.add_argument("--formats", default="gif,mp4", help="video formats to write (default gif,mp4)")
    p.add_argument("--sample", action="store_true", help="stochastic rollout instead of the deterministic one")
    p.add_argument("--use-last", action="store_true", help="in a run directory, use the latest checkpoint "
                   "instead of best/")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    add_precision_option(p)
    p.set_defaults(fn=cmd_predict)
