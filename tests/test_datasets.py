"""Dataset loaders: each published on-disk format, generated here in that exact layout, read back
through the public API (shapes, dtypes, value range, frame order, split sizes, sampling rules),
and one clear error naming the file for each kind of bad input."""
import pickle

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from ddlp.config import Config
from ddlp.data import samples
from ddlp.data.clips import ClipError
from ddlp.data.registry import available, build_dataset, register


def cfg(preset="balls_small", **kw):
    return Config.preset(preset, **kw)


def as_float(frames):
    """uint8 [T, H, W, 3] -> float [T, 3, H, W] the way loaders return them."""
    return torch.from_numpy(np.array(frames)).permute(0, 3, 1, 2).float() / 255


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def obj3d(tmp_path_factory):
    root = tmp_path_factory.mktemp("obj3d")
    return root, samples.write_obj3d(root, {"train": 2, "val": 1, "test": 1}, frames=12, size=128)


@pytest.fixture(scope="module")
def clevrer(tmp_path_factory):
    root = tmp_path_factory.mktemp("clevrer")
    ids = {"train": [0, 1, 5000], "val": [10000], "test": [11000]}     # 5000: not in the paper's train range
    return root, samples.write_clevrer_videos(root, ids, frames=18 + 8, size=(192, 128))


@pytest.fixture(scope="module")
def phyre(tmp_path_factory):
    root = tmp_path_factory.mktemp("phyre")
    return root, samples.write_phyre(root, {"train": 2, "valid": 1, "test": 1}, frames=45)


@pytest.fixture(scope="module")
def traffic(tmp_path_factory):
    path = tmp_path_factory.mktemp("traffic") / "img128np.npy"
    return path, samples.write_traffic(path, frames=500)


# ------------------------------------------------------------------------------------ OBJ3D
def test_obj3d_windows_episodes_and_frame_order(obj3d):
    root, eps = obj3d
    c = cfg("obj3d128", timestep_horizon=10)
    train = build_dataset(c, "train", root)
    assert len(train) == 2 * (12 - 11 + 1)                             # sliding windows, stride 1
    for i in range(len(train)):
        item = train[i]
        e, s = divmod(i, 2)
        assert item["frames"].dtype == torch.float32 and item["frames"].shape == (11, 3, 128, 128)
        assert item["window"].tolist() == [e, s]
        # RGBA test_1..test_12.png in numeric order (test_10 after test_9), alpha dropped, no resize at 128
        torch.testing.assert_close(item["frames"], as_float(eps["train"][e][s:s + 11]), rtol=0, atol=0)
    val = build_dataset(c, "valid", root)                               # 'valid' is an alias of 'val'
    assert len(val) == 1
    torch.testing.assert_close(val[0]["frames"], as_float(eps["val"][0]), rtol=0, atol=0)
    assert build_dataset(c, "test", root)[0]["frames"].shape == (12, 3, 128, 128)


