"""DiffuseDDLP tokens, latent statistics and normalisation."""
import numpy as np
import pytest
import torch

from ddlp import Particles
from ddlp.diffusion.latents import EPS, LatentNormalizer, LatentStats, clip_indices, default_clips, fingerprint
from ddlp.diffusion.tokens import TokenLayout, from_tokens, to_tokens

LAYOUT = TokenLayout(n_particles=3, features_dim=2, bg_features_dim=2)


def particles(B=2, T=4, K=3, m=2, seed=0) -> Particles:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return Particles(position=r(B, T, K, 2).tanh(), scale=r(B, T, K, 2), depth=r(B, T, K, 1),
                     transparency=torch.rand(B, T, K, generator=g), features=r(B, T, K, m),
                     bg_features=r(B, T, m))


def test_token_layout_and_padding_mask():
    assert (LAYOUT.fg_dim, LAYOUT.bg_dim, LAYOUT.token_dim, LAYOUT.n_tokens) == (8, 4, 8, 4)
    mask = LAYOUT.padding_mask()
    assert mask.shape == (4, 8)
    assert mask[:3].eq(1).all()
    assert mask[3].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]


def test_particles_tokens_round_trip():
    p = particles()
    x = to_tokens(p, LAYOUT)
    assert x.shape == (2, 4, 4, 8)
    # slot order: position, scale, depth, transparency, features; background [0, 0, f, pad]
    assert torch.equal(x[..., 1, 0:2], p.position[..., 1, :])
    assert torch.equal(x[..., 1, 5], p.transparency[..., 1])
    assert torch.equal(x[..., 3, 2:4], p.bg_features)
    assert x[..., 3, :2].eq(0).all() and x[..., 3, 4:].eq(0).all()
    q = from_tokens(x, LAYOUT)
    for name in ("position", "scale", "depth", "transparency", "features", "bg_features"):
        assert torch.equal(getattr(q, name), getattr(p, name)), name
    assert q.depth.shape == p.depth.shape and q.transparency.shape == p.transparency.shape


def test_tokens_reject_wrong_particles():
    with pytest.raises(ValueError, match="do not fit"):
        to_tokens(particles(K=2), LAYOUT)
    with pytest.raises(ValueError, match="background"):
        to_tokens(particles().replace(bg_features=None), LAYOUT)
    with pytest.raises(ValueError, match="expected tokens"):
        from_tokens(torch.zeros(1, 4, 5, 8), LAYOUT)


def test_statistics_pool_frames_and_particles():
    x = to_tokens(particles(B=5), LAYOUT)
    stats = LatentStats.from_tokens(x, LAYOUT, fingerprint="abc")
    fg = x[:, :, :3, :8].reshape(-1, 8)
    bg = x[:, :, 3, 2:4].reshape(-1, 2)
    assert torch.allclose(stats.fg_mean, fg.mean(0), atol=1e-6)
    assert torch.allclose(stats.fg_std, fg.std(0), atol=1e-6)          # unbiased, as upstream
    assert torch.equal(stats.fg_min, fg.min(0).values) and torch.equal(stats.fg_max, fg.max(0).values)
    assert torch.allclose(stats.bg_mean, bg.mean(0), atol=1e-6) and torch.equal(stats.bg_max, bg.max(0).values)
    assert (stats.clips, stats.frames, stats.fingerprint) == (5, 4, "abc")


@pytest.mark.parametrize("mode", ["minmax", "std"])
def test_normalise_unnormalise_round_trip(mode):
    x = to_tokens(particles(B=6), LAYOUT)
    norm = LatentNormalizer(LAYOUT, mode)
    norm.set_stats(LatentStats.from_tokens(x, LAYOUT))
    z = norm.normalize(x)
    assert torch.allclose(norm.unnormalize(z), x, atol=1e-5)
    fg = z[:, :, :3, :8].reshape(-1, 8)
    if mode == "minmax":   # the data span [-1, 1] (up to eps) per feature
        assert torch.allclose(fg.min(0).values, torch.full((8,), -1.0), atol=1e-6)
        assert (fg.max(0).values < 1).all() and (fg.max(0).values > 1 - 1e-3).all()
    else:                  # standardised per feature
        assert torch.allclose(fg.mean(0), torch.zeros(8), atol=1e-5)
        assert torch.allclose(fg.std(0), torch.ones(8), atol=1e-3)
    # the background's centre slots and the padding are never normalised
    assert torch.equal(z[..., 3, :2], x[..., 3, :2]) and torch.equal(z[..., 3, 4:], x[..., 3, 4:])


def test_minmax_formula_is_the_official_one():
    x = to_tokens(particles(B=3), LAYOUT)
    stats = LatentStats.from_tokens(x, LAYOUT)
    norm = LatentNormalizer(LAYOUT, "minmax")
    norm.set_stats(stats)
    want = 2 * (x[..., :3, :8] - stats.fg_min) / (stats.fg_max - stats.fg_min + EPS) - 1
    assert torch.allclose(norm.normalize(x)[..., :3, :8], want, atol=1e-6)


