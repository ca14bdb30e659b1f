"""The DiffuseDDLP denoiser, model directory, samplers' invariants and the official converter."""
import json

import pytest
import torch
from conftest import SHARED, needs_shared

from ddlp.diffusion.convert import convert_denoiser, denoiser_key_map, load_official_diffusion
from ddlp.diffusion.denoiser import SamplingPlan, sinusoidal_embedding
from ddlp.diffusion.model import DiffuseDDLP, DiffusionConfig
from ddlp.diffusion.sampler import ddim_sample, ddim_times, ddpm_sample
from ddlp.diffusion.train import ema_decay


def tiny(**kw) -> DiffuseDDLP:
    args = dict(n_kp_enc=2, learned_feature_dim=2, bg_learned_feature_dim=2, diffuse_frames=3, pint_dim=32,
                pint_heads=4, pint_layers=2, diffusion_num_steps=20)
    args.update(kw)
    torch.manual_seed(0)
    return DiffuseDDLP(DiffusionConfig(**args)).eval()


def test_sinusoidal_embedding_formula():
    t = torch.tensor([0, 3, 999])
    e = sinusoidal_embedding(t, 8)
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(4) / 3)
    assert e.shape == (3, 8)
    assert torch.allclose(e[:, :4], torch.sin(t[:, None] * freqs), atol=1e-5)
    assert torch.allclose(e[:, 4:], torch.cos(t[:, None] * freqs), atol=1e-5)


def test_denoiser_shapes_and_time_conditioning():
    m = tiny()
    x = torch.randn(4, 3, 3, 8)
    out = m.denoiser(x, torch.tensor([0, 5, 10, 19]))
    assert out.shape == x.shape
    same_t = m.denoiser(x, torch.full((4,), 5))
    assert torch.allclose(out[1], same_t[1], atol=1e-6)        # per-sample timestep
    assert not torch.allclose(out[0], same_t[0], atol=1e-4)
    with pytest.raises(ValueError, match="denoiser takes"):
        m.denoiser(torch.randn(1, 3, 4, 8), torch.zeros(1, dtype=torch.long))


def test_denoiser_keeps_the_causal_time_mask():
    """Upstream keeps PINT's causal mask: frame t never sees frames after t."""
    m = tiny()
    x = torch.randn(2, 3, 3, 8)
    t = torch.tensor([7, 7])
    later = x.clone()
    later[:, 2] += 1.0
    a, b = m.denoiser(x, t), m.denoiser(later, t)
    assert torch.allclose(a[:, :2], b[:, :2], atol=1e-6)
    assert not torch.allclose(a[:, 2], b[:, 2], atol=1e-4)
    earlier = x.clone()
    earlier[:, 0, 1] += 1.0                                    # particles see each other in full
    assert not torch.allclose(m.denoiser(earlier, t)[:, 0, 0], a[:, 0, 0], atol=1e-4)


def test_sampling_plan_matches_the_plain_forward():
    """Cached masks, time table and fused q/k/v compute what the module computes."""
    m = tiny()
    x = torch.randn(2, 3, 3, 8)
    t = torch.tensor([4, 4])
    plain = m.denoiser(x, t)
    masks = m.denoiser.attention_masks(3, x)
    temb = m.denoiser.time_embedding(torch.arange(20))[4:5]
    assert torch.allclose(m.denoiser(x, None, masks=masks, temb=temb), plain, atol=1e-6)
    plan = SamplingPlan(m.denoiser, 20, x)
    assert plan.fused
    assert torch.allclose(plan(x, 4), plain, atol=1e-5)
    m.denoiser.blocks[0].mlp = torch.nn.Sequential(*m.denoiser.blocks[0].mlp[:3])   # unexpected structure
    fallback = SamplingPlan(m.denoiser, 20, x)
    assert not fallback.fused
    assert torch.allclose(fallback(x, 4), m.denoiser(x, t), atol=1e-6)


