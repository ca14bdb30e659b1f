"""Pictures and videos: the nine-row figure, rollout frames and the atomic writers.

Pixel checks rely on the documented geometry: a 64 px image is shown at zoom 2 (128 px tiles),
and source pixel v (coordinate c = 2 v / 63 - 1) has its centre at 2 v + 0.5 in a tile.
"""
import dataclasses
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from ddlp import DDLP, DLP, Config, Particles
from ddlp import viz
from ddlp.viz import (COND_COLOUR, PRED_COLOUR, PROPOSAL_COLOUR, draw_particles, nine_row_figure,
                      nine_row_tiles, particle_colours, rollout_frames, save_figure, save_video, to_pil)

S, ZOOM, TILE = 64, 2, 128


def small(model: str) -> Config:
    return Config(model=model, image_size=S, enc_channels=[8, 16, 16], prior_channels=[8, 8, 16],
                  patch_size=8, n_kp_enc=4, n_kp_prior=8, learned_feature_dim=3, pint_dim=32,
                  pint_heads=4, pint_layers=2, timestep_horizon=4).validate()


@pytest.fixture(scope="module")
def ddlp_run():
    torch.manual_seed(0)
    model = DDLP(small("ddlp")).eval()
    x = torch.rand(2, 5, 3, S, S)
    with torch.no_grad():
        out = model(x, deterministic=True)
    frames, particles = model.rollout(x, steps=6, cond_steps=3)
    return x, out, frames, particles


@pytest.fixture(scope="module")
def dlp_run():
    torch.manual_seed(0)
    model = DLP(small("dlp")).eval()
    x = torch.rand(3, 3, S, S)
    with torch.no_grad():
        return x, model(x, deterministic=True)


def arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img).astype(int)


def coord(v: float) -> float:
    """Source pixel -> normalised coordinate."""
    return 2 * v / (S - 1) - 1


def centre(v: float) -> float:
    """Source pixel -> pixel centre in a zoomed tile."""
    return v * ZOOM + (ZOOM - 1) / 2


def near(mask: np.ndarray, points: np.ndarray, radius: float) -> bool:
    """Whether every True pixel of mask lies within radius of one of the (y, x) points."""
    ys, xs = np.nonzero(mask)
    d = np.hypot(ys[:, None] - points[None, :, 0], xs[:, None] - points[None, :, 1])
    return bool((d.min(1) <= radius).all())


# hand-placed particles for frame (0, 0): source pixel (y, x), pre-sigmoid scale, transparency
HAND = [((20.0, 20.0), 0.0, 1.0),      # big glimpse: sigmoid(0) = 0.5 -> half-extent 15.75 px
        ((44.25, 40.25), -2.0, 0.6),   # off-grid, so the square mask has no rounding ties
        ((10.0, 50.0), -2.0, 0.3),
        ((50.0, 12.0), -2.0, 0.05)]    # below FAINT: drawn faded


def hand_placed(out):
    """`out` with frame (0, 0)'s particles replaced by HAND and its proposals all at (30, 30)."""
    p = out.posterior

    def set0(t: torch.Tensor, value) -> torch.Tensor:
        t = t.clone()
        t[0, 0] = torch.as_tensor(value, dtype=t.dtype)
        return t
    pos = [[coord(y), coord(x)] for (y, x), _, _ in HAND]
    post = p.replace(position=set0(p.position, pos),
                     scale=set0(p.scale, [[s, s] for _, s, _ in HAND]),
                     transparency=set0(p.transparency, [a for _, _, a in HAND]))
    proposals = set0(out.proposals, [[coord(30), coord(30)]] * out.proposals.shape[-2])
    return dataclasses.replace(out, posterior=post, proposals=proposals)


