"""Metrics against hand-computed values: PSNR / SSIM / LPIPS (piqa 1.3.x conventions), MED, FVD."""
import itertools
import math

import numpy as np
import pytest
import torch

from ddlp.data.balls import generate_split
from ddlp.metrics import (
    LPIPS,
    frechet_distance,
    frechet_distance_from_stats,
    gaussian_window,
    linear_assignment,
    load_lpips_weights,
    match_once,
    med_errors,
    med_summary,
    particles_to_xy,
    psnr,
    ssim,
    ssim_map,
    xy_to_particles,
)
from ddlp.metrics.fvd import i3d_features, i3d_preprocess, load_i3d
from ddlp.metrics.lpips import LPIPS_CHANNELS, LPIPS_TAPS, find_lpips_weights
from ddlp.nn.vgg import IMAGENET_MEAN, IMAGENET_STD, VGG16Features, WeightsNotFound

C1, C2 = 0.01 ** 2, 0.03 ** 2


# ---------------------------------------------------------------------------------- PSNR
def test_psnr_hand_computed():
    x = torch.zeros(3, 3, 4, 4)
    y = x.clone()
    y[1] = 1.0                                   # MSE 1 -> 10 log10(1 / (1 + 1e-8))
    y[2, :, :2] = 0.5                            # half the pixels off by 0.5: MSE 0.125
    got = psnr(x, y)
    assert got[0].item() == pytest.approx(80.0, abs=1e-6)          # the 1e-8 guard, not infinity
    assert got[1].item() == pytest.approx(10 * math.log10(1 / (1 + 1e-8)), abs=1e-6)
    assert got[2].item() == pytest.approx(10 * math.log10(1 / (0.125 + 1e-8)), abs=1e-5)
    assert psnr(x * 255, y * 255, value_range=255.0)[2].item() == pytest.approx(got[2].item(), abs=1e-4)


def test_psnr_is_per_image_mean_over_all_elements():
    x, y = torch.rand(4, 3, 8, 8), torch.rand(4, 3, 8, 8)
    mse = ((x.double() - y.double()) ** 2).reshape(4, -1).mean(1)
    assert torch.allclose(psnr(x, y).double(), 10 * torch.log10(1 / (mse + 1e-8)), atol=1e-5)
    with pytest.raises(ValueError, match="same shape"):
        psnr(x, y[:2])


# ---------------------------------------------------------------------------------- SSIM
def test_gaussian_window_matches_piqa_example():
    # piqa's documented gaussian_kernel(5, sigma=1.5)
    assert torch.allclose(gaussian_window(5, 1.5), torch.tensor([0.1201, 0.2339, 0.2921, 0.2339, 0.1201]), atol=1e-4)
    g = gaussian_window()
    assert g.numel() == 11 and g.sum().item() == pytest.approx(1.0) and g.argmax().item() == 5


def _ssim_reference(x: np.ndarray, y: np.ndarray) -> float:
    """Direct float64 evaluation: Gaussian-weighted statistics of every valid 11x11 window of
    every channel, the SSIM formula, mean over channels and windows."""
    i = np.arange(11) - 5
    g = np.exp(-i ** 2 / (2 * 1.5 ** 2))
    g /= g.sum()
    w = np.outer(g, g)
    vals = []
    C, H, W = x.shape
    for c in range(C):
        for r in range(H - 10):
            for s in range(W - 10):
                a, b = x[c, r:r + 11, s:s + 11], y[c, r:r + 11, s:s + 11]
                mx, my = (w * a).sum(), (w * b).sum()
                vx, vy = (w * a * a).sum() - mx ** 2, (w * b * b).sum() - my ** 2
                cov = (w * a * b).sum() - mx * my
                vals.append((2 * mx * my + C1) / (mx ** 2 + my ** 2 + C1) * (2 * cov + C2) / (vx + vy + C2))
    return float(np.mean(vals))


def test_ssim_matches_direct_window_computation():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, 14, 13, generator=g)
    y = (0.6 * x + 0.4 * torch.rand(2, 3, 14, 13, generator=g)).clamp(0, 1)
    got = ssim(x, y)
    for n in range(2):
        assert got[n].item() == pytest.approx(_ssim_reference(x[n].double().numpy(), y[n].double().numpy()), abs=1e-5)


