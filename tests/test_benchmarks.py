"""benchmarks/train_step.py measures every mode it offers (its figures are printed, never asserted)."""
import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_step.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("train_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("precision, low_memory", [("fp32", False), ("bf16", True)])
def test_train_step_benchmark_reports_its_figures(bench, monkeypatch, precision, low_memory):
    monkeypatch.setitem(bench.SETTINGS, "balls_small", (1, 3))      # a tiny step: this checks the plumbing
    row = bench.run_one("balls_small", steps=1, device="cpu", precision=precision, low_memory=low_memory)
    assert (row["precision"], row["low_memory"], row["batch"], row["frames"]) == (precision, low_memory, 1, 3)
    assert row["train_step_s"] > 0 and 0 < row["peak_memory_gb"] <= row["peak_memory_with_rollout_gb"]
    assert isinstance(row["native_bf16"], bool) and row["cpu"]
