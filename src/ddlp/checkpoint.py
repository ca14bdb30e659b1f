"""Training runs on disk: checkpoints with their resumable state (optimizer, schedule, RNG,
counters; read without running pickled code), and the model a run, a model directory or a Hub id
stands for (`resolve_checkpoint`, `load_video_model`). Model files themselves: ddlp.storage."""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .config import Config
from .storage import CONFIG, WEIGHTS, atomic_write, model_directory, save_pretrained


# ------------------------------------------------------------------------------ training state
def rng_state() -> dict:
    """Every random generator a training step draws from, as tensors and plain values, so that
    `load_state` reads it back with torch.load(weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return dict(torch=torch.get_rng_state(), python=random.getstate(),
                numpy=dict(kind=kind, keys=torch.from_numpy(keys.astype(np.int64)), pos=int(pos),
                           has_gauss=int(has_gauss), cached_gaussian=float(cached)),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` captured (or the raw numpy tuple of runs saved before it)."""
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]) if isinstance(n, dict) else n)
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _numpy_array_globals() -> list:
    """What a pickled numpy array refers to: its reconstruction function, ndarray and dtypes."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:                                   # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return [_reconstruct, np.ndarray, np.dtype, *{type(np.dtype(t)) for t in (np.uint32, np.int64, np.float64)}]


def load_state(path: str | Path, map_location: str = "cpu") -> dict:
    """A training state (state.pt: optimizer, schedule, RNG, counters) read without running
    pickled code: torch.load(weights_only=True), with numpy arrays allowed for the RNG state of
    runs saved before `rng_state` stored tensors."""
    with torch.serialization.safe_globals(_numpy_array_globals()):
        return torch.load(path, map_location=map_location, weights_only=True)


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    """Where a run keeps its checkpoint of `step`: checkpoints/step-N (N zero-padded to 8 digits)."""
    return Path(run_dir) / "checkpoints" / f"step-{step:08d}"


def write_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module, state: dict, keep: int,
                     extra: Optional[dict[str, Callable[[str], None]]] = None) -> Path:
    """checkpoints/step-N/ (model files, state.pt, and `extra` files written by their callables)
    written completely under a temporary name, renamed, then `latest` pointed at it and all but
    the `keep` newest removed: a crash at any moment leaves the previous checkpoint usable."""
    final = checkpoint_path(run_dir, step)
    folder = final.parent
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained(model, tmp)
    for name, write in (extra or {}).items():
        atomic_write(tmp / name, write)
    atomic_write(tmp / "state.pt", lambda p: torch.save(state, p))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    atomic_write(folder / "latest", lambda p: Path(p).write_text(final.name))
    for old in sorted(folder.glob("step-*[0-9]"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


# ------------------------------------------------------------------------------ run directories
def latest_checkpoint(run_dir: str | Path) -> Optional[Path]:
    """The newest complete checkpoint (checkpoints/step-N with state.pt) of a training run, or None."""
    folder = Path(run_dir) / "checkpoints"
    pointer = folder / "latest"
    if pointer.is_file():
        ckpt = folder / pointer.read_text().strip()
        if (ckpt / "state.pt").is_file() and (ckpt / WEIGHTS).is_file():
            return ckpt
    complete = [d for d in sorted(folder.glob("step-*[0-9]")) if (d / "state.pt").is_file()]
    return complete[-1] if complete else None


# what best/ can be chosen by: the sign that makes lower better, and how a reader is told
BEST_RULES = {"val_loss": (1.0, "lowest validation ELBO"), "val_psnr": (-1.0, "highest validation PSNR"),
              "val_track_px": (1.0, "lowest validation tracking error among reconstructions near the best PSNR")}


def _best_record(run: Path) -> tuple[Optional[int], str]:
    """Step at which best/ was last written and the rule that chose it (from metrics.jsonl; runs
    that did not record their rule used the official one, the validation ELBO)."""
    log = run / "metrics.jsonl"
    step, rule = None, "val_loss"
    for line in log.read_text().splitlines() if log.is_file() else ():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("best"):
            step, rule = record.get("step"), record.get("best_by", "val_loss")
    return step, BEST_RULES[rule][1] if rule in BEST_RULES else rule


def _step_of(folder: Path) -> Optional[int]:
    tail = folder.name.split("-")[-1]
    return int(tail) if tail.isdigit() else None


def resolve_checkpoint(path: str | Path, use_last: bool = False) -> tuple[Path, dict]:
    """The model directory behind `path` (a model directory, a Hub id, or a training run: its best/
    model, else, or with `use_last`, the latest checkpoint) and a description of what was picked."""
    p = model_directory(path)
    if p.is_file():
        if p.name == WEIGHTS:
            p = p.parent
        elif p.suffix in (".pth", ".pt", ".ckpt", ".tar"):
            raise ValueError(f"{p} is a raw PyTorch checkpoint, not a ddlp model: convert official "
                             f"checkpoints first (ddlp convert {p} --hparams hparams.json --out DIR)")
        else:
            raise ValueError(f"{p} is a file; expected a model directory ({WEIGHTS} + {CONFIG}) or a run directory")
    if not p.is_dir():
        raise FileNotFoundError(f"no such model or run directory: {p}")
    if (p / WEIGHTS).is_file():
        info = {"path": str(p), "source": "model directory"}
        if p.parent.name == "checkpoints" and (p.parent.parent / CONFIG).is_file():
            # a checkpoint of a run: results go to the run (old checkpoints get rotated away)
            info.update(run=str(p.parent.parent), source="checkpoint", step=_step_of(p))
        return p, info
    best = p / "best"
    if not use_last and (best / WEIGHTS).is_file():
        step, rule = _best_record(p)
        return best, {"path": str(best), "run": str(p), "source": f"best ({rule})", "step": step}
    ckpt = latest_checkpoint(p)
    if ckpt is not None:
        return ckpt, {"path": str(ckpt), "run": str(p), "source": "latest checkpoint", "step": _step_of(ckpt)}
    raise FileNotFoundError(f"{p} is neither a model directory ({WEIGHTS} + {CONFIG}) nor a training run "
                            "with best/ or checkpoints/")


def load_video_model(path: str | Path, use_last: bool = False, device: str = "cpu",
                     purpose: str = "video prediction and its evaluation"):
    """A DDLP video model from a model directory, Hub id or run (see resolve_checkpoint), in eval
    mode without gradients, and its description. Clear errors for a single-image DLPv2 model, a
    DiffuseDDLP model or weights that do not fit their config; `purpose` says what needs the DDLP."""
    from .model import ParticleModel
    directory, info = resolve_checkpoint(path, use_last)
    if not (directory / CONFIG).is_file():
        raise FileNotFoundError(f"{directory} has {WEIGHTS} but no {CONFIG}")
    try:
        kind = json.loads((directory / CONFIG).read_text()).get("model")
    except json.JSONDecodeError as e:
        raise ValueError(f"{directory / CONFIG} is not valid JSON: {e}") from None
    if kind == "diffuse_ddlp":
        raise ValueError(f"{directory} is a DiffuseDDLP model; {purpose} needs the DDLP video model (model='ddlp')")
    config = Config.from_json(directory / CONFIG)
    if not config.is_video:
        raise ValueError(f"{directory} holds a single-image DLPv2 model (model={config.model!r}); {purpose} "
                         "needs a DDLP video model (model='ddlp')")
    try:
        model = ParticleModel.from_pretrained(directory, map_location=device)
    except (FileNotFoundError, ValueError):
        raise
    except Exception as e:  # noqa: BLE001 - shape mismatches, corrupt safetensors: all "unusable weights"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{directory}: cannot load {WEIGHTS} with its {CONFIG} ({first[:300]})") from None
    info.update(model=type(model).__name__, image_size=config.image_size, particles=config.n_kp_enc,
                timestep_horizon=config.timestep_horizon, trained_on={"ds": config.ds, "root": config.root})
    return model.eval().requires_grad_(False), info
