"""Parity checker against fixtures produced by the official implementation.

    python -m ddlp.parity FIXTURE [FIXTURE ...] [--atol 1e-4] [--rtol-loss 1e-4]
    python -m ddlp.parity FIXTURE.pt --write-compact DIR

Loads the fixture (official weights, config, input, expected outputs), converts the weights with
the same converter users get, runs our model and prints one line per output: name, max abs error,
tolerance, ok/FAIL. Exit status 0 only when everything passes.

A fixture is the official harness's .pt file or a compact copy of one (a folder holding
fixture.json and tensors.safetensors; `--write-compact` makes it): the same weights, input, calls
and loss values, but of every expected tensor only its shape and SLICE values at evenly spaced
flat positions, so a case fits in the repository (tests/fixtures/parity).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

from .config import Config
from .convert import from_official, official_key_map
from .losses import elbo
from .model import DDLP, Output


SLICE = 256          # values kept of every expected tensor in a compact fixture
GROUPS = ("outputs", "encode_all", "sample")


@dataclass
class Slice:
    """What a compact fixture keeps of an expected tensor: its shape and the values at
    `slice_index(numel)` of its flattened form."""
    shape: tuple[int, ...]
    values: Tensor


def slice_index(numel: int, n: int = SLICE) -> Tensor:
    """n evenly spaced flat positions, first and last included (all of them for small tensors)."""
    return torch.linspace(0, numel - 1, min(n, numel)).round().long() if numel else torch.zeros(0, dtype=torch.long)


def load_fixture(path: str) -> dict:
    if os.path.isdir(path):
        return load_compact(path)
    data = torch.load(path, weights_only=True)
    folder = os.path.dirname(path)
    for part in data["meta"].get("parts", {}):
        extra = torch.load(os.path.join(folder, part), weights_only=True)
        _merge(data, {k: v for k, v in extra.items() if k != "meta"})
    return data


def _merge(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and k in dst:
            _merge(dst[k], v)
        else:
            dst[k] = v


def write_compact(fx: dict, out_dir: str) -> None:
    """A compact copy of fixture `fx` in out_dir. Weights keep their exact storage layout: the
    official harness builds many as strided views of a small buffer, so they cost little."""
    from safetensors.torch import save_file

    from .storage import atomic_write
    tensors: dict[str, Tensor] = {"input": fx["input"].contiguous()}
    weights, storages = {}, {}
    for name, t in fx["state_dict"].items():
        key = storages.setdefault(t.untyped_storage().data_ptr(), f"storage.{len(storages)}")
        if key not in tensors:
            tensors[key] = torch.empty(0, dtype=t.dtype).set_(t.untyped_storage()).clone()
        weights[name] = dict(storage=key, shape=list(t.shape), stride=list(t.stride()), offset=t.storage_offset())
    shapes = {}
    for group in GROUPS:
        for name, ref in (fx.get(group) or {}).items():
            values = ref.values if isinstance(ref, Slice) else ref.flatten()[slice_index(ref.numel())]
            tensors[f"{group}.{name}"] = values.contiguous()
            shapes[f"{group}.{name}"] = list(ref.shape)
    losses = {v: {k: float(x) for k, x in d.items()} for v, d in fx["losses"].items()}
    doc = dict(meta={**_plain(fx["meta"]), "compact_slice": SLICE}, config=_plain(fx["config"]),
               calls=_plain(fx["calls"]), weights=weights, shapes=shapes, losses=losses)
    out = Path(out_dir)
    atomic_write(out / "tensors.safetensors", lambda p: save_file(tensors, p))
    atomic_write(out / "fixture.json", lambda p: Path(p).write_text(json.dumps(doc, indent=1, sort_keys=True)))


def _plain(obj):
    """Fixture metadata (ordered dicts, tuples, tensors) as JSON values."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, Tensor):
        return obj.tolist()
    return obj


