"""What-if editing: edits change what the model decodes and predicts, a zero edit changes nothing,
and bad edits fail with clear messages (Python API and `ddlp what-if`)."""
import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from ddlp import Config, Particles
from ddlp import whatif as W
from ddlp.cli import main
from ddlp.commands.whatif import parse_edit
from ddlp.data.balls import episode_seeds, generate_episodes
from ddlp.model import build_model

S = 64
PX = (S - 1) / 2                  # pixels per unit of normalised coordinate (align_corners)
HORIZON = 6


def balls_clip(episode: int = 0, length: int = 6) -> torch.Tensor:
    imgs = generate_episodes(episode_seeds(episode + 1, 9)[episode:], length)["imgs"][0]
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)     # four particles, as the messages and counts below expect
    return build_model(Config.preset("balls_small", n_kp_enc=4, n_kp_prior=10, topk=4)).eval()


@pytest.fixture(scope="module")
def scene(model):
    """A Balls clip, its posterior, the particle staying nearest the image centre over the burn-in
    and a dx moving it further inwards: its decoded glimpse (half the image wide, untrained) then
    stays wholly inside the image before and after the move."""
    best = None
    for episode in range(8):
        clip = balls_clip(episode)
        post = W.encode_conditioning(model, clip)
        reach = post.position[0, :4].abs().amax(-1).amax(0)             # [K]
        k = int(reach.argmin())
        if best is None or reach[k] < best[0]:
            best = float(reach[k]), clip, post, k
    _, clip, post, k = best
    return clip, post, k, -0.2 if float(post.position[0, 0, k, 1]) > 0 else 0.2


@pytest.fixture(scope="module")
def clip(scene):
    return scene[0]


@pytest.fixture(scope="module")
def posterior(scene):
    return scene[1]


@pytest.fixture(scope="module")
def central(scene):
    return scene[2], scene[3]


def alpha_of(model, p: Particles, k: int, t: int) -> torch.Tensor:
    """Canvas alpha [H, W] of particle k alone in frame t, as the decoder places it."""
    one = Particles(position=p.position[:, t:t + 1, [k]], scale=p.scale[:, t:t + 1, [k]],
                    depth=p.depth[:, t:t + 1, [k]], transparency=p.transparency[:, t:t + 1, [k]],
                    features=p.features[:, t:t + 1, [k]])
    with torch.no_grad():
        return model.decode_foreground(one).alpha_masks[0, 0, 0, 0]


def centroid(a: torch.Tensor) -> tuple[float, float]:
    ys, xs = torch.meshgrid(torch.arange(S, dtype=a.dtype), torch.arange(S, dtype=a.dtype), indexing="ij")
    m = a.sum()
    return float((a * ys).sum() / m), float((a * xs).sum() / m)


def inside(a: torch.Tensor) -> bool:
    """No alpha on the border pixels: the glimpse is not cut by the image edge."""
    return float(torch.cat([a[0], a[-1], a[:, 0], a[:, -1]]).abs().max()) < 1e-4


# ------------------------------------------------------------------------------ the mechanism
def test_moving_a_particle_moves_its_decoded_glimpse_by_the_expected_pixels(model, clip, posterior, central):
    k, dx = central
    r = W.what_if(model, clip, [W.move(k, dx=dx)], HORIZON, posterior=posterior)
    for t in (0, 3):                                                   # every burn-in frame is edited
        a0, a1 = alpha_of(model, r.original_particles, k, t), alpha_of(model, r.edited_particles, k, t)
        assert inside(a0) and inside(a1) and float(a0.sum()) > 1
        (y0, x0), (y1, x1) = centroid(a0), centroid(a1)
        assert x1 - x0 == pytest.approx(dx * PX, abs=0.15)             # 0.2 units = 6.3 px
        assert y1 - y0 == pytest.approx(0.0, abs=0.15)
    # the whole decoded frame changes, the other particles do not move
    assert float((r.original[0, 0] - r.edited[0, 0]).abs().max()) > 0.01
    others = [j for j in range(posterior.num_particles) if j != k]
    assert torch.equal(r.original_particles.position[:, :4, others], r.edited_particles.position[:, :4, others])


def test_the_rollout_after_the_edit_differs(model, clip, posterior, central):
    k, dx = central
    r = W.what_if(model, clip, [W.move(k, dx=dx)], HORIZON, posterior=posterior)
    assert r.original.shape == r.edited.shape == (1, 4 + HORIZON, 3, S, S)
    shift = r.edited_particles.position[0, 4:, k, 1] - r.original_particles.position[0, 4:, k, 1]
    assert (shift.sign() == np.sign(dx)).all() and float(shift.abs().min()) > 0.05  # PINT carries the move on
    assert float((r.original[0, 4:] - r.edited[0, 4:]).abs().amax((1, 2, 3)).min()) > 1e-3


