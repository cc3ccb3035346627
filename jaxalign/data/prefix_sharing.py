"""Prefix sharing for preference batches: one copy of the prompt per pair instead of two.

A chosen and a rejected sequence start with the same prompt, and a causal model computes the same
hidden states for those tokens in both. `share_prefix(batch)` packs each pair into one row

    [ common prefix | chosen continuation | rejected continuation | padding ]

with segment ids 0 / 1 / 2 (3 on padding), back to back. The model (`segment_ids=`,
`jaxalign.models.layers.prepare_inputs`) lets a token attend to the real tokens of the prefix and
of its own continuation only, and gives it the position it has in its own unpacked sequence, so
every log-prob is the one the unpacked pair gives (up to float summation order) while the prefix
is computed once: with a prompt as long as each completion, a quarter fewer token positions per
step.

The prefix is the longest common prefix of the two token sequences (it may run into the
completions when they start alike; those shared loss tokens count for both sides). Each loss token
t of a side is scored by the logits at the slot of its predecessor t - 1 in the packed row; the
packed batch names them explicitly:

  packed_tokens int32, packed_attention_mask bool, packed_segment_ids int32      [B, S]
  {chosen,rejected}_logits_at int32, _labels int32, _label_mask bool             [B, K]

S (the longest packed row) and K (the most loss tokens of a side) are padded by the collator's
rule (`pad_to_multiple_of` / `buckets`), so a run sees as few shapes as with unpacked batches.
Unused slots have logits_at 0, label 0, mask False. Other keys (ref_chosen_logps, ...) are passed
through. The preference objective (`jaxalign.train.objectives`) uses the packed keys when
present (`is_packed`); `reference='precomputed'` values
computed on unpacked batches stay valid. One difference from the unpacked batch: with LoRA
dropout, the prefix tokens draw one dropout mask for both sides instead of one each.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from jaxalign.data.collate import padded_length

SIDES = ("chosen", "rejected")
UNPACKED_KEYS = tuple(f"{s}_{k}" for s in SIDES
                      for k in ("tokens", "attention_mask", "loss_mask", "loss_index"))


def _rows(batch: dict, side: str):
    """(tokens, loss_mask) per row, real tokens only (right padding is checked)."""
    tokens = np.asarray(batch[f"{side}_tokens"])
    am = np.asarray(batch[f"{side}_attention_mask"]).astype(bool)
    lm = np.asarray(batch[f"{side}_loss_mask"]).astype(bool)
    if not (tokens.shape == am.shape == lm.shape) or tokens.ndim != 2:
        raise ValueError(f"share_prefix: {side}_tokens / _attention_mask / _loss_mask must be [B, T] "
                         f"of one shape, got {tokens.shape}, {am.shape}, {lm.shape}")
    out = []
    for i in range(tokens.shape[0]):
        n = int(am[i].sum())
        if not am[i, :n].all():
            raise ValueError(f"share_prefix: row {i} of {side}_attention_mask is not right-padded "
                             "(real tokens first, then padding), as the preference collator makes it")
        if lm[i, n:].any():
            raise ValueError(f"share_prefix: row {i} of {side}_loss_mask marks padding positions")
        out.append((tokens[i, :n], lm[i, :n]))
    return out


def common_prefix_length(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two 1-D token arrays."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


def share_prefix(batch: dict, *, pad_id: int = 0, pad_to_multiple_of: int | None = None,
                 buckets: Sequence[int] | None = None) -> dict:
    """A right-padded preference batch (`collate_preference`) -> the packed batch (module doc).

    pad_id fills unused token slots. Raises ValueError naming the row and field when the batch
    is not a right-padded preference batch.
    """
    missing = [f"{s}_{k}" for s in SIDES for k in ("tokens", "attention_mask", "loss_mask")
               if f"{s}_{k}" not in batch]
    if missing:
        raise ValueError(f"share_prefix: the batch lacks {missing} (a preference batch from "
                         "collate_preference is expected)")
    chosen, rejected = _rows(batch, "chosen"), _rows(batch, "rejected")
    if len(chosen) != len(rejected):
        raise ValueError(f"share_prefix: {len(chosen)} chosen rows but {len(rejected)} rejected rows")
    pads = dict(pad_to_multiple_of=pad_to_multiple_of, buckets=buckets)
    shared = [common_prefix_length(c, r) for (c, _), (r, _) in zip(chosen, rejected)]
    # each row: its prefix, its chosen continuation, its rejected continuation, back to back;
    # one padded length S for the batch, by the collator's rule (as T for unpacked batches)
    lengths = [len(c) + len(r) - n for n, (c, _), (r, _) in zip(shared, chosen, rejected)]
    width = padded_length(max(max(lengths), 1), **pads)
    b = len(chosen)
    tokens = np.full((b, width), pad_id, np.int32)
    valid = np.zeros((b, width), bool)
    segments = np.zeros((b, width), np.int32)
    picks = {s: [] for s in SIDES}  # per side and row: (source slots, labels)
    for i, (n, (ct, cl), (rt, rl)) in enumerate(zip(shared, chosen, rejected)):
        tokens[i, :n], valid[i, :n] = ct[:n], True
        start = n
        for s, (tok, lm), seg in (("chosen", (ct, cl), 1), ("rejected", (rt, rl), 2)):
            rest = len(tok) - n
            tokens[i, start:start + rest], valid[i, start:start + rest] = tok[n:], True
            segments[i, start:start + rest] = seg
            slot = np.concatenate([np.arange(n), start + np.arange(rest)])  # slot of each token
            start += rest
            t = np.flatnonzero(lm[1:]) + 1  # loss tokens with a predecessor
            if lm[0]:
                raise ValueError(f"share_prefix: row {i} of {s}_loss_mask marks the first token, "
                                 "which no position predicts")
            picks[s].append((slot[t - 1], tok[t]))
        segments[i, start:] = 3  # padding: a segment of its own (masked out as keys anyway)
    k = padded_length(max(max(len(src) for src, _ in v) for v in picks.values()) or 1, **pads)
    out = {k_: v for k_, v in batch.items() if k_ not in UNPACKED_KEYS}
    out.update(packed_tokens=tokens, packed_attention_mask=valid, packed_segment_ids=segments)
    for s, rows in picks.items():
        at, labels, mask = (np.zeros((b, k), np.int32), np.zeros((b, k), np.int32),
                            np.zeros((b, k), bool))
        for i, (src, lab) in enumerate(rows):
            at[i, :len(src)], labels[i, :len(src)], mask[i, :len(src)] = src, lab, True
        out.update({f"{s}_logits_at": at, f"{s}_labels": labels, f"{s}_label_mask": mask})
    return out


def sharing_prefix(collate, *, pad_id: int, pad_to_multiple_of: int | None = None,
                   buckets: Sequence[int] | None = None):
    """collate(examples) -> batch, made to return the packed batch (same padding rule)."""

    def packed(examples):
        return share_prefix(collate(examples), pad_id=pad_id,
                            pad_to_multiple_of=pad_to_multiple_of, buckets=buckets)

    return packed


def is_packed(batch) -> bool:
    """Whether a preference batch is in the packed (shared-prefix) layout."""
    return "packed_tokens" in batch
