"""GRPO / RLOO glue: advantages of hand-made groups, and the jitted objectives' values and
gradients against hand-written surrogates on a tiny model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.rl.grpo import (
    build_grpo_batch, build_rloo_batch, make_grpo_objective, make_rloo_objective,
)
from tests.rl.conftest import make_rollout

S3 = np.sqrt(1 / 3)  # unbiased std of a group with rewards {1, 0, 0, 1}


def test_grpo_group_advantages_by_hand():
    r = make_rollout([1, 0, 0, 1, 0, 0, 0, 0], group_size=4)
    batch, m = build_grpo_batch(r)
    a = 0.5 / (S3 + 1e-4)
    np.testing.assert_allclose(batch["advantages"], [a, -a, -a, a, 0, 0, 0, 0], rtol=1e-6)
    assert "old_logps" not in batch and "ref_logps" not in batch
    batch, _ = build_grpo_batch(r, scale_rewards="none")  # Dr. GRPO: no std division
    np.testing.assert_allclose(batch["advantages"], [.5, -.5, -.5, .5, 0, 0, 0, 0])
    batch, _ = build_grpo_batch(r, scale_rewards="batch")
    np.testing.assert_allclose(batch["advantages"][:4],
                               np.array([.5, -.5, -.5, .5]) / (np.std(r.rewards, ddof=1) + 1e-4),
                               rtol=1e-6)


def test_dapo_token_count_per_micro_batch():
    r = make_rollout([1, 0, 0, 1], group_size=2, lengths=[3, 1, 6, 2])
    batch, _ = build_grpo_batch(r, loss_type="dapo", grad_accum=2)
    assert batch["num_items_in_batch"] == pytest.approx(12 / 2)


def test_rloo_kl_in_reward_and_leave_one_out_by_hand():
    r = make_rollout([1, 0, 0], group_size=3, lengths=[3, 2, 1])
    mask = r.loss_mask[:, 1:]
    old = np.where(mask, -1.0, 0.0).astype(np.float32)
    ref = np.where(mask, -1.5, 0.0).astype(np.float32)  # k1 = old - ref = 0.5 per token
    batch, m = build_rloo_batch(r, old_logps=old, ref_logps=ref, beta=0.1)
    shaped = np.array([1 - 0.15, -0.1, -0.05])
    expected = [shaped[i] - np.mean(np.delete(shaped, i)) for i in range(3)]
    np.testing.assert_allclose(batch["advantages"], expected, rtol=1e-6)
    np.testing.assert_allclose(expected, [0.925, -0.5, -0.425], atol=1e-12)
    assert m["kl"] == pytest.approx(0.5)
    np.testing.assert_array_equal(batch["old_logps"], old)
    with pytest.raises(ValueError, match="ref_logps` is required"):
        build_rloo_batch(r, old_logps=old, beta=0.1)


def _hand_logps(model, params, r):
    """Log-probs of the completion tokens without jaxalign's log-prob helpers: [N, L-1]."""
    logits = model.apply({"params": params}, r.tokens, attention_mask=r.attention_mask)
    lsm = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), -1)
    picked = jnp.take_along_axis(lsm, jnp.asarray(r.tokens[:, 1:, None]), -1)[..., 0]
    return jnp.where(r.loss_mask[:, 1:], picked, 0.0)


def _batch(r, adv, **extra):
    return {"tokens": r.tokens, "attention_mask": r.attention_mask, "loss_mask": r.loss_mask,
            "advantages": np.asarray(adv, np.float32), **extra}


ADV = [1.0, -0.5, 0.0, 2.0]
LENGTHS = [3, 1, 6, 2]


def test_grpo_objective_value_and_gradient(tiny):
    model, params = tiny
    r = make_rollout([0, 0, 0, 0], group_size=2, lengths=LENGTHS)
    # old log-probs equal to the current ones and a reference equal to the policy: ratio 1 and
    # k3 = 0 with zero gradient, so value and gradient are those of the plain policy gradient
    lp = np.asarray(_hand_logps(model, params, r))
    obj = jax.jit(make_grpo_objective(model, beta=0.5))
    (loss, m), g = jax.value_and_grad(obj, has_aux=True)(
        {"params": params}, {}, _batch(r, ADV, old_logps=lp, ref_logps=lp), jax.random.PRNGKey(0))
    assert float(loss) == pytest.approx(-np.mean(ADV), abs=1e-6)  # -mean_i A_i
    assert abs(float(m["kl"])) < 1e-6 and float(m["clip_ratio/region_mean"]) == 0.0
    assert float(m["num_tokens"]) == sum(LENGTHS) and float(m["entropy"]) > 0

    def surrogate(p):  # policy gradient of the "grpo" aggregation: mean_i A_i mean_t logp_it
        per_seq = _hand_logps(model, p, r).sum(1) / np.asarray(LENGTHS, np.float32)
        return -jnp.mean(jnp.asarray(ADV) * per_seq)

    g_ref = jax.grad(surrogate)(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6), g["params"], g_ref)


def test_dr_grpo_normalises_by_max_completion_length(tiny):
    model, params = tiny
    r = make_rollout([0, 0, 0, 0], group_size=2, lengths=LENGTHS)
    obj = make_grpo_objective(model, loss_type="dr_grpo", max_completion_length=6)
    loss, _ = obj({"params": params}, {}, _batch(r, ADV), jax.random.PRNGKey(0))
    assert float(loss) == pytest.approx(-np.dot(ADV, LENGTHS) / (4 * 6), abs=1e-6)


def test_rloo_objective_sequence_ratio(tiny):
    model, params = tiny
    r = make_rollout([0, 0, 0, 0], group_size=2, lengths=LENGTHS)
    lp = np.asarray(_hand_logps(model, params, r))
    obj = make_rloo_objective(model, epsilon_low=0.2)
    loss, _ = obj({"params": params}, {}, _batch(r, ADV, old_logps=lp), jax.random.PRNGKey(0))
    assert float(loss) == pytest.approx(-np.mean(ADV), abs=1e-5)
    # old log-probs 0.3 nats lower on the first completion token of row 0 only: its sequence ratio
    # is e^0.3 > 1.2 with A > 0, so it is clipped to 1.2 (row 3 unchanged)
    old = lp.copy()
    first = np.argmax(r.loss_mask[0, 1:])
    old[0, first] -= 0.3
    loss, m = obj({"params": params}, {}, _batch(r, ADV, old_logps=old), jax.random.PRNGKey(0))
    assert float(loss) == pytest.approx(-(1.2 * 1.0 - 0.5 + 0 + 2.0) / 4, abs=1e-5)
    assert float(m["clip_ratio/high_mean"]) == pytest.approx(0.25)
