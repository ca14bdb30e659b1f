"""Input-pipeline throughput: training clips per second for each dataset loader.

    python benchmarks/data_loading.py [--loaders obj3d128 clevrer ...] [--workers 2] [--batch 4]
                                      [--seconds 3] [--root DIR] [--json out.json]

Without --root, small trees in each published format are generated in a temporary folder
(100-frame episodes, official frame sizes; CLEVRER as 480x320 MP4 videos). With --root DIR, DIR/<loader>
is used where it exists (e.g. real downloads), generated data elsewhere. Every loader yields training
clips of timestep_horizon + 1 = 11 frames (the preset's image size), through a shuffled DataLoader with
--workers processes; the first batch (worker start-up) is not timed. Compare the numbers with the
model's training speed (benchmarks/train_step.py): the pipeline should deliver clips faster than the
model consumes them.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

# loader name: (preset, dataset name, extra config keys, data folder below the root)
LOADERS = {
    "balls": ("balls", "balls", {}, "balls"),
    "obj3d": ("obj3d", "obj3d", {}, "obj3d"),
    "obj3d128": ("obj3d128", "obj3d128", {}, "obj3d"),
    "clevrer-frames": ("clevrer", "clevrer", {}, "clevrer_frames"),
    "clevrer-mp4": ("clevrer", "clevrer", {}, "clevrer"),
    "clevrer-mp4-cached": ("clevrer", "clevrer", {"data_cache": "CACHE"}, "clevrer"),
    "phyre": ("phyre", "phyre", {}, "phyre"),
    "traffic": ("traffic", "traffic", {}, "traffic"),
    "shapes (images)": ("shapes", "shapes", {}, None),
    "custom-npy": ("obj3d128", "custom", {}, "custom.npy"),
    "custom-hdf5": ("obj3d128", "custom", {}, "custom.h5"),
    "custom-mp4": ("obj3d128", "custom", {"data_episode_len": 100}, "custom_videos"),
}


def generate(root: Path, name: str) -> None:
    """Write the data `name` needs below root (a few 100-frame episodes in its published format)."""
    import h5py

    from ddlp.data import samples
    from ddlp.data.balls import write_balls
    folder = LOADERS[name][3]
    if folder is None or (root / folder).exists():
        return
    if folder == "balls":
        write_balls(root / folder, {"train": 4, "val": 1, "test": 1}, progress=False)
    elif folder == "obj3d":
        samples.write_obj3d(root / folder, {"train": 3, "val": 1, "test": 1})
    elif folder == "clevrer_frames":
        samples.write_clevrer_frames(root / folder, {"train": 3, "valid": 1, "test": 1})
    elif folder == "clevrer":
        samples.write_clevrer_videos(root / folder, {"train": [0, 1, 2], "val": [10000], "test": [11000]})
    elif folder == "phyre":
        samples.write_phyre(root / folder, {"train": 3, "valid": 1, "test": 1})
    elif folder == "traffic":
        samples.write_traffic(root / folder / "img128np.npy", frames=2000)
    elif folder in ("custom.npy", "custom.h5"):
        eps = np.stack([samples.episode(100, 128, seed=s) for s in range(6)])
        if folder.endswith(".npy"):
            np.save(root / folder, eps)
        else:
            with h5py.File(root / folder, "w") as f:
                f["frames"] = eps
    elif folder == "custom_videos":
        for s in range(6):
            samples.write_video(root / folder / f"clip{s}.mp4", samples.episode(100, 128, seed=s))


def measure(name: str, root: Path, workers: int, batch: int, seconds: float, cache: Path) -> dict:
    import torch
    from torch.utils.data import DataLoader

    from ddlp.config import Config
    from ddlp.data.registry import build_dataset
    preset, ds_name, extra, folder = LOADERS[name]
    extra = {k: (str(cache) if v == "CACHE" else v) for k, v in extra.items()}
    config = Config.preset(preset, timestep_horizon=10, **extra)
    ds = build_dataset(config, "train", root / folder if folder else None, name=ds_name)
    loader = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                        persistent_workers=workers > 0, generator=torch.Generator().manual_seed(0))
    clips, shape, t0, passes = 0, None, None, 0
    while t0 is None or time.perf_counter() - t0 < seconds:
        passes += 1
        for i, b in enumerate(loader):
            if t0 is None:                                      # the first batch pays for worker start-up
                t0, shape = time.perf_counter(), tuple(b["frames"].shape[1:])
                continue
            clips += len(b["frames"])
            if time.perf_counter() - t0 >= seconds:
                break
        if passes > 50:
            break
    dt = time.perf_counter() - t0
    return dict(loader=name, dataset=ds_name, items=len(ds), item_shape=list(shape), workers=workers, batch=batch,
                clips_per_s=clips / dt, frames_per_s=clips * (shape[0] if len(shape) == 4 else 1) / dt)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--loaders", nargs="+", default=list(LOADERS), choices=list(LOADERS), metavar="NAME",
                    help="loaders to time: " + ", ".join(LOADERS))
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers (default 2)")
    ap.add_argument("--batch", type=int, default=4, help="clips per batch (default 4)")
    ap.add_argument("--seconds", type=float, default=3.0, help="timed seconds per loader (default 3)")
    ap.add_argument("--root", help="data folder with real data in <loader> sub-folders (default: generated)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    import torch
    with tempfile.TemporaryDirectory(prefix="ddlp-bench-") as tmp:
        gen_root, cache = Path(tmp) / "data", Path(tmp) / "cache"
        results = []
        print(f"{'loader':<20} {'items':>7} {'item shape':<18} {'clips/s':>9} {'frames/s':>9}")
        for name in args.loaders:
            folder = LOADERS[name][3]
            root = Path(args.root) if args.root and folder and (Path(args.root) / folder).exists() else gen_root
            if root == gen_root:
                generate(gen_root, name)
            if name.endswith("-cached"):                        # fill the cache first: time the warm cache
                _fill(name, root, cache)
            r = measure(name, root, args.workers, args.batch, args.seconds, cache)
            results.append(r)
            print(f"{name:<20} {r['items']:>7} {'x'.join(map(str, r['item_shape'])):<18} "
                  f"{r['clips_per_s']:>9.1f} {r['frames_per_s']:>9.0f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(machine=platform.platform(), torch=torch.__version__,
                                                   threads=torch.get_num_threads(), results=results), indent=2))


def _fill(name: str, root: Path, cache: Path) -> None:
    """Decode every training episode once into the cache."""
    from ddlp.config import Config
    from ddlp.data.registry import build_dataset
    preset, ds_name, _, folder = LOADERS[name]
    ds = build_dataset(Config.preset(preset, timestep_horizon=10, data_cache=str(cache)), "train", root / folder,
                       name=ds_name)
    for e in range(len(ds.source)):
        ds.source.read(e, 0, 1)


if __name__ == "__main__":
    main()
