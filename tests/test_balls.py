"""Balls-Interaction: physics rules, renderer geometry, HDF5 layout and the loader's contract."""
import pickle

import h5py
import numpy as np
import pytest
import torch

from ddlp.data import balls
from ddlp.data.balls import BallsDataset, generate_split, render, simulate, simulate_episode, write_balls

T = 12                                                     # short episodes keep the file fast


@pytest.fixture(scope="module")
def episodes():
    """Ten 100-frame trajectories (physics only, cheap)."""
    return [simulate_episode(np.random.RandomState(s)) for s in range(10)]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    out = tmp_path_factory.mktemp("balls")
    write_balls(out, {"train": 2, "val": 1, "test": 1}, seqlen=T, progress=False)
    return out


def _pairwise_dist(pos):
    d = np.linalg.norm(pos[..., :, None, :] - pos[..., None, :, :], axis=-1)
    return d + np.where(np.eye(pos.shape[-2], dtype=bool), np.inf, 0)


# ---------------------------------------------------------------- physics

def test_initial_state_speed_and_spacing(episodes):
    for ep in episodes:
        np.testing.assert_allclose(np.linalg.norm(ep["velocities"][0], axis=-1), 3.0, rtol=1e-13)
        assert _pairwise_dist(ep["positions"][0]).min() >= 16
        assert set(map(tuple, ep["colors"] * 255)) <= set(balls.COLOURS.values())


def test_random_draw_order_matches_gswm():
    """choice(colour names) -> randn(3, 2) -> uniform(8, 56, 2) per ball, on the episode's RandomState."""
    for seed in range(5):
        rng = np.random.RandomState(seed)
        names = rng.choice(["blue", "red", "yellow", "fuchsia", "aqua"], 3)
        vel = rng.randn(3, 2)
        first = rng.uniform(low=8, high=56, size=2)
        ep = simulate_episode(np.random.RandomState(seed), seqlen=1)
        np.testing.assert_array_equal(ep["colors"] * 255, [balls.COLOURS[str(n)] for n in names])
        np.testing.assert_allclose(ep["velocities"][0], 3 * vel / np.linalg.norm(vel, axis=1, keepdims=True),
                                   rtol=1e-15)
        np.testing.assert_array_equal(ep["positions"][0, 0], first)       # ball 0 is never rejected


def test_energy_conserved_and_collisions_happen(episodes):
    vel = np.stack([ep["velocities"] for ep in episodes])             # [E, T, O, 2]
    energy = (vel ** 2).sum(axis=(-1, -2))
    np.testing.assert_allclose(energy, np.broadcast_to(energy[:, :1], energy.shape), rtol=1e-9)
    speeds = np.linalg.norm(vel, axis=-1)
    assert np.abs(speeds - 3).max() > 0.5                              # collisions exchanged momentum


def test_walls_keep_centres_inside(episodes):
    pos = np.stack([ep["positions"] for ep in episodes])
    # A sub-step can overshoot by at most eps * max speed = 0.1 * 3 * sqrt(3).
    assert pos.min() >= 8 - 0.52 and pos.max() <= 56 + 0.52
    assert pos.min() < 8.5 and pos.max() > 55.5                        # the walls were actually hit


def test_head_on_collision_exchanges_velocities():
    # Centres 20 px apart closing at 0.6 px per sub-step: the 7th tentative step is at 15.8 < 16.
    p, v = simulate(np.array([[[20.0, 32.0], [40.0, 32.0]]]), np.array([[[3.0, 0.0], [-3.0, 0.0]]]), seqlen=3)
    np.testing.assert_array_equal(v[0, 1:], [[[-3.0, 0.0], [3.0, 0.0]]] * 2)
    np.testing.assert_allclose(p[0, 1], [[20.6, 32.0], [39.4, 32.0]], atol=1e-12)


def test_wall_bounce_reflects_velocity():
    # x: 9 -> 8.1 in three sub-steps; the 4th would reach 7.8 < 8, so v_x flips and x climbs to 10.2.
    p, v = simulate(np.array([[[9.0, 30.0]]]), np.array([[[-3.0, 1.0]]]), seqlen=2)
    np.testing.assert_array_equal(v[0, 1, 0], [3.0, 1.0])
    np.testing.assert_allclose(p[0, 1, 0], [10.2, 31.0], atol=1e-12)


