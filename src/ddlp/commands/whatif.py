"""`ddlp what-if`: edit particles of a clip's burn-in frames and render both rollouts."""
from __future__ import annotations

import argparse

from . import add_precision_option

# flag -> (value syntax, help); K may be a comma list such as 3,5
EDIT_FLAGS = {
    "move": ("K:DX,DY", "shift right by DX and down by DY, in [-1, 1] image units (0.2 = a tenth of the width)"),
    "place": ("K:X,Y", "put at column X, row Y, in [-1, 1]"),
    "scale": ("K:F", "multiply the glimpse size by F (or K:FY,FX per axis)"),
    "depth": ("K:D", "set the depth (smaller is in front)"),
    "shift-depth": ("K:D", "add D to the depth"),
    "transparency": ("K:V", "set the transparency (0..1)"),
    "hide": ("K", "transparency 0 over the edited frames (PINT may switch it on again)"),
    "show": ("K", "transparency 1 over the edited frames"),
    "remove": ("K", "transparency 0 in every frame, predicted ones included"),
    "copy-features": ("SRC:DST", "give DST (comma list) the appearance features of SRC"),
    "swap-features": ("A:B", "exchange the appearance features of A and B"),
}
VALUES = {"move": (2,), "place": (2,), "scale": (1, 2), "depth": (1,), "shift-depth": (1,),
          "transparency": (1,), "hide": (0,), "show": (0,), "remove": (0,)}

EPILOG = """\
Edits are applied in the order given, to the frames of --frames (default 0:4, the paper's burn-in);
PINT then predicts --horizon frames from the edited particles. Positions are (x, y) in [-1, 1]:
x = column (right), y = row (down). Writes OUT/what-if.gif (original | what-if, particles and
trails drawn, edited particles ringed in white), OUT/trajectories.csv and .png, OUT/edits.json.

example:
  ddlp what-if runs/quickstart/best --input clip.mp4 --move 3:+0.2,0 --scale 1:1.3 --hide 2
"""


def parse_edit(kind: str, text: str):
    """One command-line edit, e.g. parse_edit('move', '3:+0.2,0') -> whatif.move(3, dx=0.2, dy=0)."""
    from .. import whatif as W
    syntax = EDIT_FLAGS[kind][0] if kind in EDIT_FLAGS else "K:VALUES"
    bad = W.EditError(f"--{kind} {text!r}: expected {syntax}")
    if kind not in EDIT_FLAGS:
        raise W.EditError(f"unknown edit --{kind}")
    head, sep, tail = text.strip().partition(":")
    try:
        ids = tuple(int(s) for s in head.split(","))
        if kind in ("copy-features", "swap-features"):
            dst = tuple(int(s) for s in tail.split(","))
            if len(ids) != 1 or (kind == "swap-features" and len(dst) != 1):
                raise bad
            return W.copy_features(ids[0], dst) if kind == "copy-features" else W.swap_features(ids[0], dst[0])
        nums = tuple(float(s) for s in tail.split(",")) if sep else ()
    except ValueError:
        raise bad from None
    if len(nums) not in VALUES[kind]:
        raise bad
    build = {"move": lambda: W.move(ids, dx=nums[0], dy=nums[1]), "place": lambda: W.place(ids, *nums),
             "scale": lambda: W.rescale(ids, nums[0] if len(nums) == 1 else nums),
             "depth": lambda: W.set_depth(ids, nums[0]), "shift-depth": lambda: W.shift_depth(ids, nums[0]),
             "transparency": lambda: W.set_transparency(ids, nums[0]), "hide": lambda: W.hide(ids),
             "show": lambda: W.show(ids), "remove": lambda: W.remove(ids)}
    return build[kind]()


