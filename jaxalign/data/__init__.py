"""Data layer: TRL-format datasets -> validated, tokenized, truncated, bucketed numpy batches.

Typical use:

    ds, _ = load_dataset("prefs.jsonl")                     # or synthetic.make_preference_dataset
    tok_ds = tokenize_dataset(ds, tokenizer, max_length=512, on_error="drop")
    collate = make_collate_fn(tok_ds.kind, pad_id=tokenizer.pad_token_id, pad_to_multiple_of=64)
    for batch, state in iterate_batches(tok_ds.examples, collate, batch_size=8, seed=0,
                                        state=saved_state):
        ...  # batch["chosen_tokens"]: int32 [B, T]; save `state` with the checkpoint

`make_collate_fn("preference", ..., share_prefix=True)` packs each pair after one copy of its
prompt (`prefix_sharing.py`): the preference objectives compute the same log-probs with fewer
token positions.
"""

from jaxalign.data.batching import IteratorState, epoch_order, iterate_batches
from jaxalign.data.collate import (
    collate_preference,
    collate_prompts,
    collate_sft,
    collate_unpaired,
    make_collate_fn,
    padded_length,
)
from jaxalign.data.formats import FORMATS, detect_format, extract_prompt, validate_row
from jaxalign.data.load import load_dataset
from jaxalign.data.prefix_sharing import share_prefix
from jaxalign.data.report import DataError, DataReport
from jaxalign.data.rewards import exact_match_reward, format_reward
from jaxalign.data.synthetic import (
    is_heldout,
    make_kto_dataset,
    make_preference_dataset,
    make_prompt_dataset,
    make_sft_dataset,
)
from jaxalign.data.tokenize import TokenizedDataset, tokenize_dataset
from jaxalign.data.tokenizer import build_char_tokenizer
from jaxalign.data.truncate import TRUNCATION_MODES

__all__ = [
    "DataError", "DataReport", "FORMATS", "IteratorState", "TRUNCATION_MODES", "TokenizedDataset",
    "build_char_tokenizer", "collate_preference", "collate_prompts", "collate_sft",
    "collate_unpaired", "detect_format", "epoch_order", "exact_match_reward", "extract_prompt",
    "format_reward", "is_heldout", "iterate_batches", "load_dataset", "make_collate_fn",
    "make_kto_dataset", "make_preference_dataset", "make_prompt_dataset", "make_sft_dataset",
    "padded_length", "share_prefix", "tokenize_dataset", "validate_row",
]
