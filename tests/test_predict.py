"""`ddlp predict`: videos with ground truth beside the prediction, particles as .npz / JSON, and
clear failures on bad input."""
import json

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from PIL import Image

from ddlp import Config
from ddlp.cli import main
from ddlp.data.balls import generate_split
from ddlp.model import build_model
from ddlp.particles import Particles
from ddlp.predict import _zoom_position, predict, predict_clip, prediction_frames
from ddlp.viz import to_pixel

TINY = dict(enc_channels=[8, 16, 16], prior_channels=[8, 8, 16], n_kp_enc=3, n_kp_prior=6, learned_feature_dim=2,
            pint_dim=16, pint_heads=2, pint_layers=1, timestep_horizon=4, cond_steps=4, animation_horizon=12)


@pytest.fixture(scope="module")
def model_and_clip(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    torch.manual_seed(0)
    model = build_model(Config.preset("balls_small", **TINY)).eval()
    model.save_pretrained(root / "model")
    clip = root / "clip.npy"
    np.save(clip, generate_split(1, 9, 10)["imgs"][0])               # [10, 64, 64, 3] uint8
    return root, model, clip


def test_predict_writes_videos_and_particles(model_and_clip, tmp_path):
    root, model, clip = model_and_clip
    res = predict(root / "model", clip, tmp_path, cond=4, horizon=12, device="cpu")
    assert res["cond"] == 4 and res["horizon"] == 12 and res["input_frames"] == 10 and res["ground_truth_frames"] == 10
    gif = Image.open(tmp_path / "prediction.gif")
    assert gif.n_frames == 12 and gif.width > 1.5 * gif.height            # ground truth beside the prediction
    assert iio.imread(tmp_path / "prediction.mp4", plugin="FFMPEG", index=None).shape[0] == 12
    arrays = np.load(tmp_path / "particles.npz")
    assert arrays["position"].shape == (12, 3, 2) and arrays["transparency"].shape == (12, 3)
    assert arrays["predicted"].tolist() == [False] * 4 + [True] * 8 and int(arrays["cond_steps"]) == 4
    assert np.allclose(arrays["position_px"], (arrays["position"] + 1) / 2 * 63)
    assert np.allclose(arrays["glimpse_size"], 1 / (1 + np.exp(-arrays["scale"])), atol=1e-6)
    # the very particles of the model's own rollout
    frames = torch.from_numpy(np.load(clip)).permute(0, 3, 1, 2).float() / 255
    _, particles = model.rollout(frames[None, :4], 8, 4)
    assert np.allclose(arrays["position"], particles.position[0].numpy(), atol=1e-6)
    doc = json.loads((tmp_path / "particles.json").read_text())
    assert len(doc["frames"]) == 12 and doc["cond_steps"] == 4 and "position" in doc["conventions"]
    first = doc["frames"][5]["particles"][2]
    assert doc["frames"][5]["predicted"] and first["id"] == 2
    assert first["position"] == pytest.approx(arrays["position"][5, 2].tolist(), abs=1e-6)
    assert first["transparency"] == pytest.approx(float(arrays["transparency"][5, 2]), abs=1e-6)
    assert len(doc["frames"][0]["bg_features"]) == arrays["bg_features"].shape[1]


def test_predict_clip_output_is_the_rollout(model_and_clip):
    _, model, clip = model_and_clip
    frames = torch.rand(6, 3, 64, 64)
    pred, particles = predict_clip(model, frames, 3, 9)
    out, p = model.rollout(frames[None, :3], 6, 3)
    assert pred.shape == (9, 3, 64, 64) and torch.equal(pred, out[0].clamp(0, 1))
    assert particles.position.shape == (9, 3, 2) and torch.equal(particles.position, p.position[0])
    with pytest.raises(ValueError, match="fewer than the 8 conditioning frames"):
        predict_clip(model, frames, 8, 12)


def test_boxes_are_drawn_where_the_particles_are():
    S, zoom = 64, 2
    pos = torch.tensor([[-1.0, 1.0], [0.3, -0.2]])
    assert np.allclose(to_pixel(_zoom_position(pos, S, zoom).numpy(), S * zoom), to_pixel(pos.numpy(), S, zoom))
    T, K = 3, 2
    particles = Particles(position=pos.expand(T, K, 2).clone(), scale=torch.full((T, K, 2), -1.5),
                          depth=torch.zeros(T, K, 1), transparency=torch.ones(T, K), features=torch.zeros(T, K, 2))
    pred = torch.zeros(T, 3, S, S)
    plain = prediction_frames(None, pred, particles, cond=1)
    boxed = prediction_frames(None, pred, particles, cond=1, boxes=True)
    assert len(boxed) == T and boxed[0].size == plain[0].size
    diff = np.abs(np.asarray(boxed[1], dtype=int) - np.asarray(plain[1], dtype=int)).sum(-1) > 0
    assert diff.sum() > 100                     # the box outlines (sigmoid(-1.5) = 18% of the side each way)


def _error(capsys, *argv) -> str:
    assert main(["predict", *map(str, argv)]) == 2
    return capsys.readouterr().err


def test_predict_cli_and_bad_inputs(model_and_clip, tmp_path, capsys):
    root, _, clip = model_and_clip
    assert main(["predict", str(root / "model"), "--input", str(clip), "--cond", "4", "--horizon", "14",
                 "--out", str(tmp_path / "ok"), "--formats", "gif", "--boxes"]) == 0
    out = capsys.readouterr().out
    assert "10 predicted (horizon 14)" in out and "no ground truth" in out
    assert (tmp_path / "ok" / "prediction.gif").is_file() and not (tmp_path / "ok" / "prediction.mp4").exists()
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x01 this is not a video" * 50)
    err = _error(capsys, root / "model", "--input", broken, "--out", tmp_path / "x")
    assert "broken.mp4" in err and "cannot decode" in err
    assert "fewer than the 11 conditioning frames" in _error(capsys, root / "model", "--input", clip, "--cond", 11,
                                                             "--horizon", 20)
    assert "must exceed cond" in _error(capsys, root / "model", "--input", clip, "--cond", 4, "--horizon", 4)
    assert "--formats" in _error(capsys, root / "model", "--input", clip, "--formats", "avi")
    assert "no such file" in _error(capsys, root / "model", "--input", tmp_path / "none.mp4")
    assert "there is no episode 1" in _error(capsys, root / "model", "--input", clip, "--episode", 1)
    dlp = tmp_path / "dlp"
    build_model(Config.preset("balls_small", model="dlp", **TINY)).save_pretrained(dlp)
    assert "single-image DLPv2" in _error(capsys, dlp, "--input", clip)


def test_predict_an_episode_of_an_hdf5_dataset(model_and_clip, tmp_path, capsys):
    root, model, _ = model_and_clip
    from ddlp.data.balls import write_balls
    write_balls(tmp_path / "balls", episodes={"test": 3}, seqlen=10, progress=False)
    out = tmp_path / "out"
    assert main(["predict", str(root / "model"), "--input", str(tmp_path / "balls" / "test.hdf5"), "--episode", "2",
                 "--cond", "4", "--horizon", "8", "--out", str(out), "--formats", "gif"]) == 0
    frames = torch.from_numpy(generate_split(3, 9, 10)["imgs"][2]).permute(0, 3, 1, 2).float() / 255
    _, particles = model.rollout(frames[None, :4], 4, 4)
    saved = np.load(out / "particles.npz")
    assert np.allclose(saved["position"], particles.position[0].numpy(), atol=1e-6)
    assert json.loads((out / "particles.json").read_text())["episode"] == 2
    assert main(["predict", str(root / "model"), "--input", str(tmp_path / "balls"), "--split", "test",
                 "--episode", "2", "--cond", "4", "--horizon", "8", "--out", str(tmp_path / "o2"), "--formats", "gif"]) == 0
    assert np.array_equal(np.load(tmp_path / "o2" / "particles.npz")["position"], saved["position"])


def test_predict_use_last_takes_the_runs_latest_checkpoint(model_and_clip, tmp_path):
    root, model, clip = model_and_clip
    from ddlp.checkpoint import write_checkpoint
    run = tmp_path / "run"
    model.save_pretrained(run / "best")
    write_checkpoint(run, 7, model, {"step": 7}, keep=2)
    for flags, source in (([], "best (lowest validation ELBO)"), (["--use-last"], "latest checkpoint")):
        out = tmp_path / ("last" if flags else "best")
        assert main(["predict", str(run), "--input", str(clip), "--cond", "4", "--horizon", "6",
                     "--out", str(out), "--formats", "gif", *flags]) == 0
        info = json.loads((out / "particles.json").read_text())["checkpoint"]
        assert info["source"] == source and info["run"] == str(run)
    assert info["path"].endswith("step-00000007") and info["step"] == 7


@pytest.mark.parametrize("precision", ["bf16", "auto"])
def test_predict_in_bf16(model_and_clip, tmp_path, precision):
    root, model, clip = model_and_clip
    outs = {}
    for p in ("fp32", precision):
        out = tmp_path / p
        assert main(["predict", str(root / "model"), "--input", str(clip), "--cond", "4", "--horizon", "8",
                     "--out", str(out), "--formats", "gif", "--precision", p]) == 0
        outs[p] = np.load(out / "particles.npz")
        from ddlp.nn.precision import native_bf16
        chosen = "bf16" if p == "bf16" or (p == "auto" and native_bf16()[0]) else "fp32"
        assert json.loads((out / "particles.json").read_text())["precision"] == chosen
    for key in ("position", "scale", "transparency"):
        low, ref = outs[precision][key], outs["fp32"][key]
        assert low.dtype == ref.dtype == np.float32 and low.shape == ref.shape and np.isfinite(low).all()
