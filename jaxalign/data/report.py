"""Row errors and the per-step report of kept and dropped rows.

Every data step (loading, tokenizing) either raises a `DataError` for the first bad row (naming the
file, the row index and the field) or, with `on_error="drop"`, drops the bad rows and counts them by
reason in a `DataReport`, which it returns and prints. Nothing is dropped silently.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

ON_ERROR = ("raise", "drop")

# Reasons a row can be rejected for; the keys of `DataReport.dropped`.
REASONS = (
    "malformed_json",  # a line/file that does not parse as JSON objects
    "missing_field",  # a required column is absent or None
    "wrong_type",  # a field has the wrong type (or a different form than the other rows)
    "empty_completion",  # a completion (chosen, rejected, completion, assistant turn) is empty
    "no_prompt",  # an implicit-prompt preference pair whose chosen/rejected share no prefix
    "prompt_too_long",  # the prompt leaves no room for a completion token under `max_length`
    "completion_too_long",  # keep_end: the completion leaves no room for a prompt token
    "no_completion_tokens",  # nothing left to predict after truncation
)


class DataError(ValueError):
    """A bad row: `reason` is one of `REASONS`; the message names source, row and field."""

    def __init__(
        self,
        reason: str,
        detail: str,
        *,
        field: str | None = None,
        row: int | None = None,
        source: str | None = None,
    ):
        if reason not in REASONS:
            raise ValueError(f"unknown DataError reason {reason!r}; expected one of {REASONS}")
        self.reason, self.detail, self.field, self.row, self.source = reason, detail, field, row, source
        super().__init__(self._message())

    def _message(self) -> str:
        where = []
        if self.source is not None:
            where.append(str(self.source))
        if self.row is not None:
            where.append(f"row {self.row}")
        if self.field is not None:
            where.append(f"field {self.field!r}")
        prefix = ", ".join(where)
        return f"{prefix}: {self.detail} [{self.reason}]" if prefix else f"{self.detail} [{self.reason}]"

    def at(self, *, row: int | None = None, source: str | None = None) -> "DataError":
        """Returns a copy that also names the row and/or source (keeping ones already set)."""
        return DataError(
            self.reason,
            self.detail,
            field=self.field,
            row=self.row if self.row is not None else row,
            source=self.source if self.source is not None else source,
        )


@dataclasses.dataclass(frozen=True)
class DataReport:
    """Counts for one data step: `rows_in` rows seen, `rows_kept` kept, `dropped[reason]` dropped.

    `rows_in == rows_kept + sum(dropped.values())`; both count input rows (a preference pair
    unpaired into two examples is one row).
    """

    rows_in: int
    rows_kept: int
    dropped: Mapping[str, int] = dataclasses.field(default_factory=dict)
    source: str | None = None

    @property
    def num_dropped(self) -> int:
        return sum(self.dropped.values())

    def summary(self) -> str:
        name = self.source or "dataset"
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.dropped.items())) or "none"
        return f"{name}: kept {self.rows_kept} of {self.rows_in} rows; dropped: {reasons}"


def check_on_error(on_error: str) -> None:
    if on_error not in ON_ERROR:
        raise ValueError(f"`on_error` must be one of {ON_ERROR}, got {on_error!r}")


class RowFilter:
    """Collects drops for one step: `handle(err)` re-raises under "raise", counts under "drop"."""

    def __init__(self, *, on_error: str, source: str | None):
        check_on_error(on_error)
        self.on_error, self.source = on_error, source
        self.dropped: dict[str, int] = {}

    def handle(self, err: DataError, *, row: int) -> None:
        err = err.at(row=row, source=self.source)
        if self.on_error == "raise":
            raise err
        self.dropped[err.reason] = self.dropped.get(err.reason, 0) + 1

    def report(self, *, rows_in: int, rows_kept: int) -> DataReport:
        rep = DataReport(rows_in=rows_in, rows_kept=rows_kept, dropped=dict(self.dropped),
                         source=self.source)
        if rep.num_dropped:
            print(rep.summary())
        return rep
