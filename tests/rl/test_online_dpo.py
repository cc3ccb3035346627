"""Online / iterative DPO glue: pair selection from hand-made groups, pair batches, and the
weighted preference objective (tied pairs have weight 0 and change nothing)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.losses import dpo_loss, ipo_loss
from jaxalign.rl import trainers
from jaxalign.rl.loop import RoundTools
from jaxalign.rl.online_dpo import (
    best_worst_pairs, build_pair_batch, make_preference_objective, pair_metrics, ranked_pairs,
    sequence_logps,
)
from jaxalign.rl.rollout import make_logps_fn
from tests.rl.conftest import make_rollout


def test_best_worst_pairs_by_hand():
    chosen, rejected, valid = best_worst_pairs([0, 1, 1, 0, 2, 2, 2, 2, 3, -1, 5, 5], 4)
    np.testing.assert_array_equal(chosen, [1, 4, 10])
    np.testing.assert_array_equal(rejected, [0, 4, 9])
    np.testing.assert_array_equal(valid, [True, False, True])
    with pytest.raises(ValueError, match="multiple of group_size=4"):
        best_worst_pairs([0, 1, 2], 4)
    with pytest.raises(ValueError, match=">= 2"):
        best_worst_pairs([0, 1], 1)


def test_ranked_pairs_by_hand():
    # groups: one 0/1 group with 2 correct of 4, a tie, mixed rewards, 1 correct of 4
    chosen, rejected, valid = ranked_pairs([0, 1, 1, 0, 2, 2, 2, 2, 3, -1, 5, 5, 1, 0, 0, 0], 4)
    np.testing.assert_array_equal(chosen, [1, 2, 4, 5, 10, 11, 12, 13])
    np.testing.assert_array_equal(rejected, [3, 0, 7, 6, 9, 8, 15, 14])
    np.testing.assert_array_equal(valid, [True, True, False, False, True, True, True, False])
    # odd group size: the middle completion is left out; group_size 2 is best_worst_pairs
    c, r, v = ranked_pairs([1, 0, 2], 3)
    assert (c.tolist(), r.tolist(), v.tolist()) == ([2], [1], [True])
    rew = np.random.default_rng(0).integers(0, 2, 40)
    for got, want in zip(ranked_pairs(rew, 2), best_worst_pairs(rew, 2)):
        np.testing.assert_array_equal(got[best_worst_pairs(rew, 2)[2]],
                                      want[best_worst_pairs(rew, 2)[2]])
    # every valid pair: chosen beats rejected, same group, no completion used twice
    rew = np.random.default_rng(1).integers(0, 3, 8 * 50)
    c, r, v = ranked_pairs(rew, 8)
    assert c.shape == (200,) and np.all(rew[c[v]] > rew[r[v]]) and np.all(c // 8 == r // 8)
    used = np.concatenate([c[v], r[v]])
    assert len(np.unique(used)) == len(used)
    # with 0/1 rewards: min(#correct, #incorrect) valid pairs per group
    counts = rew.reshape(-1, 8)
    bin_rew = (rew == 2).astype(float)
    _, _, v = ranked_pairs(bin_rew, 8)
    k = (counts == 2).sum(1)
    np.testing.assert_array_equal(v.reshape(-1, 4).sum(1), np.minimum(k, 8 - k))
    with pytest.raises(ValueError, match="multiple of group_size=4"):
        ranked_pairs([0, 1, 2], 4)
    with pytest.raises(ValueError, match=">= 2"):
        ranked_pairs([0, 1], 1)


def test_preference_trainer_ranked_selection_builds_every_valid_pair(tiny):
    model, params = tiny
    r = make_rollout([1, 0, 1, 0, 1, 1, 1, 1, 0, 0, 0, 1], group_size=4)
    tools = RoundTools(trainable={"params": params}, frozen={}, ref_variables={"params": params},
                       logps_fn=make_logps_fn(model), rng=np.random.default_rng(0))
    ref = sequence_logps(tools.ref_logps(r), r.loss_mask)
    for drop_ties in (True, False):
        t = trainers.preference_trainer(model, loss_fn=dpo_loss, group_size=4,
                                        pair_selection="ranked", drop_ties=drop_ties)
        rows, m = t.build(r, tools)
        c, rej, v = ranked_pairs(r.rewards, 4)  # (0,3), (2,1); tie, tie; (11,10), tie
        if drop_ties:
            c, rej, v = c[v], rej[v], v[v]
        np.testing.assert_array_equal(rows["chosen_tokens"], r.tokens[c])
        np.testing.assert_array_equal(rows["rejected_tokens"], r.tokens[rej])
        np.testing.assert_allclose(rows["ref_chosen_logps"], ref[c], rtol=1e-6)
        np.testing.assert_array_equal(rows["weight"], v.astype(np.float32))
        assert m["pairs/count"] == 3.0 and m["pairs/valid_fraction"] == 0.5
    with pytest.raises(ValueError, match="pair_selection"):
        trainers.preference_trainer(model, loss_fn=dpo_loss, pair_selection="all")


def test_pair_batch_and_metrics():
    r = make_rollout([0, 1, 1, 1], group_size=2, lengths=[3, 2, 4, 1])
    chosen, rejected, valid = best_worst_pairs(r.rewards, 2)
    ref = np.array([-1.0, -2.0, -3.0, -4.0], np.float32)
    b = build_pair_batch(r, chosen, rejected, ref_seq_logps=ref, weight=valid)
    np.testing.assert_array_equal(b["chosen_tokens"], r.tokens[[1, 2]])
    np.testing.assert_array_equal(b["rejected_loss_mask"], r.loss_mask[[0, 2]])
    np.testing.assert_array_equal(b["ref_chosen_logps"], [-2.0, -3.0])
    np.testing.assert_array_equal(b["ref_rejected_logps"], [-1.0, -3.0])
    np.testing.assert_array_equal(b["weight"], [1.0, 0.0])
    m = pair_metrics(r, chosen, rejected, valid)
    assert m == {"pairs/valid_fraction": 0.5, "pairs/count": 1.0, "pairs/reward_gap": 1.0}


def _seq_logps(model, params, tokens, am, lm):
    logits = model.apply({"params": params}, tokens, attention_mask=am)
    lsm = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), -1)
    picked = jnp.take_along_axis(lsm, jnp.asarray(tokens[:, 1:, None]), -1)[..., 0]
    return jnp.sum(jnp.where(lm[:, 1:], picked, 0.0), -1)


def test_weighted_dpo_objective(tiny):
    model, params = tiny
    r = make_rollout([1, 0, 0, 1, 1, 1], group_size=2, lengths=[3, 2, 4, 1, 2, 5])
    chosen, rejected, valid = best_worst_pairs(r.rewards, 2)  # pairs (0,1), (3,2), tie (4,4)
    ref = np.array([-3.0, -2.5, -4.0, -1.0, 7.0, 9.0], np.float32)  # the tie's ref is garbage
    batch = build_pair_batch(r, chosen, rejected, ref_seq_logps=ref, weight=valid)
    obj = jax.jit(make_preference_objective(model, loss_fn=dpo_loss, loss_kwargs={"beta": 0.3}))
    (loss, m), g = jax.value_and_grad(obj, has_aux=True)({"params": params}, {}, batch,
                                                         jax.random.PRNGKey(0))
    pc = _seq_logps(model, params, r.tokens[[0, 3]], r.attention_mask[[0, 3]], r.loss_mask[[0, 3]])
    pr = _seq_logps(model, params, r.tokens[[1, 2]], r.attention_mask[[1, 2]], r.loss_mask[[1, 2]])
    z = 0.3 * ((pc - ref[[0, 3]]) - (pr - ref[[1, 2]]))
    assert float(loss) == pytest.approx(float(jnp.mean(-jax.nn.log_sigmoid(z))), abs=1e-5)
    assert float(m["rewards/margins"]) == pytest.approx(float(jnp.mean(z)), abs=1e-5)
    # the same objective on the two valid pairs only: identical loss and gradient
    only = {k: v[:2] for k, v in batch.items()}
    (loss2, _), g2 = jax.value_and_grad(obj, has_aux=True)({"params": params}, {}, only,
                                                           jax.random.PRNGKey(0))
    assert float(loss2) == pytest.approx(float(loss), abs=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g, g2)
    # reference == policy: every DPO loss is ln 2
    pol = np.asarray(_seq_logps(model, params, r.tokens, r.attention_mask, r.loss_mask))
    batch = build_pair_batch(r, chosen, rejected, ref_seq_logps=pol, weight=valid)
    assert float(obj({"params": params}, {}, batch, jax.random.PRNGKey(0))[0]) == pytest.approx(
        np.log(2), abs=1e-5)


def test_length_averaged_losses_get_mean_logps(tiny):
    model, params = tiny
    r = make_rollout([1, 0], group_size=2, lengths=[3, 2])
    lp_tok = np.where(r.loss_mask[:, 1:], -0.5, 0.0).astype(np.float32)
    np.testing.assert_allclose(sequence_logps(lp_tok, r.loss_mask), [-1.5, -1.0])
    np.testing.assert_allclose(sequence_logps(lp_tok, r.loss_mask, average=True), [-0.5, -0.5])
    pol = np.asarray(_seq_logps(model, params, r.tokens, r.attention_mask, r.loss_mask))
    mean_pol = pol / np.array([3, 2])
    batch = build_pair_batch(r, [0], [1], ref_seq_logps=mean_pol)
    obj = make_preference_objective(model, loss_fn=ipo_loss, loss_kwargs={"beta": 0.1},
                                    average_logps=True)
    loss, _ = obj({"params": params}, {}, batch, jax.random.PRNGKey(0))
    assert float(loss) == pytest.approx((1 / (2 * 0.1)) ** 2, rel=1e-4)  # IPO at ref = policy