def test_clip_bounds_keep_std_latents():
    x = to_tokens(particles(B=8), LAYOUT)
    for mode in ("minmax", "std"):
        norm = LatentNormalizer(LAYOUT, mode)
        norm.set_stats(LatentStats.from_tokens(x, LAYOUT))
        lo, hi = norm.clip_bounds()
        z = norm.normalize(x)
        if mode == "minmax":
            assert lo.eq(-1).all() and hi.eq(1).all()          # as upstream
        else:
            # the official clamp to [-1, 1] would cut standardised data at one sigma; ours keeps it
            assert (z.abs() > 1.2).any()
            assert torch.equal(torch.clamp(z, lo, hi)[..., :3, :8], z[..., :3, :8])
            assert torch.allclose(torch.clamp(z, lo, hi), z, atol=1e-5)


def test_stats_file_round_trip_and_mismatch_messages(tmp_path):
    x = to_tokens(particles(B=3), LAYOUT)
    stats = LatentStats.from_tokens(x, LAYOUT, fingerprint="f00d")
    path = stats.save(tmp_path / "s.safetensors")
    back = LatentStats.load(path)
    assert back.fingerprint == "f00d" and back.clips == 3
    assert torch.equal(back.fg_max, stats.fg_max)
    back.check(LAYOUT, "f00d")                     # same DDLP: fine
    with pytest.raises(ValueError, match="different DDLP"):
        back.check(LAYOUT, "beef")
    with pytest.raises(ValueError, match="different model"):
        back.check(TokenLayout(3, 5, 5), "f00d")
    with pytest.raises(FileNotFoundError, match="not found"):
        LatentStats.load(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a latent statistics file"):
        LatentStats.load(tmp_path / "junk.safetensors")


def test_official_latent_stats_pth(tmp_path):
    sd = {"mu": torch.arange(8.0), "std": torch.ones(8), "min_val": -torch.ones(8), "max_val": torch.ones(8),
          "mu_bg": torch.zeros(2), "std_bg": torch.ones(2), "min_val_bg": -torch.ones(2),
          "max_val_bg": 2 * torch.ones(2)}
    torch.save(sd, tmp_path / "latent_stats.pth")
    stats = LatentStats.load(tmp_path / "latent_stats.pth")
    assert torch.equal(stats.fg_mean, torch.arange(8.0)) and torch.equal(stats.bg_max, 2 * torch.ones(2))
    torch.save({"mu": torch.zeros(8)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="missing"):
        LatentStats.load(tmp_path / "bad.pth")


def test_fingerprint_tracks_weights():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    assert fingerprint(a) == fingerprint(b)
    with torch.no_grad():
        b.bias[0] += 1e-3
    assert fingerprint(a) != fingerprint(b)


def test_clip_selection_uses_episode_starts():
    class Windows:                      # 3 episodes x 5 windows, like BallsDataset's train split
        windows = 5

        def __len__(self):
            return 15
    assert clip_indices(Windows(), "first") == [0, 5, 10]
    assert clip_indices(Windows(), "all") == list(range(15))
    assert clip_indices(Windows(), "first", max_clips=2) == [0, 5]
    assert clip_indices(list(range(4)), "first") == [0, 1, 2, 3]    # no window structure: every item
    with pytest.raises(ValueError, match="clips must be"):
        clip_indices(Windows(), "some")

    class Table:                        # ClipDataset: rows (episode, first frame, frames)
        items = np.array([[0, 0, 5], [0, 1, 5], [1, 0, 5], [1, 1, 5], [1, 2, 5]])

        def __len__(self):
            return 5
    assert clip_indices(Table(), "first") == [0, 2]
    assert clip_indices(Table(), "all") == [0, 1, 2, 3, 4]
    assert (default_clips("traffic"), default_clips("obj3d"), default_clips("balls")) == ("all", "first", "first")


def test_tokens_of_a_centred_model_decode_to_its_frames():
    """DiffuseDDLP stores positions as the DDLP encodes them: with centred_positions, object
    centres, which its decode moves back to glimpse centres from the features and scales the
    tokens keep."""
    from test_model import small

    from ddlp import DDLP
    from ddlp.data.synthetic import moving_discs
    from ddlp.model import reconfigured
    x = moving_discs(frames=3, size=64, batch=2, n_discs=2, seed=2)
    plain = DDLP(small(timestep_horizon=2)).eval()
    centred = reconfigured(plain, centred_positions=True).eval()
    with torch.no_grad():
        p, q = plain.encode(x), centred.encode(x)
        layout = TokenLayout(q.num_particles, q.features.shape[-1], q.bg_features.shape[-1])
        back = from_tokens(to_tokens(q, layout), layout)
        assert not torch.allclose(back.position, p.position, atol=1e-3)
        torch.testing.assert_close(centred.decode(back), plain.decode(p), atol=1e-5, rtol=0)
