"""The converter maps every key of every published checkpoint layout, and reports mismatches."""
import json

import pytest
import torch

from conftest import SHARED, needs_shared
from ddlp import Config, build_model
from ddlp.cli import main as cli
from ddlp.convert import ConversionError, convert_state_dict, official_key_map
from ddlp.model import ParticleModel

MANIFESTS = ["balls", "obj3d", "obj3d128", "traffic", "phyre", "clevrer",
             "shapes", "obj3d_img", "obj3d128_img", "traffic_img"]


def manifest(name):
    return json.loads((SHARED / "fixtures" / "manifests" / f"{name}.json").read_text())


def fake_official_state(m):
    """A state dict with the manifest's exact keys and shapes; aliases share one tensor."""
    g = torch.Generator().manual_seed(0)
    sd, alias_of = {}, {b: a for a, b in m["aliased_keys"]}
    for key, shape, dtype in m["keys"]:
        if key in alias_of:
            sd[key] = sd[alias_of[key]]
        else:
            sd[key] = torch.randn(shape, generator=g, dtype=getattr(torch, dtype))
    return sd


def prior_buffers(cfg):
    return {"logvar_kp": torch.tensor(0.0),
            "mu_scale_prior": torch.tensor(cfg.mu_scale_prior, dtype=torch.float64),
            "logvar_scale_p": torch.tensor(cfg.scale_std ** 2).log(),
            "logvar_offset_p": torch.tensor(cfg.offset_std ** 2).log(),
            "obj_on_a_p": torch.tensor(cfg.obj_on_alpha), "obj_on_b_p": torch.tensor(cfg.obj_on_beta)}


def config_for(m):
    kind = "ddlp" if m["model_class"] == "ObjectDynamicsDLP" else "dlp"
    return Config.from_dict({**m["constructor_kwargs"], "model": kind})


@needs_shared
@pytest.mark.parametrize("name", MANIFESTS)
def test_key_map_covers_published_layout(name):
    m = manifest(name)
    cfg = config_for(m)
    expected = [k for k, _, _ in m["keys"]]
    assert list(official_key_map(cfg)) == expected          # same keys, same order, nothing extra
    model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) == m["n_params"]
    sd = {**fake_official_state(m), **prior_buffers(cfg)}   # buffers must agree with the config
    ours = convert_state_dict(sd, cfg, model.state_dict())
    assert set(ours) == set(model.state_dict())
    model.load_state_dict(ours)


@needs_shared
@pytest.mark.parametrize("name", MANIFESTS)
def test_official_config_file_reads_unchanged(name):
    """Our presets (the official JSON files, unchanged) build the published models."""
    m = manifest(name)
    cfg = Config.preset(name)
    assert cfg.model == ("ddlp" if m["model_class"] == "ObjectDynamicsDLP" else "dlp")
    for key, value in m["constructor_kwargs"].items():
        ours = getattr(cfg, "ch" if key == "cdim" else key)
        assert ours == (list(value) if isinstance(value, (list, tuple)) else value), key


def _small_official():
    cfg = Config(model="dlp", enc_channels=[8, 16, 16], prior_channels=[8, 8, 16], n_kp_enc=4,
                 n_kp_prior=8, learned_feature_dim=2)
    # an "official" state dict: our weights under their official names
    model = build_model(cfg)
    ours = model.state_dict()
    official = {off: ours[mine] for off, mine in official_key_map(cfg).items() if mine}
    return cfg, model, {**prior_buffers(cfg), **official}


def test_converter_reports_missing_unexpected_and_shape_errors():
    cfg, model, official = _small_official()
    convert_state_dict(official, cfg, model.state_dict())     # the clean case converts
    broken = dict(official)
    del broken["fg_module.particle_attribute_enc.depth_head.weight"]
    broken["fg_module.some_new_layer.weight"] = torch.zeros(3)
    with pytest.raises(ConversionError) as e:
        convert_state_dict(broken, cfg, model.state_dict())
    assert "fg_module.particle_attribute_enc.depth_head.weight" in str(e.value)
    assert "fg_module.some_new_layer.weight" in str(e.value)
    wrong = dict(official)
    wrong["fg_module.particle_features_enc.features_head.weight"] = torch.zeros(7, 256)
    with pytest.raises(ConversionError, match=r"features_head.weight: shape \(7, 256\)"):
        convert_state_dict(wrong, cfg, model.state_dict())
    prior = dict(official)
    prior["obj_on_a_p"] = torch.tensor(0.5)
    with pytest.raises(ConversionError, match="obj_on_a_p"):
        convert_state_dict(prior, cfg, model.state_dict())


def test_convert_cli_round_trip(tmp_path, capsys):
    cfg, model, official = _small_official()
    ckpt, hparams = tmp_path / "dlp.pth", tmp_path / "hparams.json"
    torch.save(official, ckpt)
    hp = {k: v for k, v in cfg.to_dict().items() if k != "model"}   # official files name no model
    hparams.write_text(json.dumps(hp))
    assert cli(["convert", str(ckpt), "--hparams", str(hparams), "--out", str(tmp_path / "out")]) == 0
    loaded = ParticleModel.from_pretrained(tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "library_name: ddlp" in card and "| model | DLPv2 (single images) |" in card
    assert "converted from the official implementation's checkpoint dlp.pth" in card
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        a, b = model.eval()(x, deterministic=True).rec, loaded.eval()(x, deterministic=True).rec
    assert torch.equal(a, b)
    # a checkpoint that does not fit its hparams: one clear message, exit status 2
    hp["learned_feature_dim"] = 3
    hparams.write_text(json.dumps(hp))
    assert cli(["convert", str(ckpt), "--hparams", str(hparams), "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "does not match its hparams" in err and "shape" in err
    assert not (tmp_path / "bad").exists()
    assert cli(["convert", str(tmp_path / "missing.pth"), "--hparams", str(hparams), "--out", str(tmp_path / "x")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