# ---------------------------------------------------------------------------------- figure
def test_figure_layout_rows_columns_and_plain_tiles(ddlp_run):
    x, out, _, _ = ddlp_run
    labels, rows = nine_row_tiles(x, out)
    assert len(labels) == len(rows) == 9 and labels[4] == "top-4"
    assert all(len(r) == 5 for r in rows)                                   # T = 5 frames < 8
    assert all(t.size == (TILE, TILE) for r in rows for t in r)
    for j in range(5):
        assert (arr(rows[0][j]) == arr(to_pil(x[0, j], ZOOM))).all()
        assert (arr(rows[2][j]) == arr(to_pil(out.rec[0, j], ZOOM))).all()
        assert (arr(rows[5][j]) == arr(to_pil(out.foreground.image[0, j], ZOOM))).all()
        assert (arr(rows[8][j]) == arr(to_pil(out.bg[0, j], ZOOM))).all()
    fig = nine_row_figure(x, out)
    pad = 2
    assert fig.height == 9 * (TILE + pad) + pad
    left = fig.width - 5 * (TILE + pad) - pad                                 # label column
    assert 60 < left < 200
    for i in (0, 4, 8):
        for j in (0, 4):
            x0, y0 = left + pad + j * (TILE + pad), pad + i * (TILE + pad)
            assert (arr(fig.crop((x0, y0, x0 + TILE, y0 + TILE))) == arr(rows[i][j])).all()
    assert len(nine_row_tiles(x, out, max_frames=3)[1][0]) == 3


def test_particle_rows_differ_from_ground_truth_only_near_particles(ddlp_run):
    x, out, _, _ = ddlp_run
    _, rows = nine_row_tiles(x, out)
    r = viz._radius(TILE) + 2
    for j in range(5):
        p = out.posterior[0, j]
        pts = np.stack([centre((p.position[:, 0].numpy() + 1) / 2 * (S - 1)),
                        centre((p.position[:, 1].numpy() + 1) / 2 * (S - 1))], -1)
        diff = (arr(rows[1][j]) != arr(rows[0][j])).any(-1)
        assert diff.any() and near(diff, pts, r)
        for y, xx in pts:                                  # every particle left a mark
            yi, xi = int(np.clip(y, 0, TILE - 1)), int(np.clip(xx, 0, TILE - 1))
            assert diff[max(0, yi - r):yi + r, max(0, xi - r):xi + r].any()


def test_hand_placed_particles_land_on_their_pixels(ddlp_run):
    x, out, _, _ = ddlp_run
    _, rows = nine_row_tiles(x, hand_placed(out), topk=2)
    gt, post, props, top, scales, masks = (arr(rows[i][0]) for i in (0, 1, 3, 4, 6, 7))
    colours = np.array(particle_colours(4))
    c = [(int(centre(y)), int(centre(xx))) for (y, xx), _, _ in HAND]
    for k in range(3):                                     # opaque enough: exact colour at the centre
        assert (post[c[k]] == colours[k]).all()
    faint = post[c[3]]                                     # faded: a blend of the image and the colour
    assert (faint != colours[3]).any() and (faint != gt[c[3]]).any()
    # top-2 by transparency: particles 0 and 1 only
    assert (top[c[0]] == colours[0]).all() and (top[c[1]] == colours[1]).all()
    assert (top[c[2]] == gt[c[2]]).all() and (top[c[3]] == gt[c[3]]).all()
    # prior proposals: every proposal at source pixel (30, 30) -> one cross at 60.5
    diff = (props != gt).any(-1)
    assert near(diff, np.array([[60.5, 60.5]]), viz._radius(TILE) + 2)
    assert (props[60, 60] == PROPOSAL_COLOUR).all() or (props[61, 61] == PROPOSAL_COLOUR).all()
    # scale box of particle 0: 20 +- 0.5 * 63 / 2 = [4.25, 35.75] -> tile pixels [9, 72]
    for yx in ((60, 9), (60, 72), (9, 60), (72, 60)):
        assert (scales[yx] == colours[0]).all(), yx
    assert (scales[60, 6] == gt[60, 6]).all() and (scales[60, 75] == gt[60, 75]).all()
    # bg-encoder square of particle 1 (side = glimpse = 16 px) covers rows 37..52, cols 33..48
    assert out.glimpses.shape[-1] == 16
    for yx in ((100, 66), (100, 97), (74, 80), (105, 80)):
        assert (masks[yx] == colours[1]).all(), yx
    for yx in ((100, 64), (100, 99), (72, 80), (107, 80)):
        assert (masks[yx] != colours[1]).any(), yx