def test_loss_masks_padding_and_averages_all_elements():
    m = tiny(n_kp_enc=1, learned_feature_dim=2, bg_learned_feature_dim=1)   # F = 8, bg uses 3 slots
    x0 = torch.randn(2, 3, 2, 8)
    t = torch.tensor([3, 12])
    noise = torch.randn_like(x0)
    m.train(False)
    out = m.denoiser(m.schedule.q_sample(x0, t, noise), t)
    mask = m.layout.padding_mask()
    want = ((out - x0).abs() * mask).sum() / x0.numel()
    assert float(m.loss(x0, t, noise).detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    # huge values in the padded slots of the target do not enter the loss (unmasked: > 40)
    x0b = x0.clone()
    x0b[:, :, 1, 3:] = 100.0
    assert float(m.loss(x0b, t, noise).detach()) < 5


def test_model_directory_round_trip(tmp_path):
    m = tiny()
    with torch.no_grad():
        m.normalizer.fg_max.fill_(3.0)
    m.config.ddlp_fingerprint = "1234"
    m.save_pretrained(tmp_path / "m")
    back = DiffuseDDLP.from_pretrained(tmp_path / "m")
    assert back.config.ddlp_fingerprint == "1234" and back.config.diffuse_frames == 3
    assert torch.equal(back.normalizer.fg_max, m.normalizer.fg_max)       # statistics travel with the weights
    for k, v in m.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model": "ddlp"}))
    (tmp_path / "other" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="not a DiffuseDDLP model"):
        DiffuseDDLP.from_pretrained(tmp_path / "other")
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        DiffuseDDLP.from_pretrained(tmp_path)


def test_samplers_are_reproducible_and_clip():
    m = tiny()
    a = ddpm_sample(m, 3, torch.Generator().manual_seed(1))
    b = ddpm_sample(m, 3, torch.Generator().manual_seed(1))
    assert a.shape == (3, 3, 3, 8) and torch.equal(a, b)
    assert not torch.equal(a, ddpm_sample(m, 3, torch.Generator().manual_seed(2)))
    d = ddim_sample(m, 3, steps=5, generator=torch.Generator().manual_seed(1))
    # deterministic DDIM ends on the clipped x0 estimate: inside [-1, 1] for minmax
    assert d.abs().max() <= 1
    assert torch.equal(d, ddim_sample(m, 3, steps=5, generator=torch.Generator().manual_seed(1)))


def test_ddim_time_pairs():
    assert ddim_times(1000, 50)[0] == (999, 979) and ddim_times(1000, 50)[-1] == (19, -1)
    assert len(ddim_times(1000, 50)) == 50
    assert ddim_times(10, 10) == [(9, 8), (8, 7), (7, 6), (6, 5), (5, 4), (4, 3), (3, 2), (2, 1), (1, 0), (0, -1)]
    with pytest.raises(ValueError, match="DDIM steps"):
        ddim_times(10, 11)


def test_ema_warmup_schedule_is_the_official_one():
    c = DiffusionConfig()
    assert ema_decay(0, c) == 0 and ema_decay(100, c) == 0 and ema_decay(101, c) == 0
    assert ema_decay(110, c) == pytest.approx(1 - 10 ** (-2 / 3))
    assert ema_decay(10_000_000, c) == 0.995


def official_state(model: DiffuseDDLP) -> dict:
    """Our weights laid out under the official denoiser keys (the inverse of the key map)."""
    key_map = denoiser_key_map(model.config.pint_layers)
    ours = model.state_dict()
    out = {off: ours[k].clone() for off, k in key_map.items() if k is not None}
    T = model.config.diffuse_frames
    for i in range(model.config.pint_layers):
        out[f"particle_transformer.blocks.{i}.attn.mask"] = torch.tril(torch.ones(T, T)).view(1, 1, 1, T, 1, T)
    return out


def test_converter_round_trip_and_errors():
    src = tiny()
    torch.manual_seed(5)
    dst = DiffuseDDLP(src.config)
    dst.load_state_dict(convert_denoiser(official_state(src), dst))
    x, t = torch.randn(2, 3, 3, 8), torch.tensor([1, 9])
    assert torch.allclose(dst.eval().denoiser(x, t), src.denoiser(x, t), atol=1e-6)
    bad = official_state(src)
    bad.pop("particle_decoder.2.bias")
    bad["particle_transformer.blocks.0.attn.mask"] = torch.ones(1, 1, 1, 5, 1, 5)
    with pytest.raises(ValueError) as e:
        convert_denoiser(bad, dst)
    assert "particle_decoder.2.bias" in str(e.value) and "diffuse_frames=5" in str(e.value)


def test_official_checkpoint_file_converts(tmp_path):
    """saves/model.pth (schedule buffers, `model.` denoiser, EMA copy) + latent_stats.pth + the
    converted DDLP -> a model directory that samples like the EMA weights."""
    from ddlp.config import Config
    from ddlp.diffusion.convert import convert_official
    from ddlp.model import build_model
    ddlp_config = Config.preset("balls_small", n_kp_enc=2, n_kp_prior=4, learned_feature_dim=2, pint_dim=32,
                                pint_heads=4, pint_layers=2)
    build_model(ddlp_config).save_pretrained(tmp_path / "ddlp")
    online = DiffuseDDLP(DiffusionConfig.from_ddlp(ddlp_config, diffuse_frames=3, diffusion_num_steps=20)).eval()
    torch.manual_seed(9)
    ema = DiffuseDDLP(online.config).eval()

    def state(m):
        return {"betas": m.schedule.betas.clone(), **{f"model.{k}": v for k, v in official_state(m).items()}}
    torch.save({"step": 3, "model": state(online), "opt": {}, "scaler": None,
                "ema": {"initted": torch.ones(1), "step": torch.tensor([3]),
                        **{f"ema_model.{k}": v for k, v in state(ema).items()},
                        **{f"online_model.{k}": v for k, v in state(online).items()}}}, tmp_path / "model.pth")
    stats = {"mu": torch.zeros(8), "std": torch.ones(8), "min_val": -2 * torch.ones(8),
             "max_val": 2 * torch.ones(8), "mu_bg": torch.zeros(2), "std_bg": torch.ones(2),
             "min_val_bg": -torch.ones(2), "max_val_bg": torch.ones(2)}
    torch.save(stats, tmp_path / "latent_stats.pth")
    ckpt = load_official_diffusion(tmp_path / "model.pth")
    assert ckpt["step"] == 3 and ckpt["ema"] is not None
    model = convert_official(tmp_path / "model.pth", tmp_path / "ddlp", tmp_path / "latent_stats.pth")
    assert (model.config.diffuse_frames, model.config.diffusion_num_steps) == (3, 20)   # read from the file
    x, t = torch.randn(2, 3, 3, 8), torch.tensor([2, 11])
    assert torch.allclose(model.denoiser(x, t), ema.denoiser(x, t), atol=1e-6)        # EMA weights by default
    assert not torch.allclose(model.denoiser(x, t), online.denoiser(x, t), atol=1e-3)
    assert torch.equal(model.normalizer.fg_max, 2 * torch.ones(8))
    online_model = convert_official(tmp_path / "model.pth", tmp_path / "ddlp", tmp_path / "latent_stats.pth",
                                    weights="model")
    assert torch.allclose(online_model.denoiser(x, t), online.denoiser(x, t), atol=1e-6)
    torch.save({"step": 3}, tmp_path / "x.pth")
    with pytest.raises(ValueError, match="not an official DiffuseDDLP checkpoint"):
        load_official_diffusion(tmp_path / "x.pth")
    # the command writes a model directory that loads back
    from ddlp.cli import main
    assert main(["diffuse", "convert", str(tmp_path / "model.pth"), "--ddlp", str(tmp_path / "ddlp"),
                 "--stats", str(tmp_path / "latent_stats.pth"), "--out", str(tmp_path / "out")]) == 0
    back = DiffuseDDLP.from_pretrained(tmp_path / "out")
    assert torch.allclose(back.denoiser(x, t), ema.denoiser(x, t), atol=1e-6)


@needs_shared
@pytest.mark.parametrize("manifest", ["diffuse_ddlp.json", "diffuse_ddlp_obj3d128_assumed.json"])
def test_official_manifest_maps_onto_our_modules(manifest):
    """Every key of the published DiffuseDDLP layout has one destination of the same shape."""
    path = SHARED / "fixtures" / "manifests" / manifest
    if not path.is_file():
        pytest.skip(f"{manifest} not in the fixtures")
    d = json.loads(path.read_text())
    kw = d["denoiser_kwargs"]
    n_tokens, F = kw["max_particles"], kw["features_dim"]
    config = DiffusionConfig(n_kp_enc=n_tokens - 1, learned_feature_dim=F - 6, bg_learned_feature_dim=F - 6,
                             diffuse_frames=kw["block_size"], pint_dim=kw["hidden_dim"], pint_heads=kw["n_head"],
                             pint_layers=kw["n_layer"], diffusion_num_steps=d["diffusion_kwargs"]["timesteps"])
    ours = {k: tuple(v.shape) for k, v in DiffuseDDLP(config).state_dict().items()}
    key_map = denoiser_key_map(kw["n_layer"])
    official = {k: tuple(shape) for k, shape, _ in d["denoiser"]["keys"]}
    assert set(official) == set(key_map)
    for k, shape in official.items():
        if key_map[k] is None:
            assert shape[-1] == kw["block_size"]                 # causal mask buffer
        else:
            assert ours[key_map[k]] == shape, k
    mapped = {v for v in key_map.values() if v}
    assert mapped == {k for k in ours if k.startswith("denoiser.")}
    # the full checkpoint: our schedule has the official buffer length, prefixes as documented
    model_keys = {k for k, _, _ in d["checkpoint_model"]["keys"]}
    assert {f"model.{k}" for k in official} <= model_keys
    assert {k for k, shape, _ in d["checkpoint_model"]["keys"] if k == "betas" and shape == [1000]}
    ema_keys = {k for k, _, _ in d["checkpoint_ema"]["keys"]}
    assert {f"ema_model.model.{k}" for k in official} <= ema_keys
