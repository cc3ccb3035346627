"""Building blocks shared by the decoders: LoRA/NF4-aware Linear, RMSNorm, rotary embeddings,
and masked grouped-query attention.

Logical axis names (mapped to mesh axes in `jaxalign.sharding`):
  'vocab', 'embed', 'heads' (q/o projection width = heads * head_dim), 'kv' (k/v projection width),
  'mlp', 'norm'.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.fusion import computed_once
from jaxalign.models import attention_cpu

Dtype = Any


def _is_plain_array(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray)) or isinstance(x, jax.core.Tracer)


def materialize_kernel(kernel, dtype):
    """Returns the kernel as a dense array of `dtype`; NF4Tensor leaves are dequantised here,
    inside the caller's jit, so XLA fuses the dequantisation into the matmul's producer."""
    if _is_plain_array(kernel):
        return jnp.asarray(kernel, dtype)
    from jaxalign.quant.nf4 import NF4Tensor, dequantize_nf4  # lazy: only QLoRA needs it

    if isinstance(kernel, NF4Tensor):
        return dequantize_nf4(kernel, dtype)
    raise TypeError(f"unsupported kernel leaf of type {type(kernel).__name__}")


class Linear(nn.Module):
    """y = x W (+ b) (+ s * dropout(x) A B).

    The kernel W [in, out] may be an NF4Tensor (QLoRA). LoRA factors are read from the 'lora'
    variable collection (`lora_a` [in, r], `lora_b` [r, out]) when present, so the same module
    runs with or without an adapter: calling without the 'lora' collection *is* the reference
    model. `W + BA` is never materialised.
    """

    features: int
    use_bias: bool = False
    kernel_axes: tuple[str | None, str | None] = ("embed", "mlp")
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    lora: Any = None  # LoraSpec | None: static scale/dropout settings for adapters
    init_std: float = 0.02

    @nn.compact
    def __call__(self, x, *, deterministic: bool = True):
        in_features = x.shape[-1]
        if self.has_variable("params", "kernel") and not self.is_initializing():
            kernel = self.get_variable("params", "kernel")
        else:
            kernel = self.param(
                "kernel",
                nn.with_logical_partitioning(nn.initializers.normal(self.init_std), self.kernel_axes),
                (in_features, self.features),
                self.param_dtype,
            )
        if tuple(kernel.shape) != (in_features, self.features):
            raise ValueError(
                f"{'/'.join(self.path)}: kernel has shape {tuple(kernel.shape)}, expected "
                f"{(in_features, self.features)}"
            )
        lead = x.shape[:-1]
        # one 2-D matmul: on XLA:CPU its backward needs no transposes around the weight-gradient
        # dot, unlike the [B, T, in] dot_general (DPO step timings: benchmarks/RESULTS.md)
        x = x.astype(self.dtype).reshape(-1, in_features)
        if _is_plain_array(kernel):
            y = x @ jnp.asarray(kernel, self.dtype)
        else:  # NF4 (QLoRA): dequantised inside the jit, one layer at a time, fwd and bwd
            from jaxalign.quant.nf4 import NF4Tensor
            from jaxalign.quant.nf4_matmul import nf4_matmul

            if not isinstance(kernel, NF4Tensor):
                raise TypeError(f"{'/'.join(self.path)}: unsupported kernel leaf of type "
                                f"{type(kernel).__name__}")
            y = nf4_matmul(x, kernel)
        if self.use_bias:
            b = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros, (self.kernel_axes[1],)),
                (self.features,),
                self.param_dtype,
            )
            y = y + jnp.asarray(b, self.dtype)
        if self.has_variable("lora", "lora_a"):
            a = self.get_variable("lora", "lora_a")
            b = self.get_variable("lora", "lora_b")
            path = "/".join(self.path)
            if self.lora is None:
                raise ValueError(
                    f"{path}: LoRA factors were passed in the 'lora' collection but the model has "
                    "no LoraSpec; build the model with `model.clone(lora=spec)`"
                )
            scale = self.lora.scale(path, a.shape[-1])
            h = x
            if self.lora.dropout > 0.0 and not deterministic:
                h = nn.Dropout(rate=self.lora.dropout)(h, deterministic=False)
            y = y + ((h @ a.astype(self.dtype)) @ b.astype(self.dtype)) * jnp.asarray(scale, self.dtype)
        return y.reshape(*lead, self.features)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * w, computed in fp32 and cast back (as Hugging Face Llama)."""

    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    axis_name: str = "norm"

    @nn.compact
    def __call__(self, x):
        w = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
            (x.shape[-1],), self.param_dtype,
        )
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (jnp.asarray(w, self.dtype) * x32.astype(self.dtype)).astype(self.dtype)