def test_dlp_figure(dlp_run):
    x, out = dlp_run
    labels, rows = nine_row_tiles(x, out, topk=2, max_frames=8)
    assert len(rows) == 9 and all(len(r) == 3 for r in rows) and labels[4] == "top-2"
    assert (arr(rows[0][1]) == arr(to_pil(x[1], ZOOM))).all()
    assert (arr(rows[1][1]) != arr(rows[0][1])).any()
    assert (arr(rows[3][2]) != arr(rows[0][2])).any()     # proposals drawn
    fig = nine_row_figure(x, out, max_frames=2)
    assert fig.height == 9 * (TILE + 2) + 2 and (fig.width - 2) > 2 * (TILE + 2)


def test_small_images_are_enlarged_and_bad_input_is_refused(dlp_run):
    assert viz.auto_zoom(32) == 4 and viz.auto_zoom(64) == 2 and viz.auto_zoom(128) == 1
    x, out = dlp_run
    with pytest.raises(ValueError, match="expected images"):
        nine_row_figure(x[0, 0], out)


def test_draw_particles_keeps_its_contract():
    p = Particles(position=torch.tensor([[0.0, 0.0], [0.5, 0.5]]), scale=torch.zeros(2, 2),
                  depth=torch.zeros(2, 1), transparency=torch.tensor([1.0, 0.05]),
                  features=torch.zeros(2, 3))
    img = torch.zeros(3, 16, 16)
    with_boxes, plain = arr(draw_particles(img, p, zoom=4)), arr(draw_particles(img, p, zoom=4, boxes=False))
    assert with_boxes.shape == (64, 64, 3)
    c = int(viz.to_pixel(0.0, 16, 4))                       # source 7.5 -> 31.5 at zoom 4
    assert c == 31 and (plain[c, c] == particle_colours(2)[0]).all()
    far = int(viz.to_pixel(0.5, 16, 4))                     # particle 1 is below min_transparency
    assert far == 46 and (plain[far - 1:far + 2, far - 1:far + 2] == 0).all()
    box = (with_boxes != plain).any(-1)                     # half-extent 0.5 * 15 / 2 = 3.75 px
    assert box[c, int(viz.to_pixel(-0.5, 16, 4))] and box.sum() > 4 * 20


