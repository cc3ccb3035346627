"""Verifiable rewards for the synthetic arithmetic task.

A completion is a decoded string (or a conversational completion: a list of messages, whose
assistant contents are joined). Only the text before the first EOS counts, stripped of surrounding
whitespace; decoding with or without `skip_special_tokens` therefore gives the same rewards (except
for `format_reward(require_eos=True)`, which needs the EOS text).
Rewards are float32 arrays of shape [N].
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import numpy as np

_INTEGER = re.compile(r"-?[0-9]+")


def _text(completion: Any, *, field: str, index: int) -> str:
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and all(isinstance(m, dict) for m in completion):
        return "".join(str(m.get("content") or "") for m in completion
                       if m.get("role", "assistant") == "assistant")
    raise ValueError(f"`{field}[{index}]` must be a str or a list of messages, got "
                     f"{type(completion).__name__}")


def parse_completion(completion: Any, *, eos: str = "<eos>") -> tuple[str, bool]:
    """Returns (text before the first `eos`, stripped; whether an `eos` was present)."""
    text = _text(completion, field="completions", index=0)
    head, found, _ = text.partition(eos)
    return head.strip(), bool(found)


def exact_match_reward(completions: Sequence[Any], answers: Sequence[Any], *,
                       eos: str = "<eos>") -> np.ndarray:
    """1.0 where the completion (up to EOS) equals the answer's text, else 0.0; shape [N]."""
    if len(completions) != len(answers):
        raise ValueError(f"`completions` has {len(completions)} items but `answers` has "
                         f"{len(answers)}")
    out = np.zeros(len(completions), dtype=np.float32)
    for i, (c, a) in enumerate(zip(completions, answers)):
        head = _text(c, field="completions", index=i).partition(eos)[0].strip()
        out[i] = float(head == str(a).strip())
    return out


def format_reward(completions: Sequence[Any], *, eos: str = "<eos>",
                  require_eos: bool = False) -> np.ndarray:
    """1.0 where the completion (up to EOS) is a bare integer (`-?[0-9]+`) — and, with
    `require_eos`, an EOS follows it — else 0.0; shape [N]."""
    out = np.zeros(len(completions), dtype=np.float32)
    for i, c in enumerate(completions):
        head, found, _ = _text(c, field="completions", index=i).partition(eos)
        ok = _INTEGER.fullmatch(head.strip()) is not None and (bool(found) or not require_eos)
        out[i] = float(ok)
    return out
