"""`ddlp data ...`: generate and inspect datasets."""
from __future__ import annotations


def cmd_balls(args) -> int:
    from ..data.balls import write_balls
    n_eval = args.eval_episodes if args.eval_episodes is not None else max(1, args.episodes // 25)
    write_balls(args.out, episodes={"train": args.episodes, "val": n_eval, "test": n_eval},
                seqlen=args.frames)
    print(f"wrote {args.out}/{{train,val,test}}.hdf5 ({args.episodes} / {n_eval} / {n_eval} episodes)")
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