# ---------------------------------------------------------------------------------- rollouts
def test_rollout_frames_layout_and_cond_marker(ddlp_run):
    x, _, frames, particles = ddlp_run
    pics = rollout_frames(x, frames, particles, cond_steps=3)
    assert len(pics) == 9 and len({p.size for p in pics}) == 1
    alone = rollout_frames(None, frames, particles, cond_steps=3)
    assert len(alone) == 9 and alone[0].width < pics[0].width * 0.6 and alone[0].height == pics[0].height
    W, H = pics[0].size
    for t, pic in enumerate(pics):                           # right border of the prediction tile
        want = COND_COLOUR if t < 3 else PRED_COLOUR
        assert tuple(pic.getpixel((W - 6, H // 2))) == want
    # ground truth tile at (gap + border, header + border) = (7, 21), for the 5 frames we have
    for t in (0, 4):
        assert (arr(pics[t].crop((7, 21, 7 + TILE, 21 + TILE))) == arr(to_pil(x[0, t], ZOOM))).all()
    assert (arr(pics[6].crop((7, 21, 7 + TILE, 21 + TILE))) != arr(to_pil(x[0, 4], ZOOM))).any()
    # generated videos name their phases: only the titles change
    renamed = rollout_frames(None, frames, particles, cond_steps=3, phases=("diffusion", "PINT"))
    for t in (0, 5):
        assert (arr(renamed[t])[18:] == arr(alone[t])[18:]).all() and (arr(renamed[t])[:18] != arr(alone[t])[:18]).any()


def test_rollout_particles_and_trails_are_drawn_where_they_were():
    T = 3
    xs = [10.0, 20.0, 30.0]                                 # particle 0 moves right along row 20
    pos = torch.tensor([[[coord(20), coord(v)], [coord(50), coord(50)]] for v in xs])
    p = Particles(position=pos, scale=torch.zeros(T, 2, 2), depth=torch.zeros(T, 2, 1),
                  transparency=torch.ones(T, 2), features=torch.zeros(T, 2, 3))
    pred = torch.zeros(T, 3, S, S)
    with_trail = [arr(f) for f in rollout_frames(None, pred, p, trajectories=True)]
    without = [arr(f) for f in rollout_frames(None, pred, p, trajectories=False)]
    ox, oy = 7, 21                                          # tile origin: gap + border, header + border
    y = int(centre(20)) + oy
    assert (with_trail[2][y, int(centre(30)) + ox] == particle_colours(2)[0]).all()
    mid = int(centre(15)) + ox                               # halfway along the path travelled
    assert with_trail[2][y, mid].sum() > 0 and without[2][y, mid].sum() == 0
    assert (with_trail[0] == without[0]).all()              # nothing to trail at t = 0
    assert tuple(with_trail[2][oy - 2, ox]) == PRED_COLOUR  # cond_steps=0: all predicted


# ---------------------------------------------------------------------------------- writers
def _frames(n: int = 4) -> list[Image.Image]:
    return [Image.new("RGB", (50, 30), (40 * i, 200 - 40 * i, 90)) for i in range(n)]


def test_gif_round_trip(tmp_path):
    path = save_video(_frames(), tmp_path / "a" / "b" / "clip.gif", fps=5)
    with Image.open(path) as gif:
        assert gif.n_frames == 4 and gif.size == (50, 30)
        assert gif.info["loop"] == 0 and gif.info["duration"] == 200
        gif.seek(3)
        assert gif.convert("RGB").getpixel((10, 10)) == pytest.approx((120, 80, 90), abs=8)
    assert sorted(p.name for p in path.parent.iterdir()) == ["clip.gif"]   # no temp files left


def test_mp4_is_written_with_codec_friendly_size(tmp_path):
    pytest.importorskip("imageio_ffmpeg")
    import imageio.v2 as iio
    path = save_video(_frames(6), tmp_path / "clip.mp4", fps=10)
    assert path.stat().st_size > 0
    with iio.get_reader(path) as reader:
        first = reader.get_data(0)
        assert first.shape == (32, 64, 3)                    # 30 x 50 padded to multiples of 16
        assert reader.count_frames() == 6


def test_unknown_suffix_and_missing_plugin_are_clear(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"'\.avi'.*\.gif or \.mp4"):
        save_video(_frames(), tmp_path / "clip.avi")
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)   # import now fails
    with pytest.raises(ImportError, match="pip install imageio-ffmpeg"):
        save_video(_frames(), tmp_path / "clip.mp4")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="at least one frame"):
        save_video([], tmp_path / "clip.gif")


def test_writes_are_atomic(tmp_path, monkeypatch):
    path = save_video(_frames(), tmp_path / "clip.gif")
    before = path.read_bytes()

    def broken(frames, tmp, fps):
        tmp.write_bytes(b"half a gif")
        raise OSError("disk full")
    monkeypatch.setattr(viz, "_write_gif", broken)
    with pytest.raises(OSError, match="disk full"):
        save_video(_frames(), path)
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]


def test_save_figure_png(tmp_path, dlp_run):
    x, out = dlp_run
    fig = nine_row_figure(x, out)
    path = save_figure(fig, tmp_path / "figs" / "nine.png")
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == fig.size
        assert (arr(img.convert("RGB")) == arr(fig)).all()
    with pytest.raises(ValueError, match="use .png"):
        save_figure(fig, tmp_path / "nine.notaformat")
