"""DiffuseDDLP training: the x0-prediction loss falls on a toy two-cluster particle distribution,
EMA samples recover its statistics, and training resumes exactly."""
import shutil

import pytest
import torch

from ddlp.diffusion.latents import LatentStats
from ddlp.diffusion.model import DiffuseDDLP, DiffusionConfig
from ddlp.diffusion.sampler import ddim_sample, ddpm_sample
from ddlp.diffusion.train import DiffusionTrainer, DiffusionTrainOptions

pytestmark = pytest.mark.usefixtures("one_thread")

CENTRE = 0.5   # cluster A: every foreground slot at +0.5 and background features at -0.5; B mirrored


def two_clusters(layout, M=256, seed=0) -> torch.Tensor:
    """Raw tokens [M, 2, 2, F]: one particle + background, two frames, clusters 50/50, sd 0.03."""
    g = torch.Generator().manual_seed(seed)
    sign = (torch.rand(M, generator=g) < 0.5).float() * 2 - 1
    x = torch.zeros(M, 2, layout.n_tokens, layout.token_dim)
    x[:, :, 0, :layout.fg_dim] = CENTRE * sign[:, None, None] + 0.03 * torch.randn(M, 2, layout.fg_dim, generator=g)
    x[:, :, 1, 2:layout.bg_dim] = -CENTRE * sign[:, None, None] + 0.03 * torch.randn(M, 2, 1, generator=g)
    return x


def toy_model(**kw) -> DiffuseDDLP:
    args = dict(n_kp_enc=1, learned_feature_dim=1, bg_learned_feature_dim=1, diffuse_frames=2, pint_dim=32,
                pint_heads=4, pint_layers=2, dropout=0.0, diffusion_num_steps=100, batch_size=64, lr=2e-3,
                ema_decay=0.95, ema_update_every=1, ema_update_after_step=50)
    args.update(kw)
    torch.manual_seed(0)
    return DiffuseDDLP(DiffusionConfig(**args))


def test_toy_two_clusters_are_learned_and_sampled(tmp_path):
    model = toy_model()
    L = model.layout
    tokens = two_clusters(L)
    model.normalizer.set_stats(LatentStats.from_tokens(tokens, L))
    trainer = DiffusionTrainer(model, tokens, DiffusionTrainOptions(run_dir=str(tmp_path), progress=False))
    for _ in range(400):
        trainer.train_step()
    losses = trainer.losses
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.6 * first, (first, last)

    ema = trainer.ema_model.eval()
    assert not ema.training
    for name, sample, tol_mean, min_close in (
            ("ddpm", lambda: ddpm_sample(ema, 400, torch.Generator().manual_seed(1)), 0.05, 0.6),
            ("ddim", lambda: ddim_sample(ema, 400, 50, generator=torch.Generator().manual_seed(1)), 0.05, 0.5)):
        x = ema.normalizer.unnormalize(sample())
        fg, bg = x[:, :, 0, :L.fg_dim], x[:, :, 1, 2]
        side = torch.sign(fg.mean((1, 2)))
        frac_a = float((side > 0).float().mean())
        assert 0.35 < frac_a < 0.65, (name, frac_a)                       # both modes, balanced
        deviation = (fg - CENTRE * side[:, None, None]).abs().amax((1, 2))
        assert float((deviation < 0.15).float().mean()) >= min_close, name  # samples sit on a cluster
        # per-slot centres recovered. Medians: after 400 steps a few samples still sit between the
        # clusters, and how many depends on the CPU's rounding (means of 8 model seeds were off by up
        # to 0.14, medians by at most 0.021)
        for s in (1, -1):
            data = tokens[:, :, 0, :L.fg_dim][torch.sign(tokens[:, 0, 0, 0]) == s].mean((0, 1))
            got = fg[side == s].flatten(0, 1).median(0).values
            assert torch.allclose(got, data, atol=tol_mean), (name, s, got, data)
        # the background agrees with the particle's cluster (the joint structure is learned)
        assert float((torch.sign(bg.mean(1)) == -side).float().mean()) > 0.8, name


def test_resume_continues_exactly(tmp_path):

    def fresh(run):
        model = toy_model(dropout=0.1, ema_update_after_step=0, batch_size=8)
        tokens = two_clusters(model.layout, M=20)
        model.normalizer.set_stats(LatentStats.from_tokens(tokens, model.layout))
        opts = DiffusionTrainOptions(run_dir=str(run), max_steps=3, checkpoint_every=100, progress=False,
                                     preview_every=0)
        return DiffusionTrainer(model, tokens, opts)

    a = fresh(tmp_path / "a")
    a.train()                                   # 3 steps, checkpoint step-3
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    a.opt.max_steps = 6
    a.train()                                   # uninterrupted to 6
    b = fresh(tmp_path / "b")
    assert b.resume() and b.step == 3
    b.opt.max_steps = 6
    b.train()
    assert b.losses == pytest.approx(a.losses[3:], rel=0, abs=0)
    for (k, va), vb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(va, vb), k
    for (k, va), vb in zip(a.ema_model.state_dict().items(), b.ema_model.state_dict().values()):
        assert torch.equal(va, vb), k
    assert int(a.ema.n_averaged) == int(b.ema.n_averaged) == 6
    # the EMA differs from the online weights (it averages), and the model dir holds the EMA
    online = a.model.denoiser.head.weight
    assert not torch.equal(online, a.ema_model.denoiser.head.weight)
    saved = DiffuseDDLP.from_pretrained(tmp_path / "a" / "model")
    assert torch.equal(saved.denoiser.head.weight, a.ema_model.denoiser.head.weight)
    assert (tmp_path / "a" / "checkpoints" / "latest").read_text() == "step-00000006"


def test_trainer_rejects_tokens_of_another_shape(tmp_path):
    model = toy_model()
    with pytest.raises(ValueError, match="training tokens have shape"):
        DiffusionTrainer(model, torch.zeros(4, 3, 2, model.layout.token_dim),
                         DiffusionTrainOptions(run_dir=str(tmp_path)))
