"""The learning-free predictors of `ddlp evaluate --baselines`, on trajectories with known answers."""
import pytest
import torch

from ddlp.baselines import extrapolate, predict_particles
from ddlp.metrics import med_errors, med_summary
from ddlp.particles import Particles


def straight_lines(B=3, T=30, O=3, seed=0):
    """Balls moving at constant velocity inside the image (no walls, no collisions): (x, y) in
    image-side units [B, T, O, 2]."""
    g = torch.Generator().manual_seed(seed)
    start = 0.3 + 0.4 * torch.rand(B, 1, O, 2, generator=g, dtype=torch.float64)
    velocity = (torch.rand(B, 1, O, 2, generator=g, dtype=torch.float64) - 0.5) * 0.01
    return start + velocity * torch.arange(T, dtype=torch.float64).view(1, T, 1, 1), velocity


def score(guess, xy, cond):
    seen = torch.ones(xy.shape[:3], dtype=torch.bool)
    return med_errors(guess, seen.double(), xy, seen, match_t=cond)[:, cond:]


def test_constant_velocity_is_exact_on_straight_lines_and_stand_still_grows_linearly():
    xy, velocity = straight_lines()
    cond, T = 10, xy.shape[1]
    cv = score(extrapolate(xy[:, :cond], T - cond, "constant_velocity"), xy, cond)
    assert cv.abs().max() < 1e-12 and med_summary(cv)["med10"] < 1e-11
    still = score(extrapolate(xy[:, :cond], T - cond, "stand_still"), xy, cond)
    speed = velocity.norm(dim=-1).mean((1, 2))                               # [B]
    k = torch.arange(1, T - cond + 1, dtype=torch.float64)
    assert torch.allclose(still, speed[:, None] * k, atol=1e-12)             # error k * |v| at step k
    assert med_summary(still)["med10"] == pytest.approx(float(speed.mean() * 55), rel=1e-9)


def test_extrapolate_keeps_the_observed_frames_and_checks_its_input():
    x = torch.randn(2, 5, 4, 2)
    out = extrapolate(x, 3, "constant_velocity")
    assert out.shape == (2, 8, 4, 2) and torch.equal(out[:, :5], x)
    assert torch.allclose(out[:, 7], x[:, 4] + 3 * (x[:, 4] - x[:, 3]))
    assert torch.equal(extrapolate(x, 2, "stand_still")[:, 6], x[:, 4])
    with pytest.raises(ValueError, match="unknown baseline"):
        extrapolate(x, 2, "teleport")
    with pytest.raises(ValueError, match="two observed frames"):
        extrapolate(x[:, :1], 2, "constant_velocity")


def test_particle_baselines_move_positions_only():
    B, T, K, F = 2, 4, 3, 5
    p = Particles(position=torch.randn(B, T, K, 2), scale=torch.randn(B, T, K, 2), depth=torch.randn(B, T, K, 1),
                  transparency=torch.rand(B, T, K), features=torch.randn(B, T, K, F), bg_features=torch.randn(B, T, F),
                  position_mu=torch.randn(B, T, K, 2))
    out = predict_particles(p, 6, "constant_velocity")
    assert out.position.shape == (B, T + 6, K, 2) and out.position_mu is None      # values only
    assert torch.allclose(out.position[:, -1], p.position[:, -1] + 6 * (p.position[:, -1] - p.position[:, -2]))
    for name in ("scale", "depth", "transparency", "features", "bg_features"):
        v = getattr(out, name)
        assert torch.equal(v[:, :T], getattr(p, name)) and torch.equal(v[:, -1], getattr(p, name)[:, -1])
