"""Time to generate one 100-frame DiffuseDDLP video on the CPU, split into sampling (DDPM with
the trained 1000 steps, and DDIM with 50), PINT unroll and decoding.

    python benchmarks/diffuse_sample.py [--presets balls obj3d128] [--threads 2] [--repeats 3]

Random weights, batch 1, eval mode, torch threads = 2 by default (the setting of the official
figures quoted in issue 7). Every stage is timed `--repeats` times after a warm-up; the table
shows the fastest run (the machine may be shared) and the JSON also keeps the median. Writes
benchmarks/diffuse_sample.json unless --json says otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

# Official implementation on a 2-core CPU, batch 1, eval mode, random weights (issue 7):
# (1000 DDPM steps, PINT unroll to 100 frames, decoding 100 frames, total as measured) in seconds.
OFFICIAL = {"obj3d128": (7.6, 1.3, 6.7, 15.7), "balls": (5.6, 0.9, 0.9, 7.3)}
FAST_TARGET = {"obj3d128": 3.0, "balls": 1.5}   # issue 7's targets for the fast sampler


def _time(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def bench(preset: str, repeats: int, frames: int, ddim_steps: int) -> dict:
    import torch

    from ddlp.config import Config
    from ddlp.diffusion.denoiser import SamplingPlan
    from ddlp.diffusion.model import DiffuseDDLP, DiffusionConfig
    from ddlp.diffusion.sampler import ddim_sample, ddpm_sample
    from ddlp.diffusion.tokens import from_tokens
    from ddlp.model import DECODE_CHUNK, build_model

    @torch.no_grad()
    def decode(ddlp, particles):
        return ddlp.decode(particles, max_images=DECODE_CHUNK)

    torch.manual_seed(0)
    config = Config.preset(preset)
    ddlp = build_model(config).eval()
    model = DiffuseDDLP(DiffusionConfig.from_ddlp(config)).eval()
    g = torch.Generator().manual_seed(0)
    particles = from_tokens(model.normalizer.unnormalize(ddim_sample(model, 1, 2, generator=g)), model.layout)
    rollout = ddlp.pint.rollout(particles, frames - particles.batch_shape[1])

    # warm-up (allocator, oneDNN primitive caches), then the timed runs
    ddim_sample(model, 1, 5, generator=g)
    with torch.no_grad():
        ddlp.decode(rollout[:, :4])
    stages = {
        "ddpm_1000": lambda: ddpm_sample(model, 1, generator=g),
        f"ddim_{ddim_steps}": lambda: ddim_sample(model, 1, ddim_steps, generator=g),
        "pint_unroll": lambda: ddlp.pint.rollout(particles, frames - particles.batch_shape[1]),
        "decoding": lambda: decode(ddlp, rollout),
    }
    runs = {name: _time(fn, repeats) for name, fn in stages.items()}

    # one denoiser evaluation: the sampler's path (SamplingPlan: masks, time table and fused q/k/v
    # prepared once, inference mode) against a plain forward call of the module (masks and time
    # embedding recomputed, autograd bookkeeping)
    x = torch.randn(1, *model.token_shape)
    t = torch.tensor([500])
    with torch.inference_mode():
        plan = SamplingPlan(model.denoiser, model.schedule.steps, x)
        cached = _time(lambda: [plan(x, 500) for _ in range(50)], repeats)
    plain = _time(lambda: [model.denoiser(x, t) for _ in range(50)], repeats)

    best = {k: min(v) for k, v in runs.items()}
    s_ddpm, s_ddim = best["ddpm_1000"], best[f"ddim_{ddim_steps}"]
    u, d = best["pint_unroll"], best["decoding"]
    off = OFFICIAL.get(preset)
    return dict(
        preset=preset, frames=frames, tau=model.config.diffuse_frames, tokens=list(model.token_shape),
        denoiser_params=sum(p.numel() for p in model.denoiser.parameters()),
        seconds_best=best, seconds_median={k: statistics.median(v) for k, v in runs.items()},
        total_ddpm=s_ddpm + u + d, total_ddim=s_ddim + u + d,
        denoiser_step_ms=dict(sampler_path=min(cached) / 50 * 1e3, plain_forward=min(plain) / 50 * 1e3),
        official=None if off is None else dict(ddpm_1000=off[0], pint_unroll=off[1], decoding=off[2],
                                               total=off[3]),
        targets=None if off is None else dict(total_ddpm=off[3] / 2, total_ddim=FAST_TARGET[preset]),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=["balls", "obj3d128"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--frames", type=int, default=100)
    ap.add_argument("--ddim-steps", type=int, default=50)
    ap.add_argument("--json", default=str(Path(__file__).with_suffix(".json")))
    args = ap.parse_args()

    import torch
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    results = [bench(p, args.repeats, args.frames, args.ddim_steps) for p in args.presets]

    k = f"ddim_{args.ddim_steps}"
    print(f"DiffuseDDLP generation of one {args.frames}-frame video, batch 1, {args.threads} threads, "
          f"torch {torch.__version__}, best of {args.repeats} (load average at start {load})")
    head = f"{'preset':9s} {'DDPM-1000':>9s} {k.upper().replace('_', '-'):>9s} {'unroll':>7s} {'decode':>7s} " \
           f"{'total DDPM':>10s} {'total DDIM':>10s} {'step ms':>8s} {'plain ms':>8s}"
    print(head)
    for r in results:
        b = r["seconds_best"]
        print(f"{r['preset']:9s} {b['ddpm_1000']:9.2f} {b[k]:9.2f} {b['pint_unroll']:7.2f} {b['decoding']:7.2f} "
              f"{r['total_ddpm']:10.2f} {r['total_ddim']:10.2f} {r['denoiser_step_ms']['sampler_path']:8.2f} "
              f"{r['denoiser_step_ms']['plain_forward']:8.2f}")
        if r["official"]:
            o, t = r["official"], r["targets"]
            print(f"{'  official':9s} {o['ddpm_1000']:9.2f} {'':9s} {o['pint_unroll']:7.2f} {o['decoding']:7.2f} "
                  f"{o['total']:10.2f}   targets: DDPM total <= {t['total_ddpm']:.2f}, "
                  f"DDIM total <= {t['total_ddim']:.2f}")
    record = dict(machine=platform.processor() or platform.machine(), cpus=os.cpu_count(), threads=args.threads,
                  torch=torch.__version__, load_average=load, repeats=args.repeats, results=results,
                  date=time.strftime("%Y-%m-%d %H:%M"))
    tmp = Path(args.json + ".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, args.json)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
