"""PPO glue: per-token rewards (KL penalty + score on the last token), GAE and returns on a
hand-made row, the value head's alignment, and the objective at the rollout point."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.rl.ppo import (
    apply_value_head, build_ppo_batch, init_value_head, last_token_onehot, make_policy_value_fn,
    make_ppo_objective,
)
from tests.rl.conftest import make_rollout


def test_last_token_onehot():
    m = np.array([[0, 1, 1, 0], [1, 0, 1, 1], [0, 0, 0, 0]], bool)
    np.testing.assert_array_equal(last_token_onehot(m), [[0, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0]])


def _arrays(r, old_minus_ref, values):
    mask = r.loss_mask[:, 1:]
    old = np.where(mask, -1.0, 0.0).astype(np.float32)
    ref = old - np.where(mask, old_minus_ref, 0.0).astype(np.float32)
    v = np.zeros(mask.shape, np.float32)
    for i, row in enumerate(values):
        v[i, np.flatnonzero(mask[i])] = row
    return old, ref, v


def test_token_rewards_gae_and_returns_by_hand():
    r = make_rollout([1.0], group_size=1, lengths=[3])
    old, ref, v = _arrays(r, 0.2, [[0.2, 0.4, 0.6]])
    batch, m = build_ppo_batch(r, old_logps=old, old_values=v, ref_logps=ref, kl_coef=0.5,
                               gamma=1.0, lam=1.0, whiten_advantages=False)
    idx = np.flatnonzero(r.loss_mask[0, 1:])
    # rewards -0.1 per token, +1 on the last: reward-to-go 0.7, 0.8, 0.9 (gamma = lam = 1)
    np.testing.assert_allclose(batch["returns"][0, idx], [0.7, 0.8, 0.9], atol=1e-6)
    np.testing.assert_allclose(batch["advantages"][0, idx], [0.5, 0.4, 0.3], atol=1e-6)
    assert m["objective/kl"] == pytest.approx(0.6) and m["kl"] == pytest.approx(0.2)
    assert m["objective/non_score_reward"] == pytest.approx(-0.3)
    assert m["objective/rlhf_reward"] == pytest.approx(0.7) and m["objective/scores"] == 1.0
    # gamma = 0.9, lam = 0.5 by the recursion delta_t + gamma lam A_{t+1}
    batch, _ = build_ppo_batch(r, old_logps=old, old_values=v, ref_logps=ref, kl_coef=0.5,
                               gamma=0.9, lam=0.5, whiten_advantages=False)
    rew, val = [-0.1, -0.1, 0.9], [0.2, 0.4, 0.6, 0.0]
    adv, nxt = [0.0] * 3, 0.0
    for t in (2, 1, 0):
        nxt = rew[t] + 0.9 * val[t + 1] - val[t] + 0.9 * 0.5 * nxt
        adv[t] = nxt
    np.testing.assert_allclose(batch["advantages"][0, idx], adv, atol=1e-6)
    np.testing.assert_allclose(batch["returns"][0, idx], np.add(adv, val[:3]), atol=1e-6)


def test_whitening_and_missing_eos_penalty():
    r = make_rollout([1.0, 0.0], group_size=1, lengths=[3, 2])
    old, ref, v = _arrays(r, 0.0, [[0, 0, 0], [0, 0]])
    batch, m = build_ppo_batch(r, old_logps=old, old_values=v, ref_logps=ref,
                               missing_eos_penalty=1.0, terminated=np.array([True, False]))
    mask = r.loss_mask[:, 1:]
    a = batch["advantages"][mask]
    assert a.mean() == pytest.approx(0.0, abs=1e-6) and a.std(ddof=1) == pytest.approx(1.0, abs=1e-4)
    assert m["objective/scores"] == pytest.approx((1.0 + (0.0 - 1.0)) / 2)
    with pytest.raises(ValueError, match="`terminated` is required"):
        build_ppo_batch(r, old_logps=old, old_values=v, ref_logps=ref, missing_eos_penalty=1.0)


def test_value_head_alignment(tiny):
    model, params = tiny
    r = make_rollout([0, 0], group_size=1, lengths=[3, 5])
    head = {"kernel": jnp.linspace(-1, 1, 16)[:, None], "bias": jnp.array([0.3])}
    fn = make_policy_value_fn(model)
    trainable = {"params": params, "value": head}
    lp, values = fn(trainable, {}, r.tokens, r.attention_mask, r.loss_mask)
    hidden = model.apply({"params": params}, r.tokens, attention_mask=r.attention_mask,
                         return_hidden=True)
    expected = np.asarray(hidden[:, :-1] @ head["kernel"])[..., 0] + 0.3
    mask = r.loss_mask[:, 1:]
    np.testing.assert_allclose(np.asarray(values)[mask], expected[mask], atol=1e-5)
    assert (np.asarray(values)[~mask] == 0).all()
    np.testing.assert_allclose(apply_value_head(head, hidden), expected, atol=1e-5)
    _, v0 = fn({"params": params, "value": init_value_head(16)}, {}, r.tokens, r.attention_mask,
               r.loss_mask)
    assert not np.asarray(v0).any()


def test_ppo_objective_at_the_rollout_point(tiny):
    model, params = tiny
    r = make_rollout([0, 0, 0], group_size=1, lengths=[3, 1, 4])
    head = {"kernel": jnp.linspace(-0.5, 0.5, 16)[:, None], "bias": jnp.array([0.1])}
    trainable = {"params": params, "value": head}
    lp, values = make_policy_value_fn(model)(trainable, {}, r.tokens, r.attention_mask, r.loss_mask)
    mask = r.loss_mask[:, 1:]
    rng = np.random.default_rng(0)
    adv = np.where(mask, rng.normal(size=mask.shape), 0).astype(np.float32)
    ret = np.where(mask, rng.normal(size=mask.shape), 0).astype(np.float32)
    batch = {"tokens": r.tokens, "attention_mask": r.attention_mask, "loss_mask": r.loss_mask,
             "old_logps": np.asarray(lp), "old_values": np.asarray(values), "advantages": adv,
             "returns": ret}
    obj = jax.jit(make_ppo_objective(model, vf_coef=0.1))
    loss, m = obj(trainable, {}, batch, jax.random.PRNGKey(0))
    n = mask.sum()
    pg = -adv[mask].sum() / n  # ratio 1
    vf = 0.5 * np.square(np.asarray(values) - ret)[mask].sum() / n  # V = V_old: no clipping
    assert float(m["loss/policy"]) == pytest.approx(pg, abs=1e-5)
    assert float(m["loss/value"]) == pytest.approx(vf, abs=1e-5)
    assert float(loss) == pytest.approx(pg + 0.1 * vf, abs=1e-5)
    assert float(m["clip_ratio/region_mean"]) == 0.0 and float(m["entropy"]) > 0
    g = jax.grad(lambda t: obj(t, {}, batch, jax.random.PRNGKey(0))[0])(trainable)
    # d loss / d bias = vf_coef * mean_t (V_t - R_t)
    expected = 0.1 * (np.asarray(values) - ret)[mask].sum() / n
    assert float(g["value"]["bias"][0]) == pytest.approx(expected, abs=1e-5)
