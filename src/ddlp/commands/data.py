"""`ddlp data ...`: generate and inspect datasets."""
from __future__ import annotations


def cmd_balls(args) -> int:
    from ..data.balls import write_balls
    n_eval = args.eval_episodes if args.eval_episodes is not None else max(1, args.episodes // 25)
    write_balls(args.out, episodes={"train": args.episodes, "val": n_eval, "test": n_eval},
                seqlen=args.frames)
    print(f"wrote {args.out}/{{train,val,test}}.hdf5 ({args.episodes} / {n_eval} / {n_eval} episodes)")
    return 0


def cmd_inspect(args) -> int:
    from pathlib import Path

    from ..config import PRESETS, Config, parse_overrides
    from ..data import inspect as ins
    from ..config import DataOptions
    path = Path(args.path).expanduser()
    overrides = parse_overrides(args.set)
    if args.dataset:
        preset = args.preset or (args.dataset if args.dataset in PRESETS else "balls_small")
        config = Config.preset(preset, **overrides)
        summaries, rows, labels = ins.inspect_dataset(args.dataset, path, config, args.episodes, args.frames)
        print(f"{path} as dataset {args.dataset!r} (preset {preset}, {config.image_size} px, "
              f"{'video' if config.is_video else 'image'} model):")
    else:
        if not path.exists():
            raise FileNotFoundError(f"no such file or folder: {path}")
        opts = DataOptions.from_extra({k: v for k, v in overrides.items() if k.startswith("data_")})
        summaries, rows, labels = ins.inspect_files(path, opts, args.episodes, args.frames)
        print(f"{path}:")
    for s in summaries:
        print("\n".join(s.lines()))
    if rows:
        out = ins.save_sheet(ins.contact_sheet(rows, labels, args.tile), ins.default_sheet_path(path, args.out))
        print(f"contact sheet: {out} ({len(rows)} rows)")
    return 0


def cmd_phyre(args) -> int:
    from ..data.phyre import generate_phyre, import_phyre
    import_phyre()                                   # fail before creating any folder
    counts = generate_phyre(args.out, train_per_task=args.train_per_task, eval_per_task=args.eval_per_task,
                            fold=args.fold, setup=args.setup, stride=args.stride, max_tries=args.max_tries,
                            size=args.size, seed=args.seed, progress=not args.no_progress)
    print(f"wrote {args.out}/{{train,valid,test}}: " + ", ".join(f"{k} {v} episodes" for k, v in counts.items()))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("data", help="generate and inspect datasets")
    dsub = p.add_subparsers(dest="data_command", metavar="DATASET")
    b = dsub.add_parser("balls", help="generate Balls-Interaction episodes (HDF5, G-SWM layout)")
    b.add_argument("--out", required=True, help="output folder for train/val/test.hdf5")
    b.add_argument("--episodes", type=int, default=5000, help="training episodes (default 5000)")
    b.add_argument("--eval-episodes", type=int, help="val and test episodes each (default episodes/25)")
    b.add_argument("--frames", type=int, default=100, help="frames per episode (default 100)")
    b.set_defaults(fn=cmd_balls)

    i = dsub.add_parser(
        "inspect", help="show what a data folder or file holds and write a contact sheet PNG",
        description="Report episodes, frames per episode, frame size and value range of PATH (a folder "
        "of episode folders or videos, an .npy/.npz/HDF5 file, an official dataset tree...) and write a "
        "contact sheet of sampled frames, so you can check the data before a long run. With --dataset, "
        "show the items that loader yields instead (after resizing, inversion and sampling).")
    i.add_argument("path", metavar="PATH", help="data folder or file")
    i.add_argument("--dataset", help="view PATH through this registered loader (e.g. phyre, obj3d128, custom)")
    i.add_argument("--preset", help="configuration for --dataset (default: the preset of that name, else balls_small)")
    i.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="config or data option, e.g. data_episode_len=50, data_split=[0.8,0.1,0.1], image_size=128")
    i.add_argument("--out", help="contact sheet PNG (default ./inspect-<name>.png)")
    i.add_argument("--episodes", type=int, default=6, help="episodes (rows) in the sheet (default 6)")
    i.add_argument("--frames", type=int, default=8, help="frames per row (default 8)")
    i.add_argument("--tile", type=int, default=96, help="tile height in pixels (default 96)")
    i.set_defaults(fn=cmd_inspect)

    ph = dsub.add_parser(
        "phyre", help="generate PHYRE episodes (needs the optional 'phyre' package)",
        description="Roll out solving actions of the PHYRE ball tier (setup ball_within_template, templates "
        "12, 13, 16, 20, 21 left out) and write <out>/{train,valid,test}/<episode>/<k>.png in the published "
        "format (red/blue swapped, 128 px). Needs `pip install phyre` (Python 3.6-3.9).")
    ph.add_argument("--out", required=True, help="output folder")
    ph.add_argument("--train-per-task", type=int, default=2, help="episodes per training task (default 2)")
    ph.add_argument("--eval-per-task", type=int, default=1, help="episodes per val/test task (default 1)")
    ph.add_argument("--fold", type=int, default=0, help="PHYRE fold (default 0)")
    ph.add_argument("--setup", default="ball_within_template", help="PHYRE evaluation setup")
    ph.add_argument("--stride", type=int, default=7, help="physics steps per frame (default 7)")
    ph.add_argument("--max-tries", type=int, default=510, help="simulations per task before giving up")
    ph.add_argument("--size", type=int, default=128, help="frame size in pixels (default 128)")
    ph.add_argument("--seed", type=int, help="seed for the choice of actions (upstream sets none)")
    ph.add_argument("--no-progress", action="store_true")
    ph.set_defaults(fn=cmd_phyre)
