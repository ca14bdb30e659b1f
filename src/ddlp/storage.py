"""Model directories on disk and on the Hub: `config.json` + `model.safetensors` + a model card
(`README.md`), written atomically; a local folder or, through the optional `huggingface_hub`
(`pip install 'ddlp[hub]'`), a Hugging Face Hub repository id such as "org/ddlp-balls".

Below the model in the layering: it knows configs and state dicts, not model classes.
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from .config import Config

WEIGHTS, CONFIG, CARD = "model.safetensors", "config.json", "README.md"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_EXTRA = "pip install 'ddlp[hub]' (huggingface_hub)"


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


def save_pretrained(model: torch.nn.Module, directory: str | Path, metrics: Optional[dict] = None,
                    source: Optional[str] = None) -> None:
    """Weights, config and (for DLP/DDLP models) model card (see `model_card`) of `model` in `directory`."""
    directory = Path(directory)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(directory / WEIGHTS, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    atomic_write(directory / CONFIG, lambda p: Path(p).write_text(model.config.to_json()))
    if isinstance(model.config, Config):
        write_model_card(directory, model.config, sum(t.numel() for t in tensors.values()), metrics, source)


def write_model_card(directory: str | Path, config: Config, n_params: int, metrics: Optional[dict] = None,
                     source: Optional[str] = None) -> None:
    text = model_card(config, n_params, metrics, source)
    atomic_write(Path(directory) / CARD, lambda p: Path(p).write_text(text))


def model_card(config: Config, n_params: int, metrics: Optional[dict] = None, source: Optional[str] = None) -> str:
    """The README.md of a model directory: Hub metadata, what the model is, its evaluation."""
    c = config
    kind = "DDLP (video, PINT dynamics)" if c.is_video else "DLPv2 (single images)"
    rows = [("model", kind), ("dataset", c.ds), ("image size", f"{c.image_size} x {c.image_size}"),
            ("particles", f"{c.n_kp_enc} (from {c.n_kp_prior} proposals), {c.learned_feature_dim} appearance "
                          "features each"),
            ("parameters", f"{n_params:,}")]
    if c.is_video:
        rows.append(("PINT", f"{c.pint_layers} layers, {c.pint_heads} heads, dim {c.pint_dim}, "
                             f"{c.timestep_horizon}-frame context"))
    if source:
        rows.append(("source", source))
    lines = ["---", "library_name: ddlp", "tags:", "- ddlp", "- latent-particles", "- object-centric",
             "- video-prediction" if c.is_video else "- unsupervised-keypoints", "---", "",
             f"# {'DDLP' if c.is_video else 'DLPv2'} model: {c.ds}", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    if metrics:
        lines += ["", "## Evaluation", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
    cls = "DDLP" if c.is_video else "DLP"
    lines += ["", "## Use", "", "```python", f"from ddlp.model import {cls}",
              f'model = {cls}.from_pretrained("<this folder or Hub id>")', "```", "",
              "`config.json` holds every hyper-parameter; the weights are in `model.safetensors`.", ""]
    return "\n".join(lines)


def model_directory(path_or_id: str | Path, revision: Optional[str] = None) -> Path:
    """A local model directory for a path, or for a Hub repository id (downloaded into, or in
    offline mode (HF_HUB_OFFLINE=1) read from, the huggingface_hub cache)."""
    path = Path(path_or_id).expanduser()
    if path.exists() or not HUB_ID.match(str(path_or_id)) or path.parent.is_dir():
        return path             # a local path (a missing "runs/typo" is not sent to the Hub)
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ImportError(f"{path_or_id} is not a local folder; to load it from the Hugging Face Hub, "
                          f"{HUB_EXTRA}") from None
    try:
        return Path(snapshot_download(str(path_or_id), revision=revision, allow_patterns=[WEIGHTS, CONFIG, CARD],
                                      library_name="ddlp"))
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, no access: all "not available"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise FileNotFoundError(f"{path_or_id} is neither a local folder nor a Hub model available here "
                                f"({type(e).__name__}: {first[:200]})") from None


def push_to_hub(model: torch.nn.Module, repo_id: str, *, metrics: Optional[dict] = None, private: bool = False,
                token: Optional[str] = None, commit_message: str = "Upload ddlp model") -> str:
    """Upload weights, config and model card to Hub repository `repo_id` (created if needed);
    returns the commit URL."""
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise ImportError(f"pushing to the Hugging Face Hub needs huggingface_hub: {HUB_EXTRA}") from None
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp, metrics=metrics)
        info = api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message)
    return str(getattr(info, "commit_url", info))


def read_pretrained(path_or_id: str | Path, map_location: str = "cpu", revision: Optional[str] = None
                    ) -> tuple[Config, dict]:
    """The config and weights of a model directory or Hub id."""
    directory = model_directory(path_or_id, revision)
    for name in (CONFIG, WEIGHTS):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory} is not a ddlp model directory: {name} is missing "
                                    "(official .pth checkpoints must first go through `ddlp convert`)")
    return Config.from_json(directory / CONFIG), load_file(directory / WEIGHTS, device=map_location)
