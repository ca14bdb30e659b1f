"""PINT on cached posteriors of a frozen encoder: the cache round trip and its windows, the
stand-still start, position-only trunk gradients, and that only the prior moves while its KL goes
down."""
import pytest
import torch
from test_train import Clips, tiny_config

from ddlp.losses import dynamics_kl
from ddlp.model import build_model
from ddlp.pint import RelativeBias
from ddlp.pint_tuning import (PosteriorCache, encode_posteriors, mirror, resample, start_from_stand_still,
                              symmetry_centre, tune_pint)


@pytest.fixture(scope="module")
def cache():
    torch.manual_seed(0)
    model = build_model(tiny_config())
    return model, encode_posteriors(model, Clips(n=8, frames=9), clips=6, batch_size=4)


def test_cache_holds_distributions_and_round_trips(cache, tmp_path):
    model, c = cache
    assert len(c) == 6 and c.frames == 9 and c.particles.position.shape == (6, 9, model.config.n_kp_enc, 2)
    c.save(tmp_path / "posteriors.safetensors")
    back = PosteriorCache.load(tmp_path / "posteriors.safetensors")
    for name, value in vars(c.particles).items():
        other = getattr(back.particles, name)
        assert (value is None and other is None) or torch.equal(value, other), name
    with pytest.raises(ValueError, match="posterior distributions"):
        PosteriorCache(c.particles.values())


def test_windows_are_consecutive_frames_and_samples_follow_the_posterior(cache):
    _, c = cache
    g = torch.Generator().manual_seed(1)
    w = c.windows(32, 5, g)
    assert w.position.shape[:2] == (32, 5)
    full = c.particles.position_mu
    for i in range(32):                        # each window is a run of 5 frames of one cached clip
        hits = [(n, s) for n in range(len(c)) for s in range(c.frames - 4)
                if torch.equal(full[n, s:s + 5], w.position_mu[i])]
        assert hits, i
    with pytest.raises(ValueError, match="do not fit"):
        c.windows(1, 10)
    torch.manual_seed(0)
    draws = [resample(c.particles) for _ in range(400)]
    features = torch.stack([d.features for d in draws])
    std = c.particles.features_logvar.mul(0.5).exp()
    assert (features.mean(0) - c.particles.features_mu).abs().max() < 4 * std.max() / 20   # 4 sigma of a mean of 400
    assert torch.allclose(features.std(0), std, rtol=0.2)
    assert all(torch.equal(d.position_mu, c.particles.position_mu) for d in draws[:3])  # distributions are kept


def test_stand_still_start_matches_the_data_and_looks_back(cache):
    model, c = cache
    p = c.particles
    pint = model.build_pint()
    start_from_stand_still(pint, p, recency_bias=4.0, value_std=0.1)
    for block in pint.blocks:                               # reads reach the residual stream with gain ~0.6
        for w in (block.attn.value.weight, block.attn.proj.weight):
            assert 0.08 < float(w.detach().std()) < 0.12
    change = (p.position_mu[:, 1:] - p.position_mu[:, :-1]).pow(2).flatten(0, -2).mean(0)
    best = (change + p.position_logvar.exp().flatten(0, -2).mean(0)).log()   # KL-optimal "no change" variance
    assert torch.allclose(pint.readout.position_y_head.bias[1], best[0], atol=1e-5)
    assert torch.allclose(pint.readout.position_x_head.bias[1], best[1], atol=1e-5)
    assert torch.allclose(pint.readout.transparency_head.bias, torch.stack(
        [p.transparency_a.log().mean(), p.transparency_b.log().mean()]), atol=1e-5)
    T, N = 4, model.config.n_kp_enc + 1
    for table in (m for m in pint.modules() if isinstance(m, RelativeBias)):
        bias = table(T)                                     # [heads, N*T, N*T], token n*T + t
        for h in range(bias.shape[0]):
            for n in range(N):
                for t in range(h, T):                       # head h looks h frames back, same particle
                    assert int(bias[h, n * T + t].argmax()) == n * T + t - h


def test_position_only_trunk_changes_gradients_not_outputs(cache):
    from ddlp.losses import gaussian_kl
    model, c = cache
    p = c.sample(4, 5)
    pint = model.pint.eval()
    plain, routed = pint(p[:, :-1]), pint(p[:, :-1], position_only_trunk=True)
    for name, value in vars(plain).items():
        assert value is None or torch.equal(value, getattr(routed, name)), name
    post = p[:, 2:]

    def position_term(q):
        return gaussian_kl(post.anchor + post.offset_mu, post.position_logvar, q.position_mu[:, 1:],
                           q.position_logvar[:, 1:]).sum()

    trunk, head = pint.blocks[0].attn.query.weight, pint.readout.scale_head.weight
    full_kl = lambda q: dynamics_kl(p, q, 2, torch.ones(3))  # noqa: E731
    routed_grads = torch.autograd.grad(full_kl(pint(p[:, :-1], position_only_trunk=True)), [trunk, head])
    plain_grads = torch.autograd.grad(full_kl(pint(p[:, :-1])), [trunk, head])
    position_grad = torch.autograd.grad(position_term(pint(p[:, :-1])) / 4, trunk)[0]
    assert torch.allclose(routed_grads[0], position_grad, rtol=1e-4, atol=1e-8)   # the trunk: position only
    assert not torch.allclose(plain_grads[0], position_grad, rtol=1e-2)
    assert torch.allclose(routed_grads[1], plain_grads[1])                        # the heads: as before