def test_obj3d_64_resizes_bicubic_and_image_presets_yield_frames(obj3d):
    root, eps = obj3d
    x = build_dataset(cfg("obj3d", timestep_horizon=3), "val", root)[0]["frames"]
    ref = np.stack([np.asarray(Image.fromarray(f).convert("RGBA").resize((64, 64), Image.BICUBIC))[..., :3]
                    for f in eps["val"][0]])
    torch.testing.assert_close(x, as_float(ref), rtol=0, atol=0)
    for split, n in (("train", 24), ("val", 12)):
        ds = build_dataset(cfg("obj3d128_img"), split, root)            # DLP: every frame, single images
        assert len(ds) == n and ds[n - 1]["frames"].shape == (3, 128, 128)
        torch.testing.assert_close(ds[13 % n]["frames"], as_float(eps[split][(13 % n) // 12])[(13 % n) % 12])


# ------------------------------------------------------------------------------------ CLEVRER
def test_clevrer_videos_trimmed_resized_and_split_by_id(clevrer, tmp_path):
    root, eps = clevrer
    c = cfg("clevrer", timestep_horizon=3, data_episode_len=8)
    train, val, test = (build_dataset(c, s, root) for s in ("train", "val", "test"))
    assert len(train) == 2 * (8 - 4 + 1) and len(val) == len(test) == 1   # video 5000 is not a train video
    clip = val[0]["frames"]
    assert clip.shape == (8, 3, 128, 128) and 0 <= clip.min() and clip.max() <= 1
    # the background grey level encodes the frame number: frame 0 is the video's frame 18
    levels = clip[:, :, :4, :4].mean((1, 2, 3)) * 255
    expected = torch.tensor([(8 + 6 * t) % 200 for t in range(18, 26)], dtype=torch.float32)
    assert (levels - expected).abs().max() < 4
    # area resize from 192x128 to 128x128 of the decoded video frames
    ref = np.asarray(Image.fromarray(eps["val"][0][20]).resize((128, 128), Image.BOX))
    assert (clip[2] - as_float(ref[None])[0]).abs().mean() < 0.03
    assert train[5]["window"].tolist() == [1, 0]


def test_clevrer_cache_and_too_short_videos(clevrer, tmp_path):
    root, _ = clevrer
    plain = build_dataset(cfg("clevrer", timestep_horizon=3, data_episode_len=8), "train", root)[3]
    cached = build_dataset(cfg("clevrer", timestep_horizon=3, data_episode_len=8, data_cache=str(tmp_path)),
                           "train", root)
    assert torch.equal(cached[3]["frames"], plain["frames"]) and len(list(tmp_path.glob("*.npy"))) == 1
    assert torch.equal(cached[3]["frames"], plain["frames"])          # now memory-mapped from the cache
    long = build_dataset(cfg("clevrer", timestep_horizon=3, data_episode_len=20), "val", root)
    with pytest.raises(ClipError, match=r"video_10000\.mp4.*has 26 frames.*needs at least 38"):
        long[0]


def test_clevrer_preprocessed_frames(tmp_path):
    eps = samples.write_clevrer_frames(tmp_path, {"train": 1, "valid": 1, "test": 1}, frames=6)
    ds = build_dataset(cfg("clevrer", timestep_horizon=2), "val", tmp_path)
    torch.testing.assert_close(ds[0]["frames"], as_float(eps["valid"][0]), rtol=0, atol=0)


# ------------------------------------------------------------------------------------ PHYRE
def test_phyre_inverts_keeps_channel_order_cuts_and_pads(phyre):
    root, eps = phyre
    c = cfg("phyre", timestep_horizon=3)
    val = build_dataset(c, "val", root)[0]["frames"]
    assert val.shape == (100, 3, 128, 128)
    stored = eps["valid"][0][..., ::-1]                                 # the files hold B, G, R
    real = 45 - 30                                                      # the last 30 frames are idle
    torch.testing.assert_close(val[:real], 1 - as_float(stored[:real]), rtol=0, atol=0)
    assert torch.equal(val[real:], val[real - 1:real].expand(100 - real, -1, -1, -1))   # padding
    assert val[0, :, 0, 0].tolist() == [0, 0, 0]                        # white background -> black
    train = build_dataset(c, "train", root)
    assert len(train) == 2 * (100 - 4 + 1)
    assert train[0]["window"].tolist() == [0, 0] and train[11]["window"].tolist() == [0, 11]
    assert train[50]["window"].tolist() == [0, real - 4]                # moved back to end at the real length
    stored_train = eps["train"][0][..., ::-1]
    torch.testing.assert_close(train[50]["frames"], 1 - as_float(stored_train[real - 4:real]), rtol=0, atol=0)
    long = build_dataset(cfg("phyre", timestep_horizon=19), "train", root)[0]
    assert long["window"].tolist() == [0, 0] and long["frames"].shape[0] == 20
    assert torch.equal(long["frames"][real:], long["frames"][real - 1:real].expand(20 - real, -1, -1, -1))
    img = build_dataset(cfg("phyre", model="dlp"), "train", root)
    assert len(img) == 200 and img[99]["frames"].shape == (3, 128, 128)


def test_phyre_observation_conversion_matches_the_published_writer():
    from ddlp.data.phyre import COLOURS, observation_to_stored
    obs = np.zeros((256, 256), np.int64)
    obs[:2, :2] = 1                                                     # red, at the bottom (y up)
    obs[254:, 254:] = 3                                                 # blue, top right
    obs[100, 100:102] = 2                                               # half a 2x2 block green
    out = observation_to_stored(obs)
    assert out.shape == (128, 128, 3) and out.dtype == np.uint8
    assert out[127, 0].tolist() == COLOURS[1][::-1].tolist()           # flipped upright, R and B swapped
    assert out[0, 127].tolist() == COLOURS[3][::-1].tolist()
    mix = ((2 * COLOURS[2].astype(int) + 2 * 255 + 2) // 4)[::-1]
    assert out[127 - 50, 50].tolist() == mix.tolist()                  # 2x2 mean of the 256 px frame


def test_phyre_too_short_episode(tmp_path):
    samples.write_phyre(tmp_path, {"train": 1, "valid": 1, "test": 1}, frames=30, size=32)
    with pytest.raises(ClipError, match=r"00000: 30 frames.*at least 31"):
        build_dataset(cfg("phyre", timestep_horizon=3), "train", tmp_path)


# ------------------------------------------------------------------------------------ Traffic
def test_traffic_splits_windows_and_episodes(traffic):
    path, frames = traffic
    c = cfg("traffic", timestep_horizon=10)
    train = build_dataset(c, "train", path.parent)                      # the folder or the file itself
    assert len(train) == 400
    assert train[7]["window"].tolist() == [0, 7]
    torch.testing.assert_close(train[45]["frames"], as_float(frames[45:56]), rtol=0, atol=0)  # crosses 50
    assert train[399]["window"].tolist() == [0, 389] and torch.equal(train[399]["frames"], train[389]["frames"])
    val, test = build_dataset(c, "val", path), build_dataset(c, "test", path)
    assert len(val) == len(test) == 1 and val[0]["frames"].shape == (50, 3, 128, 128)
    torch.testing.assert_close(val[0]["frames"], as_float(frames[400:450]), rtol=0, atol=0)
    torch.testing.assert_close(test[0]["frames"], as_float(frames[450:500]), rtol=0, atol=0)
    img = build_dataset(cfg("traffic_img"), "test", path)
    assert len(img) == 50 and img[3]["frames"].shape == (3, 128, 128)


def test_traffic_empty_split(tmp_path):
    np.save(tmp_path / "img128np.npy", np.zeros((100, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match=r"img128np\.npy: the val split would be empty \(10 of 100 frames"):
        build_dataset(cfg("traffic"), "val", tmp_path)


# ------------------------------------------------------------------------------------ Shapes
def test_shapes_seeded_cyan_image_only():
    c = cfg("shapes")
    train, val = build_dataset(c, "train"), build_dataset(c, "val")
    assert len(train) == 40_000 and len(val) == 2_000
    x = val[5]["frames"]
    assert x.shape == (3, 64, 64) and torch.equal(x, build_dataset(c, "val")[5]["frames"])   # reproducible
    assert not torch.equal(x, train[5]["frames"])
    cyan = (x == torch.tensor([0.0, 1.0, 1.0])[:, None, None]).all(0)
    assert 0.5 < cyan.float().mean() < 0.99                               # background with some shapes
    assert x[:, ~cyan].max() <= 200 / 255
    with pytest.raises(ValueError, match="image dataset"):
        build_dataset(cfg("balls_small", ds="shapes"), "train")


# ------------------------------------------------------------------------------------ custom
def write_episode_folders(root, n, frames=10, size=32, name="frame_{k}.png"):
    eps = []
    for e in range(n):
        clip = samples.episode(frames, size, seed=e)
        (root / f"ep{e}").mkdir(parents=True)
        for k, f in enumerate(clip):
            Image.fromarray(f).save(root / f"ep{e}" / name.format(k=k))
        eps.append(clip)
    return eps


def test_custom_episode_folders_split_by_fractions(tmp_path):
    eps = write_episode_folders(tmp_path, 10, frames=12)
    c = cfg(timestep_horizon=3, data_frame_size=32, image_size=64)
    train, val, test = (build_dataset(c, s, tmp_path, name="custom") for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (8 * 9, 1, 1)
    assert train[10]["frames"].shape == (4, 3, 32, 32)                  # data_frame_size wins
    torch.testing.assert_close(train[10]["frames"], as_float(eps[1][1:5]), rtol=0, atol=0)   # frame_10 after frame_9
    torch.testing.assert_close(val[0]["frames"], as_float(eps[8]), rtol=0, atol=0)
    torch.testing.assert_close(test[0]["frames"], as_float(eps[9]), rtol=0, atol=0)
    c2 = cfg(timestep_horizon=3, data_split=[0.5, 0.2, 0.3])
    assert [len(build_dataset(c2, s, tmp_path, name="custom")) for s in ("val", "test")] == [2, 3]
    assert build_dataset(c2, "val", tmp_path, name="custom")[0]["frames"].shape == (12, 3, 64, 64)


def test_custom_arrays_hdf5_and_long_sequences(tmp_path):
    eps = np.stack([samples.episode(9, 16, seed=s) for s in range(5)])            # [N, T, H, W, 3]
    np.save(tmp_path / "u8.npy", eps)
    np.save(tmp_path / "f32.npy", eps.transpose(0, 1, 4, 2, 3).astype(np.float32) / 255)   # channel-first float
    dark = eps.astype(np.float32)                                       # floats in [0, 255] ...
    dark[3] = np.minimum(dark[3], 1)                                    # ... with an episode of values <= 1
    np.save(tmp_path / "f255.npy", dark)
    np.savez(tmp_path / "z.npz", frames=eps)
    with h5py.File(tmp_path / "v.h5", "w") as f:
        f["meta/frames"] = eps
    c = cfg(timestep_horizon=2, data_frame_size=16, data_split=[0.6, 0.2, 0.2])
    for name in ("u8.npy", "f32.npy", "z.npz", "v.h5"):
        val = build_dataset(c, "val", tmp_path / name, name="custom")
        assert len(val) == 1, name
        torch.testing.assert_close(val[0]["frames"], as_float(eps[3]), rtol=0, atol=0)
        assert len(build_dataset(c, "train", tmp_path / name, name="custom")) == 3 * 7
    val = build_dataset(c, "val", tmp_path / "f255.npy", name="custom")[0]["frames"]
    torch.testing.assert_close(val, as_float(np.minimum(eps[3], 1)), rtol=0, atol=0)   # not scaled by 255
    long = eps.reshape(45, 16, 16, 3)                                   # one sequence of 45 frames
    np.save(tmp_path / "long.npy", long)
    c = cfg(timestep_horizon=2, data_frame_size=16, data_episode_len=9)
    test = build_dataset(c, "test", tmp_path / "long.npy", name="custom")
    torch.testing.assert_close(test[0]["frames"], as_float(long[36:45]), rtol=0, atol=0)
    ds = build_dataset(cfg(timestep_horizon=2, data_frame_size=16), "train", tmp_path / "v.h5", name="custom")
    again = pickle.loads(pickle.dumps(ds))                              # DataLoader workers reopen the file
    assert torch.equal(again[4]["frames"], ds[4]["frames"])


def test_custom_split_folders_and_videos(tmp_path):
    for split, n in (("train", 2), ("valid", 1), ("test", 1)):
        for e in range(n):
            ext = ".gif" if e else ".mp4"
            samples.write_video(tmp_path / split / f"clip{e}{ext}", samples.episode(7, 32, seed=e, ramp=True))
    c = cfg(timestep_horizon=3, data_frame_size=32)
    train = build_dataset(c, "train", tmp_path, name="custom")
    assert len(train) == 2 * 4                                          # lengths counted from the videos
    x = build_dataset(c, "val", tmp_path, name="custom")[0]["frames"]
    assert x.shape == (7, 3, 32, 32)
    levels = x[:, :, :3, :3].mean((1, 2, 3)) * 255                      # frame order kept through the codec
    assert (levels.diff() > 0).all() and (levels - torch.tensor([8.0 + 6 * t for t in range(7)])).abs().max() < 8
    (tmp_path / "partial" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="partial: has a train entry but no val or valid"):
        build_dataset(c, "val", tmp_path / "partial", name="custom")


def test_custom_bad_input_names_the_file(tmp_path):
    c = cfg(timestep_horizon=3)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_dataset(c, "train", tmp_path / "nowhere", name="custom")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ClipError, match="empty.*empty folder"):
        build_dataset(c, "train", tmp_path / "empty", name="custom")
    root = tmp_path / "eps"
    write_episode_folders(root, 4, frames=6)
    (root / "ep4").mkdir()
    with pytest.raises(ClipError, match=r"ep4: empty episode folder"):
        build_dataset(c, "train", root, name="custom")
    (root / "ep4").rmdir()
    Image.new("RGB", (20, 32)).save(root / "ep1" / "frame_3.png")       # a frame of another size
    (root / "ep2" / "frame_4.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")  # a corrupt PNG
    ds = build_dataset(cfg(timestep_horizon=1, data_split=[0.5, 0.25, 0.25]), "train", root, name="custom")
    with pytest.raises(ClipError, match=r"ep1/frame_3\.png: frame of 20x32 px in an episode of 32x32"):
        ds[5 + 2]
    ds = build_dataset(cfg(timestep_horizon=1, data_split=[0.5, 0.25, 0.25]), "val", root, name="custom")
    with pytest.raises(ClipError, match=r"ep2/frame_4\.png: cannot read image"):
        ds[0]
    with pytest.raises(ClipError, match=r"ep0: 6 frames, fewer than the 8 needed for a training clip"):
        build_dataset(cfg(timestep_horizon=7), "train", root, name="custom")
    with pytest.raises(ValueError, match=r"the test split would be empty: 4 episodes.*train/val/test = 4/0/0"):
        build_dataset(cfg(data_split=[1.0, 0.0, 0.0]), "test", root, name="custom")
    (tmp_path / "bad.mp4").write_bytes(b"not a video at all")
    with pytest.raises(ClipError, match=r"bad\.mp4: cannot decode video"):
        build_dataset(c, "train", tmp_path / "bad.mp4", name="custom")
    with pytest.raises(ValueError, match="data_split must be three fractions"):
        build_dataset(cfg(data_split=[0.5, 0.5]), "train", root, name="custom")


def test_official_loaders_name_missing_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="OBJ3D folder not found"):
        build_dataset(cfg("obj3d"), "train", tmp_path / "missing")
    (tmp_path / "train").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no 'val' or 'valid' folder"):
        build_dataset(cfg("obj3d"), "val", tmp_path)
    with pytest.raises(ClipError, match="no episode folders"):
        build_dataset(cfg("phyre"), "train", tmp_path)
    with pytest.raises(FileNotFoundError, match="neither CLEVRER videos"):
        build_dataset(cfg("clevrer"), "train", tmp_path / "train")


# ------------------------------------------------------------------------------------ registry
def test_a_new_dataset_is_a_small_class_and_one_line(tmp_path):
    from ddlp.data.trees import FrameTree

    class Mine(FrameTree):
        frame_glob, size, title = "f*.png", 16, "mine"

    register("mine_for_test", Mine)
    samples.write_frame_tree(tmp_path, {"train": 1}, frames=5, size=16, name="f{k}.png")
    assert "mine_for_test" in available()
    ds = build_dataset(cfg(timestep_horizon=2), "train", tmp_path, name="mine_for_test")
    assert len(ds) == 3 and ds[2]["frames"].shape == (3, 3, 16, 16)
    with pytest.raises(ValueError, match="unknown dataset 'nope'; available: .*custom"):
        build_dataset(cfg(), "train", tmp_path, name="nope")


def test_decoding_runs_in_dataloader_workers(obj3d):
    root, eps = obj3d
    ds = build_dataset(cfg("obj3d128", timestep_horizon=10), "train", root)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=1)
    batch = next(iter(loader))
    assert batch["frames"].shape == (2, 11, 3, 128, 128)
    torch.testing.assert_close(batch["frames"][1], ds[1]["frames"], rtol=0, atol=0)


def test_a_bad_frame_in_a_worker_is_still_one_line(tmp_path):
    samples.write_obj3d(tmp_path, {"train": 1, "val": 1, "test": 1}, frames=5, size=32)
    (tmp_path / "train" / "0" / "test_3.png").write_bytes(b"garbage")
    ds = build_dataset(cfg("obj3d", timestep_horizon=3), "train", tmp_path)
    with pytest.raises(ClipError) as err:
        next(iter(torch.utils.data.DataLoader(ds, batch_size=2, num_workers=1)))
    assert str(err.value).startswith(f"{tmp_path}/train/0/test_3.png: cannot read image") and "\n" not in str(err.value)


def test_custom_reads_the_gswm_balls_layout(tmp_path):
    from ddlp.data.balls import BallsDataset, write_balls
    write_balls(tmp_path, {"train": 1, "val": 1, "test": 1}, seqlen=8, progress=False)
    x = build_dataset(cfg(timestep_horizon=3), "val", tmp_path, name="custom")[0]["frames"]
    assert torch.equal(x, BallsDataset(tmp_path, "val")[0]["frames"])
