"""Our model against tensors produced by the official implementation (../shared/fixtures)."""
import subprocess
import sys

import pytest

from conftest import SHARED, needs_shared
from ddlp.parity import run_fixture

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