def _reference_rollout(pos, vel, frames):
    """The spec's rules read literally: scalar loops, one ball and one pair at a time."""
    pos, vel = [list(p) for p in pos], [list(v) for v in vel]
    for _ in range(frames):
        for _ in range(10):
            for p, v in zip(pos, vel):
                for c in range(2):
                    if p[c] + 0.1 * v[c] - 8 < 0:
                        v[c] = abs(v[c])
                    if p[c] + 0.1 * v[c] + 8 > 64:
                        v[c] = -abs(v[c])
            nxt = [[p[c] + 0.1 * v[c] for c in range(2)] for p, v in zip(pos, vel)]
            for i in range(len(pos)):
                for j in range(i):
                    d = [nxt[i][c] - nxt[j][c] for c in range(2)]
                    dist2 = d[0] ** 2 + d[1] ** 2
                    if dist2 < 16 ** 2:
                        n = [dc / dist2 ** 0.5 for dc in d]
                        ni = n[0] * vel[i][0] + n[1] * vel[i][1]
                        nj = n[0] * vel[j][0] + n[1] * vel[j][1]
                        vel[i] = [vel[i][c] + n[c] * (nj - ni) for c in range(2)]
                        vel[j] = [vel[j][c] + n[c] * (ni - nj) for c in range(2)]
            pos = [[p[c] + 0.1 * v[c] for c in range(2)] for p, v in zip(pos, vel)]
    return np.array(pos), np.array(vel)


@pytest.mark.parametrize("seed", [None, 4])
def test_matches_literal_rules(seed):
    if seed is None:      # both pairs (1, 0) and (2, 1) collide in the first sub-step: order matters
        pos0 = np.array([[16.0, 32.0], [32.0, 32.0], [48.0, 32.0]])
        vel0 = np.array([[1.0, 0.0], [0.0, 0.0], [-1.0, 0.0]])
    else:
        ep = simulate_episode(np.random.RandomState(seed), seqlen=1)
        pos0, vel0 = ep["positions"][0], ep["velocities"][0]
    frames = 30                                                        # seed 4: collisions and bounces
    p, v = simulate(pos0[None], vel0[None], seqlen=frames + 1)
    ref_p, ref_v = _reference_rollout(pos0, vel0, frames)
    np.testing.assert_allclose(p[0, -1], ref_p, rtol=0, atol=1e-12)
    np.testing.assert_allclose(v[0, -1], ref_v, rtol=0, atol=1e-12)


def test_determinism_and_seed_rule():
    seeds = np.random.RandomState(9).randint(0, 2 ** 32 - 1, size=3)
    np.testing.assert_array_equal(balls.episode_seeds(3, 9), seeds)
    a, b = generate_split(3, 9, seqlen=T), generate_split(3, 9, seqlen=T)
    for key in balls.KEYS:
        np.testing.assert_array_equal(a[key], b[key])
    # The batched split equals episodes simulated one by one from their own seeds, bit for bit.
    for k, s in enumerate(seeds):
        ep = simulate_episode(np.random.RandomState(s), seqlen=T)
        np.testing.assert_array_equal(a["positions"][k], ep["positions"])
        np.testing.assert_array_equal(a["velocities"][k], ep["velocities"])
    c = generate_split(3, 8, seqlen=T)
    assert not np.array_equal(a["positions"], c["positions"]) and not np.array_equal(a["imgs"], c["imgs"])


def test_one_element_choice_draws_nothing():
    """Justifies omitting G-SWM's choice() calls on the mass/layer/size/shape lists."""
    rng = np.random.RandomState(3)
    before = rng.get_state()
    rng.choice([1.0], 3)
    rng.choice(["circle16"], 3)
    after = rng.get_state()
    np.testing.assert_array_equal(before[1], after[1])
    assert before[2] == after[2]


# ---------------------------------------------------------------- rendering

@pytest.mark.parametrize("x, y", [(23.3, 37.8), (8.0, 56.0), (40.71, 12.06)])
def test_single_ball_centroid_and_radius(x, y):
    img, visible = render(np.array([[x, y]]), np.ones((1, 3)))
    w = img[..., 0].astype(np.float64)
    rows, cols = np.mgrid[:64, :64]
    assert (w * cols).sum() / w.sum() == pytest.approx(x - 0.47, abs=0.02)
    assert (w * rows).sum() / w.sum() == pytest.approx(y - 0.47, abs=0.02)
    assert np.sqrt(w.sum() / 255 / np.pi) == pytest.approx(7.53, abs=0.05)
    assert img[int(y), int(x)].tolist() == [255, 255, 255] and img[0, 32].tolist() == [0, 0, 0]
    assert visible.tolist() == [True]


