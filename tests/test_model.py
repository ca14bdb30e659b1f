"""Model behaviour beyond parity: shapes, gradients, determinism, persistence, bad input."""
import pytest
import torch

from ddlp import DDLP, DLP, Config, ConfigError, Particles
from ddlp.data.synthetic import moving_discs
from ddlp.losses import elbo
from ddlp.model import ParticleModel, build_model


def small(model="ddlp", **kw):
    base = dict(model=model, image_size=64, enc_channels=[8, 16, 16], prior_channels=[8, 8, 16],
                patch_size=8, n_kp_enc=4, n_kp_prior=8, learned_feature_dim=3, pint_dim=32,
                pint_heads=4, pint_layers=2, timestep_horizon=4)
    base.update(kw)
    return Config.from_dict(base)


@pytest.mark.parametrize("size,anchor_s,patch,enc", [
    (32, 0.5, 4, [8, 16]), (64, 0.25, 8, [8, 16, 16]), (64, 0.25, 32, [8, 16, 16]),
    (128, 0.25, 16, [8, 8, 16, 16]), (128, 0.125, 16, [8, 8, 16, 16]), (256, 0.125, 32, [8, 8, 8, 16, 16]),
])
def test_shapes_over_image_and_patch_sizes(size, anchor_s, patch, enc):
    n_patches = (size // patch) ** 2
    K = min(4, n_patches)
    cfg = small(image_size=size, anchor_s=anchor_s, patch_size=patch, enc_channels=enc,
                n_kp_enc=K, n_kp_prior=min(8, n_patches))
    g = cfg.glimpse_size
    model = DDLP(cfg)
    B, T = 2, cfg.timestep_horizon + 1
    x = torch.rand(B, T, 3, size, size)
    out = model(x)
    p, q = out.posterior, out.dynamics
    assert out.rec.shape == x.shape and out.bg.shape == x.shape
    assert p.position.shape == (B, T, K, 2) and p.scale.shape == (B, T, K, 2)
    assert p.depth.shape == (B, T, K, 1) and p.transparency.shape == (B, T, K)
    assert p.features.shape == (B, T, K, 3) and p.bg_features.shape == (B, T, 3)
    assert out.glimpses.shape == (B, T, K, 3, g, g)
    assert out.foreground.glimpses.shape == (B, T, K, 4, g, g)
    assert out.foreground.alpha_masks.shape == (B, T, K, 1, size, size)
    assert out.proposals.shape == (B, T, min(8, n_patches), 2)
    assert q.position_mu.shape == (B, T - 1, K, 2) and q.bg_mu.shape == (B, T - 1, 3)
    assert torch.isfinite(elbo(out, x, cfg)["loss"])
    img = DLP(small("dlp", image_size=size, anchor_s=anchor_s, patch_size=patch, enc_channels=enc,
                    n_kp_enc=K, n_kp_prior=min(8, n_patches)))
    o = img(x[:, 0])
    assert o.rec.shape == (B, 3, size, size) and o.posterior.position.shape == (B, K, 2)


def _trainable_without_grad(model, x, **flags):
    model.train()
    out = model(x, **{k: v for k, v in flags.items() if k in ("warmup", "noisy")})
    extra = {"discount": torch.ones(model.config.timestep_horizon)} if model.config.is_video else {}
    logs = elbo(out, x, model.config, warmup=flags.get("warmup", False), noisy=flags.get("noisy", False), **extra)
    model.zero_grad()
    logs["loss"].backward()
    return [n for n, p in model.named_parameters()
            if p.requires_grad and n not in SOFTMAX_INVARIANT
            and (p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0)]


# A bias added to every logit of a softmax has an exactly zero gradient (in the official model too).
SOFTMAX_INVARIANT = {"prior.cnn.keymap.bias"}


def test_gradients_reach_every_parameter_ddlp():
    torch.manual_seed(1)
    model = DDLP(small())
    x = moving_discs(frames=5, size=64, batch=2, seed=3)
    assert _trainable_without_grad(model, x) == []


def test_gradients_reach_every_parameter_dlp_with_mixer():
    model = DLP(small("dlp", filtering_heuristic="none", n_kp_prior=64))
    x = moving_discs(frames=1, size=64, batch=2, seed=3)[:, 0]
    assert _trainable_without_grad(model, x) == []


def test_warmup_trains_the_prior_through_the_chamfer_term():
    model = DDLP(small())
    x = moving_discs(frames=5, size=64, batch=2, seed=4)
    missing = _trainable_without_grad(model, x, warmup=True, noisy=True)
    assert not [n for n in missing if n.startswith("prior.")]


def test_deterministic_mode_repeats_bit_for_bit():
    model = DDLP(small()).eval()
    x = moving_discs(frames=5, size=64, batch=2, seed=5)
    a = model(x, deterministic=True)
    torch.manual_seed(123)
    b = model(x, deterministic=True)
    assert torch.equal(a.rec, b.rec) and torch.equal(a.dynamics.position_mu, b.dynamics.position_mu)
    r1, p1 = model.rollout(x, steps=7, cond_steps=3)
    r2, p2 = model.rollout(x, steps=7, cond_steps=3)
    assert torch.equal(r1, r2) and torch.equal(p1.position, p2.position)
    c = model(x, deterministic=False)                       # sampling really samples
    assert not torch.equal(a.posterior.position, c.posterior.position)


def test_deterministic_values_are_the_means():
    model = DDLP(small()).eval()
    out = model(moving_discs(frames=5, size=64, batch=1, seed=6), deterministic=True)
    p = out.posterior
    assert torch.equal(p.position, p.anchor + p.offset_mu) and torch.equal(p.scale, p.scale_mu)
    assert torch.equal(p.transparency, p.transparency_a / (p.transparency_a + p.transparency_b))
    # the tracking anchor of frame t is the position of frame t-1
    assert torch.equal(p.anchor[:, 1:], p.position[:, :-1])


def test_rollout_shapes_and_sliding_window():
    cfg = small()
    model = DDLP(cfg).eval()
    x = moving_discs(frames=3, size=64, batch=2, seed=7)
    frames, p = model.rollout(x, steps=9, cond_steps=3)       # 12 frames > window of 4
    assert frames.shape == (2, 12, 3, 64, 64) and p.position.shape == (2, 12, 4, 2)
    assert torch.isfinite(frames).all()
    enc = model.encode(x)
    assert torch.allclose(p.position[:, :3], enc.position)
    with pytest.raises(ValueError, match="cond_steps=5"):
        model.rollout(x, steps=2, cond_steps=5)


def test_with_fresh_pint_keeps_everything_but_pint():
    from ddlp.model import with_fresh_pint
    model = DDLP(small())
    fresh = with_fresh_pint(model, pint_velocity_input=True)
    assert fresh.config.pint_velocity_input and not model.config.pint_velocity_input
    old, new = model.state_dict(), fresh.state_dict()
    assert all(torch.equal(v, new[k]) for k, v in old.items() if not k.startswith("pint."))
    assert any(k.startswith("pint.embedding.velocity.") for k in new)
    x = moving_discs(frames=5, size=64, batch=1, seed=3)
    with torch.no_grad():   # same encoder: same posterior
        assert torch.equal(model.encode(x).position, fresh.encode(x).position)
    with pytest.raises(ValueError, match="only PINT fields"):
        with_fresh_pint(model, n_kp_enc=3)
    spread = with_fresh_pint(model, spread_anchors=True)      # changes no weight: allowed
    assert spread.config.spread_anchors and spread.prior.spacing > 0
    from ddlp.model import reconfigured
    same = reconfigured(model, spread_anchors=True)
    assert same.prior.spacing > 0 and all(torch.equal(v, same.state_dict()[k]) for k, v in old.items())
    with pytest.raises(ValueError, match="without new weights"):
        reconfigured(model, pint_dim=16)


def test_decode_reconstructs_forward():
    model = DDLP(small()).eval()
    x = moving_discs(frames=5, size=64, batch=1, seed=8)
    out = model(x, deterministic=True)
    assert torch.allclose(model.decode(out.posterior), out.rec, atol=1e-6)
    # decoding a few images at a time (long rollouts) gives the same frames
    with torch.no_grad():
        chunked = model.decode(out.posterior, max_images=2)
    assert chunked.shape == out.rec.shape
    assert torch.allclose(chunked, out.rec, atol=1e-6)


def test_save_and_load_round_trip(tmp_path):
    model = DDLP(small(pint_relative_bias=False)).eval()
    model.save_pretrained(tmp_path / "m")
    assert {p.name for p in (tmp_path / "m").iterdir()} == {"model.safetensors", "config.json", "README.md"}
    loaded = ParticleModel.from_pretrained(tmp_path / "m").eval()
    assert isinstance(loaded, DDLP) and loaded.config == model.config
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    x = moving_discs(frames=5, size=64, batch=1, seed=9)
    assert torch.equal(model(x, deterministic=True).rec, loaded(x, deterministic=True).rec)
    with pytest.raises(FileNotFoundError, match="not a ddlp model directory"):
        ParticleModel.from_pretrained(tmp_path)


def test_bad_input_messages():
    model = DDLP(small())
    with pytest.raises(ValueError, match=r"expected frames of shape \[B, T, 3, 64, 64\].*\(2, 5, 3, 32, 32\)"):
        model(torch.rand(2, 5, 3, 32, 32))
    with pytest.raises(ValueError, match="got \\(2, 5, 1, 64, 64\\)"):
        model(torch.rand(2, 5, 1, 64, 64))
    with pytest.raises(ValueError, match="expected frames"):
        model(torch.rand(2, 3, 64, 64))
    with pytest.raises(ValueError, match="float images"):
        model(torch.zeros(1, 5, 3, 64, 64, dtype=torch.uint8))
    img = DLP(small("dlp"))
    with pytest.raises(ValueError, match=r"expected images of shape \[B, 3, 64, 64\]"):
        img(torch.rand(1, 5, 3, 64, 64))
    x = moving_discs(frames=3, size=64, batch=1)
    with pytest.raises(ValueError, match="timestep_horizon \\+ 1 = 5"):
        elbo(model(x), x, model.config)


@pytest.mark.parametrize("change,message", [
    (dict(patch_size=7), "patch_size"), (dict(image_size=100), "power of two"),
    (dict(anchor_s=0.1), "glimpse"), (dict(n_kp_enc=20), "exceeds"),
    (dict(filtering_heuristic="best"), "filtering_heuristic"), (dict(pint_heads=5), "divisible"),
    (dict(model="vae"), "model must be"), (dict(recon_loss_type="l1"), "recon_loss_type"),
    (dict(ch=1), "RGB"), (dict(enable_enc_attn=True), "not implemented"),
    (dict(enc_channels=[8, 8, 8, 8, 8, 8]), "background map"),
    (dict(image_size="64"), "image_size must be of type int"), (dict(beta_kl=True), "beta_kl"),
    (dict(start_dyn_epoch=2), "start_dyn_epoch 2: holding the dynamics back .* is not implemented"),
    (dict(data_split=[0.5, 0.5]), "data_split must be three fractions"),
    (dict(data_format="gif"), "data_format must be one of"), (dict(data_frame_size=0), "data_frame_size"),
])
def test_invalid_config_values(change, message):
    with pytest.raises(ConfigError, match=message):
        small(**change)
    with pytest.raises(ConfigError, match=message):
        Config.from_dict({**small().to_dict(), **change})


def test_data_options_are_typed_and_round_trip(tmp_path):
    c = small(data_split=[0.6, 0.2, 0.2], data_episode_len=40, data_cache=str(tmp_path))
    assert c.data.split == (0.6, 0.2, 0.2) and c.data.episode_len == 40 and c.data.cache == str(tmp_path)
    assert c.data.format == "auto" and c.data.frame_size is None         # defaults
    c.save(tmp_path / "config.json")
    saved = (tmp_path / "config.json").read_text()
    assert '"data_episode_len": 40' in saved                            # stored flat, as written
    assert Config.from_json(tmp_path / "config.json").data == c.data


def test_presets_and_official_files():
    cfg = Config.preset("balls")
    assert cfg.model == "ddlp" and cfg.n_kp_enc == 6 and cfg.glimpse_size == 16
    assert cfg.extra["animation_fps"] == 0.06            # script-only keys are kept
    assert Config.preset("shapes").model == "dlp"
    with pytest.raises(ConfigError, match="unknown preset"):
        Config.preset("nope")


def test_particles_helpers():
    model = DDLP(small()).eval()
    p = model.encode(moving_discs(frames=5, size=64, batch=2, seed=1))
    assert p.batch_shape == (2, 5) and p.num_particles == 4
    frame = p[:, 2]
    assert frame.position.shape == (2, 4, 2) and frame.bg_features.shape == (2, 3)
    assert torch.equal(Particles.stack([p[:, t] for t in range(5)]).position, p.position)
    assert p.values().position_mu is None and p.detach().position.requires_grad is False
    means = p.means()
    assert torch.equal(means.position, p.position_mu)


def test_dlp_tracking_over_clips():
    """use_tracking: a DLP tracks particles through a clip, with proposals on every frame."""
    model = DLP(small("dlp", use_tracking=True)).eval()
    x = moving_discs(frames=3, size=64, batch=2, seed=2)
    out = model(x, deterministic=True)
    assert out.rec.shape == x.shape and out.posterior.position.shape == (2, 3, 4, 2)
    assert torch.equal(out.posterior.anchor[:, 1:], out.posterior.position[:, :-1])
    assert out.proposals.shape == (2, 3, 8, 2) and not torch.equal(out.proposals[:, 1], out.proposals[:, 2])
    assert torch.isfinite(elbo(out, x, model.config)["loss"])


def test_no_tracking_encodes_each_frame_alone():
    """The "No Tracking" ablation: reversing the clip reverses the particles exactly, which a
    tracking posterior (anchored on the previous frame) does not do."""
    torch.manual_seed(0)
    x = torch.rand(2, 4, 3, 64, 64)
    ablated = build_model(Config.preset("balls_small", no_tracking=True, timestep_horizon=3)).eval()
    tracked = build_model(Config.preset("balls_small", timestep_horizon=3)).eval()
    tracked.load_state_dict(ablated.state_dict())
    for model, equivariant in ((ablated, True), (tracked, False)):
        with torch.no_grad():
            fwd, rev = model.encode(x), model.encode(x.flip(1))
        assert torch.allclose(fwd.position.flip(1), rev.position, atol=1e-5) == equivariant
    assert ablated(x).dynamics.position.shape == (2, 3, ablated.config.n_kp_enc, 2)


@pytest.mark.parametrize("noisy", [False, True])
def test_low_memory_gives_the_same_gradients_and_keeps_less(noisy):
    torch.manual_seed(0)
    cfg = Config.preset("balls_small", timestep_horizon=5)
    model = build_model(cfg)
    x = torch.rand(1, 6, 3, 64, 64)
    grads, kept = [], []
    for low in (False, True):
        model.zero_grad()
        model.low_memory = low
        torch.manual_seed(1)
        sizes = {}
        def keep(t):
            sizes[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            loss = elbo(model(x, noisy=noisy), x, cfg, noisy=noisy)["loss"]
        kept.append(sum(sizes.values()))
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-5)   # noisy: the same noise replayed
    assert grads[0].abs().sum() > 0
    assert kept[1] < 0.4 * kept[0], kept


@pytest.mark.parametrize("noisy", [False, True])
def test_stitch_recomputes_large_canvases_in_backward(noisy, monkeypatch):
    """With gradients and large canvases (here: any), stitching keeps only its small inputs and
    recomputes the [B, K, ., H, W] canvases in backward: the same outputs and gradients as the
    plain blend (the same noise). Small canvases are kept."""
    from ddlp import decoder
    default = decoder.RECOMPUTE_STITCH_BYTES
    torch.manual_seed(0)
    B, K, g, size = 2, 5, 8, 32
    inputs = [torch.rand(B, K, 4, g, g), torch.rand(B, K, 2) * 1.6 - 0.8, torch.randn(B, K, 2) - 2,
              torch.randn(B, K, 1), torch.rand(B, K)]
    results = []
    large = lambda *a: decoder.stitch(*a)        # noqa: E731  (the threshold is patched below)
    for fn in (large, decoder._stitch, decoder.stitch):
        monkeypatch.setattr(decoder, "RECOMPUTE_STITCH_BYTES", 0 if fn is large else default)
        leaves = [t.clone().requires_grad_() for t in inputs]
        kept = {}
        def keep(t):
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        torch.manual_seed(1)
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            fg = fn(*leaves, size, noisy)
        loss = (fg.image * torch.linspace(0, 1, size)).sum() + fg.bg_mask.square().sum() + fg.alpha_masks.sum()
        results.append((fg, torch.autograd.grad(loss, leaves), sum(kept.values())))
    (fg, grads, kept), (fg_ref, grads_ref, kept_ref), (_, _, kept_small) = results
    for a, b in zip((fg.image, fg.bg_mask, fg.alpha_masks), (fg_ref.image, fg_ref.bg_mask, fg_ref.alpha_masks)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    canvas = B * K * size * size * 4          # one float32 [B, K, 1, H, W]
    assert kept_ref > 8 * canvas and kept < canvas and kept_small == kept_ref, (kept, kept_ref, kept_small)


def test_stitch_under_bf16_autocast_keeps_bf16_canvases_close_to_float32():
    """Under bf16 autocast the pasted canvases and the blend stay bf16 (no promotion by the float32
    transparency and depth), within bf16 rounding of the float32 stitch of the same glimpses:
    image and masks to 2 % of their range, and gradients flow to every input."""
    from ddlp.decoder import _stitch
    torch.manual_seed(0)
    B, K, g, size = 2, 5, 8, 32
    glimpses = torch.rand(B, K, 4, g, g).to(torch.bfloat16).float()
    inputs = [glimpses, torch.rand(B, K, 2) * 1.6 - 0.8, torch.randn(B, K, 2) - 1, torch.randn(B, K, 1), torch.rand(B, K)]
    want = _stitch(*inputs, size, False)
    leaves = [t.clone().requires_grad_() for t in inputs]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _stitch(leaves[0].to(torch.bfloat16), *leaves[1:], size, False)
    for a, b in zip((got.image, got.bg_mask, got.alpha_masks), (want.image, want.bg_mask, want.alpha_masks)):
        assert a.dtype == torch.bfloat16
        assert float((a.detach().float() - b).abs().max()) < 0.02
    grads = torch.autograd.grad(got.image.float().sum() + got.bg_mask.float().sum(), leaves)
    assert all(gr is not None and gr.abs().sum() > 0 for gr in grads)


def test_encoder_heads_follow_the_hidden_width():
    from ddlp.encoder import AppearanceEncoder, AttributeEncoder
    attr = AttributeEncoder([8, 16], glimpse=8, image_size=32, correlation=True, hidden=48)
    a = attr(torch.rand(2, 3, 32, 32), torch.zeros(2, 5, 2))
    assert attr.depth_head.in_features == 48 and a.offset_mu.shape == (2, 5, 2) and a.log_a.shape == (2, 5)
    app = AppearanceEncoder([8, 16], glimpse=8, features_dim=3, hidden=40)
    mu, logvar = app(torch.rand(2, 5, 3, 8, 8))
    assert app.features_head.in_features == 40 and mu.shape == logvar.shape == (2, 5, 3)


@pytest.mark.parametrize("model_type,frames", [("ddlp", 5), ("dlp", None)])
def test_the_vgg_objective_is_scaled_in_the_loss_not_in_the_logs(model_type, frames):
    """The official trainer multiplies the whole objective by 1e-3 with the perceptual loss; the
    named parts stay unscaled. Same reconstruction function both ways, so only the scale differs."""
    from ddlp.losses import elbo, pixel_sse
    torch.manual_seed(0)
    cfg = small(model_type)
    model = build_model(cfg).eval()
    x = moving_discs(frames=frames or 1, size=64, batch=2, seed=3)
    x = x if frames else x[:, 0]
    with torch.no_grad():
        out = model(x, deterministic=True)
        mse = elbo(out, x, cfg, recon=pixel_sse)
        vgg_cfg = Config.from_dict({**cfg.to_dict(), "recon_loss_type": "vgg"})
        scaled = elbo(out, x, vgg_cfg, recon=pixel_sse)
    assert torch.allclose(scaled["loss"], 1e-3 * mse["loss"]) and torch.equal(scaled["loss_rec"], mse["loss_rec"])


def test_spread_first_takes_distant_proposals_first():
    from ddlp.proposals import spread_first
    # three proposals on one object, then one on a second object, then one more on the first
    kp = torch.tensor([[[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [0.8, 0.8], [0.05, 0.05]]], requires_grad=True)
    out = spread_first(kp, k=2, spacing=0.5)
    assert out[0].tolist() == kp[0, [0, 3, 1, 2, 4]].tolist()       # taken first, the rest in order
    out[0, 1].sum().backward()                                      # a gather: gradients follow
    assert kp.grad[0, 3].tolist() == [1.0, 1.0] and kp.grad.abs().sum() == 2
    # fewer distant proposals than k: the first k still start with the distant ones
    near = torch.tensor([[[0.0, 0.0], [0.1, 0.0], [0.2, 0.0]]])
    assert spread_first(near, k=2, spacing=0.5)[0].tolist() == near[0].tolist()
    # batch rows are independent
    both = torch.cat([kp.detach(), kp.detach().flip(1)])
    assert torch.equal(spread_first(both, k=2, spacing=0.5)[1, :2], both[1, :2])   # 0.05 and 0.8 apart


def test_spread_anchors_reorders_the_kept_proposals():
    """spread_anchors only reorders the kept proposals (the Chamfer-KL's set is unchanged), and
    the second anchor is a glimpse away from the first whenever a kept proposal is."""
    x = moving_discs(frames=1, size=64, batch=4, n_discs=2, seed=5)[:, 0]
    plain = DDLP(small(n_kp_enc=2))
    spread = DDLP(small(n_kp_enc=2, spread_anchors=True))
    spread.load_state_dict(plain.state_dict())
    assert (plain.prior.spacing, spread.prior.spacing, spread.prior.n_anchors) == (0.0, 0.5, 2)  # a glimpse
    a, b = plain.prior(x)[0], spread.prior(x)[0]
    assert torch.equal(a.sort(1).values, b.sort(1).values)
    gap = (b[:, 0] - b[:, 1]).norm(dim=-1)
    reachable = (torch.cdist(b[:, :1], b)[:, 0] >= 0.5).any(-1)   # a kept proposal far from the first
    assert torch.equal(gap >= 0.5, reachable) and reachable.any()
    assert not Config().spread_anchors


def test_alpha_centres_locate_the_drawn_object():
    """alpha_centres gives where a glimpse's alpha sits, in image units: one lit pixel at glimpse
    index (i, j) is at sigmoid(scale) * (u_i, u_j); and pasted on the canvas, the alpha's centroid
    is at position + that offset."""
    from ddlp.decoder import alpha_centres
    from ddlp.nn.glimpse import paste
    g = 9
    u = torch.linspace(-1, 1, g)
    decoded = torch.zeros(1, 2, 4, g, g)
    decoded[0, 0, 0, 2, 6] = 1.0                            # particle 0: one pixel up and right
    decoded[0, 1, 0, 3:6, 3:6] = 1.0                         # particle 1: a centred square
    scale = torch.tensor([[[0.0, 0.0], [1.0, -1.0]]])       # pre-sigmoid
    offset = alpha_centres(decoded, scale)
    assert torch.allclose(offset[0, 0], 0.5 * torch.stack([u[2], u[6]]))
    assert torch.allclose(offset[0, 1], torch.zeros(2), atol=1e-6)
    # on the canvas: a wide blob, so bilinear resampling keeps its centroid
    blob = torch.exp(-((u[:, None] - 0.3) ** 2 + (u[None, :] + 0.2) ** 2) / 0.1)
    decoded = torch.zeros(1, 1, 4, g, g)
    decoded[0, 0, 0] = blob
    position, scale = torch.tensor([[[0.1, -0.2]]]), torch.tensor([[[-1.0, -1.0]]])
    canvas = paste(decoded, position, torch.sigmoid(scale), 64)[0, 0, 0]
    axis = torch.linspace(-1, 1, 64)
    mass = canvas.sum()
    centroid = torch.stack([(canvas.sum(1) * axis).sum() / mass, (canvas.sum(0) * axis).sum() / mass])
    assert torch.allclose(position[0, 0] + alpha_centres(decoded, scale)[0, 0], centroid, atol=2 / 63 * 0.1)


def test_centred_positions_move_particles_not_pictures():
    """centred_positions changes no weight: encode returns object centres (glimpse centre + the
    alpha offset), decode draws the same frames from them, joint training refuses it."""
    from ddlp.decoder import alpha_centres
    from ddlp.model import reconfigured
    x = moving_discs(frames=3, size=64, batch=2, n_discs=2, seed=2)
    plain = DDLP(small(timestep_horizon=2)).eval()
    centred = reconfigured(plain, centred_positions=True).eval()
    with torch.no_grad():
        p, q = plain.encode(x), centred.encode(x)
        g = plain.config.glimpse_size
        decoded = plain.glimpse_decoder(p.features.reshape(-1, p.features.shape[-1])).view(-1, 4, 4, g, g)
        shift = alpha_centres(decoded, p.scale.reshape(-1, 4, 2)).view(p.position.shape)
        assert shift.abs().max() > 1e-3                      # a random decoder draws off centre
        assert torch.allclose(q.position, p.position + shift, atol=1e-6)
        assert torch.allclose(q.position_mu, p.position_mu + shift, atol=1e-6)
        torch.manual_seed(3)
        noisy = centred.encode(x, deterministic=False)       # centres of the objects seen at the samples
        assert torch.equal(noisy.position_mu, noisy.position)
        assert torch.allclose(noisy.anchor + noisy.offset_mu, noisy.position_mu)   # the dynamics KL's mean
        assert torch.equal(q.features, p.features) and torch.equal(q.scale, p.scale)
        assert torch.allclose(centred.decode(q), plain.decode(p), atol=1e-5)
        assert not torch.allclose(plain.decode(q), plain.decode(p), atol=1e-3)   # the shift matters
        frames, particles = centred.rollout(x, steps=2, cond_steps=2)
        assert frames.shape == (2, 4, 3, 64, 64) and particles.position.shape == (2, 4, 4, 2)
    with pytest.raises(ValueError, match="centred_positions models are trained with glimpse centres"):
        centred.train()(x)
    assert not Config().centred_positions
    with pytest.raises(ConfigError, match="centred_positions is a DDLP option"):
        small(model="dlp", centred_positions=True)
