import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxalign.data import (
    exact_match_reward,
    format_reward,
    is_heldout,
    make_collate_fn,
    make_kto_dataset,
    make_preference_dataset,
    make_prompt_dataset,
    make_sft_dataset,
    tokenize_dataset,
)
from jaxalign.data import synthetic
from jaxalign.data.rewards import parse_completion
from jaxalign.data.synthetic import Problem, corrupt_answer, sample_problems

PROMPT = re.compile(r"(\d+)([+-])(\d+)=")


def solve(prompt: str) -> str:
    a, op, b = PROMPT.fullmatch(prompt).groups()
    return str(int(a) + int(b) if op == "+" else int(a) - int(b))


def one_digit_off(wrong: str, right: str) -> bool:
    return len(wrong) == len(right) and sum(x != y for x, y in zip(wrong, right)) == 1


def test_problem_and_sampling():
    assert Problem(23, "+", 58).prompt == "23+58=" and Problem(23, "+", 58).answer == "81"
    assert Problem(5, "-", 9).answer == "-4"
    problems = sample_problems(200, seed=0, digits=2, operators="+-")
    assert problems == sample_problems(200, seed=0, digits=2, operators="+-")
    assert {p.op for p in problems} == {"+", "-"}
    assert all(0 <= p.a < 100 and 0 <= p.b < 100 for p in problems)
    assert all(int(p.answer) >= 0 for p in problems)  # allow_negative=False
    assert all(not is_heldout(p.prompt) for p in problems)
    three = sample_problems(50, seed=1, digits=3, operators="+")
    assert {p.op for p in three} == {"+"} and max(max(p.a, p.b) for p in three) >= 100
    assert any(int(p.answer) < 0 for p in sample_problems(100, seed=0, allow_negative=True))


@settings(max_examples=40, deadline=None)
@given(answer=st.integers(-999, 9999).map(str), seed=st.integers(0, 1000))
def test_corrupt_answer_differs_in_one_digit(answer, seed):
    wrong = corrupt_answer(answer, np.random.default_rng(seed))
    assert one_digit_off(wrong, answer)
    digits = wrong.lstrip("-")
    assert len(digits) == 1 or digits[0] != "0"  # no new leading zero


def test_sft_dataset_answers_and_wrong_fraction():
    ds = make_sft_dataset(40, seed=0, wrong_fraction=0.25)
    assert ds.column_names == ["prompt", "completion", "answer", "is_correct"]
    assert sum(ds["is_correct"]) == 30
    for row in ds:
        assert row["answer"] == solve(row["prompt"])
        if row["is_correct"]:
            assert row["completion"] == row["answer"]
        else:
            assert row["completion"] != row["answer"]
            assert one_digit_off(row["completion"], row["answer"])
    assert make_sft_dataset(40, seed=0, wrong_fraction=0.25).to_list() == ds.to_list()


def test_preference_kto_prompt_datasets():
    pref = make_preference_dataset(30, seed=1)
    assert all(r["chosen"] == solve(r["prompt"]) == r["answer"] for r in pref)
    assert all(one_digit_off(r["rejected"], r["chosen"]) for r in pref)
    kto = make_kto_dataset(30, seed=1, desirable_fraction=0.4)
    assert sum(kto["label"]) == 12
    assert all((r["completion"] == solve(r["prompt"])) == r["label"] for r in kto)
    prompts = make_prompt_dataset(30, seed=1)
    assert prompts.column_names == ["prompt", "answer"]
    assert all(r["answer"] == solve(r["prompt"]) for r in prompts)