def test_render_matches_supersampled_composite():
    pos = np.array([[20.0, 20.0], [30.5, 24.2], [44.1, 47.3]])        # balls 0 and 1 overlap
    col = np.array([[0, 0, 1.0], [1, 0, 0], [1, 1, 0]])
    img, _ = render(pos, col)
    n = 32
    g = (np.arange(64 * n) + 0.5) / n - 0.5                             # sub-samples, pixel-centre coords
    canvas = np.zeros((64, 64, 3))
    for (x, y), c in zip(pos - 0.47, col):
        a = ((g[None] - x) ** 2 + (g[:, None] - y) ** 2 < 7.53 ** 2).reshape(64, n, 64, n).mean((1, 3))
        canvas = canvas * (1 - a[..., None]) + c * a[..., None]
    assert np.abs(img.astype(int) - (canvas * 255).astype(np.uint8)).max() <= 4
    assert img[24, 24].tolist() == [255, 0, 0]                          # the later ball is on top


# ---------------------------------------------------------------- files

def test_hdf5_layout(root):
    assert sorted(p.name for p in root.iterdir()) == ["test.hdf5", "train.hdf5", "val.hdf5", "version.txt"]
    with h5py.File(root / "train.hdf5", "r") as f:
        assert set(f.keys()) == set(balls.KEYS)
        shapes = {k: f[k].shape for k in balls.KEYS}
        assert shapes == {"imgs": (2, T, 64, 64, 3), "layers": (2, T, 3), "positions": (2, T, 3, 2),
                          "velocities": (2, T, 3, 2), "masses": (2, T, 3), "sizes": (2, T, 3),
                          "ids": (2, T, 3), "present": (2, T, 3), "colors": (2, T, 3, 3),
                          "shapes": (2, T, 3), "in_camera": (2, T, 3)}
        assert f["imgs"].dtype == np.uint8
        assert all(f[k].dtype == np.float64 for k in balls.KEYS if k != "imgs")
        assert all(f[k].chunks is None and f[k].compression is None for k in balls.KEYS)
        data = {k: f[k][()] for k in balls.KEYS}
    expected = generate_split(2, 7, seqlen=T)
    for k in balls.KEYS:
        np.testing.assert_array_equal(data[k], expected[k])
    assert (data["layers"] == 0).all() and (data["masses"] == 1).all() and (data["sizes"] == 8).all()
    assert (data["present"] == 1).all() and (data["shapes"] == 0).all() and (data["in_camera"] == 1).all()
    assert (data["ids"] == [1, 2, 3]).all()
    assert (data["colors"] == data["colors"][:, :1]).all()


def test_interrupted_write_leaves_no_file(tmp_path, monkeypatch):
    calls = []
    generate = balls.generate_episodes

    def fail_on_second_chunk(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return generate(*args, **kwargs)

    monkeypatch.setattr(balls, "generate_episodes", fail_on_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        write_balls(tmp_path, {"test": balls._CHUNK + 1}, seqlen=T, progress=False)
    assert len(calls) == 2 and list(tmp_path.iterdir()) == []


def _check_item(item, data, episode, start, length):
    imgs = data["imgs"][episode, start:start + length]
    expected = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255
    assert item["frames"].dtype == torch.float32 and item["frames"].shape == (length, 3, 64, 64)
    torch.testing.assert_close(item["frames"], expected, rtol=0, atol=0)
    px = data["positions"][episode, start:start + length]
    assert item["positions_px"].dtype == torch.float64
    np.testing.assert_array_equal(item["positions_px"].numpy(), px)
    assert item["positions"].dtype == torch.float32 and item["positions"].shape == (length, 3, 2)
    np.testing.assert_allclose(item["positions"][..., 0].numpy(), (px[..., 1] - 0.5) / 63 * 2 - 1, atol=1e-6)
    np.testing.assert_allclose(item["positions"][..., 1].numpy(), (px[..., 0] - 0.5) / 63 * 2 - 1, atol=1e-6)
    for key in ("in_camera", "ids", "sizes"):
        np.testing.assert_array_equal(item[key].numpy(), data[key][episode, start:start + length])


def test_dataset_train_windows(root):
    data = generate_split(2, 7, seqlen=T)
    ds = BallsDataset(root, "train", clip_len=5)
    assert len(ds) == 2 * (T - 5 + 1)
    _check_item(ds[0], data, 0, 0, 5)
    _check_item(ds[9], data, 1, 1, 5)
    _check_item(ds[-1], data, 1, T - 5, 5)
    with pytest.raises(IndexError):
        ds[len(ds)]
    assert len(BallsDataset(root, "train")) == 2                      # clip_len None = whole episodes


def test_dataset_val_test_whole_episodes(root):
    for split, seed in (("val", 8), ("valid", 8), ("test", 9)):
        ds = BallsDataset(root, split, clip_len=5)
        assert len(ds) == 1
        _check_item(ds[0], generate_split(1, seed, seqlen=T), 0, 0, T)


def test_dataset_image_mode_and_subfolder_root(tmp_path, root):
    (tmp_path / "BALLS_INTERACTION").symlink_to(root, target_is_directory=True)
    ds = BallsDataset(tmp_path, "train", image=True)
    assert len(ds) == 2 * T
    item = ds[T + 3]
    data = generate_split(2, 7, seqlen=T)
    assert item["frames"].shape == (3, 64, 64) and item["positions"].shape == (3, 2)
    np.testing.assert_array_equal((item["frames"] * 255).round().byte().permute(1, 2, 0).numpy(),
                                  data["imgs"][1, 3])


def test_dataset_pickles_for_workers(root):
    ds = BallsDataset(root, "train", clip_len=4)
    first = ds[3]                                                      # opens the file in this process
    clone = pickle.loads(pickle.dumps(ds))
    torch.testing.assert_close(clone[3], first)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4, num_workers=1)))
    assert batch["frames"].shape == (4, 4, 3, 64, 64)
    ds.close()


