"""Model directories: `config.json` + `model.safetensors`, written atomically."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import Config

WEIGHTS, CONFIG = "model.safetensors", "config.json"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()   # what open() would give; mkstemp's files are owner-only


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), then rename over `path`: readers see the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_pretrained(model: torch.nn.Module, directory: str | Path) -> None:
    directory = Path(directory)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(directory / WEIGHTS, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    atomic_write(directory / CONFIG, lambda p: Path(p).write_text(json.dumps(model.config.to_dict(), indent=2)))


def load_pretrained(directory: str | Path, map_location: str = "cpu"):
    from .model import build_model
    directory = Path(directory)
    for name in (CONFIG, WEIGHTS):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory} is not a ddlp model directory: {name} is missing "
                                    "(official .pth checkpoints must first go through `ddlp convert`)")
    model = build_model(Config.from_json(directory / CONFIG))
    model.load_state_dict(load_file(directory / WEIGHTS, device=map_location))
    return model.to(map_location)
