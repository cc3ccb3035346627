"""jaxalign.evaluate: greedy and sampled task accuracy, and the held-out evaluator of the runs."""

import jax
import numpy as np
import pytest

from jaxalign import data as jdata
from jaxalign import models
from jaxalign.evaluate import accuracy_line, accuracy_summary, heldout_evaluator, task_accuracy


@pytest.fixture(scope="module")
def tiny():
    tok = jdata.build_char_tokenizer()
    cfg = models.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                             head_dim=16)
    model = models.build_model(cfg)
    variables = {"params": models.init_params(model, jax.random.PRNGKey(0))}
    prompts = jdata.make_prompt_dataset(8, seed=3, split="test", digits=2, operators="+")
    return model, variables, tok, prompts


def _texts(tiny, **kw):
    """The completions task_accuracy scores, and its result (reward: 1 for every other row)."""
    model, variables, tok, prompts = tiny
    seen = []

    def reward(texts, answers, *, eos):
        seen.extend(texts)
        return np.arange(len(texts)) % 2 == 0

    out = task_accuracy(model, variables, tok, prompts, batch_size=8, max_new_tokens=4,
                        reward_fn=reward, **kw)
    return seen, out


def test_accuracy_is_the_mean_reward(tiny):
    texts, out = _texts(tiny)
    assert out["n"] == len(texts) == 8
    assert out["accuracy"] == pytest.approx(0.5)  # rows 0, 2, 4, 6 of 8


def test_sampling_near_zero_temperature_is_greedy_and_seeded(tiny):
    greedy, _ = _texts(tiny)
    cold, _ = _texts(tiny, temperature=1e-4, seed=5)
    assert cold == greedy
    hot0, _ = _texts(tiny, temperature=1.0, seed=0)
    assert _texts(tiny, temperature=1.0, seed=0)[0] == hot0  # the seed fixes the samples
    hot1, _ = _texts(tiny, temperature=1.0, seed=1)
    assert hot1 != hot0 and hot0 != greedy  # a random tiny model samples differently per key


@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_temperature_must_be_positive(tiny, bad):
    model, variables, tok, prompts = tiny
    with pytest.raises(ValueError, match="temperature"):
        task_accuracy(model, variables, tok, prompts, temperature=bad)


def test_heldout_evaluator_greedy_and_sampled(tiny):
    model, variables, tok, _ = tiny
    kw = dict(num_prompts=8, seed=3, max_new_tokens=4, batch_size=8, digits=2, operators="+")
    greedy_only = heldout_evaluator(model, tok, **kw)(variables)
    assert "sampled_accuracy" not in greedy_only
    evaluate = heldout_evaluator(model, tok, **kw, sampled_temperature=1.0)
    both = evaluate(variables)
    assert both["accuracy"] == greedy_only["accuracy"]
    again = evaluate(variables)  # the same prompts, samplers and sampling key on every call
    assert (again["accuracy"], again["sampled_accuracy"], again["examples"]) == (
        both["accuracy"], both["sampled_accuracy"], both["examples"])
    prompts = jdata.make_prompt_dataset(8, seed=3, split="test", digits=2, operators="+")
    direct = task_accuracy(model, variables, tok, prompts, batch_size=8, max_new_tokens=4,
                           temperature=1.0, seed=3)
    assert both["sampled_accuracy"] == direct["accuracy"]
    assert both["sampled_temperature"] == 1.0
    assert set(accuracy_summary(both)) == {"accuracy", "n", "sampled_accuracy", "sampled_temperature"}
    with pytest.raises(ValueError, match="sampled_temperature"):
        heldout_evaluator(model, tok, **kw, sampled_temperature=-0.5)


def test_accuracy_line():
    assert accuracy_line({"accuracy": 0.875}) == "0.875"
    assert (accuracy_line({"accuracy": 0.875, "sampled_accuracy": 0.69, "sampled_temperature": 1.0})
            == "0.875 greedy, 0.690 sampled at T=1")
