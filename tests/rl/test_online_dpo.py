"""Online / iterative DPO glue: pair selection from hand-made groups, pair batches, and the
weighted preference objective (tied pairs have weight 0 and change nothing)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.losses import dpo_loss, ipo_loss
from jaxalign.rl.online_dpo import (
    best_worst_pairs, build_pair_batch, make_preference_objective, pair_metrics, sequence_logps,
)
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
