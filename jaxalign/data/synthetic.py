"""A synthetic verifiable task: integer arithmetic, e.g. "23+58=" -> "81".

Difficulty is set by `digits` (operands are drawn uniformly from [0, 10**digits)) and `operators`
(a string of "+" and/or "-"; with `allow_negative=False` the larger operand of a subtraction comes
first, so answers are non-negative).

Train/held-out split: a prompt belongs to the held-out ("test") split iff
`crc32(prompt) % 100 < HELDOUT_PERCENT`, a fixed function of the prompt text. Train datasets only
draw train prompts and test datasets only test prompts, whatever their seeds, so the two never share
a prompt.

The `make_*` functions return `datasets.Dataset`s in TRL's formats (standard strings, or with
`conversational=True` a user message and an assistant message), plus an `answer` metadata column,
so they go through the same `tokenize_dataset` path as user data. Pair them with
`jaxalign.data.tokenizer.build_char_tokenizer()` and the rewards in `jaxalign.data.rewards`.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any

import datasets
import numpy as np

HELDOUT_PERCENT = 10
SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True)
class Problem:
    a: int
    op: str
    b: int

    @property
    def prompt(self) -> str:
        return f"{self.a}{self.op}{self.b}="

    @property
    def answer(self) -> str:
        return str(self.a + self.b if self.op == "+" else self.a - self.b)


def is_heldout(prompt: str) -> bool:
    """True iff `prompt` belongs to the held-out split (a fixed hash of its text)."""
    return zlib.crc32(prompt.encode("utf-8")) % 100 < HELDOUT_PERCENT


def _check_args(n: int, digits: int, operators: str, split: str) -> None:
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"`n` must be a non-negative int, got {n!r}")
    if not isinstance(digits, int) or not 1 <= digits <= 9:
        raise ValueError(f"`digits` must be an int in [1, 9], got {digits!r}")
    if not operators or set(operators) - set("+-"):
        raise ValueError(f"`operators` must be a non-empty string of '+' and '-', got "
                         f"{operators!r}")
    if split not in SPLITS:
        raise ValueError(f"`split` must be one of {SPLITS}, got {split!r}")


def sample_problems(n: int, *, seed: int, digits: int = 2, operators: str = "+-",
                    split: str = "train", allow_negative: bool = False) -> list[Problem]:
    """`n` problems of `split`, drawn (with repetition) by `np.random.default_rng(seed)`."""
    _check_args(n, digits, operators, split)
    rng = np.random.default_rng(seed)
    want_heldout = split == "test"
    problems: list[Problem] = []
    tries = 0
    while len(problems) < n:
        tries += 1
        if tries > 1000 + 200 * n:
            raise ValueError(f"could not draw {n} {split} problems with digits={digits}, "
                             f"operators={operators!r}: the split holds too few prompts")
        a, b = (int(x) for x in rng.integers(0, 10**digits, size=2))
        op = operators[int(rng.integers(len(operators)))]
        if op == "-" and not allow_negative and a < b:
            a, b = b, a
        problem = Problem(a, op, b)
        if is_heldout(problem.prompt) == want_heldout:
            problems.append(problem)
    return problems


def corrupt_answer(answer: str, rng: np.random.Generator) -> str:
    """A wrong answer that differs from `answer` in exactly one digit (no new leading zero)."""
    sign = "-" if answer.startswith("-") else ""
    digits = list(answer[len(sign):])
    pos = int(rng.integers(len(digits)))
    choices = [d for d in "0123456789" if d != digits[pos] and not (pos == 0 and d == "0"
                                                                    and len(digits) > 1)]
    digits[pos] = choices[int(rng.integers(len(choices)))]
    return sign + "".join(digits)


def no_carry_answer(problem: Problem) -> str:
    """The answer computed digit by digit with carries (or borrows) forgotten: 58+23 -> '71',
    52-38 -> '26'. Equals the correct answer iff the problem needs no carry/borrow."""
    a, b = str(problem.a), str(problem.b)
    width = max(len(a), len(b))
    a, b = a.zfill(width), b.zfill(width)
    if problem.op == "+":
        digits = [(int(x) + int(y)) % 10 for x, y in zip(a, b)]
    else:
        digits = [(int(x) - int(y)) % 10 for x, y in zip(a, b)]
    text = "".join(map(str, digits)).lstrip("0") or "0"
    return text


ERRORS = ("digit", "carry")


def wrong_answer(problem: Problem, rng: np.random.Generator, error: str) -> str:
    """A wrong answer: 'digit' changes one random digit; 'carry' forgets the carries (a
    systematic error) and falls back to 'digit' for problems that need no carry."""
    if error not in ERRORS:
        raise ValueError(f"`error` must be one of {ERRORS}, got {error!r}")
    if error == "carry":
        text = no_carry_answer(problem)
        if text != problem.answer:
            return text
    return corrupt_answer(problem.answer, rng)


def _wrap(prompt: str, completion: str | None, conversational: bool) -> tuple[Any, Any]:
    if not conversational:
        return prompt, completion
    p = [{"role": "user", "content": prompt}]
    c = None if completion is None else [{"role": "assistant", "content": completion}]
    return p, c


def _draw(n, seed, kw):
    split = kw.pop("split", "train")
    conversational = kw.pop("conversational", False)
    problems = sample_problems(n, seed=seed, split=split, **kw)
    return problems, conversational, np.random.default_rng([seed, 1])


def make_sft_dataset(n: int, *, seed: int, wrong_fraction: float = 0.0, error: str = "digit",
                     **kw: Any) -> datasets.Dataset:
    """prompt/completion demonstrations; `round(wrong_fraction * n)` of them (chosen at random)
    are wrong. error='digit': wrong in one random digit; error='carry': the wrong ones are drawn
    among problems that need a carry and forget it (a systematic error; a wrong_fraction above
    the share of carry problems saturates). Columns: prompt, completion, answer (the correct one),
    is_correct. Keywords: digits, operators, split, allow_negative, conversational."""
    if not 0.0 <= wrong_fraction <= 1.0:
        raise ValueError(f"`wrong_fraction` must be in [0, 1], got {wrong_fraction!r}")
    if error not in ERRORS:
        raise ValueError(f"`error` must be one of {ERRORS}, got {error!r}")
    problems, conv, rng = _draw(n, seed, kw)
    if error == "carry":
        pool = [i for i, pr in enumerate(problems) if no_carry_answer(pr) != pr.answer]
        order = [pool[j] for j in rng.permutation(len(pool))]
    else:
        order = rng.permutation(n).tolist()
    wrong = set(order[: round(wrong_fraction * n)])
    rows: dict[str, list] = {"prompt": [], "completion": [], "answer": [], "is_correct": []}
    for i, pr in enumerate(problems):
        text = wrong_answer(pr, rng, error) if i in wrong else pr.answer
        p, c = _wrap(pr.prompt, text, conv)
        rows["prompt"].append(p)
        rows["completion"].append(c)
        rows["answer"].append(pr.answer)
        rows["is_correct"].append(i not in wrong)
    return datasets.Dataset.from_dict(rows)


def make_preference_dataset(n: int, *, seed: int, error: str = "digit",
                            **kw: Any) -> datasets.Dataset:
    """prompt/chosen/rejected: chosen is the correct answer, rejected is wrong (see
    `wrong_answer` for `error`). Columns: prompt, chosen, rejected, answer."""
    if error not in ERRORS:
        raise ValueError(f"`error` must be one of {ERRORS}, got {error!r}")
    problems, conv, rng = _draw(n, seed, kw)
    rows: dict[str, list] = {"prompt": [], "chosen": [], "rejected": [], "answer": []}
    for pr in problems:
        p, chosen = _wrap(pr.prompt, pr.answer, conv)
        _, rejected = _wrap(pr.prompt, wrong_answer(pr, rng, error), conv)
        rows["prompt"].append(p)
        rows["chosen"].append(chosen)
        rows["rejected"].append(rejected)
        rows["answer"].append(pr.answer)
    return datasets.Dataset.from_dict(rows)


def make_kto_dataset(n: int, *, seed: int, desirable_fraction: float = 0.5,
                     **kw: Any) -> datasets.Dataset:
    """prompt/completion/label: `round(desirable_fraction * n)` rows (chosen at random) carry the
    correct answer and label True, the others a one-digit-wrong answer and label False.
    Columns: prompt, completion, label, answer."""
    if not 0.0 <= desirable_fraction <= 1.0:
        raise ValueError(f"`desirable_fraction` must be in [0, 1], got {desirable_fraction!r}")
    problems, conv, rng = _draw(n, seed, kw)
    good = set(rng.permutation(n)[: round(desirable_fraction * n)].tolist())
    rows: dict[str, list] = {"prompt": [], "completion": [], "label": [], "answer": []}
    for i, pr in enumerate(problems):
        text = pr.answer if i in good else corrupt_answer(pr.answer, rng)
        p, c = _wrap(pr.prompt, text, conv)
        rows["prompt"].append(p)
        rows["completion"].append(c)
        rows["label"].append(i in good)
        rows["answer"].append(pr.answer)
    return datasets.Dataset.from_dict(rows)


def make_prompt_dataset(n: int, *, seed: int, **kw: Any) -> datasets.Dataset:
    """Prompt-only rows for online RL. Columns: prompt, answer."""
    problems, conv, _ = _draw(n, seed, kw)
    return datasets.Dataset.from_dict({
        "prompt": [_wrap(pr.prompt, None, conv)[0] for pr in problems],
        "answer": [pr.answer for pr in problems],
    })
