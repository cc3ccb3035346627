"""quantize_params / dequantize_params / bits_per_parameter on a llama-like params tree."""

import bitsandbytes.functional as bnbF
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxalign.quant import (
    NF4Tensor,
    bits_per_parameter,
    dequantize_nf4,
    dequantize_params,
    quantize_params,
)


def tree(d_model=64, d_ff=128, vocab=50, layers=2, dtype=jnp.float32):
    rng = np.random.default_rng(0)

    def normal(*shape):  # numpy, so building the tree compiles nothing
        return jnp.asarray(rng.standard_normal(shape).astype(jnp.dtype(dtype)))

    def dense(i, o, bias=False):
        p = {"kernel": normal(i, o)}
        if bias:
            p["bias"] = jnp.zeros((o,), dtype)
        return p

    params = {"embed_tokens": {"embedding": normal(vocab, d_model)},
              "norm": {"scale": jnp.ones((d_model,), dtype)},
              "lm_head": dense(d_model, vocab)}
    for layer in range(layers):
        params[f"layers_{layer}"] = {
            "attn": {name: dense(d_model, d_model, bias=name == "q_proj")
                     for name in ("q_proj", "k_proj", "v_proj", "o_proj")},
            "mlp": {"gate_proj": dense(d_model, d_ff), "up_proj": dense(d_model, d_ff),
                    "down_proj": dense(d_ff, d_model)},
            "input_norm": {"scale": jnp.ones((d_model,), dtype)},
        }
    return params


def is_nf4(x):
    return isinstance(x, NF4Tensor)


def test_default_targets_quantize_dense_kernels_only():
    params = tree()
    q = quantize_params(params)
    for layer in ("layers_0", "layers_1"):
        for group, names in (("attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                             ("mlp", ("gate_proj", "up_proj", "down_proj"))):
            for name in names:
                leaf = q[layer][group][name]["kernel"]
                assert is_nf4(leaf) and leaf.transposed and leaf.double_quant
                assert leaf.shape == params[layer][group][name]["kernel"].shape
    assert q["layers_0"]["attn"]["q_proj"]["bias"] is params["layers_0"]["attn"]["q_proj"]["bias"]
    for path in (("lm_head", "kernel"), ("embed_tokens", "embedding"), ("norm", "scale"),
                 ("layers_1", "input_norm", "scale")):
        a, b = q, params
        for k in path:
            a, b = a[k], b[k]
        assert a is b, path
    # Bytes equal bitsandbytes quantizing the PyTorch weight (the transposed kernel).
    kernel = np.asarray(params["layers_1"]["mlp"]["down_proj"]["kernel"])
    packed, state = bnbF.quantize_4bit(torch.from_numpy(kernel.T.copy()), blocksize=64,
                                       quant_type="nf4", compress_statistics=True)
    leaf = q["layers_1"]["mlp"]["down_proj"]["kernel"]
    assert np.asarray(leaf.codes).tobytes() == packed.numpy().tobytes()
    assert np.asarray(leaf.absmax).tobytes() == state.absmax.numpy().tobytes()
    assert np.asarray(leaf.nested_absmax).tobytes() == state.state2.absmax.numpy().tobytes()
    # Idempotent: already-quantized leaves are kept as they are.
    again = quantize_params(q)
    kept = again["layers_0"]["attn"]["q_proj"]["kernel"]
    assert kept is q["layers_0"]["attn"]["q_proj"]["kernel"]


def test_dequantize_params_restores_structure_and_values():
    params = tree(dtype=jnp.bfloat16)
    q = quantize_params(params, block_size=32, double_quant=False)
    dense = dequantize_params(q)
    assert jax.tree_util.tree_structure(dense) == jax.tree_util.tree_structure(params)
    for a, b in zip(jax.tree_util.tree_leaves(dense), jax.tree_util.tree_leaves(params)):
        assert a.shape == b.shape and a.dtype == b.dtype
    leaf = q["layers_0"]["attn"]["k_proj"]["kernel"]
    np.testing.assert_array_equal(np.asarray(dense["layers_0"]["attn"]["k_proj"]["kernel"]),
                                  np.asarray(dequantize_nf4(leaf, jnp.bfloat16)))
    fp32 = dequantize_params(q, jnp.float32)
    assert fp32["layers_0"]["attn"]["k_proj"]["kernel"].dtype == jnp.float32
    assert fp32["norm"]["scale"].dtype == jnp.bfloat16  # unquantized leaves are untouched
    # Quantization error is bounded by the block absmax times half the widest NF4 gap (0.1385).
    kernel = np.asarray(params["layers_0"]["attn"]["k_proj"]["kernel"], np.float32)
    err = np.abs(np.asarray(fp32["layers_0"]["attn"]["k_proj"]["kernel"]) - kernel)
    assert err.max() <= 0.1386 * np.abs(kernel).max()


def test_custom_targets_and_errors():
    params = tree(layers=1)
    q = quantize_params(params, targets=r"attn/(q|v)_proj")
    assert is_nf4(q["layers_0"]["attn"]["q_proj"]["kernel"])
    assert is_nf4(q["layers_0"]["attn"]["v_proj"]["kernel"])
    assert not is_nf4(q["layers_0"]["attn"]["k_proj"]["kernel"])
    assert not is_nf4(q["layers_0"]["mlp"]["up_proj"]["kernel"])
    with pytest.raises(ValueError, match="matched no kernel"):
        quantize_params(params, targets="qproj")
    bad = dict(params, experts={"kernel": jnp.ones((2, 64, 64))})
    with pytest.raises(ValueError, match=r"'experts/kernel' with shape \(2, 64, 64\)"):
        quantize_params(bad)
    with pytest.raises(ValueError, match="block_size"):
        quantize_params(params, block_size=100)
    with pytest.raises(ValueError, match="no NF4Tensor"):
        bits_per_parameter(params)


def test_bits_per_parameter():
    # Two [1024, 1024] kernels: 16384 absmax blocks each -> 64 nested blocks and one offset.
    params = {"a": {"kernel": jnp.ones((1024, 1024))}, "b": {"kernel": -jnp.ones((1024, 1024))},
              "lm_head": {"kernel": jnp.ones((1024, 8))}}
    q = quantize_params(params)
    bpp = bits_per_parameter(q)
    n = 1024 * 1024
    assert bpp == (4 * n + 8 * (n // 64) + 32 * (n // 64 // 256) + 32) / n
    print(f"NF4 + double quant, block 64: {bpp:.6f} bits per parameter")
    assert bpp <= 4.127
    plain = quantize_params(params, double_quant=False)
    assert bits_per_parameter(plain) == 4 + 32 / 64


def test_quantized_tree_flows_through_jit():
    params = tree(layers=1)
    q = quantize_params(params)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 64)), jnp.float32)

    @jax.jit
    def mlp(p, x):
        dense = dequantize_params(p)["layers_0"]["mlp"]
        h = jax.nn.silu(x @ dense["gate_proj"]["kernel"]) * (x @ dense["up_proj"]["kernel"])
        return h @ dense["down_proj"]["kernel"]

    ref = mlp(dequantize_params(q), x)
    np.testing.assert_allclose(np.asarray(mlp(q, x)), np.asarray(ref), rtol=1e-6, atol=1e-6)
    grads = jax.grad(lambda x: mlp(q, x).sum())(x)  # frozen NF4 base, gradients w.r.t. inputs
    assert grads.shape == x.shape and np.isfinite(np.asarray(grads)).all()
