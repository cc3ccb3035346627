"""Turning one example's text or messages into token ids (chat templates, BOS and EOS).

How a prompt/completion pair becomes ids:

- Standard rows: the prompt is tokenized without special tokens and gets one leading BOS when
  `add_bos` asks for it (`None` = whatever the tokenizer does by itself for plain text, probed once);
  the completion is tokenized without special tokens and, with `add_eos`, gets an EOS appended
  unless it already ends with one (TRL appends `eos_token` to standard completions too).
- Conversational rows are rendered to strings with the tokenizer's chat template, like
  `trl.apply_chat_template`: the prompt with `add_generation_prompt=True` (or
  `continue_final_message=True` when its last message is the assistant's), the prompt followed by
  each completion without it; the prompt string is the longest common prefix of those renders and
  each completion string is the rest of its render. Those strings are tokenized without special
  tokens: the template already renders BOS and the end-of-turn token, so `add_eos` does not apply
  (as in TRL). `add_bos=None` keeps what the template renders.
- A doubled leading BOS (template or text already holding one plus an added one) is collapsed.

Prompt and completion are tokenized separately and concatenated, which is exactly what the model
sees when it generates the completion after the prompt. (TRL tokenizes prompt+completion jointly
and starts the completion where the ids diverge; both agree whenever the tokenizer does not merge
tokens across the boundary, e.g. after a chat template's generation prompt.)
"""

from __future__ import annotations

from typing import Any, Sequence

from jaxalign.data.report import DataError

Messages = list[dict[str, Any]]


def tokenizer_adds_bos(tokenizer) -> bool:
    """True iff the tokenizer puts its BOS token first when encoding plain text."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def _common_prefix_len(a: Sequence, b: Sequence) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def fix_bos(tokenizer, ids: Sequence[int], *, add_bos: bool | None) -> list[int]:
    """BOS handling on token ids: True ensures exactly one leading BOS, False removes a leading
    BOS, None leaves it as it is; a doubled leading BOS is always collapsed to one."""
    ids = list(ids)
    bos = tokenizer.bos_token_id
    if bos is None:
        if add_bos:
            raise ValueError("add_bos=True but the tokenizer has no bos_token")
        return ids
    while len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
        ids = ids[1:]
    if add_bos is True and (not ids or ids[0] != bos):
        ids = [bos] + ids
    elif add_bos is False and ids and ids[0] == bos:
        ids = ids[1:]
    return ids


def encode_text(tokenizer, text: str, *, add_bos: bool | None = None) -> list[int]:
    """Token ids of `text` without special tokens, then `fix_bos`."""
    return fix_bos(tokenizer, tokenizer(text, add_special_tokens=False)["input_ids"],
                   add_bos=add_bos)


def _render(tokenizer, messages: Messages, **kwargs) -> str:
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("conversational rows need a tokenizer with a `chat_template`, but "
                         f"{type(tokenizer).__name__} has none")
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


def _prompt_kwargs(prompt: Messages) -> dict[str, bool]:
    if prompt[-1]["role"] == "assistant":
        return {"continue_final_message": True}
    return {"add_generation_prompt": True}


def render_prompt(tokenizer, prompt: Messages) -> str:
    """The chat-template render of a conversational prompt, ready for generation."""
    return _render(tokenizer, prompt, **_prompt_kwargs(prompt))


def render_prompt_completions(
    tokenizer, prompt: Messages, completions: Sequence[Messages]
) -> tuple[str, list[str]]:
    """Renders prompt and completions; returns (prompt string, completion strings) as in
    `trl.apply_chat_template`: each completion string continues the shared prompt string."""
    prompt_str = render_prompt(tokenizer, prompt)
    fulls = [_render(tokenizer, list(prompt) + list(c)) for c in completions]
    n = min(_common_prefix_len(prompt_str, full) for full in fulls)
    return prompt_str[:n], [full[n:] for full in fulls]


def encode_prompt(tokenizer, prompt: str | Messages, *, add_bos: bool | None,
                  default_bos: bool) -> list[int]:
    """Ids of a prompt alone (for generation). `default_bos` is `tokenizer_adds_bos(tokenizer)`."""
    if isinstance(prompt, str):
        return encode_text(tokenizer, prompt, add_bos=default_bos if add_bos is None else add_bos)
    return encode_text(tokenizer, render_prompt(tokenizer, prompt), add_bos=add_bos)


def encode_prompt_completions(
    tokenizer,
    prompt: str | Messages,
    completions: Sequence[str | Messages],
    *,
    add_bos: bool | None,
    add_eos: bool,
    default_bos: bool,
    fields: Sequence[str] = ("completion",),
) -> tuple[list[int], list[list[int]]]:
    """Ids of a prompt and of each of its completions (see the module docstring).

    `fields` names the completions in errors. Raises DataError("empty_completion") when a
    completion encodes to no token.
    """
    if isinstance(prompt, str):
        prompt_ids = encode_text(tokenizer, prompt,
                                 add_bos=default_bos if add_bos is None else add_bos)
        completion_ids = [encode_text(tokenizer, c, add_bos=False) for c in completions]
        eos = tokenizer.eos_token_id
        if add_eos:
            if eos is None:
                raise ValueError("add_eos=True but the tokenizer has no eos_token")
            completion_ids = [ids if ids[-1:] == [eos] else ids + [eos] for ids in completion_ids]
    else:
        prompt_str, completion_strs = render_prompt_completions(tokenizer, prompt, completions)
        prompt_ids = encode_text(tokenizer, prompt_str, add_bos=add_bos)
        completion_ids = [list(tokenizer(s, add_special_tokens=False)["input_ids"])
                          for s in completion_strs]
    for ids, field in zip(completion_ids, fields):
        if not ids:
            raise DataError("empty_completion", "the completion encodes to no token", field=field)
    return prompt_ids, completion_ids


def encode_messages(
    tokenizer, messages: Messages, *, add_bos: bool | None, assistant_only_loss: bool
) -> tuple[list[int], list[int]]:
    """Ids and loss mask of a whole conversation (`messages` format).

    With `assistant_only_loss`, the mask marks each assistant turn as the template renders it
    after the generation prompt (content plus end-of-turn token); otherwise every token but the
    first. The spans come from rendering the conversation up to each assistant turn.
    """
    full = _render(tokenizer, messages)
    segments: list[tuple[str, int]] = []
    pos = 0
    if assistant_only_loss:
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = pos
            if i > 0:
                before = _render(tokenizer, messages[:i], **_prompt_kwargs(messages[:i]))
                start = max(pos, _common_prefix_len(before, full))
            end = max(start, _common_prefix_len(_render(tokenizer, messages[: i + 1]), full))
            segments += [(full[pos:start], 0), (full[start:end], 1)]
            pos = end
    segments.append((full[pos:], 0 if assistant_only_loss else 1))
    ids: list[int] = []
    mask: list[int] = []
    for text, m in segments:
        if text:
            seg = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += seg
            mask += [m] * len(seg)
    fixed = fix_bos(tokenizer, ids, add_bos=add_bos)
    if len(fixed) > len(ids):
        mask = [0] + mask
    elif len(fixed) < len(ids):
        mask = mask[len(ids) - len(fixed):]
    if mask:
        mask[0] = 0  # nothing precedes the first token, so it is never predicted
    if assistant_only_loss and not any(mask):
        raise DataError("no_completion_tokens", "the conversation has no assistant turn to learn",
                        field="messages")
    return fixed, mask
