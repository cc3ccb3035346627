"""Tokenizing a whole dataset into truncated examples for one kind of trainer.

`tokenize_dataset(dataset, tokenizer, kind=...)` validates every row (`formats.validate_row`),
encodes it (`encode`), truncates it (`truncate`) and returns a `TokenizedDataset` whose examples are
plain dicts of Python int lists, ready for the collators in `collate`:

| kind         | accepts formats                                  | example keys                    |
|--------------|--------------------------------------------------|---------------------------------|
| `sft`        | text, messages, prompt_completion, preference*   | input_ids, loss_mask            |
| `preference` | preference, implicit_preference                  | chosen_/rejected_ input_ids,    |
|              |                                                  | loss_mask                       |
| `unpaired`   | unpaired_preference, preference* (unpaired)      | input_ids, loss_mask, label,    |
|              |                                                  | prompt_ids, completion_ids      |
| `prompt`     | any format with a prompt                         | prompt_ids, metadata            |

(*) SFT on a preference dataset trains on `chosen`; `unpaired` on a preference dataset emits, like
`trl.unpair_preference_dataset`, every pair's chosen row (label True) and then every pair's
rejected row (label False). `loss_mask[t] = 1` iff token t is a completion token to predict (the
trainer shifts: logits[:, :-1] predict tokens[:, 1:] under loss_mask[:, 1:]). `metadata` holds the
row's other columns (e.g. `answer`). Every example also records its source `row` index.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping, Sequence

import datasets

from jaxalign.data import encode, truncate
from jaxalign.data.formats import FORMATS, detect_conversational, detect_format, validate_row
from jaxalign.data.report import DataError, DataReport, RowFilter

KINDS = ("sft", "preference", "unpaired", "prompt")
DEFAULT_KIND = {
    "text": "sft",
    "messages": "sft",
    "prompt_completion": "sft",
    "preference": "preference",
    "implicit_preference": "preference",
    "unpaired_preference": "unpaired",
    "prompt_only": "prompt",
}
ACCEPTS = {
    "sft": ("text", "messages", "prompt_completion", "preference", "implicit_preference"),
    "preference": ("preference", "implicit_preference"),
    "unpaired": ("unpaired_preference", "preference", "implicit_preference"),
    "prompt": ("prompt_only", "prompt_completion", "preference", "implicit_preference",
               "unpaired_preference"),
}


@dataclasses.dataclass(frozen=True)
class TokenizedDataset:
    """`examples` of one `kind` (see the module docstring) and the report of the step."""

    kind: str
    examples: list[dict[str, Any]]
    report: DataReport

    def __len__(self) -> int:
        return len(self.examples)


@dataclasses.dataclass(frozen=True)
class _Settings:
    max_length: int | None
    max_prompt_length: int | None
    truncation_mode: str
    add_eos: bool
    add_bos: bool | None
    default_bos: bool
    assistant_only_loss: bool


def _pair(tokenizer, prompt, completions, fields, s: _Settings):
    """Encodes, prompt-truncates and length-checks a prompt with its completions."""
    prompt_ids, completion_ids = encode.encode_prompt_completions(
        tokenizer, prompt, completions, add_bos=s.add_bos, add_eos=s.add_eos,
        default_bos=s.default_bos, fields=fields)
    prompt_ids = truncate.truncate_prompt(prompt_ids, max_prompt_length=s.max_prompt_length)
    for ids, field in zip(completion_ids, fields):
        truncate.check_room(len(prompt_ids), len(ids), max_length=s.max_length,
                            truncation_mode=s.truncation_mode, field=field)
    return prompt_ids, completion_ids


def _join(prompt_ids, completion_ids, s: _Settings):
    return truncate.join(prompt_ids, completion_ids, max_length=s.max_length,
                         truncation_mode=s.truncation_mode)


def _sft(tokenizer, fmt: str, row: Mapping[str, Any], s: _Settings) -> list[dict]:
    if fmt == "text":
        ids = encode.encode_text(tokenizer, row["text"],
                                 add_bos=s.default_bos if s.add_bos is None else s.add_bos)
        eos = tokenizer.eos_token_id
        if s.add_eos and eos is not None and ids[-1:] != [eos]:
            ids.append(eos)
        mask = [0] + [1] * (len(ids) - 1)
    elif fmt == "messages":
        ids, mask = encode.encode_messages(tokenizer, row["messages"], add_bos=s.add_bos,
                                           assistant_only_loss=s.assistant_only_loss)
    else:
        field = "completion" if "completion" in row else "chosen"
        prompt_ids, (completion_ids,) = _pair(tokenizer, row["prompt"], [row[field]], [field], s)
        ids, mask = prompt_ids + completion_ids, [0] * len(prompt_ids) + [1] * len(completion_ids)
    ids, mask = truncate.truncate_sequence(ids, mask, max_length=s.max_length,
                                           truncation_mode=s.truncation_mode)
    return [{"input_ids": ids, "loss_mask": mask}]


def _preference(tokenizer, row: Mapping[str, Any], s: _Settings) -> list[dict]:
    prompt_ids, (chosen_ids, rejected_ids) = _pair(
        tokenizer, row["prompt"], [row["chosen"], row["rejected"]], ["chosen", "rejected"], s)
    chosen, chosen_mask = _join(prompt_ids, chosen_ids, s)
    rejected, rejected_mask = _join(prompt_ids, rejected_ids, s)
    return [{"chosen_input_ids": chosen, "chosen_loss_mask": chosen_mask,
             "rejected_input_ids": rejected, "rejected_loss_mask": rejected_mask}]


def _unpaired(tokenizer, row: Mapping[str, Any], s: _Settings) -> list[dict]:
    if "label" in row:
        items = [("completion", row["completion"], row["label"])]
    else:
        items = [("chosen", row["chosen"], True), ("rejected", row["rejected"], False)]
    prompt_ids, completion_ids = _pair(tokenizer, row["prompt"], [c for _, c, _ in items],
                                       [f for f, _, _ in items], s)
    out = []
    for (_, _, label), ids in zip(items, completion_ids):
        seq, mask = _join(prompt_ids, ids, s)
        out.append({"input_ids": seq, "loss_mask": mask, "label": bool(label),
                    "prompt_ids": prompt_ids, "completion_ids": ids})
    return out


def _prompt(tokenizer, row: Mapping[str, Any], raw: Mapping[str, Any], s: _Settings) -> list[dict]:
    ids = encode.encode_prompt(tokenizer, row["prompt"], add_bos=s.add_bos,
                               default_bos=s.default_bos)
    ids = truncate.truncate_prompt(ids, max_prompt_length=s.max_prompt_length)
    if s.max_length is not None and len(ids) >= s.max_length:
        raise DataError("prompt_too_long", f"the prompt has {len(ids)} tokens, which leaves no "
                        f"room to generate under max_length={s.max_length}", field="prompt")
    metadata = {k: v for k, v in raw.items() if k != "prompt"}
    return [{"prompt_ids": ids, "metadata": metadata}]


def _columns(dataset) -> list[str]:
    if isinstance(dataset, datasets.Dataset):
        return list(dataset.column_names)
    return list(dict.fromkeys(k for row in dataset for k in row))


def tokenize_dataset(
    dataset: datasets.Dataset | Sequence[Mapping[str, Any]],
    tokenizer,
    *,
    kind: str | None = None,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    truncation_mode: str = "keep_start",
    add_eos: bool = True,
    add_bos: bool | None = None,
    assistant_only_loss: bool = True,
    on_error: str = "raise",
    source: str | None = None,
) -> TokenizedDataset:
    """Validates, tokenizes and truncates every row; see the module docstring for the outputs.

    Args:
      dataset: a `datasets.Dataset` or a list of row dicts in one of TRL's formats.
      tokenizer: a `transformers` tokenizer (with a `chat_template` for conversational rows).
      kind: "sft", "preference", "unpaired" or "prompt"; inferred from the format when None.
      max_length: cap on prompt + completion tokens (None: no cap); see `truncate`.
      max_prompt_length: cap on prompt tokens, truncated from the left (None: no cap).
      truncation_mode: "keep_start" (cut the completion's end) or "keep_end" (cut the prompt's
        start); see `truncate` for what TRL does.
      add_eos: append EOS to standard (plain-text) completions and texts that lack one.
      add_bos: None keeps the tokenizer's/template's own BOS behaviour, True/False force one/none.
      assistant_only_loss: for `messages` rows, learn only the assistant turns (else all tokens).
      on_error: "raise" or "drop" (bad rows are dropped and counted per reason, and printed).
      source: a name (e.g. the file) for error messages and the report.
    """
    truncate.check_truncation_args(max_length=max_length, max_prompt_length=max_prompt_length,
                                   truncation_mode=truncation_mode)
    fmt = detect_format(_columns(dataset), source=source)
    kind = DEFAULT_KIND[fmt] if kind is None else kind
    if kind not in KINDS:
        raise ValueError(f"`kind` must be one of {KINDS}, got {kind!r}")
    if fmt not in ACCEPTS[kind]:
        raise ValueError(f"{source or 'dataset'}: kind {kind!r} needs one of the formats "
                         f"{[(f, list(FORMATS[f])) for f in ACCEPTS[kind]]}, got {fmt!r}")
    conversational = detect_conversational(_head(dataset), fmt)
    settings = _Settings(max_length, max_prompt_length, truncation_mode, add_eos, add_bos,
                         encode.tokenizer_adds_bos(tokenizer), assistant_only_loss)
    filt = RowFilter(on_error=on_error, source=source)
    examples: list[dict] = []
    extra: list[dict] = []  # unpaired from preference: the rejected rows go after all chosen rows
    rows_in = rows_kept = 0
    for i, raw in enumerate(dataset):
        rows_in += 1
        try:
            row = validate_row(raw, fmt=fmt, conversational=conversational)
            if kind == "sft":
                out = _sft(tokenizer, fmt, row, settings)
            elif kind == "preference":
                out = _preference(tokenizer, row, settings)
            elif kind == "unpaired":
                out = _unpaired(tokenizer, row, settings)
            else:
                out = _prompt(tokenizer, row, raw, settings)
        except DataError as err:
            filt.handle(err, row=i)
            continue
        rows_kept += 1
        for ex in out:
            ex["row"] = i
        examples.append(out[0])
        extra += out[1:]
    examples += extra
    report = filt.report(rows_in=rows_in, rows_kept=rows_kept)
    return TokenizedDataset(kind=kind, examples=examples, report=report)


def _head(dataset, n: int = 64) -> Iterable[Mapping[str, Any]]:
    if isinstance(dataset, datasets.Dataset):
        return dataset.select(range(min(n, len(dataset))))
    return dataset[:n]
