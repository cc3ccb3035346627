"""Loading a dataset in a TRL format from a local file, a saved directory or the Hub.

`load_dataset(path_or_name)` reads `.jsonl` / `.json` (a JSON array of objects, or JSON lines) and
`.parquet` files itself, so that a malformed line or a bad field is reported with the file name and
the row index; a directory written by `datasets.Dataset.save_to_disk` loads with
`datasets.load_from_disk`; anything else is passed to `datasets.load_dataset(name, split=...)`.

Every row is validated against the detected format (`jaxalign.data.formats`). With
`on_error="raise"` the first bad row raises a `DataError` naming the file, row and field; with
`on_error="drop"` bad rows are dropped and counted per reason in the returned `DataReport`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator

import datasets

from jaxalign.data.formats import FORMATS, detect_conversational, detect_format, validate_row
from jaxalign.data.report import DataError, DataReport, RowFilter, check_on_error

JSON_EXTENSIONS = (".jsonl", ".json")
PARQUET_EXTENSIONS = (".parquet",)


def _json_lines(text: str) -> Iterator[Any]:
    """Yields one parsed object (or a DataError) per non-blank line."""
    row = 0
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError as e:
            yield DataError("malformed_json", f"line {lineno} is not valid JSON ({e.msg} at column "
                            f"{e.colno})", row=row)
        row += 1


def _read_json(path: str) -> list[Any]:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".json"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            obj = None  # not a single JSON document: read it as JSON lines below
        if isinstance(obj, list):
            return obj
        if obj is not None and not isinstance(obj, dict):
            raise DataError("malformed_json", f"expected a JSON array of objects or JSON lines, got "
                            f"a top-level {type(obj).__name__}", source=path)
    return list(_json_lines(text))


def _read_rows(path: str) -> list[Any]:
    if path.endswith(JSON_EXTENSIONS):
        return _read_json(path)
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise DataError("malformed_json", f"cannot read parquet file ({e})", source=path) from e
    return table.to_pylist()


def validate_rows(
    rows: list[Any],
    *,
    fmt: str | None = None,
    on_error: str = "raise",
    source: str | None = None,
) -> tuple[list[int], str, DataReport]:
    """Validates parsed rows; returns (indices of the kept rows, format name, report).

    `rows` holds dicts (or DataErrors from parsing). The format is detected from the union of the
    rows' keys unless `fmt` is given.
    """
    check_on_error(on_error)
    filt = RowFilter(on_error=on_error, source=source)
    dicts = [r for r in rows if isinstance(r, dict)]
    if fmt is None:
        columns = {k for r in dicts for k in r}
        fmt = detect_format(columns, source=source)
    elif fmt not in FORMATS:
        raise ValueError(f"`fmt` must be one of {list(FORMATS)}, got {fmt!r}")
    conversational = detect_conversational(dicts, fmt)
    kept = []
    for i, row in enumerate(rows):
        try:
            if isinstance(row, DataError):
                raise row
            if not isinstance(row, dict):
                raise DataError("malformed_json", f"expected a JSON object, got "
                                f"{type(row).__name__}")
            validate_row(row, fmt=fmt, conversational=conversational)
        except DataError as err:
            filt.handle(err, row=i)
            continue
        kept.append(i)
    return kept, fmt, filt.report(rows_in=len(rows), rows_kept=len(kept))


def load_dataset(
    path_or_name: str,
    *,
    split: str = "train",
    fmt: str | None = None,
    on_error: str = "raise",
    **hub_kwargs: Any,
) -> tuple[datasets.Dataset, DataReport]:
    """Loads and validates a dataset; returns `(datasets.Dataset, DataReport)`.

    Args:
      path_or_name: a `.jsonl`/`.json`/`.parquet` file, a `save_to_disk` directory, or a Hub name.
      split: the split to take from a DatasetDict or a Hub dataset.
      fmt: a `FORMATS` name to validate against; detected from the columns when None.
      on_error: "raise" (first bad row raises DataError) or "drop" (count and drop bad rows).
      **hub_kwargs: passed to `datasets.load_dataset` for Hub names (e.g. `name`, `revision`).

    All original columns are kept (extra ones become metadata); columns missing from some rows of
    a JSON file are filled with None in those rows.
    """
    check_on_error(on_error)
    if os.path.isfile(path_or_name):
        if not path_or_name.endswith(JSON_EXTENSIONS + PARQUET_EXTENSIONS):
            raise ValueError(f"{path_or_name}: unsupported file type; expected one of "
                             f"{JSON_EXTENSIONS + PARQUET_EXTENSIONS}")
        rows = _read_rows(path_or_name)
        kept, _, report = validate_rows(rows, fmt=fmt, on_error=on_error, source=path_or_name)
        columns: dict[str, None] = {}
        for i in kept:
            columns.update(dict.fromkeys(rows[i]))
        ds = datasets.Dataset.from_list([{k: rows[i].get(k) for k in columns} for i in kept])
        return ds, report
    if os.path.isdir(path_or_name):
        ds = datasets.load_from_disk(path_or_name)
    elif path_or_name.endswith(JSON_EXTENSIONS + PARQUET_EXTENSIONS) or path_or_name.startswith(
            (".", os.path.sep)):
        raise FileNotFoundError(f"{path_or_name}: no such file or directory")
    else:
        ds = datasets.load_dataset(path_or_name, split=split, **hub_kwargs)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"{path_or_name}: no split {split!r}; available: {list(ds)}")
        ds = ds[split]
    kept, _, report = validate_rows(list(ds), fmt=fmt, on_error=on_error, source=path_or_name)
    if len(kept) < len(ds):
        ds = ds.select(kept)
    return ds, report
