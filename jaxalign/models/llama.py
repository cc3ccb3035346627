"""Llama-family decoder (Llama 2/3 incl. llama3 rope scaling, Mistral, Qwen2, Qwen3) in flax.linen.

Parameter tree (mirrors Hugging Face module names so the checkpoint mapping is mechanical):
  embed_tokens/embedding [V, D]
  layers_{i}/input_layernorm/scale [D]
  layers_{i}/attn/{q_proj,k_proj,v_proj,o_proj}/{kernel [in, out], bias}
  layers_{i}/attn/{q_norm,k_norm}/scale [head_dim]          (Qwen3)
  layers_{i}/post_attention_layernorm/scale [D]
  layers_{i}/mlp/{gate_proj,up_proj,down_proj}/kernel
  norm/scale [D]
  lm_head/kernel [D, V]                                       (absent when embeddings are tied)
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxalign.models import attention_cpu
from jaxalign.models.config import LlamaConfig
from jaxalign.models.remat import dropout_rng, remat_call
from jaxalign.models.layers import (
    Linear, RMSNorm, apply_rope, causal_attention, dot_product_attention, prepare_inputs,
    rope_inv_freq, rope_tables, select_positions,
)

Dtype = Any


class Attention(nn.Module):
    config: LlamaConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    lora: Any = None

    @nn.compact
    def __call__(self, x, rope, mask, layer_cache, write_index, deterministic):
        c = self.config
        b, t, _ = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, lora=self.lora)
        q = Linear(c.num_attention_heads * c.head_dim, use_bias=c.attention_bias,
                   kernel_axes=("embed", "heads"), name="q_proj", **kw)(x, deterministic=deterministic)
        k = Linear(c.num_key_value_heads * c.head_dim, use_bias=c.attention_bias,
                   kernel_axes=("embed", "kv"), name="k_proj", **kw)(x, deterministic=deterministic)
        v = Linear(c.num_key_value_heads * c.head_dim, use_bias=c.attention_bias,
                   kernel_axes=("embed", "kv"), name="v_proj", **kw)(x, deterministic=deterministic)
        q = q.reshape(b, t, c.num_attention_heads, c.head_dim)
        k = k.reshape(b, t, c.num_key_value_heads, c.head_dim)
        v = v.reshape(b, t, c.num_key_value_heads, c.head_dim)
        if c.qk_norm:
            norm_kw = dict(eps=c.rms_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                           axis_name="head_dim")
            q = RMSNorm(name="q_norm", **norm_kw)(q)
            k = RMSNorm(name="k_norm", **norm_kw)(k)
        scale = c.head_dim ** -0.5
        new_cache = None
        if layer_cache is None and attention_cpu.usable(q, k, v, self.dtype):
            # the CPU kernel rotates q and k itself (no separate rope passes, forward or backward)
            out = attention_cpu.attention(q, k, v, mask, scale=scale, rope=rope)
        else:
            q = apply_rope(q, rope)
            k = apply_rope(k, rope)
            if layer_cache is not None:
                new_cache = {name: jax.lax.dynamic_update_slice(
                    layer_cache[name], x.astype(layer_cache[name].dtype), (0, write_index, 0, 0))
                    for name, x in (("k", k), ("v", v))}
                k, v = new_cache["k"].astype(self.dtype), new_cache["v"].astype(self.dtype)
            attend = dot_product_attention if layer_cache is not None else causal_attention
            out = attend(q, k, v, mask, scale=scale, dtype=self.dtype)
        out = out.reshape(b, t, c.num_attention_heads * c.head_dim)
        out = Linear(c.hidden_size, use_bias=c.o_proj_bias, kernel_axes=("heads", "embed"),
                     name="o_proj", **kw)(out, deterministic=deterministic)
        return out, new_cache


class MLP(nn.Module):
    config: LlamaConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    lora: Any = None

    @nn.compact
    def __call__(self, x, deterministic):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, lora=self.lora, use_bias=c.mlp_bias)
        gate = Linear(c.intermediate_size, kernel_axes=("embed", "mlp"), name="gate_proj", **kw)(
            x, deterministic=deterministic)
        up = Linear(c.intermediate_size, kernel_axes=("embed", "mlp"), name="up_proj", **kw)(
            x, deterministic=deterministic)
        return Linear(c.hidden_size, kernel_axes=("mlp", "embed"), name="down_proj", **kw)(
            nn.silu(gate) * up, deterministic=deterministic)


class Block(nn.Module):
    config: LlamaConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    lora: Any = None

    @nn.compact
    def __call__(self, x, rope, mask, layer_cache, write_index, deterministic):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = RMSNorm(eps=c.rms_norm_eps, name="input_layernorm", **kw)(x)
        h, new_cache = Attention(c, lora=self.lora, name="attn", **kw)(
            h, rope, mask, layer_cache, write_index, deterministic)
        x = x + h
        h = RMSNorm(eps=c.rms_norm_eps, name="post_attention_layernorm", **kw)(x)
        x = x + MLP(c, lora=self.lora, name="mlp", **kw)(h, deterministic)
        return x, new_cache


class LlamaForCausalLM(nn.Module):
    """Causal LM. `apply({'params': p[, 'lora': adapters]}, tokens, ...)`.

    Args (call):
      tokens: int [B, T].
      attention_mask: [B, T], 1 for real tokens (left or right padding); default all ones.
      positions: int [B, T] rope positions; default cumsum(attention_mask) - 1.
      cache: optional KV cache from `init_cache`; then returns (logits, new_cache).
      return_hidden: return the final normed hidden states [B, T, D] instead of logits (for the
        vocabulary-chunked log-prob path).
      logits_at: only these positions get the final norm and LM head: int [B, K] (per row, e.g.
        the positions whose next token carries a loss) or a Python slice of the time axis;
        the output is then [B, K, V] (or [B, K, D]). Skips the LM head where no loss needs it.
      segment_ids: int [B, T], several continuations of one shared prefix packed in a row
        (segment 0 = the prefix; `layers.prepare_inputs`); positions then default to each
        token's position in its own unpacked sequence. Not with a cache.
    Returns logits [B, T, V] in `dtype` (or hidden states).
    """

    config: LlamaConfig
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
            tokens, attention_mask, positions, cache, sliding_window=c.sliding_window,
            segment_ids=segment_ids)

        embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                         embedding_init=nn.with_logical_partitioning(
                             nn.initializers.normal(0.02), ("vocab", "embed")),
                         name="embed_tokens")
        x = embed(tokens).astype(self.dtype)
        rope = rope_tables(positions, rope_inv_freq(c.head_dim, c.rope), self.dtype)
        # remat (training, no cache): recompute each block in the backward pass (models/remat.py)
        remat = self.remat and cache is None and not self.is_initializing()
        new_cache = {}
        for i in range(c.num_hidden_layers):
            kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, lora=self.lora)
            if remat:
                x = remat_call(self, Block(c, **kw, parent=None), f"layers_{i}", x, rope, mask,
                               static=(None, None, deterministic),
                               rng=dropout_rng(self, self.lora, deterministic))
                continue
            layer_cache = None if cache is None else cache[f"layers_{i}"]
            x, lc = Block(c, **kw, name=f"layers_{i}")(x, rope, mask, layer_cache, write_index,
                                                       deterministic)
            if cache is not None:
                new_cache[f"layers_{i}"] = lc
        x = select_positions(x, logits_at)
        x = RMSNorm(eps=c.rms_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name="norm")(x)
        if return_hidden:
            out = x
        elif c.tie_word_embeddings:
            out = embed.attend(x)
        else:
            out = Linear(c.vocab_size, kernel_axes=("embed", "vocab"), dtype=self.dtype,
                         param_dtype=self.param_dtype, name="lm_head")(x)
        if cache is None:
            return out
        new_cache.update(index=write_index + tokens.shape[1], valid=valid)
        return out, new_cache


def init_llama_cache(config: LlamaConfig, batch: int, max_length: int, dtype=jnp.float32):
    """An empty KV cache for `max_length` slots."""
    shape = (batch, max_length, config.num_key_value_heads, config.head_dim)
    cache = {f"layers_{i}": {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
             for i in range(config.num_hidden_layers)}
    cache.update(index=jnp.zeros((), jnp.int32), valid=jnp.zeros((batch, max_length), jnp.bool_))
    return cache
