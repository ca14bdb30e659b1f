"""`ddlp evaluate`: the paper's protocol end to end on a tiny trained model and generated Balls data,
the consistency of its JSON / CSV / PNG, and clear failures on bad input."""
import csv
import json
import math

import pytest
import torch
from PIL import Image

from ddlp import Config
from ddlp.checkpoint import resolve_checkpoint
from ddlp.cli import main
from ddlp.data.balls import BallsDataset, write_balls
from ddlp.evaluate import (
    EvalOptions,
    Protocol,
    ablation_of,
    evaluate_checkpoint,
    load_video_model,
    paper_protocol,
)
from ddlp.metrics import frechet_distance, fvd, psnr, ssim
from ddlp.metrics.lpips import LPIPS_CHANNELS
from ddlp.model import build_model
from ddlp.nn.vgg import VGG16Features
from ddlp.train import Trainer, TrainOptions

TINY = dict(enc_channels=[8, 16, 16], prior_channels=[8, 8, 16], n_kp_enc=3, n_kp_prior=6, learned_feature_dim=2,
            pint_dim=16, pint_heads=2, pint_layers=1, timestep_horizon=4, batch_size=2, epoch_steps=2,
            dyn_ramp_min_iters=4, cond_steps=4)
COND, HORIZON = 4, 14                     # 10 predicted frames: enough for MED10


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Generated Balls episodes, a DDLP trained for 2 steps (run dir with best/ and a checkpoint),
    and random-weight LPIPS files in the official formats."""
    root = tmp_path_factory.mktemp("eval")
    data = write_balls(root / "balls", episodes={"train": 2, "val": 1, "test": 3}, seqlen=24, progress=False)
    config = Config.preset("balls_small", root=str(data), **TINY)
    train = BallsDataset(data, "train", clip_len=config.timestep_horizon + 1)
    trainer = Trainer(config, train, BallsDataset(data, "val"), TrainOptions(
        run_dir=str(root / "run"), max_steps=2, num_workers=0, progress=False, tensorboard=False, figures=False,
        eval_batches=1))
    trainer.train()
    torch.manual_seed(1)
    vgg = VGG16Features()
    torch.save({f"features.{k.split('.', 1)[1]}": v for k, v in vgg.state_dict().items()}, root / "vgg16.pth")
    torch.save({f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(LPIPS_CHANNELS)},
               root / "lpips_vgg.pth")
    return root, data


def test_protocol_defaults_and_overrides():
    config = Config.preset("balls_small")
    assert paper_protocol("balls", config)[0].cond == 10 and paper_protocol("balls", config)[0].horizon == 50
    p, is_paper = paper_protocol("obj3d128", config)
    assert (p.cond, p.horizon, p.predicted, is_paper) == (6, 50, 44, True)
    assert paper_protocol("clevrer", config)[0].horizon == 100 and paper_protocol("traffic", config)[0].cond == 6
    p, is_paper = paper_protocol("balls", config, cond=6)
    assert (p.cond, p.horizon, is_paper) == (6, 50, False)
    p, is_paper = paper_protocol("mine", config)                       # unknown dataset: the config's own
    assert (p.cond, p.horizon, is_paper) == (config.cond_steps, config.animation_horizon, False)
    assert Protocol(10, 50, med_horizon=100).total == 100
    with pytest.raises(ValueError, match="must exceed cond"):
        Protocol(10, 10).check()


def test_ablation_report():
    assert ablation_of(Config.preset("balls_small"))["name"] == "DDLP"
    no_rpe = ablation_of(Config.preset("balls_small", pint_relative_bias=False))
    assert no_rpe["name"] == "DDLP (No RPE)" and no_rpe["no_rpe"] and not no_rpe["no_tracking"]
    flagged = ablation_of(Config.preset("balls_small", no_tracking=True))
    assert flagged["no_tracking"] == ("no_tracking" in Config.__dataclass_fields__)
    if not flagged["no_tracking"]:               # a model version without the switch must say it ignores it
        assert "does not implement" in flagged["warning"]
    else:
        assert flagged["name"] == "DLP (No Tracking)"


def test_checkpoint_resolution(setup, tmp_path):
    root, _ = setup
    run = root / "run"
    directory, info = resolve_checkpoint(run)
    assert directory == run / "best" and info["source"].startswith("best") and info["step"] == 2
    directory, info = resolve_checkpoint(run, use_last=True)
    assert directory.name == "step-00000002" and info["step"] == 2
    assert resolve_checkpoint(run / "best")[1]["source"] == "model directory"
    directory, info = resolve_checkpoint(run / "checkpoints" / "step-00000002")
    assert info["run"] == str(run) and info["step"] == 2 and info["source"] == "checkpoint"
    model, info = load_video_model(run)
    assert not model.training and info["ablation"]["name"] == "DDLP" and info["particles"] == 3


class Detector(torch.nn.Module):
    """Stands in for the I3D TorchScript file: per-channel means as 'features'."""

    def forward(self, x, rescale=True, resize=True, return_features=False):
        assert not rescale and not resize and return_features
        return x.mean((2, 3, 4))


def test_evaluate_end_to_end_outputs_agree(setup, tmp_path, monkeypatch):
    root, data = setup
    monkeypatch.setattr(fvd, "load_i3d", lambda path, device: Detector())
    opts = EvalOptions(root=str(data), cond=COND, horizon=HORIZON, batch_size=2, out_dir=str(tmp_path / "eval"),
                       vgg_weights=str(root / "vgg16.pth"), lpips_weights=str(root / "lpips_vgg.pth"),
                       fvd_i3d="i3d_torchscript.pt", progress=False)
    res = evaluate_checkpoint(root / "run", opts)
    files = {k: tmp_path / "eval" / f"balls_test_{v}" for k, v in
             (("json", "metrics.json"), ("csv", "per_step.csv"), ("png", "per_step.png"))}
    assert all(p.is_file() for p in files.values())
    saved = json.loads(files["json"].read_text())
    m = saved["metrics"]
    assert saved["data"]["videos"] == 3 and saved["data"]["frames_per_clip"] == 24
    assert saved["protocol"]["cond"] == COND and saved["protocol"]["predicted"] == HORIZON - COND
    assert not saved["protocol"]["paper_protocol"] and saved["checkpoint"]["source"].startswith("best")
    for name in ("psnr", "ssim", "lpips"):
        assert m[name]["n"] == 3 * (HORIZON - COND) and len(m[name]["per_step"]) == HORIZON - COND
        # every video has the same number of frames: the mean of the curve is the overall mean
        assert sum(m[name]["per_step"]) / len(m[name]["per_step"]) == pytest.approx(m[name]["mean"], abs=1e-6)
        assert saved["summary"][name] == m[name]["mean"] and saved["summary"][f"{name}_std"] == m[name]["std"]
    assert m["lpips"]["mean"] > 0 and 0 < m["ssim"]["mean"] < 1
    assert saved["summary"]["med10"] == pytest.approx(sum(m["med"]["per_step"][:10]), abs=1e-9)
    rows = list(csv.DictReader(files["csv"].open()))
    assert [int(r["step"]) for r in rows] == list(range(1, HORIZON - COND + 1))
    assert [int(r["frame"]) for r in rows] == list(range(COND, HORIZON))
    for name in ("psnr", "ssim", "lpips", "med"):
        assert [float(r[name]) for r in rows] == pytest.approx(m[name]["per_step"], abs=1e-9)
    png = Image.open(files["png"])
    assert png.width > 4 * png.height / 2 and png.height > 100            # one panel per metric
    assert res["summary"] == saved["summary"]

    # the numbers are those of the protocol: rollout, clamp, predicted frames only, all pairs
    model, _ = load_video_model(root / "run")
    clips = torch.stack([BallsDataset(data, "test")[i]["frames"][:HORIZON] for i in range(3)])
    out, _ = model.rollout(clips[:, :COND], HORIZON - COND, COND)
    pred, gt = out[:, COND:].clamp(0, 1).flatten(0, 1), clips[:, COND:].flatten(0, 1)
    values = psnr(gt, pred).double()
    assert m["psnr"]["mean"] == pytest.approx(values.mean().item(), abs=1e-5)
    assert m["psnr"]["std"] == pytest.approx(values.std().item(), abs=1e-5)       # unbiased, over all pairs
    assert m["ssim"]["mean"] == pytest.approx(ssim(gt, pred).double().mean().item(), abs=1e-6)
    # FVD compares whole clips, conditioning reconstructions included
    real = fvd.i3d_features(Detector(), clips)
    fake = fvd.i3d_features(Detector(), out.clamp(0, 1))
    assert saved["summary"]["fvd"] == pytest.approx(frechet_distance(real, fake), rel=1e-4, abs=1e-8)
    assert m["fvd"]["videos"] == 3 and m["fvd"]["frames"] == HORIZON


def test_cli_without_lpips_weights(setup, tmp_path, monkeypatch, capsys):
    root, data = setup
    monkeypatch.delenv("DDLP_LPIPS_WEIGHTS", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    rc = main(["evaluate", str(root / "run"), "--dataset", "balls", "--data.root", str(data), "--cond", "4",
               "--horizon", "14", "--max-videos", "1", "--offline", "--no-progress", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0 and "LPIPS unavailable" in out and "MED10" in out and "paper, DDLP: med10 0.149" in out
    saved = json.loads((tmp_path / "balls_test_metrics.json").read_text())
    assert saved["metrics"]["lpips"]["available"] is False and "vgg.pth" in saved["metrics"]["lpips"]["reason"]
    assert "lpips" not in saved["summary"] and saved["data"]["videos"] == 1
    assert math.isfinite(saved["summary"]["psnr"]) and saved["summary"]["med10"] > 0


def _error(capsys, *argv) -> str:
    assert main(["evaluate", *map(str, argv), "--offline", "--no-progress", "--no-lpips"]) == 2
    return capsys.readouterr().err


def test_bad_inputs_give_clear_messages(setup, tmp_path, capsys):
    root, data = setup
    run = root / "run"
    dlp = tmp_path / "dlp"
    build_model(Config.preset("balls_small", model="dlp", **TINY)).save_pretrained(dlp)
    assert "single-image DLPv2 model" in _error(capsys, dlp, "--data.root", data)
    mismatched = tmp_path / "mismatched"
    build_model(Config.preset("balls_small", **TINY)).save_pretrained(mismatched)
    Config.preset("balls_small", **{**TINY, "n_kp_enc": 4}).save(mismatched / "config.json")
    assert "cannot load model.safetensors with its config.json" in _error(capsys, mismatched, "--data.root", data)
    official = tmp_path / "balls_ddlp.pth"
    torch.save({}, official)
    assert "ddlp convert" in _error(capsys, official)
    assert "no such model or run directory" in _error(capsys, tmp_path / "nothing")
    big = tmp_path / "big"
    build_model(Config.preset("balls_small", image_size=128, anchor_s=0.125, **TINY)).save_pretrained(big)
    err = _error(capsys, big, "--data.root", data, "--cond", 4, "--horizon", 14)
    assert "64x64 frames but the model works on 128x128" in err
    err = _error(capsys, run, "--data.root", data)                         # the paper's 10 -> 50 on 24-frame clips
    assert "clips have 24 frames, fewer than the 50" in err
    assert "must exceed cond" in _error(capsys, run, "--data.root", data, "--cond", 8, "--horizon", 8)
    assert "not found" in _error(capsys, run, "--data.root", tmp_path / "missing")


def test_baselines_are_scored_beside_the_model(setup, tmp_path, capsys):
    root, data = setup
    rc = main(["evaluate", str(root / "run"), "--data.root", str(data), "--cond", "4", "--horizon", "14",
               "--baselines", "--no-lpips", "--no-progress", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0 and "baseline stand_still: MED10" in out and "baseline ground_truth_constant_velocity" in out
    saved = json.loads((tmp_path / "balls_test_metrics.json").read_text())
    b = saved["metrics"]["baselines"]
    assert set(b) == {"stand_still", "constant_velocity", "ground_truth_stand_still",
                      "ground_truth_constant_velocity"}
    assert "psnr" in b["stand_still"] and "psnr" not in b["ground_truth_stand_still"]   # no frames to score
    for name, v in b.items():
        assert len(v["med"]["per_step"]) == 10 and saved["summary"][f"med10_{name}"] == v["med"]["med10"]
    # stand still from the posterior: the model's own decoder repeats the last reconstruction
    model, _ = load_video_model(root / "run")
    clips = torch.stack([BallsDataset(data, "test")[i]["frames"][:14] for i in range(3)])
    posterior = model.encode(clips[:, :4])
    still = model.decode(posterior[:, -1:]).clamp(0, 1).expand(-1, 10, -1, -1, -1)
    values = psnr(clips[:, 4:].flatten(0, 1), still.flatten(0, 1)).double()
    assert b["stand_still"]["psnr"]["mean"] == pytest.approx(values.mean().item(), abs=1e-5)
    # the true positions' stand-still error at step k is the distance moved in k frames
    test = BallsDataset(data, "test")
    xy = torch.stack([test[i]["positions_px"][:14] for i in range(3)]) / 64
    moved = (xy[:, 4:] - xy[:, 3:4]).norm(dim=-1).mean(-1).mean(0)
    assert b["ground_truth_stand_still"]["med"]["per_step"] == pytest.approx(moved.tolist(), abs=1e-9)
    rows = list(csv.DictReader((tmp_path / "balls_test_per_step.csv").open()))
    assert [float(r["med_constant_velocity"]) for r in rows] == pytest.approx(b["constant_velocity"]["med"]["per_step"])
    assert Image.open(tmp_path / "balls_test_per_step.png").height > 100


def test_use_last_takes_the_latest_checkpoint_of_a_run(setup, tmp_path, capsys):
    root, data = setup
    rc = main(["evaluate", str(root / "run"), "--use-last", "--data.root", str(data), "--cond", "4",
               "--horizon", "14", "--max-videos", "1", "--no-lpips", "--no-progress", "--out", str(tmp_path)])
    assert rc == 0
    saved = json.loads((tmp_path / "balls_test_metrics.json").read_text())
    assert "step-00000002" in json.dumps(saved["checkpoint"]) and "best" not in saved["checkpoint"]["source"]
    capsys.readouterr()
    assert main(["tune-pint", str(root / "run"), "--use-last", "--data.root", str(data), "--out",
                 str(tmp_path / "tuned"), "--steps", "1", "--clips", "2", "--batch-size", "2"]) == 0
    assert "step-00000002" in capsys.readouterr().out and (tmp_path / "tuned" / "config.json").is_file()


def test_evaluate_in_bf16_records_its_precision(setup, tmp_path, capsys):
    root, data = setup
    rc = main(["evaluate", str(root / "run"), "--data.root", str(data), "--cond", "4", "--horizon", "14",
               "--no-lpips", "--no-progress", "--precision", "bf16", "--out", str(tmp_path)])
    assert rc == 0, capsys.readouterr().err
    saved = json.loads((tmp_path / "balls_test_metrics.json").read_text())
    assert saved["precision"] == "bf16"
    assert math.isfinite(saved["summary"]["psnr"]) and math.isfinite(saved["summary"]["med10"])
