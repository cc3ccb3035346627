"""Tests for the masked NLL and the auxiliary-SFT mixing helper."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from jaxalign.losses.sft import LOSSES, masked_nll, mix_sft

TOKEN_LOGPS = jnp.array([[-1.0, -2.0, -3.0, -4.0], [-0.5, -np.inf, np.nan, -1.5], [-9.0, -9.0, -9.0, -9.0]])
MASK = jnp.array([[1, 1, 1, 0], [1, 0, 0, 1], [0, 0, 0, 0]], bool)


def test_closed_form_and_masking():
    losses, metrics = masked_nll(token_logps=TOKEN_LOGPS, mask=MASK)
    np.testing.assert_allclose(losses, [2.0, 1.0, 0.0], rtol=1e-6)  # -inf / NaN under the mask are ignored
    np.testing.assert_allclose(metrics["num_tokens"], [3.0, 2.0, 0.0])
    np.testing.assert_allclose(metrics["nll_loss"], losses)
    losses, _ = masked_nll(token_logps=TOKEN_LOGPS, mask=MASK.astype(jnp.int32), average=False)
    np.testing.assert_allclose(losses, [6.0, 2.0, 0.0], rtol=1e-6)
    assert losses.dtype == jnp.float32


def test_gradient_is_zero_on_masked_positions():
    grads = jax.grad(lambda x: masked_nll(token_logps=x, mask=MASK)[0].sum())(TOKEN_LOGPS)
    expected = -np.asarray(MASK, np.float32) / np.maximum(np.asarray(MASK).sum(-1, keepdims=True), 1)
    np.testing.assert_allclose(grads, expected, rtol=1e-6)
    assert np.all(np.isfinite(grads))


def test_matches_torch_cross_entropy():
    rng = np.random.default_rng(0)
    b, t, v = 3, 7, 11
    logits = rng.normal(0, 3, (b, t, v)).astype(np.float32)
    labels = rng.integers(0, v, (b, t))
    mask = rng.random((b, t)) < 0.6
    mask[2] = False
    token_logps = jnp.take_along_axis(jax.nn.log_softmax(jnp.asarray(logits), -1), jnp.asarray(labels)[..., None], -1)[..., 0]
    losses, metrics = masked_nll(token_logps=token_logps, mask=mask)
    torch_labels = torch.tensor(labels).masked_fill(~torch.tensor(mask), -100)
    per_token = F.cross_entropy(torch.tensor(logits).reshape(-1, v), torch_labels.reshape(-1), reduction="none")
    per_token = per_token.reshape(b, t).numpy()
    counts = mask.sum(-1)
    expected = np.where(counts > 0, per_token.sum(-1) / np.maximum(counts, 1), 0.0)
    np.testing.assert_allclose(losses, expected, rtol=1e-5, atol=1e-6)
    # TRL's token-level batch mean (cross_entropy with ignore_index, reduction="mean"), as documented.
    token_mean = F.cross_entropy(torch.tensor(logits).reshape(-1, v), torch_labels.reshape(-1)).item()
    n = metrics["num_tokens"]
    np.testing.assert_allclose(np.sum(losses * n) / np.sum(n), token_mean, rtol=1e-5)


def test_grads_jit_vmap_registry():
    assert LOSSES == {"nll": masked_nll}
    x = jnp.array([[-1.0, -2.0, -0.3], [-0.1, -4.0, -2.5]])
    m = jnp.array([[1, 1, 0], [1, 1, 1]], bool)
    check_grads(lambda v: masked_nll(token_logps=v, mask=m)[0], (x,), order=2, modes=("fwd", "rev"))
    eager, _ = masked_nll(token_logps=x, mask=m)
    np.testing.assert_allclose(jax.jit(lambda v, mm: masked_nll(token_logps=v, mask=mm)[0])(x, m), eager, rtol=1e-6)
    vmapped = jax.vmap(lambda v, mm: masked_nll(token_logps=v, mask=mm)[0])(jnp.stack([x, x]), jnp.stack([m, m]))
    np.testing.assert_allclose(vmapped, jnp.stack([eager, eager]), rtol=1e-6)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match=r"`token_logps` has shape \(2, 3\) but `mask` has shape \(2, 4\)"):
        masked_nll(token_logps=jnp.zeros((2, 3)), mask=jnp.ones((2, 4)))
    with pytest.raises(ValueError, match=r"`token_logps` must have 2 dimensions, got shape \(3,\)"):
        masked_nll(token_logps=jnp.zeros(3), mask=jnp.ones(3))


@settings(max_examples=30, deadline=None)
@given(
    values=st.lists(st.floats(-20.0, 0.0, width=32), min_size=8, max_size=8),
    bits=st.lists(st.booleans(), min_size=8, max_size=8),
    pad=st.floats(width=32),  # any value, NaN and inf included
)
def test_padding_invariance(values, bits, pad):
    """Appending masked columns, whatever their values, changes nothing."""
    x = jnp.array(values).reshape(2, 4)
    m = jnp.array(bits).reshape(2, 4)
    padded_x = jnp.concatenate([x, jnp.full((2, 3), pad)], axis=1)
    padded_m = jnp.concatenate([m, jnp.zeros((2, 3), bool)], axis=1)
    for average in (True, False):
        a, _ = masked_nll(token_logps=x, mask=m, average=average)
        b, _ = masked_nll(token_logps=padded_x, mask=padded_m, average=average)
        np.testing.assert_array_equal(a, b)
        assert np.all(np.asarray(a) >= 0)


def test_mix_sft():
    pref = jnp.array([1.0, 2.0, 3.0])
    np.testing.assert_allclose(mix_sft(preference_losses=pref, sft_losses=jnp.array([0.5, 1.5]), lambda_sft=0.1), 2.1)
    np.testing.assert_allclose(mix_sft(preference_losses=pref, sft_losses=4.0, lambda_sft=0.5), 4.0)
    total = mix_sft(preference_losses=pref, sft_losses=jnp.array([0.5, 1.5]), lambda_sft=0.0)
    assert total.shape == () and total.dtype == jnp.float32 and math.isclose(float(total), 2.0)
    grad = jax.grad(lambda s: mix_sft(preference_losses=pref, sft_losses=s, lambda_sft=0.2))(jnp.array([0.5, 1.5]))
    np.testing.assert_allclose(grad, [0.1, 0.1], rtol=1e-6)
    jitted = jax.jit(lambda p, s, lam: mix_sft(preference_losses=p, sft_losses=s, lambda_sft=lam))
    np.testing.assert_allclose(jitted(pref, jnp.array([0.5, 1.5]), 0.1), 2.1, rtol=1e-6)
    with pytest.raises(ValueError, match=r"`preference_losses` must have shape \[B\].*got shape \(3, 1\)"):
        mix_sft(preference_losses=pref[:, None], sft_losses=1.0, lambda_sft=0.1)
    with pytest.raises(ValueError, match=r"`sft_losses` must be a scalar or have shape \[B'\].*got shape \(2, 2\)"):
        mix_sft(preference_losses=pref, sft_losses=jnp.zeros((2, 2)), lambda_sft=0.1)
    with pytest.raises(ValueError, match=r"`sft_losses`.*got shape \(0,\)"):
        mix_sft(preference_losses=pref, sft_losses=jnp.zeros(0), lambda_sft=0.1)
