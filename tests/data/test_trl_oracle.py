"""Tokenization, truncation, masks and KL pairs compared with TRL's own preprocessing + collators.

TRL's trainers preprocess in `_prepare_dataset`, which only reads a few attributes of the trainer;
we call it unbound on a stand-in object, so no model is built.
"""

import types

import datasets
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import trl
from trl import DPOConfig, KTOConfig, SFTConfig
from trl.trainer.dpo_trainer import DataCollatorForPreference, DPOTrainer
from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference, KTOTrainer
from trl.trainer.sft_trainer import SFTTrainer

from jaxalign.data import (
    collate_preference,
    collate_unpaired,
    extract_prompt,
    make_kto_dataset,
    make_preference_dataset,
    make_sft_dataset,
    tokenize_dataset,
)

datasets.disable_progress_bars()
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
CPU = dict(output_dir="/tmp/jaxalign_trl_oracle", report_to=[], bf16=False, use_cpu=True)


def conv(role, text):
    return [{"role": role, "content": text}]


def preference_rows(conversational):
    """Synthetic rows plus hand-made ones with longer prompts/completions and a system turn."""
    rows = make_preference_dataset(6, seed=3, digits=3, conversational=conversational).to_list()
    extra = [("what is 2+2? be brief.", "4", "it is five"), ("1+1=", "2 and more text", "3")]
    for p, c, r in extra:
        if conversational:
            rows.append({"prompt": conv("system", "math") + conv("user", p),
                         "chosen": conv("assistant", c), "rejected": conv("assistant", r)})
        else:
            rows.append({"prompt": p, "chosen": c, "rejected": r})
    return [{k: row[k] for k in ("prompt", "chosen", "rejected")} for row in rows]


def trl_dpo(tok, rows, max_length, mode):
    """TRL's preprocessed rows, keyed by their index in `rows`."""
    args = DPOConfig(max_length=max_length, truncation_mode=mode, **CPU)
    fake = types.SimpleNamespace(_tokenizer=tok, args=args, _is_vision_dataset=False)
    ds = datasets.Dataset.from_list(rows).add_column("idx", list(range(len(rows))))
    return {r["idx"]: r for r in DPOTrainer._prepare_dataset(fake, ds, tok, args, "train")}


@pytest.mark.parametrize("conversational", [False, True])
@pytest.mark.parametrize("mode,max_length", [("keep_start", None), ("keep_start", 12),
                                             ("keep_start", 16), ("keep_end", 12)])
def test_dpo_matches_trl(tok, conversational, mode, max_length):
    rows = preference_rows(conversational)
    ours = tokenize_dataset(rows, tok, max_length=max_length, truncation_mode=mode,
                            on_error="drop")
    ref = trl_dpo(tok, rows, max_length, mode)
    kept = [ex["row"] for ex in ours.examples]
    if mode == "keep_start":
        # TRL silently filters rows whose prompt fills max_length; we drop the same rows, counted
        assert kept == sorted(ref)
        assert ours.report.dropped.get("prompt_too_long", 0) == len(rows) - len(ref)
    else:
        # TRL keeps rows whose completion alone fills max_length (cutting the completion's start
        # and the whole prompt); we drop them as completion_too_long: compare the rows both keep
        assert set(kept) <= set(ref)
        assert ours.report.dropped.get("completion_too_long", 0) == len(ref) - len(kept)
    assert len(kept) >= 4
    expected = DataCollatorForPreference(pad_token_id=0, max_length=max_length,
                                         truncation_mode=mode)([ref[i] for i in kept])
    got = collate_preference(ours.examples, pad_id=0)
    b = len(kept)
    ids, attn, comp = (expected[k].numpy() for k in ("input_ids", "attention_mask",
                                                     "completion_mask"))
    np.testing.assert_array_equal(got["chosen_tokens"], ids[:b])
    np.testing.assert_array_equal(got["rejected_tokens"], ids[b:])
    np.testing.assert_array_equal(got["chosen_attention_mask"], attn[:b])
    np.testing.assert_array_equal(got["rejected_attention_mask"], attn[b:])
    np.testing.assert_array_equal(got["chosen_loss_mask"], comp[:b])
    np.testing.assert_array_equal(got["rejected_loss_mask"], comp[b:])


@pytest.mark.parametrize("conversational", [False, True])
@pytest.mark.parametrize("truncate", [False, True])
def test_kto_and_kl_pairs_match_trl(tok, conversational, truncate):
    # prompts have 5..8 tokens (9..11 with the chat template): this max_length cuts completions
    max_length = (11 if conversational else 9) if truncate else None
    ds = make_kto_dataset(8, seed=2, conversational=conversational)
    ds = ds.remove_columns(["answer"])
    args = KTOConfig(max_length=max_length, per_device_train_batch_size=4, **CPU)
    fake = types.SimpleNamespace(_tokenizer=tok, args=args, _is_vision_dataset=False,
                                 calculate_KL=True, desirable_weight=1.0, undesirable_weight=1.0)
    ref = KTOTrainer._prepare_dataset(fake, ds, tok, args, "train")
    ours = tokenize_dataset(ds, tok, max_length=max_length, on_error="drop")
    assert len(ref) == len(ours.examples) == 8
    collator = DataCollatorForUnpairedPreference(pad_token_id=0, max_length=max_length)
    for start in (0, 4):  # TRL rotates completions within each batch of 4
        expected = collator([ref[i] for i in range(start, start + 4)])
        got = collate_unpaired(ours.examples[start:start + 4], pad_id=0, max_length=max_length)
        for ours_key, trl_key in [("tokens", "input_ids"), ("attention_mask", "attention_mask"),
                                  ("loss_mask", "completion_mask"), ("label", "label"),
                                  ("kl_tokens", "KL_input_ids"),
                                  ("kl_attention_mask", "KL_attention_mask"),
                                  ("kl_loss_mask", "KL_completion_mask")]:
            np.testing.assert_array_equal(got[ours_key], expected[trl_key].numpy(), err_msg=ours_key)