def test_ssim_special_values_and_shape():
    x = torch.rand(2, 3, 64, 64)
    assert ssim_map(x, x).shape == (2, 3, 54, 54)                 # valid convolution, no padding
    assert torch.allclose(ssim(x, x), torch.ones(2), atol=1e-5)
    zeros, ones = torch.zeros(1, 3, 16, 16), torch.ones(1, 3, 16, 16)
    assert ssim(zeros, ones).item() == pytest.approx(C1 / (1 + C1), rel=1e-4)   # only C1 survives
    a, b = torch.full((1, 3, 11, 11), 0.2), torch.full((1, 3, 11, 11), 0.7)
    expected = (2 * 0.14 + C1) / (0.04 + 0.49 + C1)               # constant images: sigma terms vanish
    assert ssim(a.double().fill_(0.2), b.double().fill_(0.7)).item() == pytest.approx(expected, abs=1e-12)
    assert ssim(a, b).item() == pytest.approx(expected, abs=1e-4)  # float32 cancellation, as in piqa
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))


def test_ssim_is_per_channel_not_grey():
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(1, 3, 16, 16, generator=g), torch.rand(1, 3, 16, 16, generator=g)
    per_channel = torch.stack([ssim(x[:, c:c + 1], y[:, c:c + 1]) for c in range(3)]).mean()
    assert ssim(x, y).item() == pytest.approx(per_channel.item(), abs=1e-6)
    grey = ssim(x.mean(1, keepdim=True), y.mean(1, keepdim=True))
    assert abs(grey.item() - per_channel.item()) > 1e-3


# ---------------------------------------------------------------------------------- LPIPS
@pytest.fixture(scope="module")
def random_lpips():
    torch.manual_seed(0)
    net = VGG16Features().eval()
    weights = [torch.rand(c) for c in LPIPS_CHANNELS]
    return LPIPS(net, weights), net, weights


