"""PINT tuning on a frozen encoder: only the prior moves, and its KL goes down."""
import pytest
import torch
from test_train import Clips, tiny_config

from ddlp.model import build_model
from ddlp.prior_tuning import tune_prior


def test_tune_prior_lowers_the_dynamics_kl_and_leaves_the_encoder_alone():
    torch.manual_seed(0)
    model = build_model(tiny_config())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = tune_prior(model, Clips(n=16), steps=40, batch_size=8, clips=16, lr=3e-3, reset=True, progress=False)
    after = model.state_dict()
    assert stats["prior_steps"] == 40 and stats["prior_clips"] == 16
    assert stats["prior_loss_after"] < 0.9 * stats["prior_loss_before"]
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("pint.") for k in changed)


def test_tune_prior_needs_a_ddlp():
    with pytest.raises(TypeError, match="DDLP"):
        tune_prior(build_model(tiny_config(model="dlp")), Clips(), steps=1, progress=False)


def test_cli_tunes_a_saved_model(tmp_path, capsys):
    from ddlp.checkpoint import save_pretrained
    from ddlp.cli import main
    from ddlp.data.balls import write_balls
    from ddlp.model import ParticleModel
    write_balls(tmp_path / "data", episodes={"train": 2, "val": 1, "test": 1})
    model = build_model(tiny_config())
    save_pretrained(model, tmp_path / "model")
    assert main(["tune-prior", str(tmp_path / "model"), "--data.root", str(tmp_path / "data"),
                 "--out", str(tmp_path / "tuned"), "--steps", "3", "--clips", "4", "--batch-size", "2"]) == 0
    assert "dynamics KL" in capsys.readouterr().out
    tuned = ParticleModel.from_pretrained(tmp_path / "tuned").state_dict()
    original = model.state_dict()
    assert not torch.equal(tuned["pint.head.weight"], original["pint.head.weight"])
    assert torch.equal(tuned["glimpse_decoder.fc.0.weight"], original["glimpse_decoder.fc.0.weight"])
    save_pretrained(build_model(tiny_config(model="dlp")), tmp_path / "dlp")
    assert main(["tune-prior", str(tmp_path / "dlp"), "--out", str(tmp_path / "x")]) != 0
    assert "needs a DDLP" in capsys.readouterr().err
