"""Per-token and per-sequence log-probabilities, in fp32, with masking.

`labels` are the next tokens aligned with `logits` (the caller shifts: logits[:, :-1] against
tokens[:, 1:]). Masked positions contribute exactly 0 and any label value there (e.g. -100) is
ignored. Two memory-saving paths never build the full [B, T, V] fp32 log-softmax:

* `vocab_chunk=C` on `token_logps`: the logsumexp over V is accumulated C columns at a time (in
  fp32) from logits that stay in their own (e.g. bf16) dtype.
* `token_logps_from_hidden`: from the final hidden states and the LM-head kernel; logits are
  produced C vocabulary columns at a time and recomputed in the backward pass
  (`jax.checkpoint`), so neither [B, T, V] logits nor their fp32 log-softmax ever exist.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _check(logits_or_hidden_shape, labels, mask, name):
    b_t = tuple(logits_or_hidden_shape[:2])
    if len(logits_or_hidden_shape) != 3:
        raise ValueError(f"{name}: expected [B, T, V/D] input, got shape {tuple(logits_or_hidden_shape)}")
    if tuple(labels.shape) != b_t:
        raise ValueError(f"{name}: `labels` has shape {tuple(labels.shape)}, expected {b_t}")
    if mask is not None and tuple(mask.shape) != b_t:
        raise ValueError(f"{name}: `mask` has shape {tuple(mask.shape)}, expected {b_t}")


def _chunked_logsumexp(get_chunk, num_full: int, chunk: int, rem_chunk=None):
    """logsumexp over the vocabulary accumulated chunk by chunk; get_chunk(i) -> fp32 [B, T, C]."""

    @jax.checkpoint
    def body(carry, i):
        m, s = carry
        x = get_chunk(i)
        m_new = jnp.maximum(m, x.max(-1))
        s = s * jnp.exp(m - m_new) + jnp.exp(x - m_new[..., None]).sum(-1)
        return (m_new, s), None

    x0 = get_chunk(0)
    m0 = x0.max(-1)
    s0 = jnp.exp(x0 - m0[..., None]).sum(-1)
    (m, s), _ = jax.lax.scan(body, (m0, s0), jnp.arange(1, num_full))
    if rem_chunk is not None:
        x = rem_chunk()
        m_new = jnp.maximum(m, x.max(-1))
        s = s * jnp.exp(m - m_new) + jnp.exp(x - m_new[..., None]).sum(-1)
        m = m_new
    return m + jnp.log(s)


def token_logps(logits, labels, mask=None, *, vocab_chunk: int | None = None):
    """log softmax(logits)[labels] per token, fp32.

    Args:
      logits: [B, T, V] any float dtype.
      labels: int [B, T].
      mask: [B, T] (bool/0-1) or None; masked positions return exactly 0.
      vocab_chunk: if set, accumulate the logsumexp `vocab_chunk` columns at a time.
    Returns: [B, T] fp32.
    """
    _check(logits.shape, labels, mask, "token_logps")
    v = logits.shape[-1]
    safe = jnp.clip(labels, 0, v - 1).astype(jnp.int32)
    picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0].astype(jnp.float32)
    if vocab_chunk is None or vocab_chunk >= v:
        lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    else:
        c = int(vocab_chunk)
        n = v // c
        get = lambda i: jax.lax.dynamic_slice_in_dim(logits, i * c, c, axis=-1).astype(jnp.float32)
        rem = (lambda: logits[..., n * c:].astype(jnp.float32)) if v % c else None
        lse = _chunked_logsumexp(get, n, c, rem)
    out = picked - lse
    if mask is not None:
        out = jnp.where(mask.astype(bool), out, 0.0)
    return out


def token_logps_from_hidden(hidden, kernel, labels, mask=None, *, vocab_chunk: int = 4096,
                            compute_dtype=None):
    """Token log-probs from final hidden states and the LM-head kernel, chunked over the vocabulary.

    Args:
      hidden: [B, T, D] final (normed) hidden states (`model.apply(..., return_hidden=True)`).
      kernel: [D, V] LM-head kernel (the embedding transposed when tied).
      labels: int [B, T]; mask: [B, T] or None.
      vocab_chunk: columns per chunk (peak extra memory ~ B*T*vocab_chunk fp32).
      compute_dtype: matmul dtype (default: hidden's); accumulation is fp32.
    Returns: [B, T] fp32, masked positions exactly 0.
    """
    _check(hidden.shape, labels, mask, "token_logps_from_hidden")
    d, v = kernel.shape
    if hidden.shape[-1] != d:
        raise ValueError(f"token_logps_from_hidden: hidden has D={hidden.shape[-1]} but kernel is {kernel.shape}")
    dt = compute_dtype or hidden.dtype
    h = hidden.astype(dt)
    k = kernel.astype(dt)
    safe = jnp.clip(labels, 0, v - 1).astype(jnp.int32)
    cols = jnp.take(k, safe, axis=1)  # [D, B, T]
    picked = jnp.einsum("btd,dbt->bt", h, cols, preferred_element_type=jnp.float32)
    c = min(int(vocab_chunk), v)
    n = v // c
    mm = lambda w: jnp.einsum("btd,dc->btc", h, w, preferred_element_type=jnp.float32)
    get = lambda i: mm(jax.lax.dynamic_slice_in_dim(k, i * c, c, axis=1))
    rem = (lambda: mm(k[:, n * c:])) if v % c else None
    lse = _chunked_logsumexp(get, n, c, rem)
    out = picked - lse
    if mask is not None:
        out = jnp.where(mask.astype(bool), out, 0.0)
    return out


def sequence_logps(logits, labels, mask, *, average: bool = False, vocab_chunk: int | None = None):
    """Sum (or mean, with `average`) of token log-probs over `mask`. Returns [B] fp32.

    A row with an empty mask gives 0 (not NaN) in both modes.
    """
    if mask is None:
        raise ValueError("sequence_logps: `mask` is required (use jnp.ones_like(labels) for all tokens)")
    tok = token_logps(logits, labels, mask, vocab_chunk=vocab_chunk)
    return reduce_sequence(tok, mask, average=average)


def reduce_sequence(token_values, mask, *, average: bool = False):
    """Masked sum or mean over the last axis of [B, T] values; empty rows give 0."""
    m = mask.astype(jnp.float32)
    total = jnp.sum(jnp.where(m > 0, token_values.astype(jnp.float32), 0.0), axis=-1)
    if not average:
        return total
    return total / jnp.maximum(m.sum(-1), 1.0)


def shift_for_next_token(tokens, loss_mask):
    """(labels [B, T-1], mask [B, T-1]) for logits[:, :-1] from tokens/loss_mask aligned with the
    input (loss_mask[b, t] = 1 iff token t must be predicted)."""
    return tokens[:, 1:], loss_mask[:, 1:]
