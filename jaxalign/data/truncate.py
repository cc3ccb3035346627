"""Truncation of tokenized examples to `max_prompt_length` / `max_length`.

Policy (keyword `truncation_mode`):

- `max_prompt_length`: a longer prompt always loses tokens from the left (its end, which holds the
  generation prompt, is kept). This is what TRL's DPO/KTO did with `max_prompt_length`
  (`prompt_ids[-max_prompt_length:]`) and what its online trainers do with prompts.
- `max_length` on prompt + completion:
  - `"keep_start"` (TRL's default) keeps the first `max_length` tokens, i.e. truncates the completion
    from the right. A prompt of `max_length` tokens or more would leave no completion token; TRL
    drops such rows silently (`len(prompt_ids) < max_length` filter), we raise or drop-and-count
    them as `prompt_too_long`.
  - `"keep_end"` keeps the last `max_length` tokens, i.e. truncates the prompt from the left (TRL
    slices `ids[-max_length:]`, deprecated in its DPO). When the completion alone has `max_length`
    tokens or more TRL would also cut the completion's start and lose the whole prompt; we raise or
    drop-and-count such rows as `completion_too_long`.

So every kept sequence has at least one prompt token before at least one completion token.
"""

from __future__ import annotations

from typing import Sequence

from jaxalign.data.report import DataError

TRUNCATION_MODES = ("keep_start", "keep_end")


def check_truncation_args(
    *, max_length: int | None, max_prompt_length: int | None, truncation_mode: str
) -> None:
    if truncation_mode not in TRUNCATION_MODES:
        raise ValueError(f"`truncation_mode` must be one of {TRUNCATION_MODES}, got "
                         f"{truncation_mode!r}")
    for name, value in (("max_length", max_length), ("max_prompt_length", max_prompt_length)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"`{name}` must be a positive int or None, got {value!r}")
    if max_length is not None and max_prompt_length is not None and max_prompt_length >= max_length:
        raise ValueError(f"`max_prompt_length` ({max_prompt_length}) must be smaller than "
                         f"`max_length` ({max_length}) to leave room for a completion")


def truncate_prompt(prompt_ids: Sequence[int], *, max_prompt_length: int | None) -> list[int]:
    """Keeps the last `max_prompt_length` prompt tokens (all of them when None)."""
    prompt_ids = list(prompt_ids)
    if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
        return prompt_ids[-max_prompt_length:]
    return prompt_ids


def check_room(
    prompt_len: int, completion_len: int, *, max_length: int | None, truncation_mode: str,
    field: str = "completion",
) -> None:
    """Raises DataError when truncating to `max_length` would leave no prompt/completion token."""
    if max_length is None:
        return
    if truncation_mode == "keep_start" and prompt_len >= max_length:
        raise DataError("prompt_too_long", f"the prompt has {prompt_len} tokens, which leaves no "
                        f"room for a completion token under max_length={max_length} (keep_start)",
                        field="prompt")
    if truncation_mode == "keep_end" and completion_len >= max_length:
        raise DataError("completion_too_long", f"the completion has {completion_len} tokens, which "
                        f"leaves no room for a prompt token under max_length={max_length} "
                        "(keep_end)", field=field)


def truncate_sequence(
    ids: Sequence[int], loss_mask: Sequence[int], *, max_length: int | None, truncation_mode: str
) -> tuple[list[int], list[int]]:
    """Truncates a token sequence and its loss mask to `max_length` (keep_start: [:L], keep_end:
    [-L:]); raises DataError("no_completion_tokens") if no predicted token (position >= 1) is left.
    """
    ids, loss_mask = list(ids), list(loss_mask)
    if len(ids) != len(loss_mask):
        raise ValueError(f"ids and loss_mask lengths differ: {len(ids)} vs {len(loss_mask)}")
    if max_length is not None and len(ids) > max_length:
        sl = slice(None, max_length) if truncation_mode == "keep_start" else slice(-max_length, None)
        ids, loss_mask = ids[sl], loss_mask[sl]
    if not any(loss_mask[1:]):
        raise DataError("no_completion_tokens", "no completion token is left to predict (after "
                        f"truncation to max_length={max_length}, {truncation_mode})")
    return ids, loss_mask


def join(prompt_ids: Sequence[int], completion_ids: Sequence[int], *, max_length: int | None,
         truncation_mode: str) -> tuple[list[int], list[int]]:
    """Concatenates prompt and completion into (ids, loss_mask) and truncates them."""
    ids = list(prompt_ids) + list(completion_ids)
    mask = [0] * len(prompt_ids) + [1] * len(completion_ids)
    return truncate_sequence(ids, mask, max_length=max_length, truncation_mode=truncation_mode)
