"""The native CPU attention kernel: built and used here; outputs and q/k/v gradients equal a plain
softmax reference for grouped queries, head sizes 16-128, T != S (decoding), partial tiles, random
and causal masks, prefix-shared (segment) masks and rows without a visible key; a build without
AVX-512 agrees; bf16 and odd head sizes keep XLA's attention; without the kernel the models fall
back to XLA with one warning. `causal_attention` (XLA's path with causal key blocks) equals the
full computation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxalign.models import attention_cpu
from jaxalign.models.layers import (
    causal_attention, causal_blocks, dot_product_attention, prepare_inputs,
)
from tests.native_fallback import CASES, last_line


def _reference(q, k, v, mask, scale):
    """softmax(scale q k^T) v in numpy-style jnp with explicit masking; rows without a key -> 0."""
    g = q.shape[2] // k.shape[2]
    kk, vv = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    s = jnp.einsum("bthd,bshd->bhts", q, kk) * scale
    m = mask[:, 0][:, None]  # [B, 1, T, S]
    s = jnp.where(m, s, -jnp.inf)
    mx = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.where(m, jnp.exp(s - jnp.where(jnp.isfinite(mx), mx, 0.0)), 0.0)
    den = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(den > 0, den, 1.0)
    return jnp.einsum("bhts,bshd->bthd", p, vv)


def _operands(b, t, s, h, kvh, d, seed, mask_kind):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(ks[0], (b, t, h, d))
    k = jax.random.normal(ks[1], (b, s, kvh, d))
    v = jax.random.normal(ks[2], (b, s, kvh, d))
    rng = np.random.default_rng(seed)
    causal = np.tril(np.ones((t, s), bool), k=s - t)[None]
    if mask_kind == "random":
        mask = (rng.random((b, t, s)) < 0.6) & causal
        mask[0, 0, :] = False  # a query without a visible key
    elif mask_kind == "padded":  # left padding: the first rows see nothing
        mask = np.repeat(causal, b, 0)
        mask[:, :, :3] = False
    else:
        mask = np.repeat(causal, b, 0)
    return q, k, v, jnp.asarray(mask[:, None]), jax.random.normal(ks[3], (b, t, h, d))


def test_kernel_is_built_and_used_here():
    assert attention_cpu.available(), "the CI machine has a C++ compiler: the kernel must build"
    q = jnp.zeros((1, 4, 2, 16))
    assert attention_cpu.usable(q, q, q)
    assert not attention_cpu.usable(q.astype(jnp.bfloat16), q, q)  # bf16: XLA's attention
    assert not attention_cpu.usable(q, q, q, jnp.bfloat16)  # bf16 compute: XLA's attention
    assert not attention_cpu.usable(jnp.zeros((1, 4, 2, 24)), jnp.zeros((1, 4, 2, 24)),
                                    jnp.zeros((1, 4, 2, 24)))  # head size not a multiple of 16
    lowered = jax.jit(lambda q: dot_product_attention(
        q, q, q, jnp.ones((1, 1, 4, 4), bool), scale=0.25, dtype=jnp.float32)).lower(q)
    assert "jaxalign_attention_fwd" in lowered.as_text()


@pytest.mark.parametrize("b,t,s,h,kvh,d,mask_kind", [
    (2, 5, 5, 2, 2, 16, "random"),
    (2, 19, 37, 4, 2, 32, "random"),     # T != S, partial tiles and blocks, grouped queries
    (3, 64, 64, 8, 2, 64, "causal"),
    (1, 1, 50, 4, 1, 128, "causal"),     # one decoding step over a cache, 4 queries per kv head
    (2, 130, 130, 4, 4, 80, "padded"),   # head size not a multiple of 64
])
def test_native_equals_the_reference(b, t, s, h, kvh, d, mask_kind):
    q, k, v, mask, do = _operands(b, t, s, h, kvh, d, seed=t + s, mask_kind=mask_kind)
    scale = d ** -0.5
    out = jax.jit(lambda q, k, v: attention_cpu.attention(q, k, v, mask, scale=scale))(q, k, v)
    want = _reference(q, k, v, mask, scale)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=2e-5, rtol=1e-5)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * do)

    got = jax.jit(jax.grad(loss(lambda q, k, v: attention_cpu.attention(q, k, v, mask, scale=scale)),
                           argnums=(0, 1, 2)))(q, k, v)
    ref = jax.grad(loss(lambda q, k, v: _reference(q, k, v, mask, scale)), argnums=(0, 1, 2))(q, k, v)
    for g1, g2 in zip(got, ref):
        np.testing.assert_allclose(np.asarray(g1), np.asarray(g2), atol=2e-5, rtol=1e-4)


def test_prefix_shared_rows_and_numerical_gradients():
    """The packed layout's mask (a continuation sees the prefix and itself, not its sibling; padding
    keys hidden); the custom backward agrees with finite differences."""
    t = 40
    seg = np.zeros((2, t), np.int32)
    seg[:, 12:26], seg[:, 26:37], seg[:, 37:] = 1, 2, 3
    am = np.ones((2, t), np.int32)
    am[:, 37:] = 0
    _, _, _, mask = prepare_inputs(jnp.zeros((2, t), jnp.int32), jnp.asarray(am), None, None,
                                   segment_ids=jnp.asarray(seg))
    q, k, v, _, do = _operands(2, t, t, 2, 1, 16, seed=3, mask_kind="causal")
    out = attention_cpu.attention(q, k, v, mask, scale=0.25)
    np.testing.assert_allclose(np.asarray(out), np.asarray(_reference(q, k, v, mask, 0.25)),
                               atol=2e-5, rtol=1e-5)
    check_grads(lambda q, k, v: attention_cpu.attention(q, k, v, mask, scale=0.25) * do,
                (q * 0.5, k * 0.5, v), order=1, modes=["rev"], atol=5e-2, rtol=5e-2, eps=1e-2)


def test_build_without_avx512_agrees(tmp_path):
    """The vector code compiled for narrower SIMD (what a CPU without AVX-512 runs)."""
    path = attention_cpu.build(out=tmp_path / "narrow.so", extra_flags=("-mno-avx512f",))
    attention_cpu.register(path, target="jaxalign_attention_narrow_test")
    q, k, v, mask, do = _operands(2, 21, 21, 4, 2, 32, seed=5, mask_kind="random")

    def run(target):
        f = lambda q, k, v: jnp.sum(attention_cpu.attention(q, k, v, mask, scale=0.2, target=target) * do)
        return jax.value_and_grad(f, argnums=(0, 1, 2))(q, k, v)

    (l1, g1), (l2, g2) = run(attention_cpu.TARGET), run("jaxalign_attention_narrow_test")
    np.testing.assert_allclose(float(l1), float(l2), rtol=1e-5)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("t,want", [(192, (64, 128, 192)), (128, (64, 128)), (64, (64,)),
                                    (100, (56, 100)), (7, (7,)), (4096, (1024, 2048, 3072, 4096))])
def test_causal_blocks(t, want):
    assert causal_blocks(t) == want


def test_causal_attention_equals_the_full_computation(monkeypatch):
    """XLA's path (the kernel switched off) with causal key blocks: same output and gradients."""
    monkeypatch.setattr(attention_cpu, "usable", lambda *a: False)
    q, k, v, mask, do = _operands(2, 100, 100, 4, 2, 16, seed=7, mask_kind="random")

    def f(fn):
        return jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v, mask, scale=0.25,
                                                             dtype=jnp.float32) * do),
                                  argnums=(0, 1, 2))(q, k, v)

    (l1, g1), (l2, g2) = f(causal_attention), f(dot_product_attention)
    np.testing.assert_allclose(float(l1), float(l2), rtol=1e-5)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="same 100 slots"):
        causal_attention(q, k[:, :50], v[:, :50], mask[..., :50], scale=0.25, dtype=jnp.float32)