def test_a_zero_edit_reproduces_the_rollout_bit_for_bit(model, clip, posterior, central):
    k, _ = central
    zero = [W.move(k, 0.0, 0.0), W.rescale(k, 1.0), W.shift_depth(k, 0.0), W.copy_features(k, k),
            W.Edit("bg_features", "add", value=(0.0,) * posterior.bg_features.shape[-1])]
    plain = W.what_if(model, clip, [], HORIZON)
    for edited in (W.what_if(model, clip, zero, HORIZON), W.what_if(model, clip, zero, HORIZON, posterior=posterior)):
        assert torch.equal(plain.original, edited.edited) and torch.equal(plain.original, edited.original)
        for name in ("position", "scale", "depth", "transparency", "features", "bg_features"):
            assert torch.equal(getattr(plain.original_particles, name), getattr(edited.edited_particles, name))


def test_the_same_path_as_ddlp_rollout(model, clip):
    frames, p = model.rollout(clip[None], steps=3, cond_steps=4)
    r = W.what_if(model, clip, [], 3)
    assert torch.allclose(r.original, frames.clamp(0, 1), atol=1e-6)
    assert torch.allclose(r.original_particles.position, p.position, atol=1e-6)


def test_scale_multiplies_the_decoded_glimpse_size(model, clip, posterior):
    base = [W.place(0, 0.0, 0.0)]
    r = W.what_if(model, clip, base + [W.rescale(0, 1.3)], 1, posterior=posterior)
    ref = W.what_if(model, clip, base, 1, posterior=posterior)
    s0, s1 = torch.sigmoid(ref.edited_particles.scale[0, :4, 0]), torch.sigmoid(r.edited_particles.scale[0, :4, 0])
    assert torch.allclose(s1, 1.3 * s0, rtol=1e-5)
    widths = []
    for p in (ref.edited_particles, r.edited_particles):
        cols = alpha_of(model, p, 0, 0).sum(0) > 1e-3
        idx = cols.nonzero().flatten()
        widths.append(float(idx[-1] - idx[0] + 1))
    assert widths[1] / widths[0] == pytest.approx(1.3, abs=0.08)


def test_transparency_features_depth_and_frame_ranges(model, clip, posterior):
    p = posterior
    e = W.apply_edits(p, [W.hide(1), W.copy_features(2, 0), W.swap_features(1, 3), W.set_depth(2, -3.0)])
    assert (e.transparency[:, :, 1] == 0).all()
    assert torch.equal(e.features[:, :, 0], p.features[:, :, 2])
    assert torch.equal(e.features[:, :, 1], p.features[:, :, 3])
    assert torch.equal(e.features[:, :, 3], p.features[:, :, 1])
    assert (e.depth[:, :, 2] == -3).all()
    assert float(alpha_of(model, e, 1, 0).abs().max()) == 0            # hidden: nothing decoded
    # a range: frames 1 and 2 only; the input is never modified in place
    e = W.apply_edits(p, [W.move(0, dx=0.1, frames=(1, 3))])
    d = (e.position - p.position)[0, :, 0, 1]
    assert torch.allclose(d, torch.tensor([0.0, 0.1, 0.1, 0.0]), atol=1e-6)
    # remove reaches into the prediction, hide does not
    r = W.what_if(model, clip, [W.remove(2), W.hide(3)], 4, posterior=posterior)
    assert (r.edited_particles.transparency[0, :, 2] == 0).all()
    assert (r.edited_particles.transparency[0, 4:, 3] > 0).all()


@pytest.mark.parametrize("edit, message", [
    (W.move(7, dx=0.1), "particle 7 does not exist: this model has 4 particles (0..3)"),
    (W.copy_features(9, 0), "particle 9 does not exist"),
    (W.move(0, dx=3.0), "outside the image"),
    (W.place(0, 1.5, 0.0), "outside the image"),
    (W.rescale(0, 5.0), "as large as the image"),
    (W.rescale(0, -1.0), "positive"),
    (W.set_transparency(0, 1.5), "transparency must lie in [0, 1]"),
    (W.Edit("mass", "set", (0,), (1.0,)), "unknown attribute 'mass'"),
    (W.Edit("position", "mul", (0,), (1.0, 1.0)), "operation 'mul' does not apply to position"),
    (W.Edit("position", "add", (0,), (1.0,)), "needs 2 value(s)"),
    (W.move(0, dx=0.1, frames=(3, 1)), "bad frame range"),
])
def test_bad_edits_are_explained(posterior, edit, message):
    with pytest.raises(W.EditError) as e:
        W.apply_edits(posterior, [edit])
    assert message in str(e.value)


