"""Tests for jaxalign.losses.kl_estimators (Schulman 2020 k1/k2/k3)."""

import math

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from jaxalign.losses.kl_estimators import kl_estimate, kl_k1, kl_k2, kl_k3


def test_hand_computed_values():
    logps = jnp.array([[0.0, -1.0, -0.5]])
    ref = jnp.array([[-1.0, 0.0, -0.5]])  # log_r = ref - logp = [-1, 1, 0]
    np.testing.assert_allclose(kl_k1(logps, ref), [[1.0, -1.0, 0.0]])
    np.testing.assert_allclose(kl_k2(logps, ref), [[0.5, 0.5, 0.0]])
    np.testing.assert_allclose(kl_k3(logps, ref), [[math.exp(-1), math.e - 2, 0.0]], rtol=1e-6)
    for kind, fn in (("k1", kl_k1), ("k2", kl_k2), ("k3", kl_k3)):
        np.testing.assert_array_equal(kl_estimate(logps, ref, kind=kind), fn(logps, ref))


def test_k3_matches_trl_grpo_per_token_kl():
    rng = np.random.default_rng(0)
    logps = rng.normal(-2.0, 1.0, size=(3, 7))
    ref = logps + rng.normal(0.0, 0.5, size=(3, 7))
    mask = (rng.random((3, 7)) > 0.3).astype(np.float32)
    lp, rp = torch.tensor(logps), torch.tensor(ref)
    # trl/trainer/grpo_trainer.py, GRPOTrainer._compute_loss
    per_token_kl = torch.exp(rp - lp) - (rp - lp) - 1
    out = jax.jit(kl_k3)(logps.astype(np.float32), ref.astype(np.float32), mask)
    np.testing.assert_allclose(out, per_token_kl.numpy() * mask, rtol=1e-5, atol=1e-6)


def test_estimators_are_unbiased_for_sampled_tokens():
    # KL(p || q) for categoricals, estimated from samples of p.
    p = np.array([0.5, 0.3, 0.15, 0.05])
    q = np.array([0.25, 0.25, 0.25, 0.25])
    true_kl = float(np.sum(p * np.log(p / q)))
    samples = np.random.default_rng(1).choice(4, size=200_000, p=p)
    logps, ref = np.log(p)[samples][None], np.log(q)[samples][None]
    for fn in (kl_k1, kl_k3):
        assert abs(float(jnp.mean(fn(logps, ref))) - true_kl) < 0.01
    # k2 is biased, but its expectation is 0.5 * E_p[(log p/q)^2]
    expected_k2 = float(np.sum(p * 0.5 * np.log(p / q) ** 2))
    assert abs(float(jnp.mean(kl_k2(logps, ref))) - expected_k2) < 0.01


@settings(max_examples=30, deadline=None)
@given(hnp.arrays(np.float32, (2, 5), elements=st.floats(-20, 0, width=32)),
       hnp.arrays(np.float32, (2, 5), elements=st.floats(-20, 0, width=32)))
def test_k2_k3_nonnegative_and_zero_iff_equal(logps, ref):
    for fn in (kl_k2, kl_k3):
        out = np.asarray(fn(logps, ref))
        assert np.all(out >= 0)
        assert np.all(fn(logps, logps) == 0)
    np.testing.assert_allclose(kl_k1(logps, ref), logps - ref, rtol=1e-6, atol=1e-6)


def test_masked_positions_are_exact_zero_with_finite_grads():
    logps = jnp.array([[-1.0, jnp.nan, -jnp.inf], [-0.5, -0.2, jnp.inf]])
    ref = jnp.array([[-2.0, 0.0, jnp.nan], [jnp.nan, -0.1, 1.0]])
    mask = jnp.array([[1, 0, 0], [0, 1, 0]])
    for kind in ("k1", "k2", "k3"):
        out = kl_estimate(logps, ref, mask, kind=kind)
        assert np.all(np.asarray(out)[np.asarray(mask) == 0] == 0)
        grads = jax.grad(lambda lp, rp: jnp.sum(kl_estimate(lp, rp, mask, kind=kind)),
                         argnums=(0, 1))(logps, ref)
        for g in grads:
            assert np.all(np.isfinite(g))
            assert np.all(np.asarray(g)[np.asarray(mask) == 0] == 0)


def test_gradients_and_vmap():
    rng = np.random.default_rng(2)
    with jax.enable_x64(True):
        logps = rng.normal(-1.0, 0.5, size=(2, 4))
        ref = rng.normal(-1.0, 0.5, size=(2, 4))
        mask = np.array([[1, 1, 0, 1], [0, 1, 1, 1]])
        for fn in (kl_k1, kl_k2, kl_k3):
            check_grads(lambda a, b: jnp.sum(fn(a, b, mask)), (logps, ref), order=2)
        # d k3 / d logp = 1 - exp(ref - logp)
        g = jax.grad(lambda a: jnp.sum(kl_k3(a, ref, mask)))(logps)
        np.testing.assert_allclose(g, (1 - np.exp(ref - logps)) * mask, rtol=1e-10)
    batched = jax.vmap(kl_k3)(logps[None].repeat(3, 0), ref[None].repeat(3, 0), mask[None].repeat(3, 0))
    np.testing.assert_allclose(batched[1], kl_k3(logps, ref, mask), rtol=1e-6)


def test_low_precision_inputs_compute_in_float32():
    logps = jnp.array([[-1.0, -2.0]], jnp.bfloat16)
    ref = jnp.array([[-1.5, -1.0]], jnp.bfloat16)
    assert kl_k3(logps, ref).dtype == jnp.float32


def test_validation():
    with pytest.raises(ValueError, match="`ref_logps` has shape"):
        kl_k3(jnp.zeros((2, 3)), jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match="`mask` has shape"):
        kl_k1(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.ones((3, 2)))
    with pytest.raises(ValueError, match="`kind` must be one of"):
        kl_estimate(jnp.zeros(2), jnp.zeros(2), kind="k4")
