"""Tests for the Bradley-Terry reward-model loss against TRL's RewardTrainer.compute_loss."""

import collections
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads
from trl.trainer.reward_trainer import RewardTrainer

from jaxalign.losses.reward import LOSSES, bradley_terry_loss


def softplus(x):
    return math.log1p(math.exp(-abs(x))) + max(x, 0.0)


def trl_reward(chosen, rejected, margin=None, center_rewards_coefficient=None):
    """TRL's RewardTrainer.compute_loss with a stand-in model that outputs the given rewards."""

    def model(**_):
        logits = torch.tensor(np.concatenate([chosen, rejected]), dtype=torch.float32)[:, None]
        return types.SimpleNamespace(logits=logits)

    fake = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True),
        accelerator=types.SimpleNamespace(gather_for_metrics=lambda x: x, gather=lambda x: x),
        args=types.SimpleNamespace(center_rewards_coefficient=center_rewards_coefficient),
        _metrics={"train": collections.defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {"attention_mask": torch.ones(2 * len(chosen), 3, dtype=torch.long)}
    if margin is not None:
        inputs["margin"] = torch.tensor(margin, dtype=torch.float32)
    loss = RewardTrainer.compute_loss(fake, model, inputs)
    return loss.item(), {k: v[-1] for k, v in fake._metrics["train"].items()}


def test_closed_form():
    losses, metrics = bradley_terry_loss(rewards_chosen=jnp.array([2.0, 0.0]), rewards_rejected=jnp.array([1.0, 3.0]))
    np.testing.assert_allclose(losses, [softplus(-1.0), softplus(3.0)], rtol=1e-6)
    np.testing.assert_allclose(metrics["accuracy"], [1.0, 0.0])
    np.testing.assert_allclose(metrics["margin"], [1.0, -3.0])
    np.testing.assert_allclose(metrics["rewards/chosen"], [2.0, 0.0])
    losses, metrics = bradley_terry_loss(
        rewards_chosen=jnp.array([2.0, 0.0]),
        rewards_rejected=jnp.array([1.0, 3.0]),
        margin=jnp.array([0.5, 1.0]),
        center_rewards_coefficient=0.01,
    )
    np.testing.assert_allclose(losses, [softplus(-0.5) + 0.01 * 9.0, softplus(4.0) + 0.01 * 9.0], rtol=1e-6)
    np.testing.assert_allclose(metrics["margin"], [1.0, -3.0])  # without the margin, as TRL logs it
    losses, _ = bradley_terry_loss(rewards_chosen=jnp.array([2.0]), rewards_rejected=jnp.array([1.0]), margin=1.0)
    np.testing.assert_allclose(losses, [math.log(2.0)], rtol=1e-6)
    assert losses.dtype == jnp.float32


@pytest.mark.parametrize("use_margin", [False, True])
@pytest.mark.parametrize("coef", [None, 0.01])
@pytest.mark.parametrize("extreme", [False, True])
def test_matches_trl(use_margin, coef, extreme):
    rng = np.random.default_rng(0)
    n = 6
    chosen = rng.normal(0, 3, n).astype(np.float32)
    rejected = rng.normal(0, 3, n).astype(np.float32)
    if extreme:
        chosen = np.array([1e4, -1e4, 0.0, 5e3, -5e3, 1.0], np.float32)
        rejected = np.array([-1e4, 1e4, 0.0, 5e3, 5e3, -1.0], np.float32)
    margin = rng.uniform(0, 2, n).astype(np.float32) if use_margin else None
    losses, metrics = bradley_terry_loss(
        rewards_chosen=chosen, rewards_rejected=rejected, margin=margin, center_rewards_coefficient=coef
    )
    assert np.all(np.isfinite(losses))
    trl_mean, trl_metrics = trl_reward(chosen, rejected, margin, coef)
    np.testing.assert_allclose(np.mean(np.asarray(losses, np.float64)), trl_mean, rtol=1e-5)
    np.testing.assert_allclose(np.mean(metrics["accuracy"]), trl_metrics["accuracy"], rtol=1e-6)
    np.testing.assert_allclose(np.mean(metrics["margin"]), trl_metrics["margin"], rtol=1e-5, atol=1e-5)
    for i in range(n):  # per row
        row, _ = trl_reward(chosen[i : i + 1], rejected[i : i + 1], None if margin is None else margin[i : i + 1], coef)
        np.testing.assert_allclose(losses[i], row, rtol=1e-5, atol=1e-7)


def test_registry_jit_vmap_grads():
    assert LOSSES == {"bradley_terry": bradley_terry_loss}
    kw = dict(rewards_chosen=jnp.array([0.5, -1.0, 2.0]), rewards_rejected=jnp.array([0.0, 1.5, -2.0]))

    def f(c, r):
        return bradley_terry_loss(rewards_chosen=c, rewards_rejected=r, margin=0.3, center_rewards_coefficient=0.1)[0]

    check_grads(f, (kw["rewards_chosen"], kw["rewards_rejected"]), order=1, modes=("fwd", "rev"))
    eager, _ = bradley_terry_loss(**kw)
    jitted, metrics = jax.jit(lambda k: bradley_terry_loss(**k))(kw)
    np.testing.assert_allclose(jitted, eager, rtol=1e-6)
    assert all(v.shape == (3,) for v in metrics.values())
    stacked = jax.tree.map(lambda x: jnp.stack([x, -x]), kw)
    vmapped, _ = jax.vmap(lambda k: bradley_terry_loss(**k))(stacked)
    np.testing.assert_allclose(vmapped[0], eager, rtol=1e-6)
    # A traced per-row margin also works under vmap.
    m = jnp.array([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    vm, _ = jax.vmap(lambda k, mm: bradley_terry_loss(**k, margin=mm))(jax.tree.map(lambda x: jnp.stack([x, x]), kw), m)
    np.testing.assert_allclose(vm[0], eager, rtol=1e-6)
    np.testing.assert_allclose(vm[1], bradley_terry_loss(**kw, margin=1.0)[0], rtol=1e-6)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match=r"`rewards_rejected` has shape \(2,\)"):
        bradley_terry_loss(rewards_chosen=jnp.zeros(3), rewards_rejected=jnp.zeros(2))
    with pytest.raises(ValueError, match=r"`rewards_chosen` must have shape \[B\], got shape \(3, 1\)"):
        bradley_terry_loss(rewards_chosen=jnp.zeros((3, 1)), rewards_rejected=jnp.zeros(3))
    with pytest.raises(ValueError, match=r"`margin` must be a scalar or have shape \(3,\), got shape \(2,\)"):
        bradley_terry_loss(rewards_chosen=jnp.zeros(3), rewards_rejected=jnp.zeros(3), margin=jnp.zeros(2))


rewards = st.lists(st.floats(-30.0, 30.0, width=32), min_size=4, max_size=4)
_bt = jax.jit(lambda c, r: bradley_terry_loss(rewards_chosen=c, rewards_rejected=r)[0])


@settings(max_examples=40, deadline=None)
@given(c=rewards, r=rewards, shift=st.floats(-10.0, 10.0, width=32))
def test_properties(c, r, shift):
    c, r = jnp.array(c), jnp.array(r)
    loss = _bt(c, r)
    # softplus(-d) - softplus(d) = -d
    np.testing.assert_allclose(loss - _bt(r, c), -(c - r), rtol=1e-4, atol=1e-4)
    # Without centering, a common shift of the rewards changes nothing.
    np.testing.assert_allclose(_bt(c + shift, r + shift), loss, rtol=1e-4, atol=1e-4)
    assert np.all(np.asarray(loss) >= 0)
