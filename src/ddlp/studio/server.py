"""The studio's local web server: the standard library's ThreadingHTTPServer with JSON endpoints.

    GET  /                  the page (static/index.html; app.js and style.css under /static/)
    GET  /api/info          model summary, clip names, defaults
    POST /api/clip          {clip}: conditioning frames, their reconstruction and particles
    POST /api/preview       {clip, edits, edit_frames}: the edited conditioning frames, decoded
    POST /api/play          {clip, edits, horizon, edit_frames}: original and edited rollouts

Images travel as PNG data URLs. Every error comes back as {"error": message} (400 for bad input,
500 for a bug) so the page can show it. Model calls are serialised by a lock: torch modules are
not meant to be run from several threads at once.
"""
from __future__ import annotations

import base64
import io
import json
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

from .. import whatif as W
from ..particles import Particles

MAX_BODY = 1 << 20               # requests are small JSON documents
MAX_HORIZON = 500
STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8", ".png": "image/png", ".svg": "image/svg+xml"}
ClipLoader = Callable[[], Tensor]


# ------------------------------------------------------------------------------ clips
def folder_clips(folder: str | Path, image_size: int, episodes_per_file: int = 8) -> dict[str, ClipLoader]:
    """Lazy loaders for every clip in `folder`: video files, sub-folders of frames, and the first
    `episodes_per_file` episodes of each .npy/.npz/.h5/.hdf5 file (named "file #e")."""
    from ..data.clips import ARRAY_SUFFIXES, IMAGE_SUFFIXES, VIDEO_SUFFIXES
    from ..data.custom import HDF5_SUFFIXES, open_collection
    from ..config import DataOptions
    from ..data.reader import read_clip
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"--clips: no such folder: {folder}")
    out: dict[str, ClipLoader] = {}
    for path in sorted(folder.iterdir()):
        suffix = path.suffix.lower()
        is_frames = path.is_dir() and any(f.suffix.lower() in IMAGE_SUFFIXES for f in path.iterdir())
        if is_frames or suffix in VIDEO_SUFFIXES:
            out[path.name] = lambda p=path: read_clip(p, size=image_size)
        elif suffix in ARRAY_SUFFIXES + HDF5_SUFFIXES:
            n = len(open_collection(path, DataOptions(), None)[0])
            for e in range(min(n, episodes_per_file)):
                name = path.name if n == 1 else f"{path.name} #{e}"
                out[name] = lambda p=path, e=e: read_clip(p, size=image_size, episode=e)
    return out


def balls_clips(n: int, length: int, image_size: int) -> dict[str, ClipLoader]:
    """n generated Balls-Interaction test episodes of `length` frames (rendered on first use)."""
    from ..data.balls import episode_seeds, generate_episodes
    from ..data.clips import resize
    seeds = episode_seeds(n, 9)

    def load(i: int) -> Tensor:
        imgs = generate_episodes(seeds[i:i + 1], length)["imgs"][0]
        return resize(torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255, image_size)
    return {f"balls-{i}": (lambda i=i: load(i)) for i in range(n)}


