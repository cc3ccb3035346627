"""End-to-end runner tests on tiny shapes: closed-form first-step losses, resume equivalence,
gradient accumulation, precomputed reference, exports, config errors."""

import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import transformers

from jaxalign.train.metrics import read_metrics
from jaxalign.train.run import run


def losses(result):
    return [h["loss"] for h in result["history"]]


def test_dpo_first_step_is_ln2_and_export_loads_in_transformers(tiny_config):
    cfg = tiny_config("experiments/dpo.py:tiny")
    res = run(cfg)
    # policy == reference before the first update: every DPO loss is exactly ln 2
    assert abs(res["history"][0]["loss"] - math.log(2)) < 1e-6
    assert res["history"][0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert all(np.isfinite(losses(res)))
    recs = read_metrics(res["output_dir"])
    assert {"rewards/chosen", "rewards/margins", "rewards/accuracies", "logps/chosen",
            "grad_norm", "tokens_per_sec", "step_time"} <= set(recs[0])
    hf_dir = res["export"]["hf_dir"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    tokens = np.array([[1, 5, 6, 7, 8]])
    ours = res["model"].apply(res["variables"], tokens)
    with torch.no_grad():
        theirs = hf(torch.tensor(tokens)).logits.numpy()
    assert np.abs(np.asarray(ours) - theirs).max() < 1e-4


def test_resume_reproduces_uninterrupted_losses(tiny_config, tmp_path):
    full = run(tiny_config("experiments/dpo.py:tiny", train__steps=6, output_dir=str(tmp_path / "a")))
    first = run(tiny_config("experiments/dpo.py:tiny", train__steps=6, train__stop_after=3,
                            output_dir=str(tmp_path / "b")))
    assert [h["step"] for h in first["history"]] == [1, 2, 3]
    second = run(tiny_config("experiments/dpo.py:tiny", train__steps=6, output_dir=str(tmp_path / "b")))
    assert [h["step"] for h in second["history"]] == [4, 5, 6]
    np.testing.assert_allclose(losses(first) + losses(second), losses(full), rtol=1e-6, atol=1e-7)
    # the JSONL log of the resumed run has each step once
    steps = [r["step"] for r in read_metrics(second["output_dir"]) if r.get("split") == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_grad_accumulation_exact_for_dpo(tiny_config, tmp_path):
    a = run(tiny_config("experiments/dpo.py:tiny", train__steps=2, output_dir=str(tmp_path / "a")))
    b = run(tiny_config("experiments/dpo.py:tiny", train__steps=2, train__grad_accum=4,
                        output_dir=str(tmp_path / "b")))
    # mean over equal-size micro-batches of per-pair mean losses == full-batch mean
    np.testing.assert_allclose(losses(a), losses(b), rtol=1e-5)
    for x, y in zip(jax.tree.leaves(a["variables"]), jax.tree.leaves(b["variables"])):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=2e-6)


def test_precomputed_reference_equals_live_reference(tiny_config, tmp_path):
    a = run(tiny_config("experiments/dpo.py:tiny", train__steps=3, data__share_prefix=False,
                        output_dir=str(tmp_path / "a")))
    b = run(tiny_config("experiments/dpo.py:precomputed", train__steps=3, data__share_prefix=False,
                        output_dir=str(tmp_path / "b")))
    assert b["reference"] == "precomputed" and a["reference"] == "model"
    np.testing.assert_allclose(losses(a), losses(b), rtol=1e-5, atol=1e-6)
    # prefix-shared batches (each prompt once; the default for preference losses), here with
    # precomputed reference log-probs and micro-batches: the same losses again
    c = run(tiny_config("experiments/dpo.py:precomputed", train__steps=3, train__grad_accum=2,
                        output_dir=str(tmp_path / "c")))
    assert c["collate_packs"] and not a["collate_packs"]
    np.testing.assert_allclose(losses(a), losses(c), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["ipo", "simpo", "orpo", "kto", "bradley_terry", "cpo", "hinge"])
def test_every_objective_kind_trains(tiny_config, tmp_path, name):
    res = run(tiny_config(f"experiments/preference.py:{name}", train__steps=2,
                          output_dir=str(tmp_path / name)))
    assert all(np.isfinite(losses(res)))
    if name == "ipo":  # policy == reference at step 0: IPO loss is (0 - 1/(2 beta))^2
        assert res["history"][0]["loss"] == pytest.approx((1 / (2 * 0.1)) ** 2, rel=1e-5)
    if name == "kto":  # r = 0 and z0 = 0: each row's loss is 1 - sigmoid(0) = 0.5
        assert res["history"][0]["loss"] == pytest.approx(0.5, abs=1e-6)
    if name == "bradley_terry":  # zero-initialised score head: loss = ln 2
        assert res["history"][0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert res["collate_packs"] == (name not in ("kto", "bradley_terry"))  # prefix sharing


def test_share_prefix_where_it_cannot_apply_is_an_error(tiny_config, tmp_path):
    with pytest.raises(ValueError, match="share_prefix.*'reward'"):
        run(tiny_config("experiments/preference.py:bradley_terry", train__steps=1,
                        data__share_prefix=True, output_dir=str(tmp_path / "bt")))


def test_config_typos_are_errors(tmp_path):
    from jaxalign.train.config import load_config

    with pytest.raises(KeyError, match="betta"):
        load_config("experiments/dpo.py:tiny", {"loss.betta": 0.1})
    with pytest.raises(ValueError, match="unknown dpo variant"):
        load_config("experiments/dpo.py:nope")
    out = subprocess.run([sys.executable, "-m", "jaxalign.train", "--config", "experiments/dpo.py:tiny",
                          "--config.loss.betta=0.05"], capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert out.returncode != 0
    assert "betta" in out.stderr


def test_unknown_loss_name_is_a_clear_error(tiny_config):
    cfg = tiny_config("experiments/dpo.py:tiny")
    with cfg.unlocked():
        cfg.loss.name = "dpo_typo"
    with pytest.raises(ValueError, match="dpo_typo.*REGISTRY"):
        run(cfg)
