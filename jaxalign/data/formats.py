"""TRL's dataset formats: detection from column names and per-row validation.

Formats (TRL "dataset formats and types"; each is *standard* — plain strings — or *conversational* —
lists of `{"role", "content"}` messages):

| format                | columns                         | used by                        |
|-----------------------|---------------------------------|--------------------------------|
| `language_modeling`   | `text` or `messages`            | SFT                            |
| `prompt_completion`   | `prompt`, `completion`          | SFT                            |
| `preference`          | `prompt`, `chosen`, `rejected`  | DPO family, ORPO, SimPO, RM    |
| `implicit_preference` | `chosen`, `rejected`            | same; prompt = shared prefix   |
| `unpaired_preference` | `prompt`, `completion`, `label` | KTO (`label` is a bool)        |
| `prompt_only`         | `prompt`                        | online RL (GRPO, PPO, RLOO)    |

Other columns (e.g. an `answer` for a verifiable reward) are ignored here and kept as metadata by
prompt-only tokenization. In conversational rows, `chosen`/`rejected`/`completion` hold the
assistant turn(s) that follow the prompt's messages.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np

from jaxalign.data.report import DataError

# Most specific first: a dataset with prompt/chosen/rejected is preference, not prompt-only.
FORMATS: dict[str, tuple[str, ...]] = {
    "preference": ("prompt", "chosen", "rejected"),
    "implicit_preference": ("chosen", "rejected"),
    "unpaired_preference": ("prompt", "completion", "label"),
    "prompt_completion": ("prompt", "completion"),
    "messages": ("messages",),
    "text": ("text",),
    "prompt_only": ("prompt",),
}
ROLES = ("system", "user", "assistant", "tool")
# Fields holding something the model must learn to produce: an empty one is an error.
COMPLETION_FIELDS = ("completion", "chosen", "rejected", "text")


def detect_format(columns: Iterable[str], *, source: str | None = None) -> str:
    """Returns the `FORMATS` name matching the column names (most specific match wins).

    Raises DataError("missing_field") naming the columns when no format matches.
    """
    cols = set(columns)
    if "text" in cols and "messages" not in cols and not cols & {"prompt", "chosen"}:
        return "text"
    for name, required in FORMATS.items():
        if name == "text":
            continue
        if set(required) <= cols:
            return name
    raise DataError(
        "missing_field",
        f"columns {sorted(cols)} match no TRL format; expected one of "
        + "; ".join(f"{k}: {list(v)}" for k, v in FORMATS.items()),
        source=source,
    )


def detect_conversational(rows: Iterable[Mapping[str, Any]], fmt: str) -> bool:
    """Decides standard vs conversational from the first row whose main field is a str or a list."""
    if fmt == "text":
        return False
    main = FORMATS[fmt][0] if fmt != "implicit_preference" else "chosen"
    for row in rows:
        value = row.get(main)
        if isinstance(value, str):
            return False
        if isinstance(value, list):
            return True
    return False


def _check_messages(value: Any, field: str, *, allow_empty: bool) -> list[dict[str, str]]:
    if not isinstance(value, list):
        raise DataError("wrong_type", f"expected a list of {{role, content}} messages like the other "
                        f"rows, got {type(value).__name__}", field=field)
    if not value and not allow_empty:
        raise DataError("missing_field", "expected at least one message, got an empty list",
                        field=field)
    messages = []
    for i, msg in enumerate(value):
        if not isinstance(msg, Mapping):
            raise DataError("wrong_type", f"message {i}: expected a dict with 'role' and 'content', "
                            f"got {type(msg).__name__}", field=field)
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            raise DataError("wrong_type", f"message {i}: 'role' must be one of {ROLES}, got {role!r}",
                            field=field)
        if not isinstance(content, str):
            raise DataError("wrong_type", f"message {i}: 'content' must be a str, got "
                            f"{type(content).__name__}", field=field)
        messages.append({k: v for k, v in msg.items() if v is not None})
    return messages


def _check_text(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise DataError("wrong_type", f"expected a str like the other rows, got "
                        f"{type(value).__name__}", field=field)
    return value


def _check_field(row: Mapping[str, Any], field: str, conversational: bool) -> Any:
    if field not in row or row[field] is None:
        raise DataError("missing_field", "required field is missing or None", field=field)
    value = row[field]
    if field == "label":
        if not isinstance(value, (bool, np.bool_)):
            raise DataError("wrong_type", f"expected a bool (desirable=True), got {value!r} of type "
                            f"{type(value).__name__}", field=field)
        return bool(value)
    if conversational and field != "text":
        value = _check_messages(value, field, allow_empty=field in COMPLETION_FIELDS)
        if field in COMPLETION_FIELDS and not any(m["content"] for m in value):
            raise DataError("empty_completion", "the completion has no non-empty message",
                            field=field)
        return value
    value = _check_text(value, field)
    if field in COMPLETION_FIELDS and value == "":
        raise DataError("empty_completion", "the completion is an empty string", field=field)
    return value


def extract_prompt(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    """Splits an implicit-prompt pair into `(prompt, chosen, rejected)` like `trl.extract_prompt`.

    The prompt is the longest common prefix (of characters, or of messages); as in TRL, a space
    just before the divergence point goes to the completions. Raises DataError when the pair has
    no shared prefix or when one side is a prefix of the other (empty completion).
    """
    n = min(len(chosen), len(rejected))
    idx = next((i for i in range(n) if chosen[i] != rejected[i]), n)
    if idx == n:
        field = "chosen" if len(chosen) == n else "rejected"
        raise DataError("empty_completion", "chosen and rejected are equal up to the end of one of "
                        "them, so the completion after the shared prompt is empty", field=field)
    if isinstance(chosen, str) and idx > 0 and chosen[idx - 1] == " ":
        idx -= 1
    if idx == 0:
        raise DataError("no_prompt", "chosen and rejected share no prefix, so the implicit prompt "
                        "is empty", field="chosen")
    return chosen[:idx], chosen[idx:], rejected[idx:]


def validate_row(row: Mapping[str, Any], *, fmt: str, conversational: bool) -> dict[str, Any]:
    """Checks one row of format `fmt` and returns its format fields (normalised).

    Implicit-prompt preference rows come back in the explicit form (`prompt`, `chosen`,
    `rejected`). Raises DataError naming the field (the caller adds row and source).
    """
    if fmt not in FORMATS:
        raise ValueError(f"`fmt` must be one of {list(FORMATS)}, got {fmt!r}")
    out = {f: _check_field(row, f, conversational) for f in FORMATS[fmt]}
    if fmt == "implicit_preference":
        out["prompt"], out["chosen"], out["rejected"] = extract_prompt(out["chosen"], out["rejected"])
    return out