def test_particles_tracked_slightly_outside_may_be_edited_but_not_pushed_further(posterior):
    pos = posterior.position.clone()
    pos[:, :, 0, 1] = 1.05                          # tracking offsets can leave [-1, 1] a little
    p = posterior.replace(position=pos)
    assert torch.equal(W.apply_edits(p, [W.move(0, 0.0, 0.0)]).position, pos)
    assert float(W.apply_edits(p, [W.move(0, dx=-0.1)]).position[0, 0, 0, 1]) == pytest.approx(0.95)
    with pytest.raises(W.EditError, match="moves particle 0 outside the image in frame 0"):
        W.apply_edits(p, [W.move(0, dx=0.01)])


def test_bad_inputs_are_explained(model, clip):
    with pytest.raises(ValueError, match="3 frame.*fewer than the 4 conditioning"):
        W.what_if(model, clip[:3], [], 2)
    with pytest.raises(ValueError, match="needs a DDLP video model.*DLP"):
        W.what_if(build_model(Config.preset("balls_small", model="dlp")), clip, [], 2)
    with pytest.raises(ValueError, match="must start inside the 4 conditioning frames"):
        W.what_if(model, clip, [], 2, edit_frames=(4, 6))


def test_train_mode_is_restored_and_does_not_matter(model, clip, posterior):
    ref = W.what_if(model, clip, [W.move(0, dx=0.1)], 3, posterior=posterior)
    model.train()
    try:
        r = W.what_if(model, clip, [W.move(0, dx=0.1)], 3, posterior=posterior)
        assert model.training
    finally:
        model.eval()
    assert torch.equal(ref.edited, r.edited)


def test_edits_round_trip_through_json():
    edits = [W.move([1, 2], dx=0.2, dy=-0.1), W.swap_features(0, 3), W.remove(1, start=2), W.rescale(0, (1.2, 0.8))]
    back = [W.Edit.from_dict(json.loads(json.dumps(e.to_dict()))) for e in edits]
    assert back == edits
    with pytest.raises(W.EditError, match="unknown edit field"):
        W.Edit.from_dict({"attribute": "position", "op": "add", "colour": 1})
    with pytest.raises(W.EditError, match="malformed edit"):
        W.Edit.from_dict({"op": "add"})
    with pytest.raises(W.EditError, match="integers"):
        W.Edit.from_dict({"attribute": "depth", "op": "set", "particles": [1.5], "value": 1})


# ------------------------------------------------------------------------------ command line
def test_parse_edit():
    assert parse_edit("move", "3:+0.2,0") == W.move(3, dx=0.2, dy=0.0)
    assert parse_edit("move", "3,5:0,-0.1") == W.move((3, 5), dx=0.0, dy=-0.1)
    assert parse_edit("scale", "1:1.3") == W.rescale(1, 1.3)
    assert parse_edit("hide", "7") == W.hide(7)
    assert parse_edit("copy-features", "2:0,1") == W.copy_features(2, (0, 1))
    assert parse_edit("swap-features", "2:0") == W.swap_features(2, 0)
    for kind, text in (("move", "3:0.2"), ("move", "x:0,0"), ("hide", "1:0.3"), ("swap-features", "1:2,3")):
        with pytest.raises(W.EditError, match=f"--{kind} '.*': expected"):
            parse_edit(kind, text)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, model):
    root = tmp_path_factory.mktemp("models")
    model.save_pretrained(root / "ddlp")
    build_model(Config.preset("balls_small", model="dlp")).save_pretrained(root / "dlp")
    np.save(root / "short.npy", (balls_clip(length=3).permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8))
    return root


