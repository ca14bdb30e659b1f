"""`ddlp quickstart`: the README's main job (generate Balls, train within a budget, evaluate)."""
from __future__ import annotations


def cmd_quickstart(args) -> int:
    from ..quickstart import run
    run(out_dir=args.out, data_dir=args.data, minutes=args.minutes, train_episodes=args.episodes,
        test_episodes=args.test_episodes, seed=args.seed, workers=args.workers,
        position_only_trunk=not args.full_trunk, symmetric=not args.no_mirror, progress=not args.no_progress)
    return 0


def add_parser(sub) -> None:
    from ..quickstart import ENCODE_SHARE, JOINT_ANNEAL, JOINT_SHARE, JOINT_STEPS, SHORT_BUDGET, SHORT_JOINT_STEPS
    p = sub.add_parser("quickstart", help="generate Balls data, train a small DDLP on the CPU within a "
                       "time budget, evaluate it (paper protocol, with baselines) and write a prediction GIF",
                       description="Generate Balls-Interaction episodes, train the balls_small DDLP for --minutes "
                       "of wall time (data generation and evaluation not counted), evaluate it with the paper's "
                       "protocol (10 -> 50 frames, MED10) beside 'stand still' and 'constant velocity' baselines, "
                       "and write OUT/prediction.gif, OUT/metrics.json and OUT/eval/.",
                       epilog=f"The budget is split: {JOINT_STEPS} steps of joint training (the official ELBO and "
                       f"schedule, the learning rate falling to 0 over the last {JOINT_ANNEAL:.0%} of them; budgets "
                       f"under {SHORT_BUDGET} minutes run only the first {SHORT_JOINT_STEPS}, before the anneal; at most "
                       f"{JOINT_SHARE:.0%} of the budget, which cuts the steps short on slow hosts and short budgets), "
                       f"up to {ENCODE_SHARE:.0%} encoding training clips with the encoder that tracked the validation "
                       "balls best (first-frame particles started a "
                       "glimpse apart, positions at the centres of the objects the particles draw), the rest "
                       "training a fresh PINT alone on those cached posteriors, without dropout, on windows "
                       "mirrored by the square's symmetries (docs/training.md).")
    p.add_argument("--out", default="runs/quickstart", help="run directory (default runs/quickstart)")
    p.add_argument("--data", default="data/balls", help="where the generated data go (default data/balls)")
    p.add_argument("--minutes", type=float, default=15.0, help="training budget in minutes, all phases "
                   "(default 15)")
    p.add_argument("--episodes", type=int, default=300, help="training episodes to generate (default 300)")
    p.add_argument("--test-episodes", type=int, default=128, help="held-out episodes to generate and "
                   "evaluate on (default 128)")
    p.add_argument("--full-trunk", action="store_true", help="train PINT's transformer on every term of the "
                   "dynamics KL (default: the position term only; docs/training.md)")
    p.add_argument("--no-mirror", action="store_true", help="train PINT on the cached windows as they are, "
                   "not mirrored by random flips and axis swaps (docs/training.md)")
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=cmd_quickstart)
