"""The SFT -> GRPO / iterative DPO benchmark script in its --smoke mode: it runs the three stages
(the RL ones for two seeds), writes its own RESULTS.md section and finite numbers (accuracies are
not asserted: 20 SFT steps); --sft-dir reuses the SFT export."""

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
                             "--out", str(tmp_path / "runs"), "--seeds", "0,3"])
    text = results.read_text()
    assert "<!-- BEGIN bench:rl_gains -->" in text and "<!-- END bench:rl_gains -->" in text
    assert "<!-- BEGIN bench:other -->\nx\n" in text  # other sections untouched
    assert json.loads(out.read_text()).keys() == numbers.keys()
    assert set(numbers) == {"SFT", "SFT -> GRPO", "SFT -> iterative DPO", "SFT -> GRPO (seed 3)",
                            "SFT -> iterative DPO (seed 3)"}
    for row in numbers.values():
        assert 0.0 <= row["greedy"] <= 1.0 and 0.0 <= row["sampled_t1"] <= 1.0
        assert all(math.isfinite(v) for v in row.values())
    assert numbers["SFT -> GRPO"]["updates"] == 2
    assert numbers["SFT -> GRPO"]["seed"] == 0 and numbers["SFT -> GRPO (seed 3)"]["seed"] == 3
    for m in ("SFT -> GRPO", "SFT -> iterative DPO"):
        gains = [numbers[m]["greedy_gain"], numbers[f"{m} (seed 3)"]["greedy_gain"]]
        assert numbers[m]["greedy_gain_min"] == min(gains)
        assert numbers[m]["greedy_gain_mean"] == pytest.approx(sum(gains) / 2)
    assert (tmp_path / "runs" / "accuracy.png").exists()
    assert "greedy gain: mean" in text and "| SFT -> iterative DPO | 3 |" in text

    # --sft-dir: the SFT stage is the saved export, scored the same; nothing is retrained
    again = rl_gains.main(["--smoke", "--results", "", "--out", str(tmp_path / "runs2"),
                           "--seeds", "0", "--sft-dir", str(tmp_path / "runs" / "sft" / "hf")])
    assert set(again) == {"SFT", "SFT -> GRPO", "SFT -> iterative DPO"}
    assert again["SFT"]["greedy"] == numbers["SFT"]["greedy"] and "seconds" not in again["SFT"]
    assert not (tmp_path / "runs2" / "sft").exists()
