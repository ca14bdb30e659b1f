"""`ddlp quickstart`: generate Balls-Interaction data, train a small DDLP on the CPU within a
wall-clock budget, evaluate it with the paper's protocol beside learning-free baselines, and
write a prediction GIF.

The budget (setup and evaluation excluded) is split in three phases (docs/training.md):

    joint   the whole model, the official ELBO and schedule    joint_schedule(), at most JOINT_SHARE
            (the checkpoint whose posteriors track the validation balls best goes on,
            among those that reconstruct within 6 dB of the best)
    encode  posteriors of training clips, with the best encoder        at most ENCODE_SHARE
    PINT    PINT alone on those cached posteriors (ddlp.pint_tuning)   the rest
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from .storage import atomic_write, save_pretrained, write_model_card
from .config import Config
from .evaluate import PAPER_PROTOCOLS
from .model import DDLP, ParticleModel, with_fresh_pint
from .pint_tuning import encode_posteriors, tune_pint

JOINT_STEPS = 3000          # joint training: the encoder leaves the colour plateau by ~1400-1800 steps
                            # and tracks best when its learning rate then falls to 0 ...
JOINT_ANNEAL = 0.4          # ... along a cosine over the last 40 % of the steps (from step 1800)
SHORT_BUDGET = 30           # budgets under 30 minutes run only the first 1800 steps, the part before
SHORT_JOINT_STEPS = 1800    # the anneal: at 1200-1600 steps the encoders of seeds 0 and 1 still lost
                            # balls (docs/training.md), and the anneal would need 1200 steps more
JOINT_SHARE = 0.65          # ... unless the host is too slow to run them in this share of the budget
ENCODE_SHARE = 0.05         # caching posteriors (~300 frames/s on a 2-core CPU)
CACHE_FRAMES = 50           # frames per cached clip: windows of 7 frames from 50-frame tracks
PINT_DROPOUT = 0.0          # PINT's own 0.1 costs a fifth of the steps, and rollouts come out worse
JOINT_BEST_BY = "val_track_px"  # the encoder kept for the PINT phase: the one closest to the balls on
                                # validation episodes among those reconstructing within 6 dB of the best
                                # (the ELBO's and PSNR's best track worse; train.TRACKER_PSNR_MARGIN)


def split_budget(minutes: float) -> dict[str, float]:
    """Upper bounds in minutes of the joint and encoding phases, and the minutes left for PINT.
    Whatever the first two leave (joint training stops at `joint_schedule`'s steps) also goes to PINT."""
    if minutes <= 0:
        raise ValueError(f"the budget must be positive, got {minutes} minutes")
    joint, encode = JOINT_SHARE * minutes, ENCODE_SHARE * minutes
    return dict(joint=joint, encode=encode, pint=minutes - joint - encode)


def joint_schedule(minutes: float) -> tuple[int, float]:
    """Steps of the joint phase and the share of them annealed, for a budget of `minutes`."""
    return (SHORT_JOINT_STEPS, 0.0) if minutes < SHORT_BUDGET else (JOINT_STEPS, JOINT_ANNEAL)


def minutes_for_joint_steps(seconds_per_step: float, max_steps: int | None = None, start: float = 1.0) -> int:
    """The smallest whole budget from `start` minutes whose joint share runs all the steps of the
    joint phase (`max_steps`, or `joint_schedule`'s for that budget) at `seconds_per_step`
    (validations included), with 5 % to spare."""
    minutes = max(1, math.ceil(start))
    while 60 * JOINT_SHARE * minutes < 1.05 * seconds_per_step * (max_steps or joint_schedule(minutes)[0]):
        minutes += 1
    return minutes


def ensure_balls(data_dir: Path, train: int, val: int, test: int) -> Path:
    from .data.balls import write_balls
    if not all((data_dir / f"{s}.hdf5").is_file() for s in ("train", "val", "test")):
        print(f"generating Balls-Interaction episodes in {data_dir} ...")
        write_balls(data_dir, episodes={"train": train, "val": val, "test": test})
    return data_dir


def run(out_dir: str = "runs/quickstart", data_dir: str = "data/balls", minutes: float = 15.0,
        train_episodes: int = 300, val_episodes: int = 16, test_episodes: int = 128, seed: int = 0,
        workers: int = 1, max_steps: int | None = None, pint_steps: int | None = None,
        position_only_trunk: bool = True, pint_velocity_input: bool = True, spread_anchors: bool = True,
        centred_positions: bool = True, symmetric: bool = True,
        gif_episodes: int = 4,
        grad_clip: float | None = 1000.0, precision: str = "no",
        cond: int = PAPER_PROTOCOLS["balls"][0], horizon: int = PAPER_PROTOCOLS["balls"][1],
        progress: bool = True, **overrides) -> dict:
    """Everything the README's main command does. `overrides` change the balls_small config;
    `max_steps` / `pint_steps` cap the joint / PINT phases in steps as well as in time (joint:
    `joint_schedule(minutes)` by default; given, annealed over the last JOINT_ANNEAL).

    `precision` of the joint phase: fp32 by default, since at this model's size bf16 autocast buys
    no speed on a CPU (docs/performance.md). Gradients are clipped at `grad_clip` (2-4x their
    typical norm of 200-550 here): with batches of 2 at lr 2e-3 a rare spike can otherwise send the
    transparency head off.
    `position_only_trunk`: see ddlp.pint_tuning.tune_pint. `pint_velocity_input`: the PINT of
    the PINT phase (and of the final model) embeds each particle's last move; `spread_anchors`:
    from the encode phase on, the first frame's particles start a glimpse apart;
    `centred_positions`: from the encode phase on, particle positions are the centres of the
    objects they draw, so PINT learns and predicts those (config fields); `symmetric`: PINT trains
    on windows mirrored by the square's symmetries (Balls has them; `tune_pint`)."""
    from .data.balls import BallsDataset
    from .train import Trainer, TrainingError, TrainOptions

    t0 = time.time()
    out = Path(out_dir)
    budget = split_budget(minutes)
    default_schedule = max_steps is None
    max_steps, anneal = joint_schedule(minutes) if default_schedule else (max_steps, JOINT_ANNEAL)
    root = ensure_balls(Path(data_dir), train_episodes, val_episodes, test_episodes)
    config = Config.from_json(Path(__file__).parent / "configs" / "balls_small.json", seed=seed,
                              root=str(root), **overrides)
    train_set = BallsDataset(root, "train", clip_len=config.timestep_horizon + 1)
    steps = f"{max_steps} steps{' (annealed)' if anneal else ''}, "
    print(f"budget {minutes:g} min: joint training {steps}<= {budget['joint']:.2g}, encoding <= {budget['encode']:.2g}, "
          f"PINT {budget['pint']:.2g} (+ what encoding leaves); {config.n_kp_enc}-particle DDLP, "
          f"{len(train_set)} training clips of {config.timestep_horizon + 1} frames")
    trainer = Trainer(config, train_set, BallsDataset(root, "val"), TrainOptions(
        run_dir=str(out), max_minutes=budget["joint"], max_steps=max_steps, num_workers=workers,
        grad_clip=grad_clip, progress=progress, precision=precision, best_by=JOINT_BEST_BY,
        anneal=anneal, validate_at_stop=True,
        track_with=dict(spread_anchors=spread_anchors, centred_positions=centred_positions)))
    setup = time.time() - t0
    start, joint_stopped = time.time(), None
    try:
        trainer.train()
    except TrainingError as e:
        # balls_small at lr 2e-3 can diverge after 2000+ steps (non-finite gradients); the best
        # checkpoint by validation ELBO is still good, and the time left goes to PINT
        if not (out / "best").is_dir():
            raise
        joint_stopped = str(e)
        print(f"joint training stopped at step {trainer.global_step}: {e}\ngoing on with {out / 'best'}")
    joint_seconds = time.time() - start
    suggested = None
    if joint_stopped is None and 0 < trainer.global_step < max_steps:
        # a slow host's encoder may still be on the colour plateau (docs/training.md): say what budget runs it all
        per_step = joint_seconds / trainer.global_step
        suggested = minutes_for_joint_steps(per_step, None if default_schedule else max_steps, minutes)
        print(f"note: joint training ran {trainer.global_step} of its {max_steps} steps in its "
              f"{budget['joint']:.2g} minutes ({per_step:.2f} s a step on this host, validations included); "
              f"`ddlp quickstart --minutes {suggested}` gives it all its steps")
    model = ParticleModel.from_pretrained(out / "best") if (out / "best").is_dir() else trainer.model
    # the joint phase trains the preset's official model; the PINT phase starts a fresh PINT
    # anyway, and may give it the velocity input. Spread anchors and centred positions change no
    # weight: the cached posteriors and the final model use them, the joint phase does not
    # (docs/training.md)
    model = with_fresh_pint(model, pint_velocity_input=pint_velocity_input, spread_anchors=spread_anchors,
                            centred_positions=centred_positions)

    start = time.time()
    clips = BallsDataset(root, "train", clip_len=min(CACHE_FRAMES, train_set.episode_len))
    cache = encode_posteriors(model, clips, clips=len(clips), seed=seed, max_minutes=budget["encode"],
                              progress=progress)
    encode_seconds = time.time() - start
    pint_minutes = minutes - (time.time() - t0 - setup) / 60
    prior = tune_pint(model, cache, steps=pint_steps, max_minutes=max(pint_minutes, 0.0), reset=True,
                       position_only_trunk=position_only_trunk, dropout=PINT_DROPOUT, seed=seed,
                       symmetric=symmetric, progress=progress)
    save_pretrained(model, out / "best")
    budget_used = time.time() - t0 - setup

    report = evaluate_quickstart(model, out, root, cond, horizon, gif_episodes)
    write_model_card(out / "best", model.config, sum(t.numel() for t in model.state_dict().values()),
                     metrics={k: v for k, v in report.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    metrics = dict(report, minutes=minutes, budget_split=budget, setup_seconds=setup,
                   joint_seconds=joint_seconds, joint_steps=trainer.global_step, joint_stopped=joint_stopped,
                   joint_steps_planned=max_steps, minutes_for_all_joint_steps=suggested,
                   encode_seconds=encode_seconds, budget_seconds=budget_used, **prior,
                   device=str(trainer.acc.device), threads=torch.get_num_threads())
    atomic_write(out / "metrics.json", lambda p: Path(p).write_text(json.dumps(metrics, indent=2)))
    print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}, indent=2))
    print(f"wrote {out / 'prediction.gif'}, {out / 'metrics.json'} and {out / 'eval'} "
          f"({(time.time() - t0) / 60:.1f} min in all)")
    return metrics


