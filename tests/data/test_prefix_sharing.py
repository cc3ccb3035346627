"""share_prefix packs each preference pair after one copy of its common prefix: layout, labels and
scored slots by hand, the unpacked sequences recoverable for random batches, and named errors."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jaxalign import data as jdata
from jaxalign.data.prefix_sharing import common_prefix_length, share_prefix


def _batch(chosen, rejected, prompt_lens, t=None):
    t = t or max(map(len, chosen + rejected))
    out = {}
    for side, seqs in (("chosen", chosen), ("rejected", rejected)):
        toks = np.zeros((len(seqs), t), np.int32)
        am = np.zeros((len(seqs), t), bool)
        lm = np.zeros((len(seqs), t), bool)
        for i, (s, p) in enumerate(zip(seqs, prompt_lens)):
            toks[i, :len(s)], am[i, :len(s)], lm[i, p:len(s)] = s, True, True
        out.update({f"{side}_tokens": toks, f"{side}_attention_mask": am, f"{side}_loss_mask": lm})
    return out


def test_layout_by_hand():
    # row 0: prompt [5 6], chosen [7 8], rejected [4]; row 1: prompt [5 6], both start with 9
    b = _batch([[5, 6, 7, 8], [5, 6, 9]], [[5, 6, 4], [5, 6, 9, 3, 2]], [2, 2])
    b["ref_chosen_logps"] = np.array([-1.0, -2.0], np.float32)
    o = share_prefix(b)
    # row 1's common prefix runs into the completions (both start with 9): its chosen
    # continuation is empty
    assert o["packed_tokens"].tolist() == [[5, 6, 7, 8, 4], [5, 6, 9, 3, 2]]
    assert o["packed_attention_mask"].all()
    assert o["packed_segment_ids"].tolist() == [[0, 0, 1, 1, 2], [0, 0, 0, 2, 2]]
    # each loss token is scored at the slot of its predecessor in its own sequence
    assert o["chosen_logits_at"].tolist() == [[1, 2, 0], [1, 0, 0]]
    assert o["chosen_labels"].tolist() == [[7, 8, 0], [9, 0, 0]]
    assert o["chosen_label_mask"].tolist() == [[True, True, False], [True, False, False]]
    assert o["rejected_logits_at"].tolist() == [[1, 0, 0], [1, 2, 3]]
    assert o["rejected_labels"].tolist() == [[4, 0, 0], [9, 3, 2]]
    np.testing.assert_array_equal(o["ref_chosen_logps"], b["ref_chosen_logps"])  # passed through
    assert not any(k in o for k in ("chosen_tokens", "rejected_loss_mask"))


def test_padding_rule_and_padding_slots():
    b = _batch([[5, 6, 7, 8], [5, 9]], [[5, 6, 4], [5, 3, 3]], [2, 1])
    o = share_prefix(b, pad_to_multiple_of=4, pad_id=1)
    # rows of 5 and 4 real tokens, padded to 8 (a multiple of 4); K = 2 loss tokens, padded to 4
    assert o["packed_tokens"].shape == (2, 8) and o["chosen_labels"].shape == (2, 4)
    assert o["packed_tokens"][1].tolist() == [5, 9, 3, 3, 1, 1, 1, 1]
    assert o["packed_attention_mask"].sum(1).tolist() == [5, 4]
    assert o["packed_segment_ids"][1].tolist() == [0, 1, 2, 2, 3, 3, 3, 3]


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_unpacked_sequences_are_recoverable(data):
    n = data.draw(st.integers(1, 4))
    chosen, rejected, prompts = [], [], []
    for _ in range(n):
        p = data.draw(st.integers(1, 5))
        prompt = data.draw(st.lists(st.integers(3, 9), min_size=p, max_size=p))
        c = prompt + data.draw(st.lists(st.integers(3, 9), min_size=1, max_size=5))
        r = prompt + data.draw(st.lists(st.integers(3, 9), min_size=1, max_size=5))
        chosen.append(c), rejected.append(r), prompts.append(p)
    o = share_prefix(_batch(chosen, rejected, prompts))
    seg, valid, toks = o["packed_segment_ids"], o["packed_attention_mask"], o["packed_tokens"]
    for i in range(n):
        for s, seqs, sid in (("chosen", chosen, 1), ("rejected", rejected, 2)):
            keep = valid[i] & ((seg[i] == 0) | (seg[i] == sid))
            assert toks[i][keep].tolist() == seqs[i]  # prefix + own continuation, in order
            m = o[f"{s}_label_mask"][i]
            assert o[f"{s}_labels"][i][m].tolist() == seqs[i][prompts[i]:]
            # the scored slot holds the label's predecessor token
            assert toks[i][o[f"{s}_logits_at"][i][m]].tolist() == seqs[i][prompts[i] - 1:-1]
        assert common_prefix_length(np.array(chosen[i]), np.array(rejected[i])) >= prompts[i]


def test_bad_batches_are_named():
    b = _batch([[5, 6, 7]], [[5, 6, 4]], [1])
    with pytest.raises(ValueError, match="lacks.*rejected_loss_mask"):
        share_prefix({k: v for k, v in b.items() if k != "rejected_loss_mask"})
    left = dict(b, chosen_attention_mask=np.array([[0, 1, 1]], bool))
    with pytest.raises(ValueError, match="row 0 of chosen_attention_mask is not right-padded"):
        share_prefix(left)
    first = dict(b, rejected_loss_mask=np.array([[1, 1, 1]], bool))
    with pytest.raises(ValueError, match="row 0 of rejected_loss_mask marks the first token"):
        share_prefix(first)


def test_collate_fn_option():
    tok = jdata.build_char_tokenizer()
    pref = jdata.tokenize_dataset(jdata.make_preference_dataset(4, seed=0), tok, kind="preference")
    packed = jdata.make_collate_fn("preference", pad_id=tok.pad_token_id, pad_to_multiple_of=4,
                                   share_prefix=True)(pref.examples)
    plain = jdata.make_collate_fn("preference", pad_id=tok.pad_token_id, pad_to_multiple_of=4)(pref.examples)
    assert packed["packed_tokens"].shape[1] < 2 * plain["chosen_tokens"].shape[1]
    assert packed["chosen_label_mask"].sum() == plain["chosen_loss_mask"].sum()
    with pytest.raises(ValueError, match="kind='preference'"):
        jdata.make_collate_fn("sft", pad_id=0, share_prefix=True)
