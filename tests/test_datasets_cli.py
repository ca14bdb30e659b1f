"""`ddlp train --preset X --data.root DIR` on a generated tree of each dataset (one step of a shrunken
model), `ddlp data inspect` and `ddlp data phyre`."""
import importlib.util
import json
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from ddlp.cli import main
from ddlp.config import Config
from ddlp.data import samples
from ddlp.data.registry import build_dataset


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    """One small tree per dataset, in its published layout."""
    base = tmp_path_factory.mktemp("trees")
    samples.write_obj3d(base / "obj3d", {"train": 1, "val": 1, "test": 1}, frames=4, size=128)
    samples.write_clevrer_videos(base / "clevrer", {"train": [0], "val": [10000], "test": [11000]},
                                 frames=18 + 4, size=(160, 128))
    samples.write_phyre(base / "phyre", {"train": 1, "valid": 1, "test": 1}, frames=34)
    samples.write_traffic(base / "traffic" / "img128np.npy", frames=500)
    np.save(base / "mine.npy", np.stack([samples.episode(4, 48, seed=s) for s in range(4)]))
    return base


def shrink(preset: str) -> list[str]:
    """--set overrides that keep the preset's image size and dataset but make one step take ~1 s."""
    c = Config.preset(preset)
    values = dict(n_kp_enc=2, n_kp_prior=4, pint_layers=1, pint_dim=32, learned_feature_dim=2,
                  recon_loss_type="mse", timestep_horizon=2,
                  enc_channels=[8] * len(c.enc_channels), prior_channels=[8] * len(c.prior_channels))
    return [a for k, v in values.items() for a in ("--set", f"{k}={json.dumps(v)}")]


CASES = [  # preset, data root below the trees folder (None: no files), extra arguments
    ("obj3d", "obj3d", []),
    ("obj3d128", "obj3d", []),
    ("obj3d128_img", "obj3d", []),
    ("clevrer", "clevrer", ["--set", "data_episode_len=4"]),
    ("phyre", "phyre", []),
    ("traffic", "traffic", []),
    ("traffic_img", "traffic/img128np.npy", []),
    ("shapes", None, ["--set", "data_num_images=4"]),
    ("balls_small", "mine.npy", ["--dataset", "custom", "--set", "data_split=[0.5,0.25,0.25]"]),
]


@pytest.mark.parametrize("preset,root,extra", CASES, ids=[c[0] + ("-custom" if "custom" in c[2] else "")
                                                          for c in CASES])
def test_train_one_step_on_each_dataset(trees, tmp_path, capsys, preset, root, extra):
    args = ["train", "--preset", preset, "--run-dir", str(tmp_path), "--max-steps", "1", "--workers", "0",
            "--no-progress", "--no-figures", "--batch-size", "1", *shrink(preset), *extra]
    if root:
        args += ["--data.root", str(trees / root)]
    assert main(args) == 0, capsys.readouterr().err
    assert "done: 1 steps" in capsys.readouterr().out
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["image_size"] == Config.preset(preset).image_size
    assert saved["ds"] == ("custom" if "custom" in extra else Config.preset(preset).ds)
    assert (tmp_path / "checkpoints" / "step-00000001" / "model.safetensors").is_file()