def load_compact(folder: str) -> dict:
    from safetensors.torch import load_file
    doc = json.loads(open(os.path.join(folder, "fixture.json")).read())
    tensors = load_file(os.path.join(folder, "tensors.safetensors"))
    state = {name: torch.as_strided(tensors[w["storage"]], w["shape"], w["stride"], w["offset"])
             for name, w in doc["weights"].items()}
    fx = dict(meta=doc["meta"], config=doc["config"], calls=doc["calls"], state_dict=state,
              input=tensors["input"], losses=doc["losses"])
    for key, shape in doc["shapes"].items():
        group, name = key.split(".", 1)
        fx.setdefault(group, {})[name] = Slice(tuple(shape), tensors[key])
    return fx


def fixture_config(fx: dict) -> Config:
    cfg = dict(fx["config"]["constructor_kwargs"])
    cfg.update(fx["config"].get("train_hparams", {}))
    cfg["model"] = "ddlp" if fx["config"]["model_class"] == "ObjectDynamicsDLP" else "dlp"
    return Config.from_dict(cfg)


# Official output names -> how to read them from ours (after flattening [B, T] to [B*T]).
def _outputs(out: Output) -> dict[str, Callable[[], Tensor]]:
    p, fg = out.posterior, out.foreground
    zeros = torch.zeros_like
    names = dict(
        kp_p=lambda: out.proposals, rec=lambda: out.rec, mu=lambda: p.anchor, z_base=lambda: p.anchor,
        logvar=lambda: zeros(p.anchor), z=lambda: p.position,
        z_kp_bg=lambda: zeros(p.position[..., :1, :]), mu_offset=lambda: p.offset_mu,
        logvar_offset=lambda: p.position_logvar, mu_features=lambda: p.features_mu,
        logvar_features=lambda: p.features_logvar, z_features=lambda: p.features, bg=lambda: out.bg,
        mu_bg=lambda: p.bg_mu, logvar_bg=lambda: p.bg_logvar, z_bg=lambda: p.bg_features,
        cropped_objects_original=lambda: out.glimpses, obj_on_a=lambda: p.transparency_a,
        obj_on_b=lambda: p.transparency_b, obj_on=lambda: p.transparency,
        dec_objects_original=lambda: fg.glimpses, dec_objects=lambda: fg.image,
        mu_depth=lambda: p.depth_mu, logvar_depth=lambda: p.depth_logvar, z_depth=lambda: p.depth,
        mu_scale=lambda: p.scale_mu, logvar_scale=lambda: p.scale_logvar, z_scale=lambda: p.scale,
        alpha_masks=lambda: fg.alpha_masks, cropped_objects=lambda: out.glimpses,
        bg_mask=lambda: out.bg_encoder_mask, z_offset=lambda: p.offset_mu)
    if out.dynamics is not None:
        q = out.dynamics
        names.update(
            mu_dyn=lambda: q.position_mu, logvar_dyn=lambda: q.position_logvar,
            mu_features_dyn=lambda: q.features_mu, logvar_features_dyn=lambda: q.features_logvar,
            obj_on_a_dyn=lambda: q.transparency_a, obj_on_b_dyn=lambda: q.transparency_b,
            mu_depth_dyn=lambda: q.depth_mu, logvar_depth_dyn=lambda: q.depth_logvar,
            mu_scale_dyn=lambda: q.scale_mu, logvar_scale_dyn=lambda: q.scale_logvar,
            mu_bg_dyn=lambda: q.bg_mu, logvar_bg_dyn=lambda: q.bg_logvar)
    return names


@dataclass
class Check:
    name: str
    error: float
    tolerance: float
    ok: bool

    def line(self) -> str:
        return f"{self.name:<48} {self.error:11.3e}  tol {self.tolerance:9.2e}  {'ok' if self.ok else 'FAIL'}"


def _compare(name: str, ours: Tensor | None, ref: Tensor | Slice, atol: float) -> Check:
    if ours is None:
        return Check(name + " (missing)", float("inf"), atol, False)
    ours = ours.detach().float()
    shape = torch.Size(ref.shape)
    if ours.shape != shape:
        if ours.numel() == shape.numel() and name.startswith(("outputs/", "encode_all/")):
            ours = ours.reshape(shape)          # [B, T, ...] -> official frame-flattened [B*T, ...]
        else:
            return Check(f"{name} (shape {tuple(ours.shape)} vs {tuple(shape)})", float("inf"), atol, False)
    if isinstance(ref, Slice):
        ours, ref = ours.flatten()[slice_index(shape.numel())], ref.values
    err = (ours - ref.float()).abs().max().item() if ref.numel() else 0.0
    return Check(name, err, atol, err <= atol)


