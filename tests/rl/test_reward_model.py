"""A trained reward model as a reward source: loaded from a reward run's directory it equals the
run's own trainable tree, and it scores left-padded rollout rows exactly as the training-time
score function scores the same sequences right-padded."""

import jax
import numpy as np
import pytest

from jaxalign.rl.reward_model import (
    last_real_index, load_reward_model, reward_model_from_run, reward_model_source,
)
from jaxalign.rl.rewards import exact_match_source, score_with
from jaxalign.train.config import load_config
from jaxalign.train.objectives import make_score_fn
from jaxalign.train.run import run


def test_last_real_index():
    m = np.array([[0, 0, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1], [0] * 6])
    np.testing.assert_array_equal(last_real_index(m), [4, 1, 5, 0])


@pytest.mark.slow
def test_reward_run_loads_and_scores_rollout_rows(tmp_path):
    cfg = load_config("experiments/preference.py:bradley_terry", {
        "output_dir": str(tmp_path / "rm"), "train.steps": 3, "train.batch_size": 4,
        "data.num_examples": 16, "data.eval_examples": 8, "train.eval_every": 0,
        "train.eval_batches": 0, "train.progress": False, "train.async_checkpoint": False,
        "train.plots": False, "model.init.hidden_size": 16, "model.init.intermediate_size": 32,
        "model.init.num_hidden_layers": 1, "model.init.num_attention_heads": 2,
        "model.init.num_key_value_heads": 1, "optim.learning_rate": 0.05})
    result = run(cfg)
    loaded = load_reward_model(str(tmp_path / "rm"))
    from_run = reward_model_from_run(result)
    jax.tree.map(np.testing.assert_array_equal, loaded.trainable, from_run.trainable)
    assert float(np.abs(loaded.trainable["score"]["kernel"]).max()) > 0  # trained, not the init

    # the same sequences right-padded (training layout) and left-padded prompt + completion
    tok = result["tokenizer"]
    seqs = [tok("12+3=")["input_ids"] + tok("15", add_special_tokens=False)["input_ids"] + [2],
            tok("4+4=")["input_ids"] + tok("9", add_special_tokens=False)["input_ids"] + [2]]
    width = 12
    right = np.zeros((2, width), np.int32)
    rmask = np.zeros((2, width), bool)
    left = np.zeros((2, width), np.int32)
    lmask = np.zeros((2, width), bool)
    for i, s in enumerate(seqs):
        right[i, :len(s)], rmask[i, :len(s)] = s, True
        pad = 2 + i  # left pad, then right pad after the sequence
        left[i, pad:pad + len(s)], lmask[i, pad:pad + len(s)] = s, True
    expected = np.asarray(make_score_fn(result["model"])(from_run.trainable, from_run.frozen,
                                                         right, rmask))
    src = reward_model_source(loaded, weight=0.5, vocab_size=len(tok))
    total, parts = score_with([src, exact_match_source()], prompts=["a", "b"],
                              completions=["15<eos>", "9<eos>"], tokens=left, attention_mask=lmask,
                              columns={"answer": ["15", "8"]})
    np.testing.assert_allclose(parts["reward_model"], expected, atol=1e-5)
    np.testing.assert_allclose(total, 0.5 * expected + np.array([1.0, 0.0]), atol=1e-5)
    with pytest.raises(ValueError, match="share the policy's tokenizer"):
        reward_model_source(loaded, vocab_size=len(tok) + 1)
    with pytest.raises(ValueError, match="not a reward-model run"):
        reward_model_from_run({"state": {"trainable": {"params": {}}}})
