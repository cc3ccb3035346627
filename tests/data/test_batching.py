import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxalign.data import IteratorState, epoch_order, iterate_batches


def ids(batch):
    return list(batch)


def take(n, **kw):
    return list(itertools.islice(iterate_batches(**kw), n))


def test_epochs_are_permutations_and_deterministic():
    a = epoch_order(10, seed=3, epoch=0)
    assert sorted(a.tolist()) == list(range(10))
    np.testing.assert_array_equal(a, epoch_order(10, seed=3, epoch=0))
    assert not np.array_equal(a, epoch_order(10, seed=3, epoch=1))
    assert not np.array_equal(a, epoch_order(10, seed=4, epoch=0))
    np.testing.assert_array_equal(epoch_order(5, seed=0, epoch=0, shuffle=False), np.arange(5))


def test_fixed_size_batches_cover_each_epoch_once():
    examples = list(range(10))
    out = list(iterate_batches(examples, ids, batch_size=3, seed=0, num_epochs=2))
    assert len(out) == 6  # 3 full batches per epoch, the incomplete tail is skipped
    assert all(len(b) == 3 for b, _ in out)
    first = [x for b, _ in out[:3] for x in b]
    assert len(set(first)) == 9
    assert first == epoch_order(10, seed=0, epoch=0)[:9].tolist()
    assert [s for _, s in out[:3]] == [IteratorState(0, 3), IteratorState(0, 6), IteratorState(1, 0)]
    assert out[-1][1] == IteratorState(2, 0)


def test_no_drop_last_keeps_tail():
    out = list(iterate_batches(list(range(5)), ids, batch_size=2, seed=0, num_epochs=1,
                               drop_last=False, shuffle=False))
    assert [b for b, _ in out] == [[0, 1], [2, 3], [4]]
    assert out[-1][1] == IteratorState(1, 0)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 30), bs=st.integers(1, 8), stop=st.integers(0, 20),
       seed=st.integers(0, 2**31 - 1))
def test_resume_gives_exactly_the_remaining_batches(n, bs, stop, seed):
    if bs > n:
        with pytest.raises(ValueError, match="no full batch"):
            next(iterate_batches(list(range(n)), ids, batch_size=bs, seed=seed))
        return
    kw = dict(examples=list(range(n)), collate_fn=ids, batch_size=bs, seed=seed)
    full = take(stop + 5, **kw)
    head = full[:stop]
    state = head[-1][1] if head else IteratorState()
    # the state survives a round trip through a plain dict (as in a checkpoint)
    state = IteratorState.from_dict(state.to_dict())
    resumed = take(5, state=state, **kw)
    assert [b for b, _ in resumed] == [b for b, _ in full[stop:]]
    assert [s for _, s in resumed] == [s for _, s in full[stop:]]


def test_collate_is_applied_and_bad_args():
    out = next(iterate_batches([[1], [2, 3]], lambda xs: sum(map(len, xs)), batch_size=2, seed=0))
    assert out == (3, IteratorState(1, 0))
    with pytest.raises(ValueError, match="batch_size"):
        next(iterate_batches([1, 2], ids, batch_size=0, seed=0))
    with pytest.raises(ValueError, match="out of range"):
        next(iterate_batches([1, 2], ids, batch_size=1, seed=0, state=IteratorState(0, 3)))
    assert list(iterate_batches([1, 2], ids, batch_size=1, seed=0, num_epochs=0)) == []