def _forward_kwargs(call: dict, video: bool) -> dict:
    """Our forward's keyword arguments for the official forward call `call`."""
    kwargs = dict(deterministic=call.get("deterministic", False), warmup=call.get("warmup", False),
                  noisy=call.get("noisy", False), train_proposer=call.get("train_enc_prior", True))
    if video:
        kwargs["dynamics"] = call.get("forward_dyn", True)
    return kwargs


def _elbo_kwargs(args: dict, config: Config) -> tuple[Config, dict]:
    """The config and keyword arguments of our `elbo` for the official `calc_elbo` call `args`."""
    kwargs = dict(warmup=args["warmup"], noisy=args["noisy"], beta_kl=args["beta_kl"],
                  beta_rec=args["beta_rec"], kl_balance=args["kl_balance"])
    if config.is_video:
        kwargs.update(discount=args.get("dynamic_discount"), beta_dyn=args["beta_dyn"],
                      beta_dyn_rec=args["beta_dyn_rec"], num_static=args["num_static"])
    cfg = Config.from_dict({**config.to_dict(), "recon_loss_type": args["recon_loss_type"]})
    return cfg, kwargs


def elbo_gradients(fx: dict, mode: dict, seed: int) -> tuple[float, dict[str, Optional[Tensor]]]:
    """Our ELBO and its gradient for one training mode of an official gradient reference
    (shared/fixtures/gradients/<case>.json, whose `modes[m]` is `mode`), named as the official
    parameters are.

    Follows the reference's recipe: our model from the fixture's official weights (through the
    converter), train() mode, torch.manual_seed(seed) right before the forward call (noisy and
    warm-up modes and PINT's dropout draw random numbers, in the same order as the official code),
    forward and ELBO with our equivalents of the mode's official arguments, backward. Reseeds the
    global torch RNG.

    Returns the ELBO and {official name: gradient or None}, one entry per parameter under its
    first official name in state-dict order (the name `named_parameters()` gives an official
    model: aliases such as `object_dec.decode.*` are left out). The converter copies every
    official tensor unchanged under another name, so our gradient is already in the official
    layout; a shape that differs raises ValueError.
    """
    config = fixture_config(fx)
    fwd = mode["forward"]
    ns = fwd.get("num_static_frames")
    if config.is_video and ns is not None and ns != config.num_static_frames:
        config = Config.from_dict({**config.to_dict(), "num_static_frames": ns})
    model = from_official(fx["state_dict"], config).train()
    x = fx["input"].float()
    torch.manual_seed(seed)
    out = model(x, **_forward_kwargs(fwd, config.is_video))
    cfg, kwargs = _elbo_kwargs(mode["calc_elbo"], config)
    loss = elbo(out, x, cfg, **kwargs)["loss"]
    loss.backward()
    params = dict(model.named_parameters())
    grads: dict[str, Optional[Tensor]] = {}
    done: set[str] = set()
    for official, ours in official_key_map(config).items():
        if ours not in params or ours in done:
            continue
        done.add(ours)
        grad = params[ours].grad
        if grad is not None:
            want = fx["state_dict"][official].shape
            if grad.shape != want:
                raise ValueError(f"{official}: our gradient has shape {tuple(grad.shape)}, the official "
                                 f"parameter {tuple(want)}; map it back to the official layout")
            grad = grad.detach().contiguous()
        grads[official] = grad
    return float(loss.detach()), grads


