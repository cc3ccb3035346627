import numpy as np
import pytest

from jaxalign.analysis import study
from jaxalign.train.config import load_config


@pytest.mark.parametrize("variant", ["sft", "dpo", "aux_sft", "nspo", "lora", "lora,nspo",
                                     "dpo,aux_sft,nspo"])
def test_experiment_variants_load(variant):
    c = load_config(f"experiments/alignment_tax.py:{variant}")
    assert c.tax.capability_synthetic.operators == "-"
    assert c.tax.alignment_synthetic.operators == "+"
    if variant != "sft":
        assert c.loss.name == "dpo" and c.data.synthetic.operators == "+"
        assert c.nspo.enabled == ("nspo" in variant)
        assert (c.aux_sft.lambda_sft > 0) == ("aux_sft" in variant)
        assert c.lora.enabled == ("lora" in variant)


def test_experiment_rejects_unknown_variants():
    with pytest.raises(ValueError, match="unknown alignment_tax variant"):
        load_config("experiments/alignment_tax.py:ppo")
    with pytest.raises(ValueError, match="unknown modifier"):
        load_config("experiments/alignment_tax.py:dpo,qlora")
    with pytest.raises(KeyError):
        load_config("experiments/alignment_tax.py:dpo", {"nspo.ranks": 3})


def test_averaging_schedules_hold_the_endpoints():
    s = study.averaging_schedules(4)
    assert s["uniform 0"] == [0.0] * 4 and s["uniform 1"] == [1.0] * 4
    np.testing.assert_allclose(s["linear 0->1"], [0, 1 / 3, 2 / 3, 1])
    assert all(len(v) == 4 for v in s.values())


def test_arm_summary_and_plot(tmp_path):
    before = {"capability/accuracy": 0.5, "preference/pref_margin": 2.0,
              "preference/pref_accuracy": 0.8, "alignment/accuracy": 0.3}
    after = {"capability/accuracy": 0.25, "preference/pref_margin": 3.5,
             "preference/pref_accuracy": 0.9, "alignment/accuracy": 0.2}
    a = study._arm_summary({"before": before, "after": after})
    assert a["tax"] == pytest.approx(0.25) and a["gain"] == pytest.approx(1.5)
    assert a["pref_accuracy_gain"] == pytest.approx(0.1)
    assert a["addition_accuracy_gain"] == pytest.approx(-0.1)
    path = study.plot_tax_vs_gain({"dpo lr=1": a, "nspo lr=1": {**a, "tax": 0.1}},
                                  tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 1000 and path.endswith("t.png")
