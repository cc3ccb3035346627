"""Fixed-size batches in a deterministic, resumable order.

The order of epoch `e` is a permutation drawn from `np.random.default_rng([seed, e])`, so it depends
only on (seed, epoch). The position is an `IteratorState(epoch, index)`: `index` counts the
examples of that epoch's order already consumed. Every batch comes with the state *after* it; save
that state with the checkpoint and pass it back as `state=` to continue with exactly the next batch.

With `drop_last=True` (the default) every batch has exactly `batch_size` examples (one shape for a
jitted step); the incomplete tail of an epoch is skipped and the next epoch starts.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class IteratorState:
    """Position in the stream: `epoch` and the number of that epoch's examples consumed."""

    epoch: int = 0
    index: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "IteratorState":
        return cls(epoch=int(d["epoch"]), index=int(d["index"]))


def epoch_order(num_examples: int, *, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The example indices of `epoch` in order: a permutation seeded by (seed, epoch)."""
    if not shuffle:
        return np.arange(num_examples)
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def iterate_batches(
    examples: Sequence[Any],
    collate_fn: Callable[[list[Any]], Any],
    *,
    batch_size: int,
    seed: int,
    state: IteratorState = IteratorState(),
    shuffle: bool = True,
    drop_last: bool = True,
    num_epochs: int | None = None,
) -> Iterator[tuple[Any, IteratorState]]:
    """Yields `(collate_fn(batch_examples), state_after)` from `state` on.

    Stops after epoch `num_epochs - 1` (never when None). Raises ValueError when no full batch
    fits (`batch_size > len(examples)` with `drop_last`) or the state is out of range.
    """
    n = len(examples)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}")
    if n == 0 or (drop_last and batch_size > n):
        raise ValueError(f"no full batch: {n} examples, batch_size={batch_size}, "
                         f"drop_last={drop_last}")
    if state.epoch < 0 or not 0 <= state.index <= n:
        raise ValueError(f"`state` {state} out of range for {n} examples")
    epoch, index = state.epoch, state.index
    while num_epochs is None or epoch < num_epochs:
        order = epoch_order(n, seed=seed, epoch=epoch, shuffle=shuffle)
        while index < n and (index + batch_size <= n or not drop_last):
            idx = order[index: index + batch_size]
            index += len(idx)
            more = index < n and (index + batch_size <= n or not drop_last)
            nxt = IteratorState(epoch, index) if more else IteratorState(epoch + 1, 0)
            yield collate_fn([examples[int(i)] for i in idx]), nxt
        epoch, index = epoch + 1, 0