# ------------------------------------------------------------------------------ encoding for the page
def png_url(image: Tensor) -> str:
    """[3, H, W] in [0, 1] -> 'data:image/png;base64,...'."""
    from ..viz import to_pil
    buf = io.BytesIO()
    to_pil(image).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def glimpse_url(rgba: Tensor) -> str:
    """Decoded glimpse [4, g, g] (alpha first) -> PNG with transparency."""
    from PIL import Image
    arr = (rgba[[1, 2, 3, 0]].clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(arr, "RGBA").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def particles_json(p: Particles) -> dict:
    """Particles [T, K, ...] of one clip -> plain lists: position (y, x), glimpse size (fraction
    of the image per axis, y then x), depth, transparency."""
    r = lambda t: [[[round(float(v), 5) for v in k] for k in f] for f in t.tolist()]  # noqa: E731
    return dict(position=r(p.position), size=r(torch.sigmoid(p.scale)),
                depth=[[round(float(d[0]), 5) for d in f] for f in p.depth.tolist()],
                transparency=[[round(float(v), 5) for v in f] for f in p.transparency.tolist()])


class BadRequest(ValueError):
    """Input the page sent that cannot be used (shown to the user)."""


# ------------------------------------------------------------------------------ the application
@dataclass
class Studio:
    """What the server serves: one DDLP model and named example clips."""
    model: torch.nn.Module
    clips: dict[str, ClipLoader]
    cond_steps: Optional[int] = None        # default: the model's burn-in (config.num_static_frames)
    horizon: int = 40
    name: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)
    _cache: dict[str, tuple[Tensor, Particles]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        W.check_ddlp(self.model)
        self.model.eval()
        self.cond_steps = self.cond_steps or W.burn_in(self.model)

    def info(self) -> dict:
        from ..viz import particle_colours
        c = self.model.config
        K = c.n_kp_enc
        return dict(model=dict(name=self.name, type=type(self.model).__name__, image_size=c.image_size,
                               particles=K, features=c.learned_feature_dim, dataset=c.ds),
                    colours=["#%02x%02x%02x" % rgb for rgb in particle_colours(K)],
                    clips=list(self.clips), cond_steps=self.cond_steps, horizon=self.horizon,
                    edit_frames=[0, min(W.burn_in(self.model), self.cond_steps)], max_horizon=MAX_HORIZON)

    def _encoded(self, name) -> tuple[Tensor, Particles]:
        """(conditioning frames [1, cond, 3, H, W], their posterior), cached per clip."""
        if not isinstance(name, str) or name not in self.clips:
            raise BadRequest(f"unknown clip {name!r}; choose one of: {', '.join(self.clips) or '(none)'}")
        if name not in self._cache:
            frames = self.clips[name]()
            if len(frames) < self.cond_steps:
                raise BadRequest(f"clip {name} has {len(frames)} frame(s), fewer than the "
                                 f"{self.cond_steps} conditioning (burn-in) frames what-if needs")
            frames = frames[None, :self.cond_steps]
            self._cache[name] = frames, W.encode_conditioning(self.model, frames, self.cond_steps)
        return self._cache[name]

    def _edits(self, req: dict) -> tuple[list[W.Edit], tuple[int, int]]:
        edits = req.get("edits") or []
        if not isinstance(edits, list):
            raise BadRequest("edits must be a list")
        span = req.get("edit_frames") or [0, min(W.burn_in(self.model), self.cond_steps)]
        try:
            span = (int(span[0]), int(span[1]))
        except (TypeError, ValueError, IndexError):
            raise BadRequest(f"edit_frames must be [start, stop], got {span!r}") from None
        if not 0 <= span[0] < span[1] or span[0] >= self.cond_steps:
            raise BadRequest(f"edit frames {span[0]}..{span[1] - 1} must start inside the "
                             f"{self.cond_steps} conditioning frames (0..{self.cond_steps - 1})")
        return [W.Edit.from_dict(e) for e in edits], span

    def _glimpses(self, p: Particles) -> list[str]:
        """Decoded RGBA glimpse of every particle at frame 0."""
        fg = self.model.decode_foreground(p[:, :1])
        return [glimpse_url(g) for g in fg.glimpses[0, 0]]

    def clip(self, req: dict) -> dict:
        with self.lock, torch.no_grad():
            frames, post = self._encoded(req.get("clip"))
            rec = W.decode(self.model, post)
            return dict(clip=req["clip"], frames=[png_url(f) for f in frames[0]],
                        recon=[png_url(f) for f in rec[0]], particles=particles_json(post[0]),
                        glimpses=self._glimpses(post), cond_steps=self.cond_steps)

    def preview(self, req: dict) -> dict:
        with self.lock, torch.no_grad():
            _, post = self._encoded(req.get("clip"))
            edits, span = self._edits(req)
            edited = W.apply_edits(post, edits, span)
            rec = W.decode(self.model, edited)
            return dict(recon=[png_url(f) for f in rec[0]], particles=particles_json(edited[0]),
                        glimpses=self._glimpses(edited))

    def play(self, req: dict) -> dict:
        try:
            horizon = int(req.get("horizon", self.horizon))
        except (TypeError, ValueError):
            raise BadRequest(f"horizon must be a whole number, got {req.get('horizon')!r}") from None
        if not 1 <= horizon <= MAX_HORIZON:
            raise BadRequest(f"horizon must be between 1 and {MAX_HORIZON}, got {horizon}")
        t0 = time.time()
        with self.lock, torch.no_grad():
            frames, post = self._encoded(req.get("clip"))
            edits, span = self._edits(req)
            r = W.what_if(self.model, frames, edits, horizon, cond_steps=self.cond_steps, edit_frames=span,
                          posterior=post)
        diff = (r.original - r.edited).abs()
        return dict(original=[png_url(f) for f in r.original[0]], edited=[png_url(f) for f in r.edited[0]],
                    original_particles=particles_json(r.original_particles[0]),
                    edited_particles=particles_json(r.edited_particles[0]),
                    cond_steps=r.cond_steps, touched=r.touched, seconds=round(time.time() - t0, 3),
                    mean_abs_diff=float(diff.mean()),
                    changed_frames=int((diff.flatten(2).amax(-1) > 1 / 255).sum()))


# ------------------------------------------------------------------------------ HTTP
def _static(name: str) -> Optional[bytes]:
    if "/" in name or name.startswith(".") or Path(name).suffix not in STATIC_TYPES:
        return None
    f = resources.files("ddlp.studio").joinpath("static", name)
    return f.read_bytes() if f.is_file() else None


class Handler(BaseHTTPRequestHandler):
    studio: Studio                 # set on the subclass made by make_server
    quiet = False
    server_version = "ddlp-studio"

    def log_message(self, fmt: str, *args) -> None:
        if not self.quiet:
            sys.stderr.write(f"studio: {self.address_string()} {fmt % args}\n")

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: dict) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            path = "/static/index.html"
        if path == "/api/info":
            return self._json(200, self.studio.info())
        if path.startswith("/static/"):
            body = _static(path[len("/static/"):])
            if body is not None:
                return self._send(200, body, STATIC_TYPES[Path(path).suffix])
        self._json(404, {"error": f"not found: {path}"})

    def do_POST(self) -> None:  # noqa: N802
        routes = {"/api/clip": self.studio.clip, "/api/preview": self.studio.preview,
                  "/api/play": self.studio.play}
        route = routes.get(self.path.split("?", 1)[0])
        if route is None:
            return self._json(404, {"error": f"not found: {self.path}"})
        try:
            n = int(self.headers.get("Content-Length") or 0)
            if n > MAX_BODY:
                raise BadRequest(f"request too large ({n} bytes)")
            try:
                req = json.loads(self.rfile.read(n) or b"{}")
            except json.JSONDecodeError as e:
                raise BadRequest(f"request is not valid JSON: {e}") from None
            if not isinstance(req, dict):
                raise BadRequest("request must be a JSON object")
            self._json(200, route(req))
        except (ValueError, FileNotFoundError) as e:      # bad input: EditError, ClipError, BadRequest
            self._json(400, {"error": str(e)})
        except Exception as e:                            # a bug: tell the page, keep serving
            traceback.print_exc()
            self._json(500, {"error": f"internal error: {type(e).__name__}: {e}"})


def make_server(studio: Studio, host: str = "127.0.0.1", port: int = 0, quiet: bool = False) -> ThreadingHTTPServer:
    """A server bound to host:port (port 0: a free one; read it from server.server_address)."""
    handler = type("StudioHandler", (Handler,), {"studio": studio, "quiet": quiet})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server