def evaluate_quickstart(model: DDLP, out: Path, root: Path, cond: int, horizon: int, gif_episodes: int) -> dict:
    """The paper's protocol on the test split with the baselines (reports in out/eval), and the
    GIF of the first `gif_episodes` test episodes (ground truth beside prediction)."""
    from . import viz
    from .data.balls import BallsDataset
    from .evaluate import EvalOptions, evaluate_checkpoint, format_summary

    results = evaluate_checkpoint(out / "best", EvalOptions(
        dataset="balls", root=str(root), cond=cond, horizon=horizon, baselines=True, download=False,
        out_dir=str(out / "eval"), progress=False))
    print(format_summary(results))
    test = BallsDataset(root, "test")
    frames = torch.stack([test[i]["frames"][:horizon] for i in range(min(gif_episodes, len(test)))])
    pred, particles = model.eval().rollout(frames, horizon - cond, cond)
    rows = [viz.rollout_frames(frames[i], pred[i].clamp(0, 1), particles[i], cond_steps=cond)
            for i in range(len(frames))]
    viz.save_video([viz.grid([[row[t]] for row in rows], pad=0) for t in range(len(rows[0]))],
                   out / "prediction.gif")
    m = results["metrics"]
    return dict(results["summary"], test_episodes=results["data"]["videos"], cond=cond, horizon=horizon,
                recon_psnr=m["reconstruction_psnr"]["mean"], med_per_step=m.get("med", {}).get("per_step"))
