"""Padding tokenized examples into numpy batches, with bucketed lengths to bound recompilation.

Training batches are right-padded; prompt batches for generation are left-padded, so that every
prompt ends at the same column and generation appends after it. Tokens are int32, masks and labels
bool. The padded length is the longest sequence in the batch rounded up to the next multiple of
`pad_to_multiple_of`, or to the next of the sorted `buckets` (at most one of the two), so a jitted
step sees a handful of shapes instead of one per batch.

Outputs (B = batch size, T = padded length):
- `collate_sft`: tokens, attention_mask, loss_mask                                   [B, T]
  and loss_index [B, K] (below)
- `collate_preference`: chosen_tokens, chosen_attention_mask, chosen_loss_mask,
  rejected_tokens, rejected_attention_mask, rejected_loss_mask, all with one common T, and
  chosen_loss_index, rejected_loss_index with one common K.

`loss_index` [B, K] int32 lists, per row, the positions t >= 1 with loss_mask[t] (the tokens a
loss predicts), ascending, then 0 in unused slots; K is the largest count in the batch padded by
the same rule as T. The objectives then run the final norm and LM head on those K positions
instead of all T (prompt tokens need no logits). It is left out when K would not be below T - 1
(nothing to save); the objectives fall back to all positions then.
- `collate_unpaired` (KTO): tokens, attention_mask, loss_mask [B, T], label [B], and the mismatched
  pairs TRL uses for the KL estimate: row i's prompt with row (i - 1) mod B's completion (TRL's
  `[completion[-1]] + completion[:-1]` rotation), truncated like the main sequences, as
  kl_tokens, kl_attention_mask, kl_loss_mask [B, T_kl].
- `collate_prompts`: prompt_tokens, prompt_attention_mask [B, T] (left-padded), and each metadata
  column as a Python list of length B.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import numpy as np

from jaxalign.data import truncate


def padded_length(
    n: int, *, pad_to_multiple_of: int | None = None, buckets: Sequence[int] | None = None
) -> int:
    """Length to pad a batch whose longest sequence has `n` tokens to."""
    if pad_to_multiple_of is not None and buckets is not None:
        raise ValueError("give at most one of `pad_to_multiple_of` and `buckets`")
    if pad_to_multiple_of is not None:
        if not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1:
            raise ValueError(f"`pad_to_multiple_of` must be a positive int, got "
                             f"{pad_to_multiple_of!r}")
        return -(-n // pad_to_multiple_of) * pad_to_multiple_of
    if buckets is not None:
        sizes = sorted(buckets)
        if not sizes or sizes[0] < 1:
            raise ValueError(f"`buckets` must be a non-empty list of positive ints, got {buckets!r}")
        for size in sizes:
            if size >= n:
                return size
        raise ValueError(f"a sequence of {n} tokens exceeds the largest bucket {sizes[-1]} "
                         f"(buckets={list(buckets)}); add a larger bucket or lower max_length")
    return n


def pad(seqs: Sequence[Sequence[int]], length: int, *, value: int, side: str = "right",
        dtype=np.int32) -> np.ndarray:
    """Stacks sequences into a [len(seqs), length] array, padding with `value` on `side`."""
    out = np.full((len(seqs), length), value, dtype=dtype)
    for i, s in enumerate(seqs):
        if len(s) > length:
            raise ValueError(f"sequence {i} has {len(s)} tokens, more than the padded length "
                             f"{length}")
        if len(s):
            if side == "right":
                out[i, : len(s)] = s
            else:
                out[i, length - len(s):] = s
    return out


def _check(examples: Sequence[Any], pad_id: int) -> None:
    if not examples:
        raise ValueError("cannot collate an empty list of examples")
    if not isinstance(pad_id, (int, np.integer)):
        raise ValueError(f"`pad_id` must be an int (tokenizer.pad_token_id, or eos_token_id when "
                         f"the tokenizer has no pad token), got {pad_id!r}")


def _stack(seqs, masks, length, pad_id, prefix=""):
    return {
        f"{prefix}tokens": pad(seqs, length, value=pad_id),
        f"{prefix}attention_mask": pad([[1] * len(s) for s in seqs], length, value=0, dtype=bool),
        f"{prefix}loss_mask": pad(masks, length, value=0, dtype=bool),
    }


def loss_index(*loss_masks: np.ndarray, pad_to_multiple_of: int | None = None,
               buckets: Sequence[int] | None = None) -> list[np.ndarray] | None:
    """One loss index [B, K] per loss_mask [B, T] (module doc), all with a common K; None when
    K would not be below T - 1."""
    t = loss_masks[0].shape[1]
    hits = [np.asarray(m, bool).copy() for m in loss_masks]
    for h in hits:
        h[:, 0] = False  # token 0 has no previous position to predict it
    n = max(int(h.sum(1).max(initial=0)) for h in hits)
    k = padded_length(max(n, 1), pad_to_multiple_of=pad_to_multiple_of, buckets=buckets)
    if k >= t - 1:
        return None
    out = []
    for h in hits:
        idx = np.zeros((h.shape[0], k), np.int32)
        for i, row in enumerate(h):
            pos = np.flatnonzero(row)
            idx[i, :len(pos)] = pos
        out.append(idx)
    return out


def add_loss_index(batch: dict, prefixes: Sequence[str] = ("",), *,
                   pad_to_multiple_of: int | None = None,
                   buckets: Sequence[int] | None = None) -> dict:
    """Adds `{prefix}loss_index` for each prefix's `{prefix}loss_mask` to `batch` (in place, one
    common K; nothing when `loss_index` returns None); returns the batch."""
    idx = loss_index(*(batch[f"{p}loss_mask"] for p in prefixes),
                     pad_to_multiple_of=pad_to_multiple_of, buckets=buckets)
    if idx is not None:
        batch.update({f"{p}loss_index": i for p, i in zip(prefixes, idx)})
    return batch


def collate_sft(examples, *, pad_id: int, pad_to_multiple_of: int | None = None,
                buckets: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """Right-pads `input_ids`/`loss_mask` examples into tokens, attention_mask, loss_mask [B, T]."""
    _check(examples, pad_id)
    seqs = [ex["input_ids"] for ex in examples]
    length = padded_length(max(map(len, seqs)), pad_to_multiple_of=pad_to_multiple_of,
                           buckets=buckets)
    out = _stack(seqs, [ex["loss_mask"] for ex in examples], length, pad_id)
    return add_loss_index(out, pad_to_multiple_of=pad_to_multiple_of, buckets=buckets)


def collate_preference(examples, *, pad_id: int, pad_to_multiple_of: int | None = None,
                       buckets: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """Right-pads chosen and rejected sequences to one common length T."""
    _check(examples, pad_id)
    chosen = [ex["chosen_input_ids"] for ex in examples]
    rejected = [ex["rejected_input_ids"] for ex in examples]
    length = padded_length(max(map(len, chosen + rejected)), pad_to_multiple_of=pad_to_multiple_of,
                           buckets=buckets)
    out = {
        **_stack(chosen, [ex["chosen_loss_mask"] for ex in examples], length, pad_id, "chosen_"),
        **_stack(rejected, [ex["rejected_loss_mask"] for ex in examples], length, pad_id,
                 "rejected_"),
    }
    return add_loss_index(out, ("chosen_", "rejected_"), pad_to_multiple_of=pad_to_multiple_of,
                          buckets=buckets)


def collate_unpaired(examples, *, pad_id: int, max_length: int | None = None,
                     truncation_mode: str = "keep_start", pad_to_multiple_of: int | None = None,
                     buckets: Sequence[int] | None = None,
                     kl_pairs: bool = True) -> dict[str, np.ndarray]:
    """KTO batches: the examples' sequences plus (with `kl_pairs`) the mismatched KL sequences.

    `max_length`/`truncation_mode` must be the ones used at tokenization; they truncate the KL
    sequences. KL pairs need a batch of at least 2.
    """
    _check(examples, pad_id)
    seqs = [ex["input_ids"] for ex in examples]
    length = padded_length(max(map(len, seqs)), pad_to_multiple_of=pad_to_multiple_of,
                           buckets=buckets)
    out = _stack(seqs, [ex["loss_mask"] for ex in examples], length, pad_id)
    out["label"] = np.array([bool(ex["label"]) for ex in examples], dtype=bool)
    if kl_pairs:
        if len(examples) < 2:
            raise ValueError("KTO's KL pairs need a batch of at least 2 examples, got 1")
        kl = [
            truncate.join(ex["prompt_ids"], examples[i - 1]["completion_ids"],
                          max_length=max_length, truncation_mode=truncation_mode)
            for i, ex in enumerate(examples)
        ]
        kl_len = padded_length(max(len(s) for s, _ in kl), pad_to_multiple_of=pad_to_multiple_of,
                               buckets=buckets)
        out.update(_stack([s for s, _ in kl], [m for _, m in kl], kl_len, pad_id, "kl_"))
    return out


def collate_prompts(examples, *, pad_id: int, pad_to_multiple_of: int | None = None,
                    buckets: Sequence[int] | None = None) -> dict[str, Any]:
    """Left-pads prompts for generation; metadata columns come back as lists."""
    _check(examples, pad_id)
    seqs = [ex["prompt_ids"] for ex in examples]
    length = padded_length(max(map(len, seqs)), pad_to_multiple_of=pad_to_multiple_of,
                           buckets=buckets)
    out: dict[str, Any] = {
        "prompt_tokens": pad(seqs, length, value=pad_id, side="left"),
        "prompt_attention_mask": pad([[1] * len(s) for s in seqs], length, value=0, side="left",
                                     dtype=bool),
    }
    keys = dict.fromkeys(k for ex in examples for k in ex.get("metadata", {}))
    for k in keys:
        if k in out:
            raise ValueError(f"metadata column {k!r} clashes with a batch key")
        out[k] = [ex.get("metadata", {}).get(k) for ex in examples]
    return out


COLLATORS: dict[str, Callable[..., dict]] = {
    "sft": collate_sft,
    "preference": collate_preference,
    "unpaired": collate_unpaired,
    "prompt": collate_prompts,
}


def make_collate_fn(kind: str, *, pad_id: int, pad_to_multiple_of: int | None = None,
                    buckets: Sequence[int] | None = None, max_length: int | None = None,
                    truncation_mode: str = "keep_start",
                    share_prefix: bool = False) -> Callable[[Sequence[dict]], dict]:
    """The collator for a `TokenizedDataset.kind`, with its settings bound.

    share_prefix (preference only): pack each pair after one copy of its common prefix
    (`jaxalign.data.prefix_sharing`), so the prompt is computed once per pair."""
    if kind not in COLLATORS:
        raise ValueError(f"`kind` must be one of {list(COLLATORS)}, got {kind!r}")
    padded_length(1, pad_to_multiple_of=pad_to_multiple_of, buckets=buckets)  # validates them
    kwargs: dict[str, Any] = dict(pad_id=pad_id, pad_to_multiple_of=pad_to_multiple_of,
                                  buckets=buckets)
    if kind == "unpaired":
        kwargs.update(max_length=max_length, truncation_mode=truncation_mode)
    collate = functools.partial(COLLATORS[kind], **kwargs)
    if not share_prefix:
        return collate
    if kind != "preference":
        raise ValueError(f"share_prefix packs chosen/rejected pairs: it needs kind='preference', "
                         f"got {kind!r}")
    from jaxalign.data.prefix_sharing import sharing_prefix

    return sharing_prefix(collate, **kwargs)
