import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from jaxalign.losses.logps import (
    reduce_sequence, sequence_logps, token_logps, token_logps_from_hidden,
)


def _data(b=2, t=5, v=11, seed=0):
    rng = np.random.RandomState(seed)
    logits = rng.randn(b, t, v).astype(np.float32) * 3
    labels = rng.randint(0, v, (b, t))
    mask = rng.rand(b, t) > 0.3
    return logits, labels, mask


def test_hand_computed_uniform_logits():
    # Uniform logits over V=4: every token has log p = -ln 4.
    logits = jnp.zeros((1, 3, 4))
    labels = jnp.array([[0, 3, 2]])
    mask = jnp.array([[1, 1, 0]])
    assert np.allclose(sequence_logps(logits, labels, mask), [-2 * math.log(4)], atol=1e-6)
    assert np.allclose(sequence_logps(logits, labels, mask, average=True), [-math.log(4)], atol=1e-6)


def test_matches_torch_log_softmax_and_masks_exactly_zero():
    logits, labels, mask = _data()
    labels_with_ignore = np.where(mask, labels, -100)  # TRL-style ignore index must be harmless
    ref = torch.log_softmax(torch.tensor(logits), -1).gather(-1, torch.tensor(labels)[..., None])[..., 0].numpy()
    out = np.asarray(token_logps(jnp.asarray(logits), jnp.asarray(labels_with_ignore), jnp.asarray(mask)))
    np.testing.assert_allclose(out[mask], ref[mask], atol=1e-5)
    assert (out[~mask] == 0.0).all()
    seq = sequence_logps(logits, labels_with_ignore, mask)
    np.testing.assert_allclose(seq, (ref * mask).sum(1), atol=1e-5)


def test_empty_mask_row_gives_zero_not_nan():
    logits, labels, mask = _data()
    mask[0] = False
    for avg in (False, True):
        out = sequence_logps(logits, labels, mask, average=avg)
        assert out[0] == 0.0 and np.isfinite(np.asarray(out)).all()


@pytest.mark.parametrize("chunk", [1, 3, 4, 11, 64])
def test_vocab_chunked_equals_full(chunk):
    logits, labels, mask = _data(v=11)
    full = token_logps(logits, labels, mask)
    ch = jax.jit(lambda l: token_logps(l, labels, mask, vocab_chunk=chunk))(logits)
    np.testing.assert_allclose(ch, full, atol=1e-5)
    g_full = jax.grad(lambda l: token_logps(l, labels, mask).sum())(jnp.asarray(logits))
    g_ch = jax.grad(lambda l: token_logps(l, labels, mask, vocab_chunk=chunk).sum())(jnp.asarray(logits))
    np.testing.assert_allclose(g_ch, g_full, atol=1e-5)


def test_bf16_logits_are_upcast():
    logits, labels, mask = _data(v=50)
    lb = jnp.asarray(logits, jnp.bfloat16)
    out = token_logps(lb, labels, mask)
    assert out.dtype == jnp.float32
    ref = token_logps(lb.astype(jnp.float32), labels, mask)  # same bf16 values, fp32 math
    np.testing.assert_allclose(out, ref, atol=1e-5)
    ch = token_logps(lb, labels, mask, vocab_chunk=16)
    np.testing.assert_allclose(ch, ref, atol=1e-5)


def test_from_hidden_matches_and_never_builds_full_fp32_logsoftmax():
    rng = np.random.RandomState(1)
    b, t, d, v = 2, 6, 8, 37
    h = jnp.asarray(rng.randn(b, t, d), jnp.float32)
    k = jnp.asarray(rng.randn(d, v), jnp.float32)
    labels = jnp.asarray(rng.randint(0, v, (b, t)))
    mask = jnp.asarray(rng.rand(b, t) > 0.2)
    ref = token_logps(h @ k, labels, mask)
    out = token_logps_from_hidden(h, k, labels, mask, vocab_chunk=8)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    g_ref = jax.grad(lambda h, k: token_logps(h @ k, labels, mask).sum(), argnums=(0, 1))(h, k)
    g = jax.grad(lambda h, k: token_logps_from_hidden(h, k, labels, mask, vocab_chunk=8).sum(),
                 argnums=(0, 1))(h, k)
    for a, r in zip(g, g_ref):
        np.testing.assert_allclose(a, r, atol=1e-4)


def test_from_hidden_peak_memory_is_below_full_logits():
    # Compiled memory: the chunked path's temporaries stay well below one [B, T, V] fp32 array.
    b, t, d, v = 4, 64, 32, 8192
    h = jax.ShapeDtypeStruct((b, t, d), jnp.float32)
    k = jax.ShapeDtypeStruct((d, v), jnp.float32)
    labels = jax.ShapeDtypeStruct((b, t), jnp.int32)

    def loss_chunked(h, k, y):
        return token_logps_from_hidden(h, k, y, None, vocab_chunk=512).sum()

    def loss_full(h, k, y):
        return token_logps(h @ k, y).sum()

    def temp_bytes(f):
        c = jax.jit(jax.grad(f, argnums=(0, 1))).lower(h, k, labels).compile()
        return c.memory_analysis().temp_size_in_bytes

    full_logits = b * t * v * 4
    chunked = temp_bytes(loss_chunked)
    assert chunked < full_logits / 2, (chunked, full_logits)
    assert temp_bytes(loss_full) >= full_logits  # sanity: the naive path does build them


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 3), st.integers(1, 6), st.integers(2, 9), st.integers(0, 10_000))
def test_property_sum_equals_mean_times_count(b, t, v, seed):
    logits, labels, mask = _data(b, t, v, seed)
    s = sequence_logps(logits, labels, mask)
    m = sequence_logps(logits, labels, mask, average=True)
    np.testing.assert_allclose(s, m * np.maximum(mask.sum(1), 1), rtol=1e-5, atol=1e-5)
    assert (np.asarray(s) <= 1e-6).all()  # log-probs are never positive


def test_bad_shapes_raise():
    logits, labels, mask = _data()
    with pytest.raises(ValueError, match="labels"):
        token_logps(logits, labels[:, :3], mask)
    with pytest.raises(ValueError, match="mask"):
        sequence_logps(logits, labels, mask[:1])


def test_reduce_sequence_jit_vmap():
    x = jnp.arange(12.0).reshape(2, 2, 3)
    m = jnp.ones((2, 2, 3))
    out = jax.jit(jax.vmap(lambda a, b: reduce_sequence(a, b, average=True)))(x, m)
    np.testing.assert_allclose(out, x.mean(-1))
