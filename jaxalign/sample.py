"""Batched generation under jit with a KV cache.

`make_sampler(model, ...)` returns a jitted `sample(variables, prompt_tokens, prompt_mask, rng)`.
Prompts are left-padded [B, P]; the cache has P + max_new_tokens static slots; the decode loop is
a `jax.lax.while_loop` that stops as soon as every row has emitted EOS. `variables` is whatever
`model.apply` takes ({'params': p} or {'params': p, 'lora': adapters}; NF4 leaves work), so the
same sampler serves full, LoRA and QLoRA policies and sharded params.

Returned per-token log-probs are log softmax(logits / temperature)[token] (the distribution that
was sampled before top-k/top-p truncation, the convention of TRL/vLLM); at temperature 1 they
equal a teacher-forced forward pass.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from jaxalign.models import init_cache


def filter_logits(logits, *, top_k: int | None = None, top_p: float | None = None):
    """Masks logits [B, V] outside the top-k set and/or the top-p nucleus with -inf."""
    neg = jnp.finfo(logits.dtype).min
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if top_p is not None and top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly before each token
        keep_sorted = before < top_p  # always keeps the first token
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, neg)
    return logits


def _select(logits, rng, *, greedy, temperature, top_k, top_p):
    logits = logits.astype(jnp.float32)
    scaled = logits / (1.0 if greedy else temperature)
    logp_all = jax.nn.log_softmax(scaled, axis=-1)
    if greedy:
        tok = jnp.argmax(logits, axis=-1)
    else:
        tok = jax.random.categorical(rng, filter_logits(scaled, top_k=top_k, top_p=top_p), axis=-1)
    return tok.astype(jnp.int32), jnp.take_along_axis(logp_all, tok[:, None], axis=-1)[:, 0]


def make_sampler(model, *, max_new_tokens: int, eos_ids: int | Sequence[int], pad_id: int = 0,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 greedy: bool = False, cache_dtype: Any = None):
    """Returns jitted `sample(variables, prompt_tokens [B,P], prompt_mask [B,P], rng) -> dict` with
    `tokens` [B, N], `logps` [B, N] fp32, `mask` [B, N] (1 up to and including EOS), `lengths` [B]."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not greedy and temperature <= 0:
        raise ValueError(f"temperature must be > 0 (use greedy=True for argmax), got {temperature}")
    eos = jnp.asarray([eos_ids] if isinstance(eos_ids, int) else list(eos_ids), jnp.int32)
    pick = functools.partial(_select, greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p)

    @jax.jit
    def sample(variables, prompt_tokens, prompt_mask, rng):
        b, p = prompt_tokens.shape
        n = max_new_tokens
        cache = init_cache(model, b, p + n, cache_dtype or model.dtype)
        # prefill: the LM head only at the last prompt slot (left padding: every prompt ends there)
        logits, cache = model.apply(variables, prompt_tokens, attention_mask=prompt_mask, cache=cache,
                                    logits_at=slice(-1, None))
        rng, sub = jax.random.split(rng)
        tok, lp = pick(logits[:, -1], sub)
        done = jnp.isin(tok, eos)
        tokens = jnp.full((b, n), pad_id, jnp.int32).at[:, 0].set(tok)
        logps = jnp.zeros((b, n), jnp.float32).at[:, 0].set(lp)
        mask = jnp.zeros((b, n), jnp.bool_).at[:, 0].set(True)

        def cond(c):
            i, _, _, done, *_ = c
            return (i < n) & ~jnp.all(done)

        def body(c):
            i, cache, prev, done, rng, tokens, logps, mask = c
            logits, cache = model.apply(variables, prev[:, None],
                                        attention_mask=jnp.ones((b, 1), jnp.bool_), cache=cache)
            rng, sub = jax.random.split(rng)
            tok, lp = pick(logits[:, -1], sub)
            live = ~done
            tok = jnp.where(live, tok, pad_id)
            tokens = tokens.at[:, i].set(tok)
            logps = logps.at[:, i].set(jnp.where(live, lp, 0.0))
            mask = mask.at[:, i].set(live)
            done = done | jnp.isin(tok, eos)
            return i + 1, cache, tok, done, rng, tokens, logps, mask

        carry = (jnp.int32(1), cache, tok, done, rng, tokens, logps, mask)
        _, _, _, _, _, tokens, logps, mask = jax.lax.while_loop(cond, body, carry)
        return {"tokens": tokens, "logps": logps, "mask": mask, "lengths": mask.sum(-1)}

    return sample
