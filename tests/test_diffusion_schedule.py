"""DiffuseDDLP noise schedule: cosine betas, forward noising and the posterior, against closed
forms computed independently in float64."""
import math

import pytest
import torch

from ddlp.diffusion.schedule import NoiseSchedule, cosine_betas


def closed_form_alpha_bar(n: int, s: float = 0.008) -> torch.Tensor:
    """alpha_bar_t for paper steps t = 1..n, straight from the cosine formula (no clipping needed
    below the last step)."""
    f = lambda u: math.cos((u / n + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    return torch.tensor([f(t) / f(0) for t in range(1, n + 1)], dtype=torch.float64)


def test_cosine_schedule_matches_formula():
    n = 1000
    betas = cosine_betas(n)
    assert betas.dtype == torch.float64 and betas.shape == (n,)
    assert float(betas.min()) > 0 and float(betas.max()) == pytest.approx(0.999)   # last step clipped
    abar = torch.cumprod(1 - betas, 0)
    want = closed_form_alpha_bar(n)
    # identical until the clipped final step
    assert torch.allclose(abar[:-1], want[:-1], rtol=1e-10, atol=1e-12)
    assert betas[0] == pytest.approx(1 - want[0].item(), rel=1e-10)


def test_buffers_are_float32_and_consistent():
    sched = NoiseSchedule(200)
    assert sched.betas.dtype == torch.float32 and sched.betas.shape == (200,)
    b = cosine_betas(200)
    abar = torch.cumprod(1 - b, 0)
    assert torch.allclose(sched.alphas_cumprod.double(), abar, rtol=1e-6)
    assert sched.alphas_cumprod_prev[0] == 1
    assert torch.allclose(sched.alphas_cumprod_prev[1:], sched.alphas_cumprod[:-1])
    # no persistent state: a schedule is derived from the config
    assert sched.state_dict() == {}


def test_forward_noising_is_the_closed_form():
    sched = NoiseSchedule(100)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 4, 3, 7, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0, 10, 50, 98, 99])
    xt = sched.q_sample(x0, t, noise)
    abar = torch.cumprod(1 - cosine_betas(100), 0)
    for i, ti in enumerate(t.tolist()):
        want = abar[ti].sqrt() * x0[i].double() + (1 - abar[ti]).sqrt() * noise[i].double()
        assert torch.allclose(xt[i].double(), want, atol=1e-5)


def test_one_shot_noising_equals_step_by_step_in_distribution():
    """q(x_t | x_0) = N(sqrt(abar_t) x0, 1 - abar_t): the product of the per-step kernels."""
    sched = NoiseSchedule(50)
    g = torch.Generator().manual_seed(1)
    x0 = torch.full((20000,), 0.7)
    x = x0.clone()
    for s in range(30):
        beta = sched.betas[s]
        x = (1 - beta).sqrt() * x + beta.sqrt() * torch.randn(x.shape, generator=g)
    abar = sched.alphas_cumprod[29]
    assert float(x.mean()) == pytest.approx(float(abar.sqrt() * 0.7), abs=0.02)
    assert float(x.var()) == pytest.approx(float(1 - abar), abs=0.02)


def test_posterior_mean_and_variance_closed_form():
    """q(x_{t-1} | x_t, x_0) by Bayes: precision = 1/(1 - abar_{t-1}) + alpha_t/beta_t, mean =
    var * (sqrt(abar_{t-1}) x0 / (1 - abar_{t-1}) + sqrt(alpha_t) x_t / beta_t)."""
    n = 1000
    sched = NoiseSchedule(n)
    betas = cosine_betas(n)
    abar = torch.cumprod(1 - betas, 0)
    g = torch.Generator().manual_seed(2)
    x0, xt = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    t = torch.tensor([1, 17, 500, 998])
    mean, var, logvar = sched.q_posterior(x0, xt, t)
    for i, ti in enumerate(t.tolist()):
        a_prev, beta = abar[ti - 1], betas[ti]
        prec = 1 / (1 - a_prev) + (1 - beta) / beta
        want_var = 1 / prec
        want_mean = want_var * (a_prev.sqrt() * x0[i].double() / (1 - a_prev)
                                 + (1 - beta).sqrt() * xt[i].double() / beta)
        assert float(var[i]) == pytest.approx(float(want_var), rel=1e-4)
        assert float(logvar[i]) == pytest.approx(math.log(want_var), abs=1e-4)
        assert torch.allclose(mean[i].double(), want_mean, atol=1e-4)
    # t = 0: the posterior is the point x0 (variance 0, log-variance clipped, not -inf)
    mean0, var0, logvar0 = sched.q_posterior(x0[:1], xt[:1], torch.tensor([0]))
    assert float(var0) == 0 and torch.allclose(mean0, x0[:1], atol=1e-6)
    assert float(logvar0) == pytest.approx(math.log(1e-20))


def test_noise_and_x0_conversions_invert_each_other():
    sched = NoiseSchedule(100)
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    t = torch.tensor([0, 40, 99])
    xt = sched.q_sample(x0, t, eps)
    assert torch.allclose(sched.noise_from_x0(xt, t, x0), eps, atol=1e-3)
    assert torch.allclose(sched.x0_from_noise(xt, t, eps), x0, atol=1e-3)


def test_bad_schedule_arguments():
    with pytest.raises(ValueError, match="unknown noise schedule"):
        NoiseSchedule(10, "quadratic")
    with pytest.raises(ValueError, match="at least 2"):
        NoiseSchedule(1)
