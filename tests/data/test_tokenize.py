"""Tokenization of each format with the tiny char tokenizer; token ids are computed by hand.

Ids: <pad>0 <bos>1 <eos>2 <|system|>4 <|user|>5 <|assistant|>6, "0".."9" = 7..16, "+"17 "-"18 "="20.
"""

import copy

import pytest

from jaxalign.data import DataError, tokenize_dataset
from jaxalign.data.encode import encode_text, fix_bos

BOS, EOS, SYSTEM, USER, ASSISTANT = 1, 2, 4, 5, 6
P = [8, 9, 17, 10, 20]  # "12+3="
C15 = [8, 12]  # "15"
C14 = [8, 11]  # "14"


def user(text):
    return [{"role": "user", "content": text}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


def test_prompt_completion_standard(tok):
    out = tokenize_dataset([{"prompt": "12+3=", "completion": "15"}], tok)
    assert out.kind == "sft"
    (ex,) = out.examples
    assert ex["input_ids"] == [BOS] + P + C15 + [EOS]
    assert ex["loss_mask"] == [0] * 6 + [1, 1, 1]
    assert out.report.rows_in == out.report.rows_kept == 1 and not out.report.dropped


def test_prompt_completion_conversational(tok):
    out = tokenize_dataset([{"prompt": user("12+3="), "completion": assistant("15")}], tok)
    (ex,) = out.examples
    # "<bos><|user|>12+3=<|assistant|>" + "15<eos>": the template adds BOS and EOS, once each
    assert ex["input_ids"] == [BOS, USER] + P + [ASSISTANT] + C15 + [EOS]
    assert ex["loss_mask"] == [0] * 8 + [1, 1, 1]


def test_preference_standard_and_conversational(tok):
    rows = [{"prompt": "12+3=", "chosen": "15", "rejected": "14"}]
    (ex,) = tokenize_dataset(rows, tok).examples
    assert ex["chosen_input_ids"] == [BOS] + P + C15 + [EOS]
    assert ex["rejected_input_ids"] == [BOS] + P + C14 + [EOS]
    assert ex["chosen_loss_mask"] == ex["rejected_loss_mask"] == [0] * 6 + [1] * 3
    conv = [{"prompt": user("12+3="), "chosen": assistant("15"), "rejected": assistant("14")}]
    (ex,) = tokenize_dataset(conv, tok).examples
    assert ex["chosen_input_ids"] == [BOS, USER] + P + [ASSISTANT] + C15 + [EOS]
    assert ex["rejected_input_ids"] == [BOS, USER] + P + [ASSISTANT] + C14 + [EOS]
    assert ex["chosen_loss_mask"] == [0] * 8 + [1] * 3


def test_implicit_prompt_preference(tok):
    conv = [{"chosen": user("12+3=") + assistant("15"), "rejected": user("12+3=") + assistant("14")}]
    out = tokenize_dataset(conv, tok)
    assert out.kind == "preference"
    (ex,) = out.examples
    assert ex["chosen_input_ids"] == [BOS, USER] + P + [ASSISTANT] + C15 + [EOS]
    assert ex["chosen_loss_mask"] == [0] * 8 + [1] * 3
    (ex,) = tokenize_dataset([{"chosen": "12+3=15", "rejected": "12+3=14"}], tok).examples
    assert ex["chosen_input_ids"] == [BOS] + P + C15 + [EOS]
    assert ex["rejected_input_ids"] == [BOS] + P + C14 + [EOS]


def test_unpaired_and_unpairing(tok):
    rows = [{"prompt": "12+3=", "completion": "15", "label": True},
            {"prompt": "1+1=", "completion": "3", "label": False}]
    out = tokenize_dataset(rows, tok)
    assert out.kind == "unpaired"
    a, b = out.examples
    assert a["input_ids"] == [BOS] + P + C15 + [EOS] and a["label"] is True
    assert a["prompt_ids"] == [BOS] + P and a["completion_ids"] == C15 + [EOS]
    assert b["input_ids"] == [BOS, 8, 17, 8, 20, 10, EOS] and b["label"] is False
    assert b["loss_mask"] == [0] * 5 + [1, 1]
    # a preference dataset unpairs like trl.unpair_preference_dataset: all chosen, then all rejected
    prefs = [{"prompt": "12+3=", "chosen": "15", "rejected": "14"},
             {"prompt": "1+1=", "chosen": "2", "rejected": "3"}]
    out = tokenize_dataset(prefs, tok, kind="unpaired")
    assert [(e["row"], e["label"]) for e in out.examples] == [(0, True), (1, True), (0, False),
                                                              (1, False)]
    assert out.examples[2]["completion_ids"] == C14 + [EOS]
    assert out.report.rows_in == out.report.rows_kept == 2


def test_text_and_messages(tok):
    (ex,) = tokenize_dataset([{"text": "1+1=2"}], tok).examples
    assert ex["input_ids"] == [BOS, 8, 17, 8, 20, 9, EOS]
    assert ex["loss_mask"] == [0, 1, 1, 1, 1, 1, 1]  # everything after the first token
    conv = [{"messages": [{"role": "system", "content": "hi"}] + user("1+1=") + assistant("2")
             + user("2+2=") + assistant("4")}]
    (ex,) = tokenize_dataset(conv, tok).examples
    h, i = 29, 30
    assert ex["input_ids"] == [BOS, SYSTEM, h, i, USER, 8, 17, 8, 20, ASSISTANT, 9, EOS,
                               USER, 9, 17, 9, 20, ASSISTANT, 11, EOS]
    # only the assistant turns (content + end-of-turn) are learned
    assert ex["loss_mask"] == [0] * 10 + [1, 1] + [0] * 6 + [1, 1]
    (ex,) = tokenize_dataset(conv, tok, assistant_only_loss=False).examples
    assert ex["loss_mask"] == [0] + [1] * 19


def test_messages_without_assistant_turn(tok):
    rows = [{"messages": user("1+1=")}]
    with pytest.raises(DataError, match=r"row 0, field 'messages'.*no_completion_tokens"):
        tokenize_dataset(rows, tok)


def test_prompt_only_keeps_metadata(tok):
    rows = [{"prompt": "12+3=", "answer": "15", "level": 2}, {"prompt": user("1+1="), "answer": "2"}]
    out = tokenize_dataset(rows[:1], tok)
    assert out.kind == "prompt"
    assert out.examples[0]["prompt_ids"] == [BOS] + P
    assert out.examples[0]["metadata"] == {"answer": "15", "level": 2}
    (ex,) = tokenize_dataset(rows[1:], tok).examples
    assert ex["prompt_ids"] == [BOS, USER, 8, 17, 8, 20, ASSISTANT]  # with the generation prompt
    prefs = [{"prompt": "12+3=", "chosen": "15", "rejected": "14"}]
    (ex,) = tokenize_dataset(prefs, tok, kind="prompt").examples
    assert ex["prompt_ids"] == [BOS] + P and ex["metadata"] == {"chosen": "15", "rejected": "14"}


def test_sft_on_preference_uses_chosen(tok):
    (ex,) = tokenize_dataset([{"prompt": "12+3=", "chosen": "15", "rejected": "14"}], tok,
                             kind="sft").examples
    assert ex["input_ids"] == [BOS] + P + C15 + [EOS]


def test_kind_format_mismatch(tok):
    with pytest.raises(ValueError, match="kind 'preference' needs"):
        tokenize_dataset([{"prompt": "1=", "completion": "1"}], tok, kind="preference")
    with pytest.raises(ValueError, match="`kind` must be one of"):
        tokenize_dataset([{"prompt": "1="}], tok, kind="dpo")


def test_eos_not_doubled_and_optional(tok):
    (ex,) = tokenize_dataset([{"prompt": "1+1=", "completion": "2<eos>"}], tok).examples
    assert ex["input_ids"] == [BOS, 8, 17, 8, 20, 9, EOS]
    (ex,) = tokenize_dataset([{"prompt": "1+1=", "completion": "2"}], tok, add_eos=False).examples
    assert ex["input_ids"] == [BOS, 8, 17, 8, 20, 9]
    # chat templates close the assistant turn themselves: add_eos does not add a second EOS
    (ex,) = tokenize_dataset([{"prompt": user("1+1="), "completion": assistant("2")}], tok,
                             add_eos=True).examples
    assert ex["input_ids"][-2:] == [9, EOS] and ex["input_ids"].count(EOS) == 1


def test_bos_handling(tok):
    row = [{"prompt": "1+1=", "completion": "2"}]
    (ex,) = tokenize_dataset(row, tok, add_bos=False).examples
    assert ex["input_ids"] == [8, 17, 8, 20, 9, EOS]
    # a prompt text that already starts with BOS is not given a second one
    (ex,) = tokenize_dataset([{"prompt": "<bos>1+1=", "completion": "2"}], tok).examples
    assert ex["input_ids"] == [BOS, 8, 17, 8, 20, 9, EOS]
    # the chat template renders BOS: add_bos=True keeps exactly one, add_bos=False removes it
    conv = [{"prompt": user("1="), "completion": assistant("1")}]
    (ex,) = tokenize_dataset(conv, tok, add_bos=True).examples
    assert ex["input_ids"] == [BOS, USER, 8, 20, ASSISTANT, 8, EOS]
    (ex,) = tokenize_dataset(conv, tok, add_bos=False).examples
    assert ex["input_ids"] == [USER, 8, 20, ASSISTANT, 8, EOS]
    assert ex["loss_mask"] == [0, 0, 0, 0, 1, 1]
    assert fix_bos(tok, [BOS, BOS, BOS, 7], add_bos=None) == [BOS, 7]
    assert encode_text(tok, "<bos><bos>1", add_bos=True) == [BOS, 8]


def test_truncation_keep_start(tok):
    rows = [{"prompt": "12+3=", "completion": "1234"}]  # prompt 6 tokens, completion 5
    (ex,) = tokenize_dataset(rows, tok, max_length=8).examples
    assert ex["input_ids"] == [BOS] + P + [8, 9]  # the completion loses its end
    assert ex["loss_mask"] == [0] * 6 + [1, 1]
    (ex,) = tokenize_dataset(rows, tok, max_length=7).examples
    assert ex["input_ids"] == [BOS] + P + [8] and ex["loss_mask"][-1] == 1
    with pytest.raises(DataError, match=r"row 0, field 'prompt'.*prompt_too_long"):
        tokenize_dataset(rows, tok, max_length=6)


def test_truncation_keep_end(tok):
    rows = [{"prompt": "12+3=", "completion": "1234"}]
    (ex,) = tokenize_dataset(rows, tok, max_length=8, truncation_mode="keep_end").examples
    assert ex["input_ids"] == [17, 10, 20, 8, 9, 10, 11, EOS]  # the prompt loses its start
    assert ex["loss_mask"] == [0, 0, 0, 1, 1, 1, 1, 1]
    (ex,) = tokenize_dataset(rows, tok, max_length=6, truncation_mode="keep_end").examples
    assert ex["input_ids"] == [20, 8, 9, 10, 11, EOS]
    with pytest.raises(DataError, match=r"field 'completion'.*completion_too_long"):
        tokenize_dataset(rows, tok, max_length=5, truncation_mode="keep_end")


def test_max_prompt_length_truncates_from_the_left(tok):
    rows = [{"prompt": "12+3=", "completion": "15"}]
    (ex,) = tokenize_dataset(rows, tok, max_prompt_length=3).examples
    assert ex["input_ids"] == [17, 10, 20] + C15 + [EOS]
    (ex,) = tokenize_dataset([{"prompt": "12+3="}], tok, max_prompt_length=3).examples
    assert ex["prompt_ids"] == [17, 10, 20]
    with pytest.raises(DataError, match="prompt_too_long"):
        tokenize_dataset([{"prompt": "12+3="}], tok, max_length=6)
    with pytest.raises(ValueError, match="max_prompt_length"):
        tokenize_dataset(rows, tok, max_length=4, max_prompt_length=4)
    with pytest.raises(ValueError, match="truncation_mode"):
        tokenize_dataset(rows, tok, truncation_mode="left")


def test_drop_counts_and_errors(tok, capsys):
    rows = [
        {"prompt": "1+1=", "chosen": "2", "rejected": "3"},
        {"prompt": "1+1=", "chosen": "", "rejected": "3"},  # empty completion
        {"prompt": "1+1=", "chosen": 2, "rejected": "3"},  # wrong type
        {"prompt": None, "chosen": "2", "rejected": "3"},  # missing
        {"prompt": "123456789+1=", "chosen": "2", "rejected": "3"},  # too long
        {"prompt": "2+2=", "chosen": "4", "rejected": "5"},
    ]
    with pytest.raises(DataError) as e:
        tokenize_dataset(rows, tok, max_length=10, source="prefs.jsonl")
    assert str(e.value).startswith("prefs.jsonl, row 1, field 'chosen': ")
    assert e.value.reason == "empty_completion" and e.value.row == 1
    out = tokenize_dataset(rows, tok, max_length=10, on_error="drop", source="prefs.jsonl")
    assert [ex["row"] for ex in out.examples] == [0, 5]
    assert out.report.rows_in == 6 and out.report.rows_kept == 2
    assert out.report.dropped == {"empty_completion": 1, "wrong_type": 1, "missing_field": 1,
                                  "prompt_too_long": 1}
    assert "prefs.jsonl: kept 2 of 6 rows" in capsys.readouterr().out
    with pytest.raises(ValueError, match="on_error"):
        tokenize_dataset(rows, tok, on_error="skip")


def test_mixed_standard_and_conversational_rows(tok):
    rows = [{"prompt": "1=", "completion": "1"}, {"prompt": user("1="), "completion": assistant("1")}]
    with pytest.raises(DataError, match=r"row 1, field 'prompt': expected a str"):
        tokenize_dataset(rows, tok)


def test_conversational_needs_chat_template(tok):
    no_template = copy.deepcopy(tok)
    no_template.chat_template = None
    with pytest.raises(ValueError, match="chat_template"):
        tokenize_dataset([{"prompt": user("1="), "completion": assistant("1")}], no_template)