def test_lpips_equals_its_formula_with_random_weights(random_lpips):
    metric, net, weights = random_lpips
    x, y = torch.rand(3, 3, 32, 32), torch.rand(3, 3, 32, 32)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    def taps(img):
        h, out = (img - mean) / std, []
        for i, layer in enumerate(net.features):
            h = layer(h)
            if i in LPIPS_TAPS:
                out.append(h)
        return out

    expected = torch.zeros(3)
    with torch.no_grad():
        for w, fx, fy in zip(weights, taps(x), taps(y)):
            nx = fx / (fx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            ny = fy / (fy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            expected += ((nx - ny) ** 2).mean((2, 3)) @ w
    got = metric(x, y)
    assert got.shape == (3,)
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(metric(x, x), torch.zeros(3), atol=1e-7)
    assert (got > 0).all()


def test_lpips_weight_file_order_and_validation(tmp_path, random_lpips, monkeypatch):
    _, _, weights = random_lpips
    # The official v0.1 file layout, keys deliberately out of order.
    state = {f"lin{i}.model.1.weight": weights[i].view(1, -1, 1, 1) for i in (3, 0, 4, 2, 1)}
    path = tmp_path / "vgg.pth"
    torch.save(state, path)
    loaded = load_lpips_weights(path)
    assert [w.numel() for w in loaded] == list(LPIPS_CHANNELS)
    assert all(torch.equal(a, b) for a, b in zip(loaded, weights))
    alex = tmp_path / "alex.pth"
    torch.save({f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate((64, 192, 384, 256, 256))}, alex)
    with pytest.raises(ValueError, match="not an LPIPS VGG weight file"):
        load_lpips_weights(alex)
    # lookup order: explicit path, environment, torch hub cache; never a download when told so
    monkeypatch.delenv("DDLP_LPIPS_WEIGHTS", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(WeightsNotFound, match="download disabled.*vgg.pth"):
        find_lpips_weights(download=False)
    with pytest.raises(WeightsNotFound, match="not found at"):
        find_lpips_weights(tmp_path / "missing.pth")
    monkeypatch.setenv("DDLP_LPIPS_WEIGHTS", str(path))
    assert find_lpips_weights(download=False) == path
    monkeypatch.delenv("DDLP_LPIPS_WEIGHTS")
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    cached = tmp_path / "hub" / "checkpoints" / "vgg.pth"
    cached.write_bytes(path.read_bytes())
    assert find_lpips_weights(download=False) == cached


# ---------------------------------------------------------------------------------- MED
def test_coordinate_conventions():
    pos = torch.tensor([[-1.0, 1.0], [1.0, -1.0], [0.0, 0.0]])      # (row, col)
    exact = particles_to_xy(pos, 64)
    assert torch.allclose(exact[0], torch.tensor([63.5 / 64, 0.5 / 64], dtype=torch.float64))   # (x, y)
    assert torch.allclose(exact[1], torch.tensor([0.5 / 64, 63.5 / 64], dtype=torch.float64))
    assert torch.allclose(exact[2], torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert torch.allclose(particles_to_xy(pos, 64, "naive")[0], torch.tensor([1.0, 0.0], dtype=torch.float64))
    assert torch.allclose(xy_to_particles(exact, 64), pos.double(), atol=1e-12)
    with pytest.raises(ValueError, match="mapping"):
        particles_to_xy(pos, 64, "centre")


def test_linear_assignment_is_optimal():
    rng = np.random.default_rng(0)
    for trial in range(60):
        n, m = int(rng.integers(1, 5)), int(rng.integers(1, 6))
        cost = rng.random((n, m))
        if trial % 3 == 0:
            cost[rng.random((n, m)) < 0.3] = np.nan
        pairs = linear_assignment(cost)
        assert len({i for i, _ in pairs}) == len(pairs) == len({j for _, j in pairs})
        best = None
        for perm in itertools.permutations(range(max(n, m)), min(n, m)):
            ps = list(zip(range(n), perm)) if n <= m else list(zip(perm, range(m)))
            ps = [(i, j) for i, j in ps if np.isfinite(cost[i, j])]
            key = (-len(ps), sum(cost[i, j] for i, j in ps))
            best = key if best is None or key < best else best
        assert -len(pairs) == best[0] and sum(cost[i, j] for i, j in pairs) == pytest.approx(best[1])


def _balls(episodes=3, frames=24):
    data = generate_split(episodes, 9, frames)
    gt_xy = torch.from_numpy(data["positions"]) / 64                      # (x, y), image-side units
    return gt_xy, torch.from_numpy(data["in_camera"]) > 0


def test_med_zero_for_ground_truth_particles_and_known_offset():
    gt_xy, seen = _balls()
    particles = xy_to_particles(gt_xy, 64).float()                        # (row, col) in [-1, 1]
    on = torch.ones(seen.shape)
    err = med_errors(particles_to_xy(particles, 64), on, gt_xy, seen, match_t=10)[:, 10:]
    assert err.abs().max().item() < 1e-6
    shifted = particles_to_xy(particles, 64) + torch.tensor([2 / 64, 0.0], dtype=torch.float64)  # 2 px right
    summary = med_summary(med_errors(shifted, on, gt_xy, seen, match_t=10)[:, 10:])
    assert summary["med10"] == pytest.approx(10 * 2 / 64, abs=1e-6)
    assert np.allclose(summary["per_step"], 2 / 64) and summary["med_overall"] == pytest.approx(2 / 64)


def test_med_matching_presence_and_fixed_pairs():
    gt = torch.tensor([[0.2, 0.2], [0.8, 0.8]], dtype=torch.float64)
    pred = torch.tensor([[0.21, 0.2], [0.2, 0.2], [0.8, 0.79], [0.5, 0.5]], dtype=torch.float64)
    on = torch.tensor([0.9, 0.1, 0.9, 0.9])          # particle 1 sits exactly on ball 0 but is transparent
    assert match_once(pred, on, gt, torch.tensor([True, True])) == [(0, 0), (1, 2)]
    # fewer candidates than balls: fall back to every particle (or give up when told so)
    assert match_once(pred, torch.zeros(4), gt, torch.tensor([True, True])) == [(0, 1), (1, 2)]
    assert match_once(pred, torch.zeros(4), gt, torch.tensor([True, True]), fallback=False) == []
    # pairs are fixed at the matching frame: particles swapping later are not re-matched
    T = 3
    gt_t = gt.expand(T, 2, 2).clone()[None]
    pred_t = pred.expand(T, 4, 2).clone()[None]
    pred_t[0, 2, 0], pred_t[0, 2, 2] = pred[2], pred[0]
    err = med_errors(pred_t, on.expand(1, T, 4), gt_t, torch.ones(1, T, 2, dtype=torch.bool), match_t=0)[0]
    assert err[0].item() == pytest.approx((0.01 + 0.01) / 2)
    swapped = math.dist((0.2, 0.2), (0.8, 0.79)) + math.dist((0.8, 0.8), (0.21, 0.2))
    assert err[2].item() == pytest.approx(swapped / 2)


def test_med_summary_sums_ten_steps_and_propagates_nan():
    errors = torch.arange(1, 13, dtype=torch.float64).repeat(3, 1) / 100      # 3 episodes x 12 steps
    errors[1, 11] = math.nan
    s = med_summary(errors)
    assert s["med10"] == pytest.approx(sum(range(1, 11)) / 100)
    assert math.isnan(s["per_step"][11]) and s["steps_summed"] == 10 and s["episodes"] == 3
    assert med_summary(errors[:, :4])["med10"] is None               # fewer than 10 scored steps


def test_copy_last_frame_baseline_grows_with_time():
    gt_xy, seen = _balls(episodes=8, frames=24)
    frozen = gt_xy.clone()
    frozen[:, 10:] = gt_xy[:, 9:10]                                   # "predict" the last seen frame forever
    errors = med_errors(frozen, torch.ones(seen.shape), gt_xy, seen, match_t=10)[:, 10:]
    px = torch.tensor(med_summary(errors)["per_step"]) * 64
    assert 1.5 < px[0] < 4.5                                          # ~2.7 px/frame, one step ahead
    assert px[9] > 4 * px[0] and (px[1:10] > px[:9]).all()


# ---------------------------------------------------------------------------------- FVD
def test_frechet_distance_closed_forms():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)   # diagonal covariances
    assert frechet_distance_from_stats(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, abs=1e-9)
    A = np.array([[2.0, 0.5], [0.5, 1.0]])
    B = np.array([[1.0, -0.3], [-0.3, 3.0]])                     # does not commute with A
    M = A @ B
    tr_sqrt = math.sqrt(np.trace(M) + 2 * math.sqrt(np.linalg.det(M)))   # trace of the 2x2 sqrtm
    assert frechet_distance_from_stats(np.zeros(2), A, np.zeros(2), B) == pytest.approx(
        np.trace(A) + np.trace(B) - 2 * tr_sqrt, abs=1e-9)


def test_frechet_distance_from_gaussian_samples():
    rng = np.random.default_rng(0)
    A = np.array([[2.0, 0.5], [0.5, 1.0]])
    real = rng.multivariate_normal([0.0, 0.0], A, size=40000)
    fake = rng.multivariate_normal([1.0, -1.0], 4 * A, size=40000)     # cov 4A: sqrtm term = 2A
    expected = 2.0 + np.trace(A) + 4 * np.trace(A) - 2 * 2 * np.trace(A)
    assert frechet_distance(real, fake) == pytest.approx(expected, abs=0.1)
    assert abs(frechet_distance(real, real)) < 1e-6
    assert frechet_distance(real[:1], fake[:1]) == pytest.approx(np.sum((real[0] - fake[0]) ** 2))
    with pytest.raises(ValueError, match="same D"):
        frechet_distance(real, fake[:, :1])


def test_i3d_preprocess_and_features():
    videos = torch.rand(3, 10, 3, 32, 48)
    x = i3d_preprocess(videos)
    assert x.shape == (3, 3, 10, 224, 224) and x.min() >= -1 and x.max() <= 1
    with pytest.raises(ValueError, match="T >= 10"):
        i3d_preprocess(torch.rand(1, 5, 3, 32, 32))

    class Detector(torch.nn.Module):
        def forward(self, x: torch.Tensor, rescale: bool = True, resize: bool = True,
                    return_features: bool = False) -> torch.Tensor:
            assert not rescale and not resize and return_features
            return x.mean((2, 3, 4))

    feats = i3d_features(Detector(), videos, batch_size=2)
    assert torch.allclose(feats, i3d_preprocess(videos).mean((2, 3, 4)), atol=1e-6)


def test_load_i3d_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="i3d_torchscript.pt"):
        load_i3d(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a TorchScript I3D model"):
        load_i3d(bad)
