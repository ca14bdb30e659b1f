"""`ddlp quickstart`: generate Balls-Interaction data, train a small DDLP on the CPU, evaluate on
held-out episodes and write a prediction GIF and a metrics JSON."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .checkpoint import atomic_write
from .config import Config
from .model import DDLP, ParticleModel


def ensure_balls(data_dir: Path, train: int, val: int, test: int) -> Path:
    from .data.balls import write_balls
    if not all((data_dir / f"{s}.hdf5").is_file() for s in ("train", "val", "test")):
        print(f"generating Balls-Interaction episodes in {data_dir} ...")
        write_balls(data_dir, episodes={"train": train, "val": val, "test": test})
    return data_dir


def match_particles(particles: torch.Tensor, on: torch.Tensor, balls: torch.Tensor) -> torch.Tensor:
    """For each ground-truth ball [O, 2] the index of the nearest visible particle ([K, 2], on [K])."""
    d = torch.cdist(balls, particles)                      # [O, K]
    d = d + 1e3 * (on < 0.5)[None]
    return d.argmin(1)


@torch.no_grad()
def evaluate_rollouts(model: DDLP, episodes, cond: int, horizon: int) -> dict:
    """Reconstruction PSNR of the conditioning frames, prediction PSNR of the next `horizon`
    frames, and the position error (pixels) of the particles matched to the balls at the first
    predicted frame, per step."""
    model.eval()
    rec_mse, pred_mse, errors = [], [], []
    for item in episodes:
        frames = item["frames"][None]
        gt = frames[:, : cond + horizon]
        pred, p = model.rollout(gt, horizon, cond)
        pred = pred.clamp(0, 1)
        rec_mse.append((pred[:, :cond] - gt[:, :cond]).pow(2).mean((0, 2, 3, 4)))
        pred_mse.append((pred[:, cond:] - gt[:, cond:]).pow(2).mean((0, 2, 3, 4)))
        balls = torch.as_tensor(item["positions"])[: cond + horizon].float()   # [L, O, 2] (y, x) in [-1, 1]
        idx = match_particles(p.position[0, cond], p.transparency[0, cond], balls[cond])
        track = p.position[0, cond:, idx]                                        # [horizon, O, 2]
        px = (model.config.image_size - 1) / 2
        errors.append(((track - balls[cond:]) * px).norm(dim=-1).mean(-1))
    psnr = lambda m: float((-10 * torch.log10(torch.stack(m).mean(0))).mean())  # noqa: E731
    err = torch.stack(errors).mean(0)
    return dict(recon_psnr=psnr(rec_mse), pred_psnr=psnr(pred_mse),
                pred_psnr_per_step=(-10 * torch.log10(torch.stack(pred_mse).mean(0))).tolist(),
                position_error_px=float(err.mean()), position_error_px_first10=float(err[:10].mean()),
                position_error_px_per_step=err.tolist(), episodes=len(episodes))


def run(out_dir: str = "runs/quickstart", data_dir: str = "data/balls", minutes: float = 14.5,
        train_episodes: int = 300, eval_episodes: int = 16, horizon: int = 24, seed: int = 0,
        workers: int = 1, max_steps: int | None = None, progress: bool = True, **overrides) -> dict:
    """Everything the README's main command does. `overrides` change the balls_small config."""
    from .data.balls import BallsDataset
    from .train import TrainOptions, Trainer
    from . import viz

    t0 = time.time()
    out = Path(out_dir)
    root = ensure_balls(Path(data_dir), train_episodes, eval_episodes, eval_episodes)
    config = Config.from_json(Path(__file__).parent / "configs" / "balls_small.json", seed=seed,
                              root=str(root), **overrides)
    train_set = BallsDataset(root, "train", clip_len=config.timestep_horizon + 1)
    val_set = BallsDataset(root, "val")
    print(f"training {config.n_kp_enc}-particle DDLP for up to {minutes:g} min "
          f"({len(train_set)} training clips of {config.timestep_horizon + 1} frames)")
    trainer = Trainer(config, train_set, val_set, TrainOptions(
        run_dir=str(out), max_minutes=minutes, max_steps=max_steps, num_workers=workers, progress=progress))
    trainer.train()
    train_time = time.time() - t0
    model = ParticleModel.from_pretrained(out / "best") if (out / "best").is_dir() else trainer.model
    test = BallsDataset(root, "test")
    episodes = [test[i] for i in range(min(eval_episodes, len(test)))]
    metrics = evaluate_rollouts(model, episodes, config.cond_steps, horizon)
    metrics.update(train_minutes=train_time / 60, steps=trainer.global_step, cond_steps=config.cond_steps,
                   horizon=horizon, device=str(trainer.acc.device))
    atomic_write(out / "metrics.json", lambda p: Path(p).write_text(json.dumps(metrics, indent=2)))

    item = episodes[0]
    frames = item["frames"][None, : config.cond_steps + horizon]
    pred, particles = model.rollout(frames, horizon, config.cond_steps)
    imgs = viz.rollout_frames(frames[0], pred[0].clamp(0, 1), particles[0], cond_steps=config.cond_steps)
    viz.save_video(imgs, out / "prediction.gif")
    print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, list)}, indent=2))
    print(f"wrote {out / 'prediction.gif'} and {out / 'metrics.json'} ({(time.time() - t0) / 60:.1f} min)")
    return metrics