def test_tune_prior_lowers_the_dynamics_kl_and_leaves_the_encoder_alone():
    torch.manual_seed(0)
    model = build_model(tiny_config())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = tune_pint(model, Clips(n=16), steps=40, batch_size=8, clips=16, lr=3e-3, reset=True,
                       position_only_trunk=True, progress=False)
    after = model.state_dict()
    assert stats["pint_steps"] == 40 and stats["pint_clips"] == 16
    assert stats["pint_loss_after"] < 0.9 * stats["pint_loss_before"]
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("pint.") for k in changed)


def test_tune_prior_stops_at_its_time_budget(cache):
    model, c = cache
    stats = tune_pint(model, c, steps=10**6, max_minutes=0.02, batch_size=4, progress=False)
    assert 0 < stats["pint_steps"] < 10**6 and stats["pint_seconds"] < 1.2 + 5


def test_tune_prior_needs_a_ddlp():
    with pytest.raises(TypeError, match="DDLP"):
        tune_pint(build_model(tiny_config(model="dlp")), Clips(), steps=1, progress=False)


def test_cli_tunes_a_saved_model(tmp_path, capsys, monkeypatch):
    import ddlp.pint_tuning
    from ddlp.storage import save_pretrained
    from ddlp.cli import main
    from ddlp.data.balls import write_balls
    from ddlp.model import ParticleModel
    write_balls(tmp_path / "data", episodes={"train": 2, "val": 1, "test": 1}, seqlen=20, progress=False)
    model = build_model(tiny_config())
    save_pretrained(model, tmp_path / "model")
    seen = {}

    def spy(model, cache, **kw):
        seen.update(kw, dropouts={m.p for m in model.pint.modules() if isinstance(m, torch.nn.Dropout)})
        stats = tune_pint(model, cache, **kw)
        seen["after"] = {m.p for m in model.pint.modules() if isinstance(m, torch.nn.Dropout)}
        return stats
    monkeypatch.setattr(ddlp.pint_tuning, "tune_pint", spy)
    assert main(["tune-pint", str(tmp_path / "model"), "--data.root", str(tmp_path / "data"),
                 "--out", str(tmp_path / "tuned"), "--steps", "3", "--clips", "4", "--frames", "12",
                 "--batch-size", "2", "--lr", "1e-3", "--bias-lr", "0.02", "--reset", "--position-only-trunk",
                 "--spread-anchors", "--centred-positions", "--max-minutes", "1", "--dropout", "0", "--symmetric",
                 "--seed", "1"]) == 0
    assert seen["dropout"] == 0 and seen["dropouts"] == {0.1} and seen["after"] == {0.0}
    assert seen["symmetric"] is True
    out = capsys.readouterr().out
    assert "dynamics KL" in out and "on 4 clips" in out
    tuned_model = ParticleModel.from_pretrained(tmp_path / "tuned")
    assert tuned_model.config.root == model.config.root  # not mutated
    assert tuned_model.config.spread_anchors and not model.config.spread_anchors
    assert tuned_model.config.centred_positions and not model.config.centred_positions
    tuned = tuned_model.state_dict()
    original = model.state_dict()
    assert not torch.equal(tuned["pint.head.weight"], original["pint.head.weight"])
    assert torch.equal(tuned["glimpse_decoder.fc.0.weight"], original["glimpse_decoder.fc.0.weight"])
    assert main(["tune-pint", str(tmp_path / "model"), "--data.root", str(tmp_path / "data"),
                 "--out", str(tmp_path / "x"), "--frames", "3"]) != 0
    assert "at least timestep_horizon + 1 = 5" in capsys.readouterr().err
    # the command's first name still runs it
    assert main(["tune-prior", str(tmp_path / "model"), "--data.root", str(tmp_path / "data"),
                 "--out", str(tmp_path / "x"), "--frames", "3"]) != 0
    assert "at least timestep_horizon + 1 = 5" in capsys.readouterr().err
    save_pretrained(build_model(tiny_config(model="dlp")), tmp_path / "dlp")
    assert main(["tune-pint", str(tmp_path / "dlp"), "--out", str(tmp_path / "x")]) != 0
    assert "needs a DDLP" in capsys.readouterr().err


def test_the_stand_still_start_lowers_the_dynamics_kl_of_a_fresh_prior():
    torch.manual_seed(0)
    model = build_model(tiny_config())
    stats = tune_pint(model, Clips(n=8), steps=0, clips=8, reset=True, progress=False)
    assert stats["pint_steps"] == 0        # "before": the model's own fresh PINT, "after": a stand-still start
    assert stats["pint_loss_after"] < 0.9 * stats["pint_loss_before"], stats


