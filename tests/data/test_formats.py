import numpy as np
import pytest

from jaxalign.data import DataError, detect_format, extract_prompt, validate_row
from jaxalign.data.report import DataReport


def msg(role, text):
    return {"role": role, "content": text}


@pytest.mark.parametrize("columns,expected", [
    (["prompt", "chosen", "rejected", "answer"], "preference"),
    (["chosen", "rejected"], "implicit_preference"),
    (["prompt", "completion", "label"], "unpaired_preference"),
    (["prompt", "completion"], "prompt_completion"),
    (["messages"], "messages"),
    (["text", "source"], "text"),
    (["prompt", "answer"], "prompt_only"),
])
def test_detect_format(columns, expected):
    assert detect_format(columns) == expected


def test_detect_format_error_names_source():
    with pytest.raises(DataError, match=r"^data\.jsonl: columns \['input'\] match no TRL format"):
        detect_format(["input"], source="data.jsonl")


def test_validate_row_normalises_and_checks():
    row = {"prompt": [msg("user", "1+1=")], "completion": [msg("assistant", "2")],
           "label": np.bool_(True)}
    out = validate_row(row, fmt="unpaired_preference", conversational=True)
    assert out["label"] is True and out["prompt"] == [msg("user", "1+1=")]
    with pytest.raises(DataError, match="field 'label': expected a bool.*got 1 of type int"):
        validate_row(dict(row, label=1), fmt="unpaired_preference", conversational=True)
    with pytest.raises(DataError, match="field 'completion'.*empty_completion"):
        validate_row(dict(row, completion=[msg("assistant", "")]), fmt="unpaired_preference",
                     conversational=True)
    with pytest.raises(DataError, match=r"field 'prompt': message 0: 'content' must be a str"):
        validate_row(dict(row, prompt=[{"role": "user"}]), fmt="unpaired_preference",
                     conversational=True)
    with pytest.raises(DataError, match="field 'prompt': expected at least one message"):
        validate_row(dict(row, prompt=[]), fmt="unpaired_preference", conversational=True)


def test_extract_prompt_conversational_and_errors():
    chosen = [msg("system", "s"), msg("user", "1+1="), msg("assistant", "2")]
    rejected = [msg("system", "s"), msg("user", "1+1="), msg("assistant", "3")]
    assert extract_prompt(chosen, rejected) == (chosen[:2], chosen[2:], rejected[2:])
    assert extract_prompt("The sky is blue.", "The sky is green.") == \
        ("The sky is", " blue.", " green.")
    with pytest.raises(DataError, match="no_prompt"):
        extract_prompt("abc", "xbc")
    with pytest.raises(DataError, match="field 'chosen'.*empty_completion"):
        extract_prompt("1+1=", "1+1=2")
    with pytest.raises(DataError, match="no_prompt"):
        validate_row({"chosen": [msg("user", "a")], "rejected": [msg("user", "b")]},
                     fmt="implicit_preference", conversational=True)


def test_error_and_report_messages():
    err = DataError("wrong_type", "expected a str", field="prompt").at(row=3, source="f.jsonl")
    assert str(err) == "f.jsonl, row 3, field 'prompt': expected a str [wrong_type]"
    with pytest.raises(ValueError, match="unknown DataError reason"):
        DataError("oops", "x")
    rep = DataReport(rows_in=5, rows_kept=3, dropped={"wrong_type": 2}, source="f.jsonl")
    assert rep.num_dropped == 2
    assert rep.summary() == "f.jsonl: kept 3 of 5 rows; dropped: wrong_type=2"
