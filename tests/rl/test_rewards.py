"""Reward sources: built-in verifiable rewards, TRL-style Python functions, weighted combination."""

import numpy as np
import pytest

from jaxalign.rl.rewards import (
    RewardSource, exact_match_source, format_source, python_source, reward_metrics, score_with,
    sources_from_weights,
)

COMPLETIONS = ["12<eos>", "13<eos>", "12", "x<eos>", " 7 <eos><pad>"]
ANSWERS = ["12", "12", "12", "3", "7"]


def _score(sources, completions=COMPLETIONS, answers=ANSWERS):
    n = len(completions)
    return score_with(sources, prompts=["q"] * n, completions=completions,
                      tokens=np.zeros((n, 4), np.int32), attention_mask=np.ones((n, 4), bool),
                      columns={"answer": answers})


def test_exact_match_and_format_by_hand():
    total, parts = _score([exact_match_source(), format_source(require_eos=True)])
    np.testing.assert_array_equal(parts["exact_match"], [1, 0, 1, 0, 1])
    np.testing.assert_array_equal(parts["format"], [1, 1, 0, 0, 1])
    np.testing.assert_array_equal(total, [2, 1, 1, 0, 2])
    assert total.dtype == np.float32


def test_weighted_combination_with_a_trl_style_function():
    seen = {}

    def length_penalty(prompts, completions, **kwargs):
        seen.update(kwargs)
        return [-len(c) for c in completions]

    sources = [exact_match_source(weight=2.0), python_source("length", length_penalty, weight=0.5)]
    total, parts = _score(sources)
    lengths = np.array([len(c) for c in COMPLETIONS], np.float32)
    np.testing.assert_allclose(parts["length"], -lengths)
    np.testing.assert_allclose(total, 2.0 * np.array([1, 0, 1, 0, 1]) - 0.5 * lengths)
    # the function receives the dataset columns and the token rows
    assert seen["answer"] == ANSWERS and seen["tokens"].shape == (5, 4)


def test_reward_metrics_names_and_values():
    total, parts = _score([exact_match_source()])
    m = reward_metrics(total, parts)
    assert m["rewards/exact_match/mean"] == pytest.approx(0.6)
    assert m["rewards/exact_match/std"] == pytest.approx(np.std([1, 0, 1, 0, 1], ddof=1))


def test_sources_from_weights_skips_zero_weights():
    s = sources_from_weights({"exact_match": 1.0, "format": 0.0}, eos="<eos>")
    assert [x.name for x in s] == ["exact_match"]
    s = sources_from_weights({"exact_match": 1.0, "format": 0.25}, eos="<eos>")
    assert [(x.name, x.weight) for x in s] == [("exact_match", 1.0), ("format", 0.25)]
    with pytest.raises(ValueError, match="unknown reward 'accuracy'"):
        sources_from_weights({"accuracy": 1.0}, eos="<eos>")
    with pytest.raises(ValueError, match="every reward weight is zero"):
        sources_from_weights({"exact_match": 0.0}, eos="<eos>")


def test_bad_rewards_raise_clear_errors():
    with pytest.raises(ValueError, match=r"'short' returned shape \(2,\), expected \(5,\)"):
        _score([python_source("short", lambda **_: [0.0, 1.0])])
    with pytest.raises(ValueError, match=r"'nan' returned non-finite rewards at rows \[1\]"):
        _score([python_source("nan", lambda completions, **_: [0, np.nan, 0, 0, 0])])
    with pytest.raises(ValueError, match="distinct"):
        _score([exact_match_source(), exact_match_source()])
    with pytest.raises(ValueError, match="needs a prompt column 'answer'"):
        score_with([exact_match_source()], prompts=["q"], completions=["1"],
                   tokens=np.zeros((1, 2)), attention_mask=np.ones((1, 2)), columns={})
    with pytest.raises(ValueError, match="column 'answer' has 1 items, expected 2"):
        score_with([exact_match_source()], prompts=["q", "q"], completions=["1", "2"],
                   tokens=np.zeros((2, 2)), attention_mask=np.ones((2, 2)), columns={"answer": ["1"]})
    with pytest.raises(ValueError, match="without '/'"):
        RewardSource("a/b", lambda **_: 0)
