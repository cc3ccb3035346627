"""The SFT -> GRPO / iterative DPO benchmark script in its --smoke mode: it runs the three stages,
writes its own RESULTS.md section and finite numbers (accuracies are not asserted: 20 SFT steps)."""

import json
import math

import pytest


@pytest.mark.slow
def test_rl_gains_smoke(tmp_path):
    from experiments.benchmarks import rl_gains

    results, out = tmp_path / "RESULTS.md", tmp_path / "numbers.json"
    (tmp_path / "RESULTS.md").write_text("# Benchmark results\n\n<!-- BEGIN bench:other -->\nx\n"
                                         "<!-- END bench:other -->\n")
    numbers = rl_gains.main(["--smoke", "--results", str(results), "--json", str(out),
                             "--out", str(tmp_path / "runs")])
    text = results.read_text()
    assert "<!-- BEGIN bench:rl_gains -->" in text and "<!-- END bench:rl_gains -->" in text
    assert "<!-- BEGIN bench:other -->\nx\n" in text  # other sections untouched
    assert json.loads(out.read_text()).keys() == numbers.keys()
    assert set(numbers) == {"SFT", "SFT -> GRPO", "SFT -> iterative DPO"}
    for row in numbers.values():
        assert 0.0 <= row["greedy"] <= 1.0 and 0.0 <= row["sampled_t1"] <= 1.0
        assert all(math.isfinite(v) for v in row.values())
    assert numbers["SFT -> GRPO"]["updates"] == 2
    assert (tmp_path / "runs" / "accuracy.png").exists()
