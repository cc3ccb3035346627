"""Reward sources for online training: Python reward functions, a trained reward model, and a
weighted combination of several.

A reward source is a `RewardSource(name, fn, weight)`. Its `fn` is called like a TRL reward
function, with keyword arguments only:

    fn(prompts=[str] * N, completions=[str] * N, tokens=int [N, L], attention_mask=bool [N, L],
       **columns)  ->  array-like [N]

`completions` are the decoded completions with special tokens kept (so an emitted EOS shows as its
text, e.g. "81<eos>"); `tokens`/`attention_mask` are the prompt + completion token rows (prompt
left-padded, completion right-padded); `columns` are the prompt dataset's other columns (e.g.
`answer`), one list entry per row. A function takes what it needs and ignores the rest with
`**kwargs`. Only these functions run in Python; the reward model's forward pass is jitted.

`score_with(sources, ...)` evaluates every source and returns the weighted sum [N] and each
source's raw rewards (logged as `rewards/<name>/mean`, as TRL does).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import numpy as np

from jaxalign.data.rewards import exact_match_reward, format_reward


@dataclasses.dataclass(frozen=True)
class RewardSource:
    """One reward signal: `fn` (see the module docstring) scaled by `weight` in the total."""

    name: str
    fn: Callable[..., Any]
    weight: float = 1.0

    def __post_init__(self):
        if not self.name or "/" in self.name:
            raise ValueError(f"RewardSource `name` must be a non-empty string without '/', got "
                             f"{self.name!r}")
        if not callable(self.fn):
            raise ValueError(f"RewardSource {self.name!r}: `fn` must be callable, got {self.fn!r}")
        if not np.isfinite(self.weight):
            raise ValueError(f"RewardSource {self.name!r}: `weight` must be finite, got {self.weight!r}")


def exact_match_source(*, eos: str = "<eos>", weight: float = 1.0,
                       answer_column: str = "answer") -> RewardSource:
    """1.0 where the completion (up to EOS) equals the row's `answer_column`, else 0.0."""

    def fn(*, completions, **columns):
        if answer_column not in columns:
            raise ValueError(f"reward 'exact_match' needs a prompt column {answer_column!r}; the "
                             f"prompt dataset has {sorted(k for k in columns if k not in ('prompts', 'tokens', 'attention_mask'))}")
        return exact_match_reward(completions, columns[answer_column], eos=eos)

    return RewardSource("exact_match", fn, weight)


def format_source(*, eos: str = "<eos>", require_eos: bool = True,
                  weight: float = 1.0) -> RewardSource:
    """1.0 where the completion is a bare integer (followed by EOS with `require_eos`), else 0.0."""

    def fn(*, completions, **_):
        return format_reward(completions, eos=eos, require_eos=require_eos)

    return RewardSource("format", fn, weight)


def python_source(name: str, fn: Callable[..., Any], *, weight: float = 1.0) -> RewardSource:
    """Wraps any TRL-style reward function `fn(prompts, completions, **kwargs) -> [N]`."""
    return RewardSource(name, fn, weight)


def _check_rewards(name: str, value, n: int) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float32)
    if arr.shape != (n,):
        raise ValueError(f"reward source {name!r} returned shape {arr.shape}, expected ({n},) "
                         f"(one reward per completion)")
    if not np.all(np.isfinite(arr)):
        bad = np.flatnonzero(~np.isfinite(arr))[:5].tolist()
        raise ValueError(f"reward source {name!r} returned non-finite rewards at rows {bad}")
    return arr


def score_with(sources: Sequence[RewardSource], *, prompts: Sequence[str],
               completions: Sequence[str], tokens, attention_mask,
               columns: dict[str, list] | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Evaluates every source; returns (sum_k weight_k * r_k [N] float32, {name: r_k [N]})."""
    if not sources:
        raise ValueError("`sources` is empty: give at least one reward source")
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"reward source names must be distinct, got {names}")
    n = len(completions)
    if len(prompts) != n:
        raise ValueError(f"`prompts` has {len(prompts)} items but `completions` has {n}")
    columns = dict(columns or {})
    for k, v in columns.items():
        if len(v) != n:
            raise ValueError(f"column {k!r} has {len(v)} items, expected {n} (one per completion)")
    parts = {}
    total = np.zeros(n, np.float32)
    for s in sources:
        r = _check_rewards(s.name, s.fn(prompts=list(prompts), completions=list(completions),
                                        tokens=tokens, attention_mask=attention_mask, **columns), n)
        parts[s.name] = r
        total += np.float32(s.weight) * r
    return total, parts


def reward_metrics(total: np.ndarray, parts: dict[str, np.ndarray]) -> dict[str, float]:
    """TRL's per-source logging: `rewards/<name>/mean`, `rewards/<name>/std` (unbiased)."""
    out = {}
    for name, r in parts.items():
        out[f"rewards/{name}/mean"] = float(np.mean(r))
        out[f"rewards/{name}/std"] = float(np.std(r, ddof=1)) if r.size > 1 else 0.0
    return out


def sources_from_weights(weights: dict[str, float], *, eos: str,
                         reward_model: Any = None, reward_model_weight: float = 0.0
                         ) -> list[RewardSource]:
    """The built-in sources by name with their weights ({'exact_match': 1.0, 'format': 0.1});
    zero weights are skipped; `reward_model` (a `RewardModel`) is added with its weight."""
    builders = {"exact_match": lambda w: exact_match_source(eos=eos, weight=w),
                "format": lambda w: format_source(eos=eos, weight=w)}
    out = []
    for name, w in weights.items():
        if name not in builders:
            raise ValueError(f"unknown reward {name!r}; built-in rewards are {sorted(builders)} "
                             f"(plus the reward model)")
        if w:
            out.append(builders[name](float(w)))
    if reward_model is not None and reward_model_weight:
        from jaxalign.rl.reward_model import reward_model_source

        out.append(reward_model_source(reward_model, weight=float(reward_model_weight)))
    if not out:
        raise ValueError(f"every reward weight is zero ({weights}, reward model "
                         f"{reward_model_weight}): nothing to optimise")
    return out
