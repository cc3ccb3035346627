import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxalign.data import make_collate_fn, padded_length, tokenize_dataset
from jaxalign.data.collate import collate_prompts, collate_unpaired, pad

BOS, EOS = 1, 2


def test_padded_length_rules():
    assert padded_length(5) == 5
    assert padded_length(5, pad_to_multiple_of=4) == 8
    assert padded_length(8, pad_to_multiple_of=4) == 8
    assert padded_length(5, buckets=[16, 8]) == 8
    assert padded_length(9, buckets=[8, 16]) == 16
    with pytest.raises(ValueError, match="exceeds the largest bucket 16"):
        padded_length(17, buckets=[8, 16])
    with pytest.raises(ValueError, match="at most one"):
        padded_length(3, pad_to_multiple_of=4, buckets=[8])
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        padded_length(3, pad_to_multiple_of=0)


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 300), m=st.integers(1, 64))
def test_padded_length_multiple_property(n, m):
    length = padded_length(n, pad_to_multiple_of=m)
    assert length % m == 0 and n <= length < n + m


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 100), buckets=st.sets(st.integers(1, 100), min_size=1, max_size=5))
def test_padded_length_bucket_property(n, buckets):
    if n > max(buckets):
        with pytest.raises(ValueError):
            padded_length(n, buckets=sorted(buckets))
    else:
        length = padded_length(n, buckets=sorted(buckets))
        assert length == min(b for b in buckets if b >= n)


