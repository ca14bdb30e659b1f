"""`data.reader.read_clip`: one clip from every format the dataset loaders read, the same frames
whichever way they are stored, and errors that say what was found."""
import h5py
import imageio.v3 as iio
import numpy as np
import pytest
import torch
from PIL import Image

from ddlp.cli import main
from ddlp.data.balls import BallsDataset, write_balls
from ddlp.data.clips import ClipError
from ddlp.data.reader import read_clip

RNG = np.random.default_rng(0)
EPISODES = RNG.integers(0, 256, (3, 5, 16, 16, 3), dtype=np.uint8)      # [N, T, H, W, C]


def as_float(frames: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("reader")
    with h5py.File(root / "eps.hdf5", "w") as f:
        f["video"] = EPISODES
    np.savez(root / "eps.npz", frames=EPISODES)
    np.save(root / "one.npy", EPISODES[1])
    folder = root / "frames"
    folder.mkdir()
    for t, frame in enumerate(EPISODES[2]):
        Image.fromarray(frame).save(folder / f"{t}.png")
    iio.imwrite(root / "clip.gif", EPISODES[0], duration=100, loop=0)
    return root


@pytest.mark.parametrize("name,episode,expected", [("eps.hdf5", 2, 2), ("eps.hdf5", None, 0), ("eps.npz", 1, 1),
                                                   ("one.npy", None, 1), ("frames", None, 2), ("frames/3.png", None, 2)])
def test_every_format_gives_the_stored_frames(files, name, episode, expected):
    x = read_clip(files / name, episode=episode)
    want = as_float(EPISODES[expected])
    if name.endswith(".png"):
        want = want[3:4]
    assert x.shape == want.shape and x.dtype == torch.float32
    assert torch.equal(x, want)


def test_gif_and_resize(files):
    x = read_clip(files / "clip.gif", size=8)
    assert x.shape == (5, 3, 8, 8) and 0 <= x.min() and x.max() <= 1
    assert (read_clip(files / "clip.gif") - as_float(EPISODES[0])).abs().mean() < 0.1   # GIF palette


def test_a_balls_dataset_folder_by_split_and_episode(tmp_path):
    write_balls(tmp_path, episodes={"train": 1, "val": 1, "test": 2}, seqlen=6, progress=False)
    test = BallsDataset(tmp_path, "test")
    assert torch.equal(read_clip(tmp_path, episode=1), test[1]["frames"])
    assert torch.equal(read_clip(tmp_path / "test.hdf5", episode=1), test[1]["frames"])
    assert torch.equal(read_clip(tmp_path, split="valid"), BallsDataset(tmp_path, "val")[0]["frames"])


def test_errors_say_what_was_found(files, tmp_path):
    with pytest.raises(ClipError, match=r"eps\.hdf5: there is no episode 3 \(array eps\.hdf5: 3 episodes, numbered 0-2\)"):
        read_clip(files / "eps.hdf5", episode=3)
    with pytest.raises(ClipError, match=r"clip\.gif: holds one clip, so there is no episode 1"):
        read_clip(files / "clip.gif", episode=1)
    with pytest.raises(ClipError, match=r"frames: there is no episode 1 \(one sequence of 5 frames: 1 episode"):
        read_clip(files / "frames", episode=1)
    with pytest.raises(ValueError, match="episode index must be >= 0"):
        read_clip(files / "eps.hdf5", episode=-1)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ClipError, match=r"notes\.txt: not a dataset file; use a folder, a video, \.npy/\.npz or \.h5/\.hdf5"):
        read_clip(tmp_path / "notes.txt")
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        read_clip(tmp_path / "missing.hdf5")
    (tmp_path / "train.hdf5").write_bytes(b"")
    with pytest.raises(ClipError, match=r"no test split \(it has train\)"):
        read_clip(tmp_path)


def test_training_on_a_balls_file_instead_of_its_folder_is_explained(tmp_path, capsys):
    write_balls(tmp_path, episodes={"train": 1, "val": 1, "test": 1}, seqlen=8, progress=False)
    assert main(["train", "--preset", "balls_small", "--data.root", str(tmp_path / "train.hdf5"),
                 "--run-dir", str(tmp_path / "run"), "--max-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "train.hdf5 is a file; the Balls dataset root is the folder that holds train.hdf5" in err
    assert f"--dataset custom --data.root {tmp_path / 'train.hdf5'}" in err