def test_conversational_variants_tokenize(tok):
    pref = make_preference_dataset(4, seed=0, conversational=True)
    row = pref[0]
    assert [m["role"] for m in row["prompt"]] == ["user"]
    assert solve(row["prompt"][0]["content"]) == row["answer"]
    assert row["chosen"] == [{"role": "assistant", "content": row["answer"]}]
    out = tokenize_dataset(pref, tok)
    ex = out.examples[0]
    text = tok.decode(ex["chosen_input_ids"])
    assert text == f"<bos><|user|>{row['prompt'][0]['content']}<|assistant|>{row['answer']}<eos>"
    assert tok.decode([t for t, m in zip(ex["chosen_input_ids"], ex["chosen_loss_mask"]) if m]) \
        == row["answer"] + "<eos>"
    batch = make_collate_fn("prompt", pad_id=0)(
        tokenize_dataset(make_prompt_dataset(3, seed=0, conversational=True), tok).examples)
    assert batch["prompt_tokens"].shape[0] == 3 and len(batch["answer"]) == 3
    assert (batch["prompt_tokens"][:, -1] == tok.convert_tokens_to_ids("<|assistant|>")).all()


def test_heldout_split_never_overlaps_training():
    train = set(make_sft_dataset(2000, seed=0)["prompt"]) | set(make_prompt_dataset(2000, seed=1)
                                                                ["prompt"])
    test = set(make_prompt_dataset(300, seed=0, split="test")["prompt"])
    test |= set(make_preference_dataset(300, seed=5, split="test")["prompt"])
    assert train and test and not train & test
    assert all(is_heldout(p) for p in test) and not any(is_heldout(p) for p in train)
    frac = np.mean([is_heldout(Problem(a, "+", b).prompt) for a in range(100) for b in range(100)])
    assert 0.05 < frac < 0.15  # about HELDOUT_PERCENT = 10% of the problem space


def test_bad_arguments(monkeypatch):
    with pytest.raises(ValueError, match="digits"):
        make_sft_dataset(2, seed=0, digits=0)
    with pytest.raises(ValueError, match="operators"):
        make_prompt_dataset(2, seed=0, operators="*")
    with pytest.raises(ValueError, match="split"):
        make_prompt_dataset(2, seed=0, split="val")
    with pytest.raises(ValueError, match="wrong_fraction"):
        make_sft_dataset(2, seed=0, wrong_fraction=1.5)
    monkeypatch.setattr(synthetic, "HELDOUT_PERCENT", 0)  # no prompt is held out any more
    with pytest.raises(ValueError, match="too few prompts"):
        make_prompt_dataset(5, seed=0, split="test")


def test_exact_match_reward():
    completions = ["81<eos><pad><pad>", "81", " 81 <eos>", "80<eos>", "8<eos>1", "",
                   [{"role": "assistant", "content": "81<eos>"}]]
    r = exact_match_reward(completions, ["81"] * 7)
    assert r.dtype == np.float32 and r.shape == (7,)
    np.testing.assert_array_equal(r, [1, 1, 1, 0, 0, 0, 1])
    assert parse_completion(" 81 <eos>7") == ("81", True) and parse_completion("8") == ("8", False)
    with pytest.raises(ValueError, match="answers"):
        exact_match_reward(["1"], ["1", "2"])
    with pytest.raises(ValueError, match=r"completions\[0\]"):
        exact_match_reward([3], ["3"])


def test_format_reward():
    completions = ["81<eos>", "-4<eos>", "81", "eighty<eos>", "8 1<eos>", "<eos>", "81=<eos>"]
    np.testing.assert_array_equal(format_reward(completions), [1, 1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(format_reward(completions, require_eos=True),
                                  [1, 1, 0, 0, 0, 0, 0])


def test_rewards_on_decoded_model_output(tok):
    ds = make_prompt_dataset(4, seed=0)
    answers = ds["answer"]
    # decoded ids of "answer<eos><pad>" with and without special tokens both score 1
    ids = [tok(a + "<eos><pad>", add_special_tokens=False)["input_ids"] for a in answers]
    for skip in (False, True):
        texts = [tok.decode(i, skip_special_tokens=skip) for i in ids]
        np.testing.assert_array_equal(exact_match_reward(texts, answers), np.ones(4))
