"""RSO statistical rejection sampling (against a literal transcription of Liu et al. 2023's
Algorithm 1 and its acceptance probabilities), RSO pairs, best-of-N selection and the weighted
SFT objective."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jaxalign.rl.rejection import (
    best_of_n, build_sft_batch, make_sft_objective, rso_pairs, statistical_rejection_sample,
)
from tests.rl.conftest import make_rollout


def paper_algorithm_1(response_candidates, response_rewards, num_samples, beta, rng):
    """Liu et al. 2023, Algorithm 1 (the paper's Python), with `rng.uniform()` for np.random."""
    candidates = {c: r for c, r in zip(response_candidates, response_rewards)}
    accepted = []
    while len(accepted) < num_samples:
        max_reward = max(candidates.values())
        to_remove = []
        for c, r in candidates.items():
            u = rng.uniform()
            if u >= np.exp((r - max_reward) / beta):
                continue
            accepted.append(c)
            to_remove.append(c)
            if len(accepted) == num_samples:
                break
        for c in to_remove:
            candidates.pop(c)
    return accepted


@settings(max_examples=60, deadline=None)
@given(rewards=st.lists(st.floats(-3, 3), min_size=1, max_size=10),
       beta=st.floats(0.05, 5.0), k=st.integers(1, 10), seed=st.integers(0, 2**31))
def test_matches_the_papers_algorithm(rewards, beta, k, seed):
    k = min(k, len(rewards))
    names = [f"y{i}" for i in range(len(rewards))]
    ref = paper_algorithm_1(names, rewards, k, beta, np.random.default_rng(seed))
    got = statistical_rejection_sample(rewards, num_samples=k, beta=beta,
                                       rng=np.random.default_rng(seed))
    assert [names[i] for i in got] == ref
    assert len(set(got)) == k
    assert int(np.argmax(rewards)) in got or k < len(rewards)  # the best is accepted first pass


def test_acceptance_probability():
    # two candidates r = [0, 1], beta = 1, one sample: candidate 0 is examined first and kept with
    # probability exp(-1); otherwise candidate 1 (r = r_max) is always accepted.
    rng = np.random.default_rng(0)
    n = 20000
    first = sum(statistical_rejection_sample([0.0, 1.0], num_samples=1, beta=1.0, rng=rng) == [0]
                for _ in range(n))
    assert first / n == pytest.approx(np.exp(-1), abs=4 * np.sqrt(0.25 / n))
    # a tiny beta keeps only maxima: candidates come out in decreasing reward order
    got = statistical_rejection_sample([0.1, 0.9, 0.5, 0.7], num_samples=4, beta=1e-6, rng=rng)
    assert got == [1, 3, 2, 0]
    with pytest.raises(ValueError, match=r"`num_samples` must be in \[1, 2\]"):
        statistical_rejection_sample([0.0, 1.0], num_samples=3, beta=1.0, rng=rng)
    with pytest.raises(ValueError, match="`beta` must be > 0"):
        statistical_rejection_sample([0.0, 1.0], num_samples=1, beta=0.0, rng=rng)


def test_rso_pairs_dedupe_rank_and_drop_ties():
    # group 1: 4 candidates, two identical texts; group 2: all rewards equal (ties only)
    r = make_rollout([1, 0, 0, 1, 2, 2, 2, 2], group_size=4,
                     completions=["a", "b", "b", "c", "d", "e", "f", "g"])
    # a huge beta accepts everything in order: group 1 -> distinct rows [0, 1, 3]
    chosen, rejected, m = rso_pairs(r, num_samples=4, beta=1e9, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(chosen, [0])  # pair (0, 1): 1 > 0; row 3 is left unpaired
    np.testing.assert_array_equal(rejected, [1])
    assert m["rso/candidates_per_prompt"] == pytest.approx((3 + 4) / 2)
    assert m["rso/accepted_per_prompt"] == pytest.approx((3 + 4) / 2)
    assert m["pairs/count"] == 1.0  # group 2's pairs (4, 5), (6, 7) tie and are dropped


def test_best_of_n():
    rows, m = best_of_n([0, 3, 3, 1, 0, 0, 0, 0.5], 4)
    np.testing.assert_array_equal(rows, [1, 7])
    rows, m = best_of_n([0, 3, 3, 1, 0, 0, 0, 0.5], 4, min_reward=1.0)
    np.testing.assert_array_equal(rows, [1])
    assert m["best_of_n/kept_fraction"] == 0.5 and m["best_of_n/best_reward"] == 1.75


def test_weighted_sft_objective(tiny):
    model, params = tiny
    r = make_rollout([1, 0, 1], group_size=1, lengths=[3, 2, 4])
    batch = build_sft_batch(r, [0, 2, 1])
    batch["weight"][2] = 0.0  # padding row
    obj = jax.jit(make_sft_objective(model))
    loss, m = obj({"params": params}, {}, batch, jax.random.PRNGKey(0))
    logits = model.apply({"params": params}, r.tokens, attention_mask=r.attention_mask)
    lsm = jax.nn.log_softmax(logits[:, :-1], -1)
    picked = jnp.take_along_axis(lsm, jnp.asarray(r.tokens[:, 1:, None]), -1)[..., 0]
    mask = r.loss_mask[:, 1:]
    rows = np.array([0, 2])
    expected = -float(jnp.sum(jnp.where(mask[rows], picked[rows], 0.0))) / 7
    assert float(loss) == pytest.approx(expected, abs=1e-5)
    assert float(m["num_tokens"]) == 7.0
