"""Training throughput, peak memory and rollout time of the paper's presets.

    python benchmarks/train_step.py [--presets balls obj3d128] [--precision fp32 bf16] [--low-memory] [--steps 5] [--json out.json]
    python benchmarks/train_step.py --compare HEAD~3 [WORKTREE] [--rounds 3]

Each preset runs in its own process (so peak memory is its own): synthetic clips of moving
discs, the post-warm-up training regime (full reconstruction, dynamics on, all future frames
weighted), MSE reconstruction loss, Adam. Prints a table and writes a JSON.
Peak memory is taken after the training steps, as the official harness does
(`peak_memory_with_rollout_gb` also covers the evaluation forward and the rollout). The rollout
time is the faster of two 100-frame rollouts of one clip (10 conditioning frames) after a short
warm-up, the statistic of the official harness (../shared/official-bench).
CPU: peak RSS of the process; GPU: max allocated memory.

--compare runs the same measurement on two revisions (git revisions, or WORKTREE for the files
as they are now), alternating A, B, A, B, ... so that both see the same machine load, and prints
the ratios B/A of the per-revision medians over rounds.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETTINGS = {  # preset: (batch, frames per clip) as stated in docs/performance.md
    "balls": (8, 11),
    "obj3d128": (2, 11),
    "balls_small": (8, 7),
}


def run_one(preset: str, steps: int, device: str, precision: str = "fp32", low_memory: bool = False) -> dict:
    import contextlib

    import torch

    from ddlp.nn.precision import cpu_model, native_bf16

    from ddlp import Config, build_model
    from ddlp.data.synthetic import moving_discs
    from ddlp.losses import elbo

    batch, frames = SETTINGS[preset]
    cfg = Config.preset(preset, recon_loss_type="mse", timestep_horizon=frames - 1)
    model = build_model(cfg).to(device).train()
    model.low_memory = low_memory     # as `ddlp train --low-memory` sets it
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, eps=cfg.adam_eps)
    x = moving_discs(frames=frames, size=cfg.image_size, batch=batch, seed=0).to(device)
    ones = torch.ones(cfg.timestep_horizon, device=device)

    def autocast():
        if precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast("cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16)

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    times, cpu_times = [], []
    for i in range(steps + 1):                  # the first step warms up kernels/allocators
        sync()
        t, c = time.perf_counter(), time.process_time()
        with autocast():
            loss = elbo(model(x), x, cfg, discount=ones)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()
        if i:
            times.append(time.perf_counter() - t)
            cpu_times.append(time.process_time() - c)
    train_peak = (torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda")
                  else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    with torch.no_grad(), autocast():
        model.eval()
        enc_t = time.perf_counter()
        model(x, deterministic=True)
        sync()
        enc_t = time.perf_counter() - enc_t
        clip = moving_discs(frames=10, size=cfg.image_size, batch=1, seed=1).to(device)
        model.rollout(clip, steps=5, cond_steps=10)            # warm-up
        rollout_times = []
        for _ in range(2):      # the min of two, as ../shared/official-bench/bench_official.py takes
            sync()
            t = time.perf_counter()
            model.rollout(clip, steps=90, cond_steps=10)
            sync()
            rollout_times.append(time.perf_counter() - t)
        rollout_t = min(rollout_times)
    step = statistics.median(times)
    peak_all = (torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    native, evidence = native_bf16(device)
    return dict(preset=preset, batch=batch, frames=frames, device=device, threads=torch.get_num_threads(),
                precision=precision, low_memory=low_memory, cpu=cpu_model(), native_bf16=native, bf16_evidence=evidence,
                train_step_s=step, clips_per_s=batch / step, train_step_cpu_s=statistics.median(cpu_times), peak_memory_gb=train_peak,
                peak_memory_with_rollout_gb=peak_all,
                forward_s=enc_t, rollout_100_frames_s=rollout_t, torch=torch.__version__)


# CPU seconds per step are the robust figure on a shared machine with one thread (no spinning).
METRICS = ("train_step_s", "train_step_cpu_s", "peak_memory_gb", "peak_memory_with_rollout_gb", "forward_s",
           "rollout_100_frames_s")


def measure(preset: str, steps: int, device: str, src: str | None = None, precision: str = "fp32",
            low_memory: bool = False) -> dict:
    """run_one in a fresh process, importing ddlp from `src` (default: the installed one)."""
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, __file__, "--one", preset, "--steps", str(steps),
                        "--device", device, "--precision", precision] + (["--low-memory"] if low_memory else []),
                       capture_output=True, text=True, env=env)
    if r.returncode:
        sys.exit(r.stderr)
    return json.loads(r.stdout.strip().splitlines()[-1])


def checkout(rev: str, into: Path) -> str:
    """The src/ folder of a revision (WORKTREE: this checkout as it is)."""
    root = Path(__file__).resolve().parents[1]
    if rev == "WORKTREE":
        return str(root / "src")
    dest = into / rev.replace("/", "_").replace("~", "-").replace("^", "-")
    archive = subprocess.run(["git", "-C", str(root), "archive", rev, "src"], capture_output=True, check=True)
    dest.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return str(dest / "src")


def print_table(rows: list[dict]) -> None:
    print(f"{'preset':<12} {'precision':<13} {'batch x T':>9} {'step (s)':>9} {'clips/s':>8} {'peak (GB)':>9} "
          f"{'fwd (s)':>8} {'rollout100 (s)':>14}")
    for r in rows:
        mode = r.get('precision', 'fp32') + ('+lowmem' if r.get('low_memory') else '')
        print(f"{r['preset']:<12} {mode:<13} {r['batch']:>4} x {r['frames']:<3} {r['train_step_s']:>9.2f} "
              f"{r['clips_per_s']:>8.2f} {r['peak_memory_gb']:>9.2f} {r['forward_s']:>8.2f} "
              f"{r['rollout_100_frames_s']:>14.2f}")


def compare(revs: list[str], presets: list[str], steps: int, rounds: int, device: str,
            precision: str = "fp32", low_memory: bool = False) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        srcs = {rev: checkout(rev, Path(tmp)) for rev in revs}
        runs = {(rev, p): [] for rev in revs for p in presets}
        for i in range(rounds):
            for preset in presets:
                for rev in revs:
                    runs[rev, preset].append(measure(preset, steps, device, srcs[rev], precision, low_memory))
                    print(f"round {i + 1}/{rounds} {preset} {rev} {precision}: "
                          f"{runs[rev, preset][-1]['train_step_s']:.2f} s/step", file=sys.stderr)
    med = {k: {m: statistics.median(r[m] for r in v) for m in METRICS} for k, v in runs.items()}
    a, b = revs
    print(f"\n{'preset':<10} {'metric':<22} {a:>12} {b:>12} {'B/A':>7}")
    for preset in presets:
        for m in METRICS:
            x, y = med[a, preset][m], med[b, preset][m]
            print(f"{preset:<10} {m:<22} {x:>12.3f} {y:>12.3f} {y / x:>7.2f}")
    return dict(revisions=revs, rounds=rounds, precision=precision, low_memory=low_memory, medians={f"{rev}:{p}": v for (rev, p), v in med.items()},
                runs={f"{rev}:{p}": v for (rev, p), v in runs.items()})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=["balls", "obj3d128"], choices=sorted(SETTINGS))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default="benchmarks/train_step.json")
    ap.add_argument("--compare", nargs="+", metavar="REV",
                    help="two revisions to run side by side (one given: REV against WORKTREE)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds for --compare")
    ap.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16"],
                    help="fp32 and/or bf16 (torch.autocast around forward, loss and rollout); each is measured")
    ap.add_argument("--low-memory", action="store_true",
                    help="recompute the decoders' activations in backward, as `ddlp train --low-memory` does")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.steps, args.device, args.precision[0], args.low_memory)))
        return
    from ddlp.nn.precision import cpu_model, native_bf16
    native, evidence = native_bf16(args.device)
    machine = dict(machine=platform.platform(), processor=platform.processor(), cpu=cpu_model(),
                   native_bf16=native, bf16_evidence=evidence)
    print(f"{machine['cpu']}; native bf16: {'yes' if native else 'no'} ({evidence})")
    if args.compare:
        revs = args.compare + ["WORKTREE"] if len(args.compare) == 1 else args.compare
        if len(revs) != 2:
            ap.error("--compare takes one or two revisions")
        if len(args.precision) != 1:
            ap.error("--compare takes one --precision")
        result = compare(revs, args.presets, args.steps, args.rounds, args.device, args.precision[0], args.low_memory)
        out = args.json.replace(".json", "_compare.json")
    else:
        rows = [measure(preset, args.steps, args.device, precision=p, low_memory=args.low_memory) for preset in args.presets for p in args.precision]
        print_table(rows)
        result, out = dict(results=rows), args.json
    with open(out, "w") as f:
        json.dump({**machine, **result}, f, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
