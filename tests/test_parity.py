"""Our model against tensors produced by the official implementation: the compact case in the
repository (tests/fixtures/parity) always, the full fixtures (../shared/fixtures) where present."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import SHARED, needs_shared
from ddlp.cli import main
from ddlp.parity import load_fixture, run_fixture, write_compact

COMPACT = Path(__file__).parent / "fixtures" / "parity" / "ddlp_balls_small"

CASES = ["dlpv2_small", "dlpv2_shapes_small", "ddlp_balls_small", "ddlp_obj3d_small"]


@needs_shared
@pytest.mark.parametrize("case", CASES)
def test_fixture_matches_official(case):
    checks = run_fixture(str(SHARED / "fixtures" / "parity" / f"{case}.pt"))
    failed = [c.line() for c in checks if not c.ok]
    assert not failed, "\n".join(failed)
    names = {c.name.split("/")[0] for c in checks}
    assert {"outputs", "losses", "encode_all"} <= names
    if case.startswith("ddlp"):
        assert "sample" in names                      # the rollout is checked too
        assert any(c.name == "outputs/mu_dyn" for c in checks)
    assert len(checks) > 60


@needs_shared
def test_parity_cli_exit_codes(tmp_path):
    fixture = str(SHARED / "fixtures" / "parity" / "dlpv2_small.pt")
    ok = subprocess.run([sys.executable, "-m", "ddlp.parity", fixture], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "outputs/rec" in ok.stdout and ok.stdout.strip().endswith("0 check(s) failed")
    # An impossible tolerance must fail: the checker really compares.
    bad = subprocess.run([sys.executable, "-m", "ddlp.parity", fixture, "--atol", "1e-12"],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "FAIL" in bad.stdout
    missing = subprocess.run([sys.executable, "-m", "ddlp.parity", str(tmp_path / "nope.pt")],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "no such fixture" in missing.stderr


def test_compact_case_in_the_repository_matches_official():
    checks = run_fixture(str(COMPACT))
    failed = [c.line() for c in checks if not c.ok]
    assert not failed, "\n".join(failed)
    names = {c.name for c in checks}
    assert {"outputs/rec", "outputs/mu_dyn", "sample/z_pos", "losses/discount/loss", "encode_all/mu"} <= names
    assert len(checks) > 100
    assert sum(f.stat().st_size for f in COMPACT.iterdir()) < 3e6


def test_compact_case_fails_when_the_model_differs(tmp_path, capsys):
    fx = load_fixture(str(COMPACT))
    w = "dyn_module.particle_projection.particle_projection.0.weight"
    assert w in fx["state_dict"]
    fx["state_dict"][w] = fx["state_dict"][w] * 1.01
    write_compact(fx, str(tmp_path / "changed"))
    failed = {c.name for c in run_fixture(str(tmp_path / "changed")) if not c.ok}
    assert "outputs/mu_dyn" in failed and "outputs/rec" not in failed      # only the dynamics moved
    assert main(["parity", str(COMPACT)]) == 0
    assert capsys.readouterr().out.strip().endswith("ok: 0 check(s) failed")
    assert main(["parity", str(COMPACT), "--atol", "1e-12"]) == 1


@needs_shared
def test_compact_case_is_a_slice_of_the_full_fixture(tmp_path):
    full = SHARED / "fixtures" / "parity" / "ddlp_balls_small.pt"
    out = tmp_path / "compact"
    done = subprocess.run([sys.executable, "-m", "ddlp.parity", str(full), "--write-compact", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"wrote {out}" in done.stdout and done.stdout.strip().endswith("0 check(s) failed")
    ours, committed = load_file(out / "tensors.safetensors"), load_file(COMPACT / "tensors.safetensors")
    assert ours.keys() == committed.keys() and all(torch.equal(ours[k], committed[k]) for k in ours)
    assert json.loads((out / "fixture.json").read_text()) == json.loads((COMPACT / "fixture.json").read_text())
    fx = load_fixture(str(full))
    assert torch.equal(fx["outputs"]["rec"].flatten()[-1], committed["outputs.rec"][-1])
