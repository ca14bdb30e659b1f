"""`ddlp quickstart`: generate Balls-Interaction data, train a small DDLP on the CPU, evaluate on
held-out episodes and write a prediction GIF and a metrics JSON."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .checkpoint import atomic_write, save_pretrained
from .config import Config
from .model import DDLP, ParticleModel
from .prior_tuning import tune_prior


def ensure_balls(data_dir: Path, train: int, val: int, test: int) -> Path:
    from .data.balls import write_balls
    if not all((data_dir / f"{s}.hdf5").is_file() for s in ("train", "val", "test")):
        print(f"generating Balls-Interaction episodes in {data_dir} ...")
        write_balls(data_dir, episodes={"train": train, "val": val, "test": test})
    return data_dir


@torch.no_grad()
def evaluate_rollouts(model: DDLP, episodes, cond: int, horizon: int) -> dict:
    """Scores of deterministic rollouts conditioned on `cond` frames and predicting `horizon` more,
    with the evaluation module (ddlp.evaluate): per-frame PSNR / SSIM of the predictions (mean and
    std over all episode-frame pairs, as the paper), MED of particles matched one-to-one to the
    balls at the first predicted frame (in image-side units, and in pixels). Reconstruction PSNR
    of the conditioning frames per frame and averaged, as the paper (and `psnr`, and `ddlp
    evaluate`); the `*_pooled` / `pred_psnr` values are the PSNR of the mean squared error over
    all frames, lower when a few frames are much worse than the rest."""
    from torch.utils.data import DataLoader

    from .evaluate import Protocol, score_rollouts
    from .metrics import med_summary
    model.eval()
    protocol = Protocol(cond, cond + horizon).check()
    scores = score_rollouts(model, DataLoader(list(episodes), batch_size=8), protocol, progress=False)
    db = lambda mse: -10 * torch.log10(mse)  # noqa: E731
    pred_mse = scores.pred["mse"].double()
    med = med_summary(scores.med)
    err_px = scores.med.double().mean(0) * model.config.image_size
    return dict(recon_psnr=float(scores.cond["psnr"].double().mean()),
                recon_psnr_pooled=float(db(scores.cond["mse"].double().mean())),
                pred_psnr=float(db(pred_mse.mean())),
                pred_psnr_per_step=db(pred_mse.mean(0)).tolist(),
                position_error_px=float(err_px.mean()), position_error_px_first10=float(err_px[:10].mean()),
                position_error_px_per_step=err_px.tolist(), episodes=scores.videos,
                psnr=float(scores.pred["psnr"].double().mean()), psnr_std=float(scores.pred["psnr"].double().std()),
                ssim=float(scores.pred["ssim"].double().mean()), ssim_std=float(scores.pred["ssim"].double().std()),
                med10=med["med10"], med_per_step=med["per_step"])


def run(out_dir: str = "runs/quickstart", data_dir: str = "data/balls", minutes: float = 14.5,
        train_episodes: int = 300, eval_episodes: int = 16, horizon: int = 24, seed: int = 0,
        workers: int = 1, max_steps: int | None = None, prior_minutes: float = 2.0,
        prior_steps: int = 3000, prior_clips: int = 1024, joint_beta_dyn: float | None = None,
        gif_episodes: int = 4, grad_clip: float | None = 1000.0, progress: bool = True,
        **overrides) -> dict:
    """Everything the README's main command does. `overrides` change the balls_small config.

    The budget of `minutes` is split: joint training, then up to `prior_minutes` (at most
    `prior_steps` steps) of PINT alone on the frozen encoder's posteriors (ddlp.prior_tuning).
    `joint_beta_dyn` replaces the preset's dynamics-KL weight in the joint phase only (default:
    keep it). Lower weights reconstruct sooner in some runs and predict worse in others; run to
    run spread decides more than the setting (docs/training.md). The saved config keeps the
    preset's beta_dyn, which the PINT tuning uses. The GIF shows the first `gif_episodes` test
    episodes, one row each.
    Gradients are clipped at `grad_clip` (2-4x their typical norm of 200-550 here): with batches of
    2 at lr 2e-3 a rare spike can otherwise send the transparency head off."""
    from . import viz
    from .data.balls import BallsDataset
    from .train import Trainer, TrainOptions

    t0 = time.time()
    out = Path(out_dir)
    root = ensure_balls(Path(data_dir), train_episodes, eval_episodes, eval_episodes)
    config = Config.from_json(Path(__file__).parent / "configs" / "balls_small.json", seed=seed,
                              root=str(root), **overrides)
    beta_dyn = config.beta_dyn
    if joint_beta_dyn is not None:
        config.beta_dyn = joint_beta_dyn
    train_set = BallsDataset(root, "train", clip_len=config.timestep_horizon + 1)
    val_set = BallsDataset(root, "val")
    joint_minutes = max(minutes - prior_minutes, 0.1)
    print(f"training {config.n_kp_enc}-particle DDLP (dynamics KL weight {config.beta_dyn:g}) for up to "
          f"{joint_minutes:g} min, then PINT alone for up to {prior_minutes:g} min ({len(train_set)} "
          f"training clips of {config.timestep_horizon + 1} frames)")
    trainer = Trainer(config, train_set, val_set, TrainOptions(
        run_dir=str(out), max_minutes=joint_minutes, max_steps=max_steps, num_workers=workers,
        grad_clip=grad_clip, progress=progress))
    trainer.train()
    model = ParticleModel.from_pretrained(out / "best") if (out / "best").is_dir() else trainer.model
    model.config.beta_dyn = beta_dyn                # tune_prior's loss is the weighted dynamics KL
    prior = tune_prior(model, train_set, steps=prior_steps, clips=prior_clips, max_minutes=prior_minutes,
                       reset=True, seed=seed, progress=progress)
    save_pretrained(model, out / "best")
    train_time = time.time() - t0
    test = BallsDataset(root, "test")
    episodes = [test[i] for i in range(min(eval_episodes, len(test)))]
    metrics = evaluate_rollouts(model, episodes, config.cond_steps, horizon)
    metrics.update(train_minutes=train_time / 60, steps=trainer.global_step, **prior, cond_steps=config.cond_steps,
                   horizon=horizon, device=str(trainer.acc.device))
    atomic_write(out / "metrics.json", lambda p: Path(p).write_text(json.dumps(metrics, indent=2)))

    frames = torch.stack([e["frames"][: config.cond_steps + horizon] for e in episodes[:gif_episodes]])
    pred, particles = model.rollout(frames, horizon, config.cond_steps)
    rows = [viz.rollout_frames(frames[i], pred[i].clamp(0, 1), particles[i], cond_steps=config.cond_steps)
            for i in range(len(frames))]
    viz.save_video([viz.grid([[row[t]] for row in rows], pad=0) for t in range(len(rows[0]))],
                   out / "prediction.gif")
    print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, list)}, indent=2))
    print(f"wrote {out / 'prediction.gif'} and {out / 'metrics.json'} ({(time.time() - t0) / 60:.1f} min)")
    print(f"the paper's protocol (Balls: 10 -> 50 frames, MED10, PSNR/SSIM/LPIPS): "
          f"ddlp evaluate {out} --dataset balls --data.root {root}")
    return metrics
