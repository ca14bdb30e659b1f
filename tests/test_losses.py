"""Loss primitives against closed forms / torch.distributions, and the VGG perceptual loss."""
import pytest
import torch
from torch.distributions import Beta, Normal, kl_divergence

from ddlp.losses import beta_divergence, chamfer_kl, gaussian_kl, pixel_sse
from ddlp.nn import vgg
from ddlp.nn.vgg import VGG16Features, VGGPerceptualLoss, WeightsNotFound, find_vgg16_weights


def test_gaussian_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mu, lv, mu0, lv0 = (torch.randn(5, 3, generator=g, dtype=torch.float64) for _ in range(4))
    ref = kl_divergence(Normal(mu, (0.5 * lv).exp()), Normal(mu0, (0.5 * lv0).exp())).sum(-1)
    assert torch.allclose(gaussian_kl(mu, lv, mu0, lv0), ref, atol=1e-12)
    assert torch.allclose(gaussian_kl(mu, lv, 0.0, 0.0), kl_divergence(
        Normal(mu, (0.5 * lv).exp()), Normal(0.0, 1.0)).sum(-1), atol=1e-12)


def test_beta_kl_matches_torch_up_to_the_official_epsilon():
    a, b = torch.tensor([0.5, 2.0, 7.0], dtype=torch.float64), torch.tensor([1.5, 0.3, 2.0], dtype=torch.float64)
    ref = kl_divergence(Beta(a, b), Beta(torch.full_like(a, 0.1), torch.full_like(b, 0.1)))
    ours = beta_divergence(a, b, 0.1, 0.1)
    assert torch.allclose(ours, ref, rtol=1e-3)          # the 1e-5 shifts inside lgamma/digamma
    assert torch.allclose(beta_divergence(a, b, a, b), torch.zeros_like(a), atol=1e-12)


def test_chamfer_kl_on_a_known_case():
    pts = torch.tensor([[[0.0, 0.0], [1.0, 0.0]]])
    tgt = torch.tensor([[[0.0, 0.1], [1.0, 0.0], [0.0, 1.0]]])
    # nearest for each target: 0.01, 0, 1 -> /2 ; nearest for each point: 0.01, 0 -> /2
    expected = 0.5 * (0.01 + 0.0 + 1.0) + 0.5 * (0.01 + 0.0)
    assert torch.allclose(chamfer_kl(pts, tgt), torch.tensor([expected]), atol=1e-6)


def test_pixel_sse_is_a_per_image_sum():
    a, b = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)
    assert torch.equal(pixel_sse(a, b), torch.tensor([48.0, 48.0]))


def test_vgg_perceptual_loss_formula_with_random_weights():
    torch.manual_seed(0)
    net = VGG16Features().eval()
    loss = VGGPerceptualLoss(net)
    x, y = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    mean = torch.tensor(vgg.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(vgg.IMAGENET_STD).view(1, 3, 1, 1)
    # direct: run torchvision's layer order and keep post-ReLU relu1_2, relu2_2, relu3_2, relu4_3, pool5
    h_x, h_y, expected = (x - mean) / std, (y - mean) / std, (x - y).pow(2).sum((1, 2, 3))
    for i, layer in enumerate(net.features[:31]):
        h_x, h_y = layer(h_x), layer(h_y)
        if i in (3, 8, 13, 22, 30):
            expected = expected + 0.12151 * (h_x - h_y).pow(2).sum((1, 2, 3))
    assert torch.allclose(loss(y, x), expected, rtol=1e-5)
    assert torch.equal(loss(x, x), torch.zeros(2))
    assert [f.shape[1:] for f in net(torch.rand(1, 3, 128, 128))] == [
        (64, 128, 128), (128, 64, 64), (256, 32, 32), (512, 16, 16), (512, 4, 4)]


def test_vgg_weights_are_found_in_the_hub_cache_or_a_given_file(tmp_path, monkeypatch):
    torch.save(VGG16Features().state_dict(), tmp_path / "mine.pth")
    assert find_vgg16_weights(tmp_path / "mine.pth") == tmp_path / "mine.pth"
    VGG16Features.pretrained(tmp_path / "mine.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    cache = tmp_path / "home" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / vgg.VGG16_FILE).write_bytes((tmp_path / "mine.pth").read_bytes())
    assert find_vgg16_weights() == cache / vgg.VGG16_FILE


def test_missing_vgg_weights_offline_explain_how_to_provide_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("DDLP_VGG16_WEIGHTS", raising=False)

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsNotFound) as e:
        find_vgg16_weights()
    msg = str(e.value)
    assert vgg.VGG16_URL in msg and "DDLP_VGG16_WEIGHTS" in msg and str(tmp_path) in msg
    with pytest.raises(WeightsNotFound, match="not found at"):
        find_vgg16_weights(tmp_path / "absent.pth")
