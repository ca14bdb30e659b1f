"""The README's main job, end to end on a tiny budget."""
import json

from PIL import Image

from ddlp.quickstart import run

TINY = dict(enc_channels=[8, 16, 16], prior_channels=[8, 8, 16], n_kp_enc=3, n_kp_prior=6,
            learned_feature_dim=2, pint_dim=16, pint_heads=2, pint_layers=1, timestep_horizon=4,
            batch_size=4, epoch_steps=2, cond_steps=3)


def test_quickstart_writes_metrics_and_gif(tmp_path):
    metrics = run(out_dir=str(tmp_path / "run"), data_dir=str(tmp_path / "data"), minutes=5,
                  train_episodes=2, eval_episodes=2, horizon=4, workers=0, max_steps=3, prior_steps=4, joint_beta_dyn=0.02,
                  progress=False, **TINY)
    for split in ("train", "val", "test"):
        assert (tmp_path / "data" / f"{split}.hdf5").is_file()
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["steps"] == 3 and saved["episodes"] == 2 and saved["prior_steps"] == 4
    assert len(saved["pred_psnr_per_step"]) == 4 and len(saved["position_error_px_per_step"]) == 4
    assert abs(saved["position_error_px"] - sum(saved["position_error_px_per_step"]) / 4) < 1e-4
    assert 0 < saved["recon_psnr"] < 60 and saved == metrics
    assert saved["recon_psnr"] >= saved["recon_psnr_pooled"] - 1e-9     # mean of per-frame PSNRs vs PSNR of the mean
    gif = Image.open(tmp_path / "run" / "prediction.gif")
    # one row per test episode (2 here), ground truth beside prediction in each: 280 x 2*156 px
    assert gif.n_frames >= 2 and gif.width < gif.height < 1.5 * gif.width, gif.size
    assert (tmp_path / "run" / "figures").is_dir()
    # the joint phase ran with the given dynamics-KL weight, PINT was tuned on the preset's,
    # which the saved model keeps
    assert json.loads((tmp_path / "run" / "config.json").read_text())["beta_dyn"] == 0.02
    assert json.loads((tmp_path / "run" / "best" / "config.json").read_text())["beta_dyn"] == 0.1
    assert saved["prior_loss_after"] > 0