def rope_inv_freq(head_dim: int, rope) -> np.ndarray:
    """Inverse frequencies [head_dim/2] for rope_type default / linear / llama3 (Llama 3.1)."""
    inv = 1.0 / (rope.theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if rope.rope_type == "linear":
        inv = inv / rope.factor
    elif rope.rope_type == "llama3":
        old = rope.original_max_position_embeddings
        low_wl = old / rope.low_freq_factor
        high_wl = old / rope.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wl, inv / rope.factor, inv)
        smooth = (old / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def rope_tables(positions, inv_freq, dtype):
    """(cos, sin), each [B, T, 1, D], for rope positions [B, T] (Hugging Face's rotate_half layout).

    Computed once per forward pass and shared by every layer, as its own computation
    (`jaxalign.fusion.computed_once`): fused into the layers, cos/sin were recomputed per element
    in every layer's q/k rotation, forward and backward.
    """

    def tables(pos):
        freqs = pos.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
        emb = jnp.concatenate([freqs, freqs], axis=-1)  # [B, T, D]
        return (jnp.cos(emb)[:, :, None, :].astype(dtype), jnp.sin(emb)[:, :, None, :].astype(dtype))

    return computed_once(tables, positions)


def apply_rope(x, rope):
    """Rotates x [B, T, H, D] by `rope` = (cos, sin) from `rope_tables`.

    Hugging Face's rotate_half: out = x * cos + concat(-x2, x1) * sin for halves x1, x2 of D. The
    halves are taken as a [2, D/2] view and swapped with a flip, the sign folded into sin: no
    concatenation, which XLA:CPU emits as a slow loop (forward and backward twice as fast).
    """
    cos, sin = rope
    half = x.shape[-1] // 2
    pairs = x.reshape(*x.shape[:-1], 2, half)
    c = cos[..., None, :half].astype(x.dtype)
    s = sin[..., None, :half].astype(x.dtype) * jnp.asarray([[-1.0], [1.0]], x.dtype)
    return (pairs * c + jnp.flip(pairs, axis=-2) * s).reshape(x.shape)


def attention_mask_4d(q_positions, kv_positions, kv_valid, *, sliding_window=None,
                      q_segments=None, kv_segments=None):
    """Boolean mask [B, 1, Tq, Tk]: causal by position, key padding, optional sliding window.

    q_positions [B, Tq] and kv_positions [B, Tk] are the sequence slots (not rope positions)
    of queries and keys; kv_valid [B, Tk] marks real (non-padding) keys. With segment ids
    (int [B, Tq] / [B, Tk]; see `prepare_inputs`), a query also needs its key in segment 0 (the
    shared prefix) or in its own segment.
    """
    q = q_positions[:, :, None]
    k = kv_positions[:, None, :]
    mask = (k <= q) & kv_valid[:, None, :]
    if q_segments is not None:
        ks = kv_segments[:, None, :]
        mask = mask & ((ks == 0) | (ks == q_segments[:, :, None]))
    if sliding_window is not None:
        mask = mask & (q - k < sliding_window)
    return mask[:, None, :, :]


def dot_product_attention(q, k, v, mask, *, scale, dtype, query_blocks=None):
    """Grouped-query attention. q [B, T, H, D], k/v [B, S, KVH, D], mask [B, 1, T, S] -> [B, T, H, D].

    Logits and softmax in fp32; query rows with no valid key (padding) return zeros. In fp32 on a
    single-device CPU the fused kernel `jaxalign.models.attention_cpu` computes it (same result;
    it skips every key tile the mask hides from a block of queries). Otherwise XLA's matmuls:
    the G = H/KVH query heads sharing a key head are stacked along the query axis, so both
    products are plain batched matmuls over (B, KVH) ([G*T, D] x [D, S] and [G*T, S] x [S, D])
    rather than contractions of a 5-D layout, which XLA:CPU surrounds with transposes.

    query_blocks: optional increasing ends of query blocks (the last = T). Query block
    [ends[i-1], ends[i]) is scored against keys [0, ends[i]) only; the caller guarantees the mask
    is False beyond (causal self-attention: `causal_attention`). The head-major transposes are
    done once, outside the blocks.
    """
    if attention_cpu.usable(q, k, v, dtype):
        return attention_cpu.attention(q, k, v, mask, scale=scale)
    b, t, h, d = q.shape
    s, kvh = k.shape[1], k.shape[2]
    g = h // kvh
    qh = q.reshape(b, t, kvh, g, d).transpose(0, 2, 3, 1, 4)  # [B, KVH, G, T, D]
    kh = k.transpose(0, 2, 1, 3)  # [B, KVH, S, D]
    vh = v.astype(dtype).transpose(0, 2, 1, 3)
    ends = tuple(query_blocks) if query_blocks else (t,)
    if ends[-1] != t or any(e1 <= e0 for e0, e1 in zip((0,) + ends, ends)) or ends[-1] > s:
        raise ValueError(f"query_blocks: expected increasing ends up to T={t} (keys: {s}), "
                         f"got {ends}")
    parts, start = [], 0
    for end in ends:
        stop = s if len(ends) == 1 else end
        parts.append(_attend(qh[:, :, :, start:end], kh[:, :, :stop], vh[:, :, :stop],
                             mask[:, :, start:end, :stop], scale=scale, dtype=dtype))
        start = end
    out = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=3)  # [B, KVH, G, T, D]
    out = out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)
    # rows with no valid key (e.g. left padding) averaged v uniformly: zero them on the output,
    # D values per row instead of S probabilities
    return jnp.where(jnp.any(mask, axis=-1)[:, 0, :, None, None], out, jnp.zeros((), out.dtype))


