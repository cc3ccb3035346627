"""The README's main command runs end to end (quick mode: a smoke run, not the accuracy claim;
the full demo's numbers are recorded in experiments/benchmarks/RESULTS.md)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_demo_quick_runs_end_to_end(tmp_path):
    out = subprocess.run([sys.executable, "-m", "jaxalign.demo", "--quick", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Held-out exact-match accuracy" in out.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    for key in ("accuracy", "sampled_accuracy"):  # greedy, and sampled at temperature 1
        assert set(summary[key]) == {"random init", "after SFT", "after SFT+DPO"}
        assert all(0.0 <= v <= 1.0 for v in summary[key].values())
    assert summary["sampled_temperature"] == 1.0
    assert "sampled T=1" in out.stdout
    png = (tmp_path / "accuracy.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    for stage in ("sft", "dpo"):
        assert (tmp_path / stage / "metrics.jsonl").exists()
        assert (tmp_path / stage / "hf" / "config.json").exists()
