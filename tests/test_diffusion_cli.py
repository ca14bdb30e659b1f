"""`ddlp diffuse stats|train|sample` end to end on a tiny DDLP, and the bad-input messages."""
import json
import math

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ddlp.cli import main
from ddlp.config import Config
from ddlp.data.balls import write_balls
from ddlp.diffusion.latents import LatentStats
from ddlp.model import build_model

pytestmark = pytest.mark.usefixtures("one_thread")

TAU = 3


@pytest.fixture(scope="module")
def ddlp_dir(tmp_path_factory):
    """A tiny untrained DDLP (random weights are enough to exercise the pipeline) and its data."""
    root = tmp_path_factory.mktemp("diffuse")
    write_balls(root / "data", episodes={"train": 4, "val": 1, "test": 1}, seqlen=8, progress=False)
    torch.manual_seed(0)
    config = Config.preset("balls_small", n_kp_enc=2, n_kp_prior=4, pint_dim=16, pint_heads=2, pint_layers=1,
                           timestep_horizon=4, root=str(root / "data"))
    build_model(config).save_pretrained(root / "ddlp")
    return root


def run(*argv) -> int:
    return main(["diffuse", *map(str, argv)])


def test_train_then_sample_writes_videos(ddlp_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert run("train", "--ddlp", ddlp_dir / "ddlp", "--run-dir", out, "--max-steps", 4, "--diffusion-steps", 8,
               "--frames", TAU, "--batch-size", 2, "--checkpoint-every", 2, "--preview-every", 4,
               "--no-progress") == 0
    for name in ("config.json", "latents.safetensors", "latent_stats.safetensors", "ddlp/model.safetensors",
                 "model/model.safetensors", "checkpoints/latest", "figures/sample-00000004.png", "metrics.jsonl"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert (config["diffuse_frames"], config["diffusion_num_steps"], config["model"]) == (TAU, 8, "diffuse_ddlp")
    latents = LatentStats.load(out / "latent_stats.safetensors")
    assert latents.clips == 4 and latents.frames == TAU          # one clip per episode (its first frames)
    assert latents.fingerprint == config["ddlp_fingerprint"]

    assert run("sample", out, "--num", 1, "--frames", 6, "--precision", "bf16", "--out", out / "bf16",
               "--no-progress") == 0
    assert len(list((out / "bf16").glob("video-*.gif"))) == 1
    assert run("sample", out, "--num", 3, "--frames", 7, "--batch-size", 2, "--no-progress") == 0
    text = capsys.readouterr().out
    assert "sampling" in text and "PINT unroll" in text and "decoding" in text
    videos = sorted((out / "samples").glob("video-*.gif"))
    assert [v.name for v in videos] == ["video-000.gif", "video-001.gif", "video-002.gif"]
    with Image.open(videos[0]) as gif:
        assert gif.n_frames == 7                                   # labelled frames are all distinct
    with Image.open(out / "samples" / "first-frames.png") as grid:
        tile = 128 + 2                                              # 64 px frames shown at 2x, 2 px gaps
        assert grid.size == (TAU * tile + 2, 3 * tile + 2)         # tau columns, one row per video

    # resume continues the same run; a second plain `train` into it is refused
    assert run("train", "--run-dir", out, "--resume", "--max-steps", 6, "--no-progress") == 0
    assert (out / "checkpoints" / "latest").read_text() == "step-00000006"
    assert run("train", "--ddlp", ddlp_dir / "ddlp", "--run-dir", out, "--no-progress") == 2
    assert "already holds a DiffuseDDLP run" in capsys.readouterr().err


def test_stats_command_and_mismatched_statistics(ddlp_dir, tmp_path, capsys):
    stats = tmp_path / "stats.safetensors"
    assert run("stats", "--ddlp", ddlp_dir / "ddlp", "--frames", TAU, "--out", stats, "--clips", "all",
               "--no-progress") == 0
    s = LatentStats.load(stats)
    assert s.clips == 4 * (8 - 5 + 1) and s.frames == TAU        # every 5-frame training window
    assert "pos_y" in capsys.readouterr().out
    # statistics of another DDLP are refused by name
    torch.manual_seed(1)
    other = build_model(Config.from_json(ddlp_dir / "ddlp" / "config.json"))
    other.save_pretrained(tmp_path / "other")
    code = run("train", "--ddlp", tmp_path / "other", "--run-dir", tmp_path / "r", "--stats", stats,
               "--max-steps", 1, "--no-progress")
    assert code == 2
    assert "computed for a different DDLP" in capsys.readouterr().err


def test_bad_inputs_have_clear_messages(ddlp_dir, tmp_path, capsys):
    assert run("train", "--ddlp", tmp_path / "missing", "--run-dir", tmp_path / "r") == 2
    assert "no such model or run directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert run("train", "--ddlp", tmp_path / "empty", "--run-dir", tmp_path / "r") == 2
    assert "is neither a model directory (model.safetensors + config.json) nor a training run" in capsys.readouterr().err
    dlp = Config.preset("balls_small", model="dlp", n_kp_enc=2, n_kp_prior=4)
    build_model(dlp).save_pretrained(tmp_path / "dlp")
    assert run("train", "--ddlp", tmp_path / "dlp", "--run-dir", tmp_path / "r") == 2
    assert "single-image DLP" in capsys.readouterr().err
    assert run("sample", tmp_path / "nothing") == 2
    assert "not found" in capsys.readouterr().err


def test_sample_refuses_too_few_frames_and_another_ddlp(ddlp_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert run("train", "--ddlp", ddlp_dir / "ddlp", "--run-dir", out, "--max-steps", 1, "--diffusion-steps", 4,
               "--frames", TAU, "--preview-every", 0, "--no-progress") == 0
    assert run("sample", out, "--frames", TAU - 1, "--num", 1) == 2
    assert f"below tau={TAU}" in capsys.readouterr().err
    torch.manual_seed(2)
    build_model(Config.from_json(ddlp_dir / "ddlp" / "config.json")).save_pretrained(tmp_path / "other")
    assert run("sample", out, "--ddlp", tmp_path / "other", "--num", 1, "--frames", TAU) == 2
    assert "different DDLP" in capsys.readouterr().err
    assert run("sample", out, "--sampler", "ddpm", "--steps", 2, "--num", 1, "--frames", TAU) == 2
    assert "use --sampler ddim" in capsys.readouterr().err


def test_train_in_bf16(ddlp_dir, tmp_path):
    out = tmp_path / "run"
    assert run("train", "--ddlp", ddlp_dir / "ddlp", "--run-dir", out, "--max-steps", 2, "--diffusion-steps", 4,
               "--frames", TAU, "--preview-every", 0, "--precision", "bf16", "--no-progress") == 0
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert losses and all(math.isfinite(v) and v > 0 for v in losses)
    weights = load_file(out / "model" / "model.safetensors")
    assert all(w.dtype == torch.float32 for w in weights.values())
