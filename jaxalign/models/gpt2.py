"""GPT-2 decoder in flax.linen, with the same call signature as the Llama family.

Parameter tree: wte/embedding [V, D], wpe/embedding [P, D],
  layers_{i}/{ln_1,ln_2}/{scale,bias}, layers_{i}/attn/{c_attn,c_proj}/{kernel,bias},
  layers_{i}/mlp/{c_fc,c_proj}/{kernel,bias}, ln_f/{scale,bias}. The LM head is tied to wte.
Hugging Face's Conv1D weights are already [in, out], so kernels map without a transpose.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxalign.models.config import GPT2Config
from jaxalign.models.remat import dropout_rng, remat_call
from jaxalign.models.layers import (
    Linear, causal_attention, dot_product_attention, prepare_inputs, select_positions,
)

Dtype = Any


def _act(name):
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return lambda x: jax.nn.gelu(x, approximate=True)
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    return jax.nn.relu


class LayerNorm(nn.Module):
    eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (d,), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
                          (d,), self.param_dtype)
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * jnp.asarray(scale, jnp.float32) + jnp.asarray(bias, jnp.float32)).astype(self.dtype)


class GPT2Attention(nn.Module):
    config: GPT2Config
    layer_idx: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    lora: Any = None

    @nn.compact
    def __call__(self, h, mask, layer_cache, write_index, deterministic):
        c = self.config
        b, t, d = h.shape
        hd = d // c.n_head
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, lora=self.lora, use_bias=True)
        qkv = Linear(3 * d, kernel_axes=("embed", "heads"), name="c_attn", **kw)(
            h, deterministic=deterministic)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        q, k, v = (a.reshape(b, t, c.n_head, hd) for a in (q, k, v))
        new_cache = None
        if layer_cache is not None:
            k = jax.lax.dynamic_update_slice(layer_cache["k"], k.astype(layer_cache["k"].dtype),
                                             (0, write_index, 0, 0))
            v = jax.lax.dynamic_update_slice(layer_cache["v"], v.astype(layer_cache["v"].dtype),
                                             (0, write_index, 0, 0))
            new_cache = {"k": k, "v": v}
        scale = (hd ** -0.5) if c.scale_attn_weights else 1.0
        if c.scale_attn_by_inverse_layer_idx:
            scale = scale / float(self.layer_idx + 1)
        attend = dot_product_attention if layer_cache is not None else causal_attention
        a = attend(q, k.astype(self.dtype), v.astype(self.dtype), mask, scale=scale, dtype=self.dtype)
        a = Linear(d, kernel_axes=("heads", "embed"), name="c_proj", **kw)(
            a.reshape(b, t, d), deterministic=deterministic)
        return a, new_cache


class GPT2MLP(nn.Module):
    config: GPT2Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    lora: Any = None

    @nn.compact
    def __call__(self, h, deterministic):
        c = self.config
        d = h.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, lora=self.lora, use_bias=True)
        h = Linear(c.n_inner or 4 * d, kernel_axes=("embed", "mlp"), name="c_fc", **kw)(
            h, deterministic=deterministic)
        h = _act(c.activation_function)(h)
        return Linear(d, kernel_axes=("mlp", "embed"), name="c_proj", **kw)(h, deterministic=deterministic)


class GPT2Block(nn.Module):
    config: GPT2Config
    layer_idx: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    lora: Any = None

    @nn.compact
    def __call__(self, x, mask, layer_cache, write_index, deterministic):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = LayerNorm(c.layer_norm_epsilon, name="ln_1", **kw)(x)
        a, new_cache = GPT2Attention(c, self.layer_idx, lora=self.lora, name="attn", **kw)(
            h, mask, layer_cache, write_index, deterministic)
        x = x + a
        h = LayerNorm(c.layer_norm_epsilon, name="ln_2", **kw)(x)
        return x + GPT2MLP(c, lora=self.lora, name="mlp", **kw)(h, deterministic), new_cache


class GPT2LMHeadModel(nn.Module):
    """GPT-2 causal LM; same call contract as `LlamaForCausalLM`."""

    config: GPT2Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    lora: Any = None
    remat: bool = False

    @nn.compact
    def __call__(self, tokens, *, attention_mask=None, positions=None, cache=None,
                 deterministic: bool = True, return_hidden: bool = False, logits_at=None,
                 segment_ids=None):
        c = self.config
        write_index, valid, positions, mask = prepare_inputs(
            tokens, attention_mask, positions, cache,
            segment_ids=segment_ids)
        emb_kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        wte = nn.Embed(c.vocab_size, c.n_embd, name="wte", embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(0.02), ("vocab", "embed")), **emb_kw)
        wpe = nn.Embed(c.n_positions, c.n_embd, name="wpe", embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(0.01), (None, "embed")), **emb_kw)
        x = (wte(tokens) + wpe(positions)).astype(self.dtype)
        # remat (training, no cache): recompute each block in the backward pass (models/remat.py)
        remat = self.remat and cache is None and not self.is_initializing()
        new_cache = {}
        for i in range(c.n_layer):
            kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, lora=self.lora)
            if remat:
                x = remat_call(self, GPT2Block(c, i, **kw, parent=None), f"layers_{i}", x, mask,
                               static=(None, None, deterministic),
                               rng=dropout_rng(self, self.lora, deterministic))
                continue
            lc = None if cache is None else cache[f"layers_{i}"]
            x, nc = GPT2Block(c, i, **kw, name=f"layers_{i}")(x, mask, lc, write_index, deterministic)
            if cache is not None:
                new_cache[f"layers_{i}"] = nc
        x = select_positions(x, logits_at)
        x = LayerNorm(c.layer_norm_epsilon, self.dtype, self.param_dtype, name="ln_f")(x)
        out = x if return_hidden else wte.attend(x)
        if cache is None:
            return out
        new_cache.update(index=write_index + tokens.shape[1], valid=valid)
        return out, new_cache


def init_gpt2_cache(config: GPT2Config, batch: int, max_length: int, dtype=jnp.float32):
    hd = config.n_embd // config.n_head
    shape = (batch, max_length, config.n_head, hd)
    cache = {f"layers_{i}": {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
             for i in range(config.n_layer)}
    cache.update(index=jnp.zeros((), jnp.int32), valid=jnp.zeros((batch, max_length), jnp.bool_))
    return cache