def test_gzip_compressed_original_style_file(tmp_path):
    data = generate_split(2, 9, seqlen=T)
    with h5py.File(tmp_path / "test.hdf5", "w") as f:
        for k in balls.LOADER_KEYS:
            f.create_dataset(k, data=data[k], compression="gzip", chunks=True)
    ds = BallsDataset(tmp_path, "test")
    assert len(ds) == 2
    _check_item(ds[1], data, 1, 0, T)


# ---------------------------------------------------------------- bad inputs

def _write(path, **arrays):
    with h5py.File(path, "w") as f:
        for k, v in arrays.items():
            f[k] = v


def _arrays(n=1, t=T, size=64):
    return {"imgs": np.zeros((n, t, size, size, 3), np.uint8), "positions": np.zeros((n, t, 3, 2)),
            **{k: np.zeros((n, t, 3)) for k in ("sizes", "ids", "in_camera")}}


def test_missing_folder_and_split(tmp_path):
    with pytest.raises(FileNotFoundError, match="folder not found: .*nowhere"):
        BallsDataset(tmp_path / "nowhere", "train")
    with pytest.raises(FileNotFoundError, match=r"'test' not found; looked for .*test\.hdf5"):
        BallsDataset(tmp_path, "test")
    with pytest.raises(ValueError, match="unknown Balls split 'dev'"):
        BallsDataset(tmp_path, "dev")


def test_not_hdf5(tmp_path):
    (tmp_path / "train.hdf5").write_bytes(b"this is not an HDF5 file")
    with pytest.raises(ValueError, match=r"train\.hdf5 is not a readable HDF5 file"):
        BallsDataset(tmp_path, "train")


def test_missing_keys(tmp_path):
    arrays = _arrays()
    del arrays["ids"], arrays["sizes"]
    _write(tmp_path / "val.hdf5", **arrays)
    with pytest.raises(ValueError, match=r"val\.hdf5 lacks the Balls dataset keys \['sizes', 'ids'\]"):
        BallsDataset(tmp_path, "val")


def test_wrong_image_size_and_mismatched_arrays(tmp_path):
    _write(tmp_path / "train.hdf5", **_arrays(size=32))
    with pytest.raises(ValueError, match=r"'imgs' is uint8 \(1, 12, 32, 32, 3\), expected uint8"):
        BallsDataset(tmp_path, "train")
    arrays = _arrays()
    arrays["positions"] = np.zeros((1, T - 1, 3, 2))
    _write(tmp_path / "test.hdf5", **arrays)
    with pytest.raises(ValueError, match=r"do not fit 'imgs' .*'positions': \(1, 11, 3, 2\)"):
        BallsDataset(tmp_path, "test")


def test_clip_len_too_long_and_empty_split(tmp_path, root):
    with pytest.raises(ValueError, match=rf"clip_len=13 does not fit the {T}-frame episodes of .*train\.hdf5"):
        BallsDataset(root, "train", clip_len=T + 1)
    _write(tmp_path / "test.hdf5", **_arrays(n=0))
    with pytest.raises(ValueError, match=r"test\.hdf5 holds an empty split"):
        BallsDataset(tmp_path, "test")
