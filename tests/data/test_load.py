import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jaxalign.data import DataError, load_dataset, tokenize_dataset

ROWS = [
    {"prompt": "1+1=", "chosen": "2", "rejected": "3", "answer": "2"},
    {"prompt": "2+2=", "chosen": "4", "rejected": "5", "answer": "4"},
]
CONV_ROWS = [
    {"prompt": [{"role": "user", "content": "1+1="}],
     "completion": [{"role": "assistant", "content": "2"}], "label": True},
    {"prompt": [{"role": "user", "content": "2+2="}],
     "completion": [{"role": "assistant", "content": "5"}], "label": False},
]


def write_jsonl(path, rows, extra_lines=()):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return str(path)


def test_jsonl_roundtrip_through_tokenization(tmp_path, tok):
    path = write_jsonl(tmp_path / "prefs.jsonl", ROWS)
    ds, report = load_dataset(path)
    assert isinstance(ds, datasets.Dataset) and len(ds) == 2
    assert ds.column_names == ["prompt", "chosen", "rejected", "answer"]
    assert report.rows_in == report.rows_kept == 2 and report.source == path
    ex = tokenize_dataset(ds, tok).examples[1]
    assert ex["chosen_input_ids"] == [1, 9, 17, 9, 20, 11, 2]


def test_conversational_jsonl_and_json_array(tmp_path, tok):
    path = write_jsonl(tmp_path / "kto.jsonl", CONV_ROWS)
    ds, _ = load_dataset(path)
    assert ds[0]["prompt"] == [{"role": "user", "content": "1+1="}] and ds[1]["label"] is False
    out = tokenize_dataset(ds, tok)
    assert out.kind == "unpaired"
    assert out.examples[0]["input_ids"] == [1, 5, 8, 17, 8, 20, 6, 9, 2]
    arr = tmp_path / "kto.json"
    arr.write_text(json.dumps(CONV_ROWS))
    ds2, _ = load_dataset(str(arr))
    assert ds2.to_list() == ds.to_list()


def test_parquet(tmp_path, tok):
    path = str(tmp_path / "prefs.parquet")
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    ds, report = load_dataset(path)
    assert ds.to_list() == ROWS and report.rows_kept == 2
    bad = str(tmp_path / "bad.parquet")
    pq.write_table(pa.Table.from_pylist(ROWS + [{"prompt": "3+3=", "chosen": None, "rejected": "7",
                                                "answer": "6"}]), bad)
    with pytest.raises(DataError, match=r"bad\.parquet, row 2, field 'chosen'.*missing_field"):
        load_dataset(bad)
    ds, report = load_dataset(bad, on_error="drop")
    assert len(ds) == 2 and report.dropped == {"missing_field": 1}


def test_save_to_disk_directory(tmp_path):
    d = str(tmp_path / "saved")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(d)
    ds, report = load_dataset(d, split="train")
    assert ds.to_list() == ROWS and report.rows_kept == 2
    with pytest.raises(ValueError, match="no split 'test'"):
        load_dataset(d, split="test")


def test_malformed_jsonl_names_file_row_and_field(tmp_path, capsys):
    path = write_jsonl(tmp_path / "bad.jsonl", ROWS + [
        {"prompt": "3+3=", "rejected": "7"},  # row 2: chosen missing
        {"prompt": "4+4=", "chosen": 8, "rejected": "9"},  # row 3: wrong type
        {"prompt": "5+5=", "chosen": "10", "rejected": ""},  # row 4: empty completion
    ], extra_lines=["", '{"prompt": "6+6=", "chosen": "12"', '[1, 2]'])  # rows 5, 6
    with pytest.raises(DataError) as e:
        load_dataset(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}, row 2, field 'chosen': ") and "missing_field" in msg
    ds, report = load_dataset(path, on_error="drop")
    assert len(ds) == 2 and ds["prompt"] == ["1+1=", "2+2="]
    assert report.rows_in == 7 and report.rows_kept == 2
    assert report.dropped == {"missing_field": 1, "wrong_type": 1, "empty_completion": 1,
                              "malformed_json": 2}
    assert "bad.jsonl: kept 2 of 7 rows" in capsys.readouterr().out


def test_malformed_line_error(tmp_path):
    path = write_jsonl(tmp_path / "broken.jsonl", ROWS[:1], extra_lines=["{not json"])
    with pytest.raises(DataError, match=r"broken\.jsonl, row 1: line 2 is not valid JSON"):
        load_dataset(path)


def test_label_must_be_bool(tmp_path):
    rows = [dict(CONV_ROWS[0]), dict(CONV_ROWS[1], label="no")]
    path = write_jsonl(tmp_path / "kto.jsonl", rows)
    with pytest.raises(DataError, match=r"row 1, field 'label': expected a bool"):
        load_dataset(path)


def test_bad_message_structure(tmp_path):
    rows = [dict(CONV_ROWS[0]), dict(CONV_ROWS[1], prompt=[{"role": "robot", "content": "x"}])]
    path = write_jsonl(tmp_path / "kto.jsonl", rows)
    with pytest.raises(DataError, match=r"row 1, field 'prompt': message 0: 'role' must be"):
        load_dataset(path)


def test_unknown_columns_and_files(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"question": "1+1=", "answer": "2"}])
    with pytest.raises(DataError, match="match no TRL format"):
        load_dataset(path)
    other = tmp_path / "x.csv"
    other.write_text("prompt\n1+1=\n")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_dataset(str(other))
    with pytest.raises(FileNotFoundError):
        load_dataset(str(tmp_path / "missing.jsonl"))
    with pytest.raises(FileNotFoundError):
        load_dataset("relative/missing.parquet")
    with pytest.raises(ValueError, match="on_error"):
        load_dataset(path, on_error="ignore")