def test_unpairing_matches_trl(tok):
    rows = preference_rows(False)
    args = KTOConfig(max_length=None, **CPU)
    fake = types.SimpleNamespace(_tokenizer=tok, args=args, _is_vision_dataset=False,
                                 calculate_KL=False, desirable_weight=1.0, undesirable_weight=1.0)
    ref = KTOTrainer._prepare_dataset(fake, datasets.Dataset.from_list(rows), tok, args, "train")
    ours = tokenize_dataset(rows, tok, kind="unpaired")
    assert [r["label"] for r in ref] == [e["label"] for e in ours.examples]
    assert [r["prompt_ids"] + r["completion_ids"] for r in ref] == \
        [e["input_ids"] for e in ours.examples]


def trl_sft(tok, ds, max_length, mode="keep_start"):
    args = SFTConfig(max_length=max_length, truncation_mode=mode, **CPU)
    fake = types.SimpleNamespace(_tokenizer=tok, args=args, _is_vision_dataset=False,
                                 chat_template=None, completion_only_loss=True)
    return SFTTrainer._prepare_dataset(fake, ds, tok, args, False, None, "train")


@pytest.mark.parametrize("conversational", [False, True])
@pytest.mark.parametrize("max_length,mode", [(None, "keep_start"), (9, "keep_start"),
                                             (10, "keep_start"), (8, "keep_end")])
def test_sft_prompt_completion_matches_trl(tok, conversational, max_length, mode):
    if max_length is not None and conversational:
        max_length += 3  # the template adds <|user|> and <|assistant|>; a 1-token completion grows
    ds = make_sft_dataset(12, seed=4, digits=3, conversational=conversational)
    ds = ds.select_columns(["prompt", "completion"]).add_column("idx", list(range(12)))
    ref = {r["idx"]: r for r in trl_sft(tok, ds, max_length, mode)}
    ours = tokenize_dataset(ds, tok, max_length=max_length, truncation_mode=mode, on_error="drop")
    kept = [e["row"] for e in ours.examples]
    if mode == "keep_start":  # both drop the rows whose prompt fills max_length
        assert kept == sorted(ref)
    else:  # TRL keeps rows whose completion fills max_length (losing the prompt); we drop them
        assert set(kept) <= set(ref)
    assert len(kept) >= 2
    for e in ours.examples:
        r = ref[e["row"]]
        assert r["input_ids"] == e["input_ids"]
        assert [lab != -100 for lab in r["labels"]] == [bool(m) for m in e["loss_mask"]]


def test_sft_text_and_messages_match_trl(tok):
    texts = datasets.Dataset.from_list([{"text": "1+1=2"}, {"text": "a b c<eos>"}])
    ref = trl_sft(tok, texts, None)
    ours = tokenize_dataset(texts, tok)
    assert [r["input_ids"] for r in ref] == [e["input_ids"] for e in ours.examples]
    msgs = datasets.Dataset.from_list([
        {"messages": conv("system", "hi") + conv("user", "1+1=") + conv("assistant", "2")},
        {"messages": conv("user", "2+2=") + conv("assistant", "4") + conv("user", "3+3=")
         + conv("assistant", "6")},
    ])
    ref = trl_sft(tok, msgs, None)
    # TRL (without a {% generation %} template) learns every token, like assistant_only_loss=False
    ours = tokenize_dataset(msgs, tok, assistant_only_loss=False)
    for r, e in zip(ref, ours.examples):
        assert r["input_ids"] == e["input_ids"]
        assert e["loss_mask"][1:] == [1] * (len(e["input_ids"]) - 1)


@settings(max_examples=60, deadline=None)
@given(prefix=st.text("ab ", min_size=1, max_size=6), c=st.text("ab ", min_size=1, max_size=4),
       r=st.text("ab ", min_size=1, max_size=4))
def test_extract_prompt_matches_trl(prefix, c, r):
    chosen, rejected = prefix + c, prefix + r
    n = min(len(chosen), len(rejected))
    idx = next((i for i in range(n) if chosen[i] != rejected[i]), n)
    assume(idx < n)  # TRL's result is only meaningful when the two strings diverge
    assume(idx > 1 or chosen[0] != " ")  # and leave a non-empty prompt
    expected = trl.extract_prompt({"chosen": chosen, "rejected": rejected})
    assert extract_prompt(chosen, rejected) == (expected["prompt"], expected["chosen"],
                                                expected["rejected"])
