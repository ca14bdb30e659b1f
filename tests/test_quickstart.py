"""The README's main job, end to end on a tiny budget, and how it splits its budget."""
import json
import math

import pytest
from PIL import Image

from ddlp.cli import main
from ddlp.quickstart import (ENCODE_SHARE, JOINT_ANNEAL, JOINT_SHARE, JOINT_STEPS, joint_schedule,
                             minutes_for_joint_steps, run, split_budget)

TINY = dict(enc_channels=[8, 16, 16], prior_channels=[8, 8, 16], n_kp_enc=3, n_kp_prior=6,
            learned_feature_dim=2, pint_dim=16, pint_heads=2, pint_layers=1, timestep_horizon=4,
            batch_size=4, epoch_steps=2, cond_steps=3)


@pytest.fixture
def trainer_options(monkeypatch):
    """The TrainOptions of every Trainer built during the test, in order."""
    from ddlp.train import Trainer
    seen, init = [], Trainer.__init__
    monkeypatch.setattr(Trainer, "__init__", lambda self, *a, **k: (init(self, *a, **k), seen.append(self.opt))[0])
    return seen


def test_the_budget_split_is_the_documented_one():
    # joint training stops at its steps or at its share, whichever comes first; PINT gets the rest.
    # Budgets under 30 minutes run the 3000-step schedule up to where its anneal would start
    assert (JOINT_STEPS, JOINT_ANNEAL) == (3000, 0.4)
    assert [joint_schedule(m) for m in (0.1, 15, 29.9, 30, 60)] == [(1800, 0.0)] * 3 + [(3000, 0.4)] * 2
    assert split_budget(15) == pytest.approx(dict(joint=9.75, encode=0.75, pint=4.5))
    assert split_budget(60) == pytest.approx(dict(joint=39.0, encode=3.0, pint=18.0))
    for minutes in (1, 15, 16, 60):
        b = split_budget(minutes)
        assert b["joint"] == pytest.approx(JOINT_SHARE * minutes)
        assert b["encode"] == pytest.approx(ENCODE_SHARE * minutes)
        assert sum(b.values()) == pytest.approx(minutes)
    with pytest.raises(ValueError, match="positive"):
        split_budget(0)


def test_a_slow_host_is_told_the_budget_that_runs_every_joint_step():
    # 1800 steps at 0.30 s fit 15 minutes' 9.75 (with 5 % to spare); the AVX2 EPYC's 0.364 s
    # (1620 steps in 9.8 minutes) need 18; past 30 minutes the schedule is 3000 steps
    assert minutes_for_joint_steps(0.30, start=15) == 15
    assert minutes_for_joint_steps(0.364, start=15) == 18
    assert minutes_for_joint_steps(0.70, start=15) == 57
    assert minutes_for_joint_steps(1.0, max_steps=2, start=0.1) == 1
    for per_step in (0.1, 0.364, 0.7, 2.0):
        m = minutes_for_joint_steps(per_step)
        assert 60 * JOINT_SHARE * m >= 1.05 * per_step * joint_schedule(m)[0]
        assert m == 1 or 60 * JOINT_SHARE * (m - 1) < 1.05 * per_step * joint_schedule(m - 1)[0]


def test_quickstart_joint_phase_stops_at_its_step_count(tmp_path, trainer_options):
    """With steps to spare in its share, the joint phase stops at `max_steps` (given here; by
    default `joint_schedule`'s), annealed over its last JOINT_ANNEAL and keeping the best tracker,
    and PINT gets the time it leaves."""
    minutes = 0.3                           # 18 s: joint training may take 11.7 s, 2 steps take ~2
    metrics = run(out_dir=str(tmp_path / "run"), data_dir=str(tmp_path / "data"), minutes=minutes,
                  train_episodes=2, val_episodes=1, test_episodes=2, workers=0, cond=4, horizon=14,
                  max_steps=2, progress=False, **TINY)
    assert metrics["joint_steps"] == metrics["joint_steps_planned"] == 2
    assert metrics["minutes_for_all_joint_steps"] is None        # no advice when every step ran
    opt = trainer_options[0]
    assert (opt.max_steps, opt.anneal, opt.best_by) == (2, JOINT_ANNEAL, "val_track_px")
    assert opt.track_with == dict(spread_anchors=True, centred_positions=True)   # as PINT will see it
    assert metrics["joint_seconds"] < 60 * JOINT_SHARE * minutes
    assert 60 * minutes - 1 <= metrics["budget_seconds"] <= 60 * minutes + 10
    # PINT runs until the budget is spent: what joint training and encoding left, less the few
    # seconds of loading the best checkpoint between the phases
    left = 60 * minutes - metrics["joint_seconds"] - metrics["encode_seconds"]
    assert left - 5 <= metrics["pint_seconds"] <= left + 1
    assert metrics["pint_seconds"] > 60 * (1 - JOINT_SHARE - ENCODE_SHARE) * minutes