def test_cli_writes_video_and_trajectories(model_dirs, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["what-if", str(model_dirs / "ddlp"), "--balls", "0", "--move", "2:-0.2,0", "--scale", "1:1.3",
               "--hide", "3", "--horizon", "3", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert "3 edit(s) on particles [1, 2, 3]" in capsys.readouterr().out
    gif = Image.open(out / "what-if.gif")
    assert gif.n_frames == 4 + 3 and gif.width > 1.7 * gif.height      # two panels side by side
    rows = list(csv.DictReader(open(out / "trajectories.csv")))
    assert len(rows) == 2 * 7 * 4
    x = {(r["rollout"], int(r["t"]), int(r["particle"])): float(r["x"]) for r in rows}
    assert x[("edited", 0, 2)] - x[("original", 0, 2)] == pytest.approx(-0.2, abs=1e-4)
    assert x[("edited", 0, 0)] == x[("original", 0, 0)]
    record = json.loads((out / "edits.json").read_text())
    assert record["edit_frames"] == [0, 4] and len(record["edits"]) == 3
    assert Image.open(out / "trajectories.png").size[0] >= 256


@pytest.mark.parametrize("extra, message", [
    (["--balls", "0", "--move", "7:0.1,0"], "particle 7 does not exist"),
    (["--balls", "0", "--move", "0:3,0"], "outside the image"),
    (["--balls", "0", "--move", "0:0.1"], "expected K:DX,DY"),
    (["--input", "{root}/short.npy"], "has 3 frame(s), fewer than the 4 conditioning"),
    (["--input", "{root}/missing.mp4"], "no such file"),
    (["--input", "{root}/short.npy", "--episode", "1"], "short.npy: there is no episode 1"),
    (["--balls", "0", "--episode", "1"], "--episode picks an episode of --input"),
])
def test_cli_bad_input_is_one_clear_line(model_dirs, tmp_path, capsys, extra, message):
    extra = [a.format(root=model_dirs) for a in extra]
    assert main(["what-if", str(model_dirs / "ddlp"), *extra, "--horizon", "1", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ddlp what-if: error:") and message in err and "Traceback" not in err


def test_cli_reads_an_episode_of_an_hdf5_file(model_dirs, tmp_path, capsys):
    from ddlp.data.balls import write_balls
    write_balls(tmp_path, episodes={"test": 2}, seqlen=8, progress=False)
    rc = main(["what-if", str(model_dirs / "ddlp"), "--input", str(tmp_path / "test.hdf5"), "--episode", "1",
               "--move", "0:0.1,0", "--horizon", "2", "--out", str(tmp_path / "out")])
    assert rc == 0, capsys.readouterr().err
    record = json.loads((tmp_path / "out" / "edits.json").read_text())
    assert record["input"] == f"{tmp_path / 'test.hdf5'} episode 1"
    assert Image.open(tmp_path / "out" / "what-if.gif").n_frames == 4 + 2


def test_cli_rejects_a_non_ddlp_checkpoint(model_dirs, tmp_path, capsys):
    assert main(["what-if", str(model_dirs / "dlp"), "--balls", "0", "--out", str(tmp_path)]) == 2
    assert "needs a DDLP video model" in capsys.readouterr().err
    assert main(["what-if", str(model_dirs / "short.npy"), "--balls", "0"]) == 2
    assert "is a file; expected a model directory" in capsys.readouterr().err


def test_the_default_burn_in_is_the_models(tmp_path, capsys):
    from ddlp.studio import Studio
    torch.manual_seed(0)
    three = build_model(Config.preset("balls_small", n_kp_enc=4, n_kp_prior=10, topk=4, num_static_frames=3)).eval()
    r = W.what_if(three, balls_clip(length=5), [W.move(0, dx=0.05)], 2)
    assert r.cond_steps == 3 and tuple(r.edit_frames) == (0, 3) and r.edited.shape[1] == 3 + 2
    assert W.encode_conditioning(three, balls_clip(length=5)).position.shape[1] == 3
    assert Studio(three, {}).info()["cond_steps"] == 3
    three.save_pretrained(tmp_path / "m")
    assert main(["what-if", str(tmp_path / "m"), "--balls", "0", "--move", "0:0.05,0", "--horizon", "1",
                 "--out", str(tmp_path / "out")]) == 0
    record = json.loads((tmp_path / "out" / "edits.json").read_text())
    assert record["cond_steps"] == 3 and record["edit_frames"] == [0, 3]


def test_cli_what_if_in_bf16(model_dirs, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["what-if", str(model_dirs / "ddlp"), "--balls", "0", "--move", "2:-0.2,0", "--horizon", "3",
               "--precision", "bf16", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert json.loads((out / "edits.json").read_text())["precision"] == "bf16"
    rows = list(csv.DictReader(open(out / "trajectories.csv")))
    x = {(r["rollout"], int(r["t"]), int(r["particle"])): float(r["x"]) for r in rows}
    assert x[("edited", 0, 2)] - x[("original", 0, 2)] == pytest.approx(-0.2, abs=1e-4)   # edits stay exact
    assert all(np.isfinite(float(r["x"])) for r in rows)