SCRIPT = """
import warnings, numpy as np, jax, jax.numpy as jnp
from jaxalign.models import attention_cpu
from jaxalign.models.layers import dot_product_attention
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    q = jnp.asarray(np.random.default_rng(0).standard_normal((1, 6, 2, 16)), jnp.float32)
    out = dot_product_attention(q, q, q, jnp.tril(jnp.ones((6, 6), bool))[None, None], scale=0.25,
                                dtype=jnp.float32)
text = jax.jit(lambda q: dot_product_attention(q, q, q, jnp.ones((1, 1, 6, 6), bool), scale=0.25,
                                               dtype=jnp.float32)).lower(q).as_text()
print(attention_cpu.available(), len(caught), "jaxalign_attention" in text,
      bool(np.isfinite(np.asarray(out)).all()), [str(c.message)[:200] for c in caught])
"""


@pytest.mark.parametrize("env,warned", CASES)
def test_fallback_without_the_kernel(tmp_path, env, warned):
    line = last_line(SCRIPT, tmp_path, env)
    assert line.startswith(f"False {warned} False True"), line
    if warned:
        assert "no-such-compiler" in line and "XLA's matmuls" in line


def test_rope_inside_the_kernel_equals_rotating_first():
    """attention(q, k, v, rope=...) == attention(apply_rope(q), apply_rope(k), v), values and the
    gradients of the unrotated q and k; rope needs self-attention."""
    from jaxalign.models.layers import apply_rope, rope_tables

    q, k, v, mask, do = _operands(2, 37, 37, 4, 2, 32, seed=11, mask_kind="random")
    positions = jnp.asarray(np.random.default_rng(0).integers(0, 50, (2, 37)))
    rope = rope_tables(positions, 1.0 / (10000.0 ** (np.arange(0, 32, 2) / 32)), jnp.float32)

    def fused(q, k, v):
        return jnp.sum(attention_cpu.attention(q, k, v, mask, scale=0.2, rope=rope) * do)

    def rotated(q, k, v):
        return jnp.sum(_reference(apply_rope(q, rope), apply_rope(k, rope), v, mask, 0.2) * do)

    (l1, g1), (l2, g2) = (jax.value_and_grad(f, argnums=(0, 1, 2))(q, k, v) for f in (fused, rotated))
    np.testing.assert_allclose(float(l1), float(l2), rtol=1e-5)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="S = T"):
        attention_cpu.attention(q[:, :5], k, v, mask[:, :, :5], scale=0.2, rope=rope)