def test_quickstart_spends_its_budget_phase_by_phase(tmp_path, trainer_options, capsys):
    # 21 s: joint 13.65 s, encoding <= 1.05 s but at least one batch (8 clips of 50 frames: 1.3 s
    # on a 2-core AVX2 EPYC, 2.4 s on a slower CI host), PINT the rest
    minutes = 0.35
    metrics = run(out_dir=str(tmp_path / "run"), data_dir=str(tmp_path / "data"), minutes=minutes,
                  train_episodes=2, val_episodes=1, test_episodes=2, workers=0, cond=4, horizon=14,
                  progress=False, **TINY)
    for split in ("train", "val", "test"):
        assert (tmp_path / "data" / f"{split}.hdf5").is_file()
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    # the short budget's schedule, cut by its share of the time; the weights it stops at are validated
    opt = trainer_options[0]
    assert (opt.max_steps, opt.anneal, opt.validate_at_stop) == (1800, 0.0, True)
    # compared as JSON: a model this small may leave every particle off, and NaN != NaN
    assert json.dumps(saved, sort_keys=True) == json.dumps(metrics, sort_keys=True)
    assert saved["budget_split"] == pytest.approx(split_budget(minutes))
    # each phase runs until its share is spent, then finishes its step (or epoch: validation,
    # figures, checkpoint), which on a busy 2-core machine takes up to a few seconds
    late = 5.0
    assert 60 * JOINT_SHARE * minutes <= saved["joint_seconds"] <= 60 * JOINT_SHARE * minutes + late
    assert saved["encode_seconds"] <= 60 * ENCODE_SHARE * minutes + late
    assert 60 * minutes - 1 <= saved["budget_seconds"] <= 60 * minutes + 2 * late
    assert saved["joint_steps"] > 0 and saved["pint_steps"] > 0 and saved["pint_clips"] > 0
    # far from its 1800 steps, the joint phase says which budget would run them all
    per_step = saved["joint_seconds"] / saved["joint_steps"]
    assert saved["joint_steps_planned"] == 1800
    assert saved["minutes_for_all_joint_steps"] == minutes_for_joint_steps(per_step, start=minutes)
    out = capsys.readouterr().out
    assert f"joint training ran {saved['joint_steps']} of its 1800 steps" in out
    assert f"`ddlp quickstart --minutes {saved['minutes_for_all_joint_steps']}` gives it all its steps" in out
    assert len(saved["pint_symmetry_centre"]) == 2     # PINT trained on mirrored windows
    # the paper's protocol with the baselines, on the held-out episodes
    assert saved["test_episodes"] == 2 and len(saved["med_per_step"]) == 10
    for key in ("med10_ground_truth_stand_still", "med10_ground_truth_constant_velocity", "psnr", "ssim", "recon_psnr"):
        assert saved[key] > 0, key
    # after ~10 joint steps this tiny model may have no particle switched on (MED is then NaN, as
    # in G-SWM); the model's and the posterior baselines' MED10 are either both NaN or all scores
    model_scores = [saved[k] for k in ("med10", "med10_stand_still", "med10_constant_velocity")]
    assert all(v > 0 for v in model_scores) or all(math.isnan(v) for v in model_scores), model_scores
    assert (tmp_path / "run" / "eval" / "balls_test_per_step.png").is_file()
    gif = Image.open(tmp_path / "run" / "prediction.gif")
    # one row per test episode (2 here), ground truth beside prediction in each; 14 frames
    assert gif.n_frames == 14 and gif.width < gif.height < 1.5 * gif.width, gif.size
    final = json.loads((tmp_path / "run" / "best" / "config.json").read_text())
    assert final["n_kp_enc"] == 3 and final["pint_velocity_input"] is True   # the PINT phase's PINT
    assert final["spread_anchors"] is True and final["centred_positions"] is True   # anchors, positions
    joint = json.loads((tmp_path / "run" / "config.json").read_text())
    assert not any(joint.get(k) for k in ("pint_velocity_input", "spread_anchors", "centred_positions"))  # official
    card = (tmp_path / "run" / "best" / "README.md").read_text()
    assert "## Evaluation" in card and f"| med10 | {saved['med10']:.4g} |" in card


def test_a_diverging_joint_phase_leaves_its_time_to_pint(tmp_path, monkeypatch):
    from ddlp.train import Trainer, TrainingError
    train = Trainer.train

    def diverges(self):
        train(self)
        raise TrainingError("more than 100 updates skipped for non-finite gradients")

    monkeypatch.setattr(Trainer, "train", diverges)
    metrics = run(out_dir=str(tmp_path / "run"), data_dir=str(tmp_path / "data"), minutes=0.35,
                  train_episodes=2, val_episodes=1, test_episodes=1, workers=0, cond=4, horizon=8,
                  gif_episodes=1, progress=False, **TINY)
    assert "non-finite" in metrics["joint_stopped"] and metrics["pint_steps"] > 0
    assert (tmp_path / "run" / "prediction.gif").is_file()


def test_cli_runs_the_quickstart(tmp_path, capsys):
    rc = main(["quickstart", "--out", str(tmp_path / "run"), "--data", str(tmp_path / "data"), "--minutes", "0.1",
               "--episodes", "2", "--test-episodes", "2", "--full-trunk", "--no-mirror", "--workers", "0", "--seed", "1",
               "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and "budget 0.1 min" in out and "baseline stand_still: MED10" in out
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    # a model trained for seconds may lose every ball (MED NaN): only the report is checked here
    assert saved["minutes"] == 0.1 and "med10" in saved and saved["test_episodes"] == 2
    assert json.loads((tmp_path / "run" / "config.json").read_text())["seed"] == 1
    assert "pint_symmetry_centre" not in saved          # --no-mirror