def run_fixture(path: str, atol: float = 1e-4, rtol_loss: float = 1e-4, atol_loss: float = 1e-5) -> list[Check]:
    torch.set_num_threads(1)
    fx = load_fixture(path)
    config = fixture_config(fx)
    model = from_official(fx["state_dict"], config).eval()
    x = fx["input"].float()
    calls = fx["calls"]
    checks: list[Check] = []
    video = isinstance(model, DDLP)
    fwd = calls["forward"]

    with torch.no_grad():
        out = model(x, **_forward_kwargs(fwd, video))
        readers = _outputs(out)
        for name, ref in fx["outputs"].items():
            reader = readers.get(name)
            checks.append(_compare(f"outputs/{name}", reader() if reader else None, ref, atol))

        for variant, args in calls.get("calc_elbo", {}).items():
            cfg, loss_kwargs = _elbo_kwargs(args, config)
            logs = elbo(out, x, cfg, **loss_kwargs)
            for name, ref in fx["losses"][variant].items():
                ours = logs.get(name)
                tol = rtol_loss * abs(float(ref)) + atol_loss
                if ours is None:
                    checks.append(Check(f"losses/{variant}/{name} (missing)", float("inf"), tol, False))
                    continue
                err = abs(float(ours) - float(ref))
                checks.append(Check(f"losses/{variant}/{name}", err, tol, err <= tol))

        enc = calls.get("encode_all")
        if enc is not None and "encode_all" in fx:
            det = enc.get("deterministic", True)
            if video:
                p, kp, glimpses = model.track(x, deterministic=det)
                enc_out = Output(out.rec, p, kp, out.foreground, out.bg, glimpses, out.bg_encoder_mask)
            else:
                enc_out = model(x, deterministic=det)
                # the public API: encode() returns the same particles
                p = model.encode(x, deterministic=det)
                checks.append(_compare("encode/position", p.position, enc_out.posterior.position, 0.0))
            readers = _outputs(enc_out)
            for name, ref in fx["encode_all"].items():
                reader = readers.get(name)
                checks.append(_compare(f"encode_all/{name}", reader() if reader else None, ref, atol))

        if video and "sample" in fx:
            s = calls["sample"]
            frames, particles = model.rollout(x, s["num_steps"], s["cond_steps"],
                                              deterministic=s.get("deterministic", True))
            ours = dict(rec=frames, z_pos=particles.position, z_scale=particles.scale,
                        z_obj_on=particles.transparency, z_depth=particles.depth,
                        z_features=particles.features, z_bg_features=particles.bg_features)
            for name, ref in fx["sample"].items():
                if name == "z_ids":
                    ids = torch.arange(1, config.n_kp_enc + 1).expand(ref.shape)
                    checks.append(_compare("sample/z_ids", ids.float(), ref, 0.0))
                    continue
                checks.append(_compare(f"sample/{name}", ours.get(name), ref, atol))
    return checks


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ddlp.parity", description=__doc__.split("\n\n")[0])
    ap.add_argument("fixtures", nargs="+", help="fixture .pt files (parts are found beside them) or compact "
                    "fixture folders")
    ap.add_argument("--atol", type=float, default=1e-4, help="max abs error for tensors (default 1e-4)")
    ap.add_argument("--rtol-loss", type=float, default=1e-4, help="relative tolerance for loss scalars")
    ap.add_argument("--atol-loss", type=float, default=1e-5, help="absolute slack for loss scalars")
    ap.add_argument("--write-compact", metavar="DIR", help="write a compact copy of the one fixture given to "
                    "DIR (then check the copy)")
    args = ap.parse_args(argv)
    if args.write_compact:
        if len(args.fixtures) != 1:
            ap.error("--write-compact takes exactly one fixture")
        if not os.path.exists(args.fixtures[0]):
            print(f"{args.fixtures[0]}: no such fixture file", file=sys.stderr)
            return 2
        write_compact(load_fixture(args.fixtures[0]), args.write_compact)
        print(f"wrote {args.write_compact} (fixture.json, tensors.safetensors)")
        args.fixtures = [args.write_compact]
    failed = 0
    for path in args.fixtures:
        if not os.path.exists(path):
            print(f"{path}: no such fixture file", file=sys.stderr)
            return 2
        print(f"== {path}")
        for check in run_fixture(path, args.atol, args.rtol_loss, args.atol_loss):
            print(check.line())
            failed += not check.ok
    print(f"{'FAIL' if failed else 'ok'}: {failed} check(s) failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