def test_tune_pint_can_train_without_dropout(cache):
    model, c = cache
    ps = lambda: {m.p for m in model.pint.modules() if isinstance(m, torch.nn.Dropout)} | {  # noqa: E731
        b.attn.dropout for b in model.pint.blocks}
    assert ps() == {0.1}
    tune_pint(model, c, steps=2, batch_size=4, progress=False)
    assert ps() == {0.1}                    # left as it was unless asked
    tune_pint(model, c, steps=2, batch_size=4, dropout=0.0, progress=False)
    assert ps() == {0.0}
    model.pint.train()
    x = c.windows(4, model.config.timestep_horizon)
    torch.testing.assert_close(model.pint(x).position_mu, model.pint(x).position_mu, rtol=0, atol=0)
    model.pint.set_dropout(0.1)
    assert ps() == {0.1} and not torch.equal(model.pint(x).position_mu, model.pint(x).position_mu)


def test_mirror_draws_the_eight_symmetries_of_the_square_about_the_centre(cache):
    _, c = cache
    w = c.windows(256, 5, torch.Generator().manual_seed(0))
    w = w.replace(scale=torch.randn_like(w.scale), scale_mu=torch.randn_like(w.scale))  # tell y from x
    centre = torch.tensor([0.1, -0.2])
    m = mirror(w, centre, torch.Generator().manual_seed(1))
    d, dm = w.position - centre, m.position - centre
    maps = set()
    for i in range(len(d)):      # one map per window: the same signed permutation of every frame and particle
        for swap in (False, True):
            src = d[i].flip(-1) if swap else d[i]
            sign = dm[i, 0, 0] / src[0, 0]
            if torch.allclose(dm[i], src * sign.sign(), atol=1e-6):
                maps.add((swap, *sign.sign().tolist()))
                scale = w.scale_mu[i].flip(-1) if swap else w.scale_mu[i]
                assert torch.equal(m.scale_mu[i], scale)
                break
        else:
            raise AssertionError(f"window {i} is not mirrored rigidly")
    assert len(maps) == 8
    torch.testing.assert_close(m.position_mu, m.anchor + m.offset_mu)   # the KL's reading of the mean holds
    assert torch.equal(m.features, w.features) and torch.equal(m.transparency, w.transparency)
    # pairwise distances inside a frame are kept
    torch.testing.assert_close(torch.cdist(m.position[:, 0], m.position[:, 0]),
                               torch.cdist(w.position[:, 0], w.position[:, 0]))


def test_symmetry_centre_is_the_middle_of_where_visible_particles_go(cache):
    _, c = cache
    torch.manual_seed(0)
    p = c.particles
    n = p.position_mu.numel() // 2
    box = torch.rand(p.position_mu.shape) * torch.tensor([0.8, 1.2]) + torch.tensor([-0.3, -0.5])
    visible = torch.rand(p.transparency_a.shape) < 0.5
    # invisible particles sit anywhere and must not move the centre
    mu = torch.where(visible[..., None], box, box + 5)
    p = p.replace(position_mu=mu, transparency_a=torch.where(visible, 9.0, 1.0), transparency_b=torch.ones_like(mu[..., 0]))
    torch.testing.assert_close(symmetry_centre(p, tail=0.0), torch.tensor([0.1, 0.1]), atol=0.02 + 10 / n, rtol=0)
    hidden = p.replace(transparency_a=torch.ones_like(p.transparency_b))    # none on: the middle of all
    torch.testing.assert_close(symmetry_centre(hidden, tail=0.0), (mu.amin((0, 1, 2)) + mu.amax((0, 1, 2))) / 2)



def test_symmetry_centre_ignores_particles_off_the_image(cache):
    # a seed-1 Balls encoder kept 1.3 % of its visible particles near x = -2.7, where they draw
    # nothing; with them the centre came out at x = -0.86 and mirrored windows left the image
    _, c = cache
    torch.manual_seed(0)
    p = c.particles
    mu = torch.rand(p.position_mu.shape) * 1.6 - 0.8                  # the box: centre (0, 0)
    stray = torch.rand(mu.shape[:-1]) < 0.02
    mu = torch.where(stray[..., None], torch.tensor([0.0, -2.7]) + 0.1 * torch.rand(mu.shape), mu)
    p = p.replace(position_mu=mu, transparency_a=torch.full_like(mu[..., 0], 9.0),
                  transparency_b=torch.ones_like(mu[..., 0]))
    torch.testing.assert_close(symmetry_centre(p, tail=0.0), torch.zeros(2), atol=0.02, rtol=0)
    everywhere = p.replace(position_mu=mu + 3)       # nothing inside: all the visible ones count
    torch.testing.assert_close(symmetry_centre(everywhere, tail=0.0), (mu + 3).amin((0, 1, 2)) / 2 + (mu + 3).amax((0, 1, 2)) / 2)

def test_tune_pint_can_train_on_mirrored_windows(cache):
    model, c = cache
    stats = tune_pint(model, c, steps=3, batch_size=4, symmetric=True, progress=False)
    assert stats["pint_steps"] == 3 and len(stats["pint_symmetry_centre"]) == 2
    assert "pint_symmetry_centre" not in tune_pint(model, c, steps=1, batch_size=4, progress=False)