class _EditAction(argparse.Action):
    """Collect every edit flag into one ordered list of (kind, text): order matters (copy, then move)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, "edits", [*(getattr(namespace, "edits", None) or []),
                                     (option_string.lstrip("-"), values)])


def _frame_range(text: str) -> tuple[int, int]:
    start, sep, stop = text.partition(":")
    try:
        if not sep:
            raise ValueError
        return int(start), int(stop)
    except ValueError:
        raise ValueError(f"--frames expects START:STOP (e.g. 0:4), got {text!r}") from None


def load_input(args, image_size: int):
    """The clip [T, 3, S, S] from --input or a generated Balls episode, from frame --start on."""
    import torch
    if args.input:
        from ..data.reader import read_clip
        clip = read_clip(args.input, size=image_size, episode=args.episode, split=args.split)
        name = args.input if args.episode is None else f"{args.input} episode {args.episode}"
    else:
        if args.episode is not None:
            raise ValueError("--episode picks an episode of --input; with --balls give the episode there")
        from ..data.balls import episode_seeds, generate_episodes
        from ..data.clips import resize
        if args.balls < 0:
            raise ValueError(f"--balls expects an episode index >= 0, got {args.balls}")
        length = args.start + args.cond_steps + 1
        imgs = generate_episodes(episode_seeds(args.balls + 1, 9)[args.balls:], length)["imgs"][0]
        clip = resize(torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255, image_size)
        name = f"Balls test episode {args.balls}"
    if not 0 <= args.start < len(clip):
        raise ValueError(f"--start {args.start} is outside the {len(clip)}-frame clip {name}")
    return clip[args.start:], name


def cmd_what_if(args) -> int:
    import json
    import time
    from pathlib import Path

    from ..nn.precision import autocast, inference_precision
    from ..storage import atomic_write
    from ..viz import save_figure, save_video
    from ..whatif import burn_in, load_ddlp, side_by_side_frames, trajectory_figure, what_if, write_trajectories
    edits = [parse_edit(kind, text) for kind, text in args.edits]
    span = _frame_range(args.frames) if args.frames else None
    model = load_ddlp(args.checkpoint)
    args.cond_steps = burn_in(model) if args.cond_steps is None else args.cond_steps
    if args.horizon < 0 or args.cond_steps < 1:
        raise ValueError(f"need --horizon >= 0 and --cond-steps >= 1, got {args.horizon} and {args.cond_steps}")
    clip, name = load_input(args, model.config.image_size)
    t0 = time.time()
    device = next(model.parameters()).device
    precision = inference_precision(args.precision, device)
    with autocast(precision, device):
        result = what_if(model, clip, edits, args.horizon, cond_steps=args.cond_steps, edit_frames=span,
                         progress=True)
    dt = time.time() - t0
    out = Path(args.out)
    video = save_video(side_by_side_frames(result, particles=not args.no_particles),
                       out / f"what-if.{args.format}", fps=args.fps)
    csv_path = write_trajectories(result, out / "trajectories.csv")
    fig = save_figure(trajectory_figure(result), out / "trajectories.png")
    record = dict(checkpoint=str(args.checkpoint), input=name, start=args.start, cond_steps=result.cond_steps,
                  edit_frames=list(result.edit_frames), horizon=args.horizon,
                  edits=[e.to_dict() for e in result.edits],
                  precision=precision)
    atomic_write(out / "edits.json", lambda p: Path(p).write_text(json.dumps(record, indent=2)))
    diff = float((result.original - result.edited).abs().mean())
    print(f"{len(edits)} edit(s) on particles {result.touched or '-'} over frames "
          f"{result.edit_frames[0]}:{result.edit_frames[1]}; {result.cond_steps} conditioning + "
          f"{args.horizon} predicted frames in {dt:.1f}s; mean |original - edited| = {diff:.4f}")
    print(f"wrote {video}, {csv_path}, {fig}, {out / 'edits.json'}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("what-if", help="edit particles of the first frames and render the consequences",
                       description="\"What if...?\" video prediction (DDLP paper, section 5.3): encode the "
                       "first frames of a clip, edit chosen particles, roll the dynamics on, and render the "
                       "original and edited rollouts side by side.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="DDLP model directory (config.json + model.safetensors) or a "
                   "training run folder (its best/ model or latest checkpoint)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", help="clip: video file, folder of frames, .npy/.npz/.h5/.hdf5 array or a "
                     "dataset folder")
    src.add_argument("--balls", type=int, metavar="EPISODE", help="use generated Balls-Interaction "
                     "test episode EPISODE instead of a file")
    p.add_argument("--episode", type=int, help="episode of --input where it holds several (default 0)")
    p.add_argument("--split", default="test", help="split of a dataset folder given as --input (default test)")
    p.add_argument("--start", type=int, default=0, help="first frame of the clip to use (default 0)")
    p.add_argument("--cond-steps", type=int, help="conditioning frames encoded by the posterior (default: "
                   "the model's burn-in, num_static_frames: 4 in the paper's configs)")
    p.add_argument("--frames", metavar="START:STOP", help="frames the edits act on, stop exclusive "
                   "(default: 0 to the burn-in); a stop beyond the conditioning frames keeps re-applying the edits "
                   "to predicted frames")
    p.add_argument("--horizon", type=int, default=50, help="frames predicted after the conditioning "
                   "frames (default 50)")
    p.add_argument("--out", default="outputs/what-if", help="output folder (default outputs/what-if)")
    p.add_argument("--format", choices=["gif", "mp4"], default="gif", help="video format (default gif)")
    p.add_argument("--fps", type=float, default=10, help="frames per second of the video (default 10)")
    add_precision_option(p, "the rollouts")
    p.add_argument("--no-particles", action="store_true", help="do not draw particles and trails")
    edits = p.add_argument_group("edits (repeatable, applied in the order given; K may be a list: 3,5)")
    for kind, (syntax, hlp) in EDIT_FLAGS.items():
        edits.add_argument(f"--{kind}", action=_EditAction, metavar=syntax, help=hlp, dest="edits")
    p.set_defaults(fn=cmd_what_if, edits=[])
