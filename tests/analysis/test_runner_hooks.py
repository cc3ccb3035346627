"""End to end through `jaxalign.train.run`: the capability-regression (tax) evaluation, auxiliary
SFT mixing and NSPO's projection inside the jitted step."""

import json
import os

import jax
import numpy as np
import pytest

from jaxalign.analysis.nspo import project
from jaxalign.models import from_pretrained, save_pretrained
from jaxalign.train.config import load_config
from jaxalign.train.run import run

from tests.analysis.conftest import tiny_model


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory):
    model, params, tok = tiny_model(layers=2, hidden=32, seed=1)
    d = str(tmp_path_factory.mktemp("init"))
    save_pretrained(model, params, d)
    tok.save_pretrained(d)
    return d


def _config(init_dir, out, variant, **over):
    o = {"output_dir": out, "init_from": init_dir, "train.steps": 4, "train.batch_size": 8,
         "train.log_every": 1, "train.progress": False, "train.plots": False,
         "train.checkpoint_every": 100, "export.hf_dir": False, "data.num_examples": 64,
         "data.eval_examples": 16, "train.eval_batches": 1, "tax.num_examples": 16,
         "aux_sft.num_examples": 64, "aux_sft.batch_size": 8, "nspo.num_batches": 2,
         "nspo.batch_size": 8, "nspo.rank": 4, "optim.warmup_steps": 0}
    o.update(over)
    return load_config(f"experiments/alignment_tax.py:{variant}", o)


def _kernels(tree):
    return {"/".join(k): v for k, v in
            __import__("flax").traverse_util.flatten_dict(tree).items()}


@pytest.mark.slow
def test_tax_aux_sft_and_nspo_full_finetune(init_dir, tmp_path):
    cfg = _config(init_dir, str(tmp_path / "run"), "dpo,aux_sft,nspo", **{"aux_sft.lambda_sft": 0.2})
    r = run(cfg)
    # Tax: before/after on the capability (subtraction), alignment (addition) and preference sets.
    tax = r["tax"]
    for key in ("capability/accuracy", "capability/nll", "alignment/accuracy",
                "preference/pref_accuracy", "preference/pref_margin"):
        assert key in tax["before"] and key in tax["after"]
    assert tax["after"]["capability/nll"] != tax["before"]["capability/nll"]  # training moved it
    rep = tax["report"]
    assert rep["tax"] == pytest.approx(tax["before"]["capability/accuracy"]
                                       - tax["after"]["capability/accuracy"])
    assert rep["gain"] == pytest.approx(tax["after"]["preference/pref_margin"]
                                        - tax["before"]["preference/pref_margin"])
    with open(os.path.join(r["output_dir"], "tax.json")) as f:
        assert json.load(f)["report"]["tax"] == pytest.approx(rep["tax"])
    # Auxiliary SFT: loss = preference loss + lambda * NLL on the second stream.
    for h in r["history"]:
        assert h["loss"] == pytest.approx(h["loss/preference"] + 0.2 * h["aux_sft/nll"], rel=1e-5)
    # NSPO: every update lies in the null space of the capability basis.
    assert "update_norm" in r["history"][-1]
    _, p0 = from_pretrained(init_dir)
    p1 = r["variables"]["params"]
    delta = jax.tree.map(lambda a, b: np.asarray(a, np.float32) - np.asarray(b, np.float32), p1, p0)
    basis = r["nspo_basis"]
    assert len(basis["left"]) >= 14 and len(basis["right"]) == 1  # 7 kernels x 2 layers + embedding
    flat = _kernels({"params": delta})
    for side in ("left", "right"):
        for path, u in basis[side].items():
            u = np.asarray(u)
            d = flat[path]
            assert np.abs(d).max() > 1e-6
            resid = u.T @ d if side == "left" else d @ u
            assert np.abs(resid).max() < 1e-5 * max(1.0, np.abs(d).max()), path
    still = project({"params": delta}, basis)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), still, {"params": delta})


@pytest.mark.slow
def test_nspo_with_lora_keeps_merged_updates_in_the_null_space(init_dir, tmp_path):
    cfg = _config(init_dir, str(tmp_path / "lora"), "lora,nspo")
    r = run(cfg)
    basis = r["nspo_basis"]
    adapters = _kernels({"lora": r["variables"]["lora"]})
    assert basis["left"] and all(p.endswith("/lora_a") for p in basis["left"])
    for path, u in basis["left"].items():
        a = np.asarray(adapters[path])
        b = np.asarray(adapters[path[:-len("lora_a")] + "lora_b"])
        assert np.abs(b).max() > 0  # B trained
        # U^T A = 0, so U^T (s A B) = 0: the merged update leaves capability inputs' outputs alone.
        np.testing.assert_allclose(np.asarray(u).T @ a, 0.0, atol=1e-5)