def test_sft_batch_right_padded(tok):
    rows = [{"prompt": "1+1=", "completion": "2"}, {"prompt": "12+3=", "completion": "15"}]
    out = tokenize_dataset(rows, tok)
    batch = make_collate_fn("sft", pad_id=tok.pad_token_id, pad_to_multiple_of=4)(out.examples)
    assert batch["tokens"].dtype == np.int32 and batch["tokens"].shape == (2, 12)
    assert batch["attention_mask"].dtype == bool and batch["loss_mask"].dtype == bool
    np.testing.assert_array_equal(batch["tokens"][0], [BOS, 8, 17, 8, 20, 9, EOS, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(batch["tokens"][1], [BOS, 8, 9, 17, 10, 20, 8, 12, EOS, 0, 0, 0])
    np.testing.assert_array_equal(batch["attention_mask"].sum(1), [7, 9])
    np.testing.assert_array_equal(batch["loss_mask"][0], [0] * 5 + [1, 1] + [0] * 5)
    np.testing.assert_array_equal(batch["loss_mask"][1], [0] * 6 + [1, 1, 1] + [0] * 3)
    # the loss positions, padded to a multiple of 4 like T, 0 in unused slots
    np.testing.assert_array_equal(batch["loss_index"], [[5, 6, 0, 0], [6, 7, 8, 0]])


def test_preference_batch_common_length(tok):
    rows = [{"prompt": "1+1=", "chosen": "2", "rejected": "100"},
            {"prompt": "2+2=", "chosen": "4", "rejected": "5"}]
    out = tokenize_dataset(rows, tok)
    batch = make_collate_fn("preference", pad_id=0)(out.examples)
    assert set(batch) == {f"{s}_{k}" for s in ("chosen", "rejected")
                          for k in ("tokens", "attention_mask", "loss_mask", "loss_index")}
    # the longest of all chosen and rejected (prompt 5 + "100<eos>" 4) fixes T for both
    assert batch["chosen_tokens"].shape == batch["rejected_tokens"].shape == (2, 9)
    np.testing.assert_array_equal(batch["chosen_tokens"][0], [BOS, 8, 17, 8, 20, 9, EOS, 0, 0])
    np.testing.assert_array_equal(batch["rejected_tokens"][0], [BOS, 8, 17, 8, 20, 8, 7, 7, EOS])
    np.testing.assert_array_equal(batch["rejected_loss_mask"][0], [0] * 5 + [1] * 4)
    np.testing.assert_array_equal(batch["chosen_loss_mask"][1], [0] * 5 + [1, 1, 0, 0])
    # one K (the longest completion: "100<eos>") for chosen and rejected
    np.testing.assert_array_equal(batch["chosen_loss_index"], [[5, 6, 0, 0], [5, 6, 0, 0]])
    np.testing.assert_array_equal(batch["rejected_loss_index"], [[5, 6, 7, 8], [5, 6, 0, 0]])
    batch = make_collate_fn("preference", pad_id=0, buckets=[4, 16, 32])(out.examples)
    assert batch["chosen_tokens"].shape == (2, 16) and batch["chosen_loss_index"].shape == (2, 4)
    # K padded to the bucket 16 would not be below T - 1: no index, objectives use all positions
    batch = make_collate_fn("preference", pad_id=0, buckets=[16, 32])(out.examples)
    assert "chosen_loss_index" not in batch and "rejected_loss_index" not in batch


def test_loss_index_rules():
    from jaxalign.data.collate import loss_index

    m = np.array([[1, 1, 0, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0]], bool)
    # position 0 is never predicted; an all-prompt row has only unused slots
    (idx,) = loss_index(m)
    np.testing.assert_array_equal(idx, [[1, 3], [0, 0]])
    assert idx.dtype == np.int32
    (idx,) = loss_index(m, pad_to_multiple_of=4)
    np.testing.assert_array_equal(idx, [[1, 3, 0, 0], [0, 0, 0, 0]])
    assert loss_index(m, pad_to_multiple_of=8) is None  # K = 8 >= T - 1


@settings(max_examples=40, deadline=None)
@given(rows=st.lists(st.lists(st.booleans(), min_size=12, max_size=12), min_size=1, max_size=4))
def test_loss_index_lists_exactly_the_loss_positions(rows):
    from jaxalign.data.collate import loss_index

    m = np.array(rows, bool)
    out = loss_index(m)
    n = int(m[:, 1:].sum(1).max())
    if max(n, 1) >= m.shape[1] - 1:
        assert out is None
        return
    (idx,) = out
    for row, ix in zip(m, idx):
        want = np.flatnonzero(row[1:]) + 1
        np.testing.assert_array_equal(ix[:len(want)], want)
        assert not ix[len(want):].any()


def test_kto_kl_pairs(tok):
    rows = [{"prompt": "1=", "completion": "1", "label": True},
            {"prompt": "2=", "completion": "22", "label": False},
            {"prompt": "3=", "completion": "333", "label": True}]
    out = tokenize_dataset(rows, tok)
    batch = make_collate_fn("unpaired", pad_id=0)(out.examples)
    np.testing.assert_array_equal(batch["label"], [True, False, True])
    np.testing.assert_array_equal(batch["tokens"][2], [BOS, 10, 20, 10, 10, 10, EOS])
    # row i's prompt with row (i-1) mod B's completion, as TRL's rotation
    np.testing.assert_array_equal(batch["kl_tokens"], [
        [BOS, 8, 20, 10, 10, 10, EOS],
        [BOS, 9, 20, 8, EOS, 0, 0],
        [BOS, 10, 20, 9, 9, EOS, 0],
    ])
    np.testing.assert_array_equal(batch["kl_loss_mask"].astype(int), [
        [0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1, 0]])
    np.testing.assert_array_equal(batch["kl_attention_mask"].sum(1), [7, 5, 6])
    # KL sequences are truncated like the main ones
    trunc = collate_unpaired(out.examples, pad_id=0, max_length=5)
    np.testing.assert_array_equal(trunc["kl_tokens"][0], [BOS, 8, 20, 10, 10])
    trunc = collate_unpaired(out.examples, pad_id=0, max_length=5, truncation_mode="keep_end")
    np.testing.assert_array_equal(trunc["kl_tokens"][0], [20, 10, 10, 10, EOS])
    assert "kl_tokens" not in collate_unpaired(out.examples, pad_id=0, kl_pairs=False)
    with pytest.raises(ValueError, match="at least 2"):
        collate_unpaired(out.examples[:1], pad_id=0)


def test_prompt_batch_left_padded_with_metadata(tok):
    rows = [{"prompt": "1+1=", "answer": "2"}, {"prompt": "12+34=", "answer": "46"}]
    out = tokenize_dataset(rows, tok)
    batch = collate_prompts(out.examples, pad_id=0, pad_to_multiple_of=8)
    np.testing.assert_array_equal(batch["prompt_tokens"], [
        [0, 0, 0, BOS, 8, 17, 8, 20],
        [0, BOS, 8, 9, 17, 10, 11, 20],
    ])
    np.testing.assert_array_equal(batch["prompt_attention_mask"], batch["prompt_tokens"] != 0)
    assert batch["answer"] == ["2", "46"]


def test_bad_collate_inputs():
    with pytest.raises(ValueError, match="empty list"):
        make_collate_fn("sft", pad_id=0)([])
    with pytest.raises(ValueError, match="pad_id"):
        make_collate_fn("sft", pad_id=None)([{"input_ids": [1], "loss_mask": [0]}])
    with pytest.raises(ValueError, match="kind"):
        make_collate_fn("dpo", pad_id=0)
    with pytest.raises(ValueError, match="more than the padded length"):
        pad([[1, 2, 3]], 2, value=0)