def _attend(qh, kh, vh, mask, *, scale, dtype):
    """qh [B, KVH, G, T, D], kh/vh [B, KVH, S, D], mask [B, 1, T, S] -> [B, KVH, G, T, D]."""
    b, kvh, g, t, d = qh.shape
    s = kh.shape[2]
    logits = jnp.einsum("bkqd,bksd->bkqs", qh.reshape(b, kvh, g * t, d), kh,
                        preferred_element_type=jnp.float32) * scale
    logits = logits.reshape(b, kvh, g, t, s)
    logits = jnp.where(mask[:, :, None, :, :], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(dtype).reshape(b, kvh, g * t, s)
    return jnp.einsum("bkqs,bksd->bkqd", probs, vh).reshape(b, kvh, g, t, d)


def causal_blocks(t: int, *, block: int = 64, max_blocks: int = 4) -> tuple[int, ...]:
    """Ends of the query blocks `causal_attention` splits t positions into: ceil(t / block)
    blocks, at most `max_blocks`, of near-equal length (multiples of 8 but the last). Query block
    i attends to keys [0, ends[i]); with n equal blocks that is (n + 1) / 2n of the t x t scores."""
    n = max(1, min(max_blocks, -(-t // block)))
    return tuple(sorted({min(t, -(-(t * (i + 1) // n) // 8) * 8) for i in range(n)} | {t}))


def causal_attention(q, k, v, mask, *, scale, dtype):
    """`dot_product_attention` for self-attention without a cache: q and k/v hold the same T
    slots and the mask is causal by slot (as `prepare_inputs` makes it without a cache), so no
    query sees a later key. Each query block (`causal_blocks`) is scored against the keys up to
    its own end only, skipping score blocks above the diagonal that the mask would zero: at
    T = 192, 6 of 9 blocks. Same result. q [B, T, H, D], k/v [B, T, KVH, D], mask [B, 1, T, T]."""
    t = q.shape[1]
    if k.shape[1] != t or tuple(mask.shape[-2:]) != (t, t):
        raise ValueError(f"causal_attention: expected self-attention over the same {t} slots, got "
                         f"{k.shape[1]} keys and mask {tuple(mask.shape)}")
    return dot_product_attention(q, k, v, mask, scale=scale, dtype=dtype,
                                 query_blocks=causal_blocks(t))


def select_positions(x, logits_at):
    """x [B, T, D] at `logits_at`: a Python slice of the time axis, or int positions [B, K]
    (one row of positions per sequence) -> [B, K, D]. None returns x unchanged."""
    if logits_at is None:
        return x
    if isinstance(logits_at, slice):
        return x[:, logits_at]
    idx = jnp.asarray(logits_at)
    if idx.ndim != 2 or idx.shape[0] != x.shape[0] or not jnp.issubdtype(idx.dtype, jnp.integer):
        raise ValueError(f"logits_at: expected int positions [B={x.shape[0]}, K] or a slice, got "
                         f"{idx.dtype} {tuple(idx.shape)}")
    return jnp.take_along_axis(x, idx[:, :, None], axis=1)


def default_positions(attention_mask):
    """Rope positions from a padding mask [B, T]: cumsum - 1 over real tokens, 0 on padding.
    Works for left and right padding."""
    am = attention_mask.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(am, axis=-1) - 1, 0)


def prepare_inputs(tokens, attention_mask, positions, cache, *, sliding_window=None,
                   segment_ids=None):
    """Shared decoder preamble: (write_index, valid [B, S], positions [B, T], mask [B, 1, T, S]).

    Without a cache, keys are the T input slots; with one, the T new tokens are written at
    `cache['index']` and attend over all S cache slots that hold real tokens.

    segment_ids int [B, T] (no cache) packs several sequences that share a prefix into one row:
    segment 0 is the shared prefix, each other id one continuation placed after it (and after the
    continuations before it). A token attends to the earlier real tokens of segment 0 and of its
    own segment, and its default position counts exactly those tokens, so every continuation
    sees what it would see alone after the prefix (prefix sharing: `jaxalign.data.prefix_sharing`).
    """
    b, t = tokens.shape
    if attention_mask is None:
        attention_mask = jnp.ones((b, t), jnp.bool_)
    attention_mask = attention_mask.astype(jnp.bool_)
    if segment_ids is not None:
        if cache is not None:
            raise ValueError("segment_ids (packed continuations of a shared prefix) are for "
                             "training forwards; they cannot be combined with a KV cache")
        if tuple(segment_ids.shape) != (b, t):
            raise ValueError(f"segment_ids: expected shape {(b, t)} like tokens, got "
                             f"{tuple(segment_ids.shape)}")
        slots = jnp.broadcast_to(jnp.arange(t), (b, t))
        mask = attention_mask_4d(slots, slots, attention_mask, q_segments=segment_ids,
                                 kv_segments=segment_ids)
        if positions is None:  # the real tokens each query sees, itself included, minus one
            positions = jnp.maximum(mask[:, 0].astype(jnp.int32).sum(-1) - 1, 0)
        if sliding_window is not None:  # the window counts tokens of the unpacked sequence
            mask = mask & ((positions[:, :, None] - positions[:, None, :]) < sliding_window)[:, None]
        return 0, attention_mask, positions, mask
    if cache is None:
        write_index = 0
        valid = attention_mask
        q_slots = jnp.broadcast_to(jnp.arange(t), (b, t))
        kv_slots = q_slots
    else:
        write_index = cache["index"]
        valid = jax.lax.dynamic_update_slice(cache["valid"], attention_mask, (0, write_index))
        q_slots = jnp.broadcast_to(write_index + jnp.arange(t), (b, t))
        kv_slots = jnp.broadcast_to(jnp.arange(valid.shape[1]), valid.shape)
    if positions is None:
        positions = jnp.take_along_axis(default_positions(valid), q_slots, axis=1)
    mask = attention_mask_4d(q_slots, kv_slots, valid, sliding_window=sliding_window)
    return write_index, valid, positions, mask