def test_train_with_a_missing_data_root_is_one_line(tmp_path, capsys):
    assert main(["train", "--preset", "obj3d128", "--data.root", str(tmp_path / "nope"),
                 "--run-dir", str(tmp_path / "run"), "--max-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ddlp train: error: OBJ3D folder not found:") and "nope" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------- inspect
def test_inspect_reports_and_writes_a_contact_sheet(trees, tmp_path, capsys):
    out = tmp_path / "sheet.png"
    assert main(["data", "inspect", str(trees / "obj3d"), "--out", str(out), "--frames", "3"]) == 0
    text = capsys.readouterr().out
    assert "train: 1 episode folders of frames" in text
    assert "1 episodes, 4 frames each (4 frames), frames 128x128 px, values [0.000, 1.000]" in text
    assert f"contact sheet: {out} (3 rows)" in text
    img = Image.open(out)
    assert img.height == 2 + 3 * (96 + 2) and img.width > 3 * 96           # 3 splits x 3 frames of 96 px

    assert main(["data", "inspect", str(trees / "mine.npy"), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "4 episodes, 4 frames each (16 frames), frames 48x48 px" in text
    assert "train/val/test = 2/1/1 episodes" in text                       # 80/10/10 % of 4 episodes


def test_inspect_through_a_loader_shows_what_the_model_sees(trees, tmp_path, capsys):
    out = tmp_path / "p.png"
    assert main(["data", "inspect", str(trees / "phyre"), "--out", str(out)]) == 0
    raw_mean = float(capsys.readouterr().out.split("(mean ")[1].split(")")[0])
    assert main(["data", "inspect", str(trees / "phyre"), "--dataset", "phyre", "--set", "timestep_horizon=3",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "val: 1 items of 100x3x128x128 (ClipDataset)" in text and "train: 97 items of 4x3x128x128" in text
    seen_mean = float(text.split("val: ")[1].split("(mean ")[1].split(")")[0])
    assert raw_mean > 0.6 and seen_mean < 0.4                               # white files, inverted frames


def test_inspect_bad_path_is_one_line(tmp_path, capsys):
    assert main(["data", "inspect", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.startswith("ddlp data: error: no such file or folder:")
    (tmp_path / "empty").mkdir()
    assert main(["data", "inspect", str(tmp_path / "empty")]) == 2
    assert "empty folder" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- PHYRE generation
@pytest.mark.skipif(importlib.util.find_spec("phyre") is not None, reason="phyre is installed here")
def test_phyre_generation_without_the_package_says_what_to_install(tmp_path, capsys):
    assert main(["data", "phyre", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ddlp data: error: generating PHYRE data needs the optional 'phyre' package")
    assert "pip install phyre" in err and not (tmp_path / "out").exists()


def fake_phyre(frames: int = 36):
    """Just enough of the phyre API: folds, the action cache, a simulator (every other try solves)."""
    def rollout(seed):
        obs = np.zeros((frames, 256, 256), np.int64)
        for t in range(frames):
            obs[t, 100:140, 20 + 5 * t:60 + 5 * t] = 1 + seed % 3          # a box sliding right
            obs[t, :10] = 6                                                 # the floor (bottom, y up)
        return obs

    class Sim:
        def __init__(self, tasks):
            self.tasks, self.calls = tasks, 0

        def simulate_action(self, i, action, need_images=True, stride=7):
            self.calls += 1
            solved = self.calls % 2 == 0
            status = SimpleNamespace(is_solved=lambda: solved, is_invalid=lambda: False)
            return SimpleNamespace(status=status, images=rollout(i))

    cache = SimpleNamespace(action_array=np.random.rand(3, 3),
                            load_simulation_states=lambda task: np.array([1, -1, 1]))
    return SimpleNamespace(get_fold=lambda setup, fold: (["00000:000", "00012:001", "00001:004"],
                                                         ["00002:000"], ["00003:000"]),
                           get_default_100k_cache=lambda tier: cache, initialize_simulator=lambda t, tier: Sim(t))


def test_phyre_generator_writes_the_published_layout(tmp_path):
    from ddlp.data.phyre import generate_phyre
    counts = generate_phyre(tmp_path, train_per_task=2, phyre=fake_phyre(), seed=0, progress=False)
    assert counts == {"train": 4, "valid": 1, "test": 1}                   # template 12 is left out
    files = sorted((tmp_path / "train" / "00003").iterdir())
    assert len(files) == 36 and files[0].name == "00000.png" and files[-1].name == "00035.png"
    index = json.loads((tmp_path / "train" / "index.json").read_text())
    assert [r["task"] for r in index] == ["00000:000", "00000:000", "00001:004", "00001:004"]
    stored = np.asarray(Image.open(files[0]))
    assert stored.shape == (128, 128, 3) and stored[-1, 0].tolist() == [0, 0, 0]   # floor at the bottom
    assert stored[0, 0].tolist() == [255, 255, 255]
    val = build_dataset(Config.preset("phyre", timestep_horizon=3), "val", tmp_path)[0]["frames"]
    assert val.shape == (100, 3, 128, 128) and val[0, :, 0, 0].tolist() == [0, 0, 0]   # inverted white
